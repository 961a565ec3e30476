"""The scripts' pictures: calibrate.py's histograms, ROC curves and reconstructions; training loss curves."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import metrics
from utils import atomic_write

plt.switch_backend("Agg")  # files only; never needs a display


def save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)


def calibration_plots(report, real, sets, result, autoencoder, shown, plots_dir):
    """calibrate.py's pictures: ROC curves per score, the mse histogram (with an autoencoder) and, given
    shown = (set name per image, score_batch's output with keep_maps), reconstructions."""
    if autoencoder:
        mse_histogram(report, real, sets, plots_dir)
    n = len(result["roc"])
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), sharey=True, squeeze=False)
    for ax, (score, (r, fs)) in zip(axes[0], result["roc"].items()):  # p-value scores come as 1 - p
        for name, f in fs.items():
            ax.plot(*metrics.roc_curve(r, f)[:2], label=f"{name} {metrics.auroc(r, f):.3f}")  # fpr, tpr
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set(title=f"score: {score}", xlabel="FPR (held-out real flagged)")
        ax.legend(title="AUROC", fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("TPR (fakes caught)")
    save(fig, Path(plots_dir) / "roc_curve.png")
    if shown:
        reconstructions(*shown, plots_dir)


def mse_histogram(report, real, sets, plots_dir):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = np.concatenate([real["mse"]] + [s["mse"] for s in sets.values()])
    lo = max(values[values > 0].min(), 1e-8)  # log bins: zero errors fall off the left edge
    bins = np.logspace(np.log10(lo), np.log10(values.max()) + 1e-9, 80)
    ax.hist(real["mse"], bins=bins, alpha=0.6, label=f"real (n={len(real['mse']):,})", color="tab:green")
    for name, s in sets.items():
        ax.hist(s["mse"], bins=bins, alpha=0.45, histtype="stepfilled", label=f"{name} (n={len(s['mse']):,})")
    thresholds = report["reconstruction_thresholds"]["thresholds"]
    for (name, t), style in zip(thresholds.items(), ["-", "--", ":", "-."]):
        ax.axvline(t["value"], color="black", linestyle=style, linewidth=1, label=f"{name} {t['value']:.4g}")
    ax.set(xscale="log", xlabel="reconstruction MSE (log scale)", ylabel="images",
           title="Reconstruction error: real vs fakes, with the mse thresholds")
    ax.legend(fontsize=7, ncol=2)
    save(fig, Path(plots_dir) / "threshold_calibration.png")


def reconstructions(names, out, plots_dir):
    """Originals (as the model saw them), reconstructions and error maps, one column per image."""
    x, maps = out["input"], out["maps"]
    fig, axes = plt.subplots(3, len(x), figsize=(1.9 * len(x), 6), squeeze=False)
    for j, name in enumerate(names):
        for ax, image in zip(axes[:2, j], (x[j], out["recon"][j])):  # normalized: to [S, S, 3] in [0, 1]
            ax.imshow(((image.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
        im = axes[2, j].imshow(maps[j].numpy(), cmap="inferno", vmin=0, vmax=float(maps.max()))
        axes[0, j].set_title(name, fontsize=9)
        axes[2, j].set_xlabel(f"mse {out['mse'][j]:.4f}", fontsize=8)
    plt.setp(axes, xticks=[], yticks=[])
    for row, label in enumerate(["original", "reconstruction", "error map"]):
        axes[row, 0].set_ylabel(label)
    fig.colorbar(im, ax=axes[2, :].tolist(), shrink=0.8, label="squared error")
    save(fig, Path(plots_dir) / "reconstruction_comparison.png")


def loss_curve(history, path):
    """Training and validation loss per epoch (train.py's metrics.jsonl rows), log scale."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="tight")
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], label=label)
    ax.set(yscale="log", xlabel="epoch", ylabel="MSE (inputs in [-1, 1])")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
