"""
The pictures calibrate.py writes: error distributions with the thresholds, ROC
curves per score and fake set, and originals over reconstructions over error maps.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import metrics  # noqa: E402
from data import preprocess  # noqa: E402
from detector import score_batch  # noqa: E402
from model import atomic_write  # noqa: E402


def save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)


def threshold_plot(report, real, sets, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = [real["mse"]] + [s["mse"] for s in sets.values()]
    lo = max(min(v[v > 0].min() for v in values if (v > 0).any()), 1e-8)
    bins = np.logspace(np.log10(lo), np.log10(max(v.max() for v in values)) + 1e-9, 80)
    ax.hist(real["mse"], bins=bins, alpha=0.6, label=f"real (n={len(real['mse']):,})", color="tab:green")
    for name, s in sets.items():
        ax.hist(s["mse"], bins=bins, alpha=0.45, histtype="stepfilled", label=f"{name} (n={len(s['mse']):,})")
    for (name, t), style in zip(report["reconstruction_thresholds"]["thresholds"].items(), ["-", "--", ":", "-."]):
        ax.axvline(t["value"], color="black", linestyle=style, linewidth=1, label=f"{name} {t['value']:.4g}")
    ax.set_xscale("log")
    ax.set_xlabel("reconstruction MSE (log scale)")
    ax.set_ylabel("images")
    ax.set_title("Reconstruction error: real vs fakes, with the mse thresholds")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def roc_plot(real, sets, result, path):
    held = result["held_idx"]
    panels = [(s, real[s][held], {n: v[s] for n, v in sets.items()}) for s in ("mse", "local", "complexity")]
    panels.append(("combined", 1 - result["held_p"], {n: 1 - p for n, p in result["fake_p"].items()}))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    for ax, (score, r, fs) in zip(axes, panels):
        for name, f in fs.items():
            fpr, tpr, _ = metrics.roc_curve(r, f)
            ax.plot(fpr, tpr, label=f"{name} {metrics.auroc(r, f):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_title(f"score: {score}")
        ax.set_xlabel("FPR (held-out real flagged)")
        ax.legend(title="AUROC", fontsize=7, loc="lower right")
    axes[0].set_ylabel("TPR (fakes caught)")
    save(fig, path)


def to_image(x):
    """normalized [3, S, S] -> [S, S, 3] in [0, 1] for imshow."""
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def comparison_plot(model, samples, path):
    names, images = [], []
    for name, batch in samples.items():
        for i in range(batch.shape[0]):
            names.append(name)
            images.append(preprocess(batch[i], model.config.image_size))
    device = next(model.parameters()).device
    x = torch.cat(images).to(device)
    out = score_batch(model, x, keep_maps=True)
    n = len(names)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6), squeeze=False)
    vmax = float(out["maps"].max())
    for j in range(n):
        axes[0, j].imshow(to_image(x[j].cpu()))
        axes[0, j].set_title(names[j], fontsize=9)
        axes[1, j].imshow(to_image(out["recon"][j]))
        im = axes[2, j].imshow(out["maps"][j].numpy(), cmap="inferno", vmin=0, vmax=vmax)
        axes[2, j].set_xlabel(f"mse {out['mse'][j]:.4f}", fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, label in enumerate(["original", "reconstruction", "error map"]):
        axes[row, 0].set_ylabel(label)
    fig.colorbar(im, ax=axes[2, :].tolist(), shrink=0.8, label="squared error")
    save(fig, path)


def calibration_plots(report, real, sets, result, model, samples, plots_dir):
    plots_dir = Path(plots_dir)
    threshold_plot(report, real, sets, plots_dir / "threshold_calibration.png")
    roc_plot(real, sets, result, plots_dir / "roc_curve.png")
    if samples:
        comparison_plot(model, samples, plots_dir / "reconstruction_comparison.png")
