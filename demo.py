"""
The whole pipeline, end to end, offline, on a CPU in a few minutes:

    python demo.py --out-dir demo_output

1. trains the smoke model on synthetic dead-leaves images (train.py --preset smoke),
2. writes held-out "real" images (dead leaves from another seed) as PNG files and
   calibrates on them against noise and the hard synthetic sets (calibrate.py),
3. writes an example folder -- real-like images, noise, flat colours, gradients and
   one corrupt file -- and classifies it with heatmaps and a CSV (inference_example.py).

Each step runs the real script as a subprocess, exactly as a user would.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

import fakes
from data import dead_leaves


def save_pngs(images, folder, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images.shape[0]):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{prefix}_{i:04d}.png")


def run(step, args):
    print(f"\n=== {step}: {' '.join(map(str, args))}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)])
    print(f"=== {step} finished in {time.perf_counter() - t0:.1f}s (exit {proc.returncode})", flush=True)
    return proc.returncode


def copy_figures(out, figures):
    figures.mkdir(parents=True, exist_ok=True)
    picks = [out / n for n in ("threshold_calibration.png", "roc_curve.png", "reconstruction_comparison.png")]
    picks.append(out / "model" / "loss_curve.png")
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    picks += [next(p for p in heatmaps if p.name.startswith(k)) for k in ("real_like", "flat")]
    for src in picks:
        name = f"heatmap_{src.name.split('-')[0]}.png" if src.parent.name == "heatmaps" else src.name
        shutil.copyfile(src, figures / name)
    print(f"copied {len(picks)} figures to {figures}/")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="demo_output", help="everything goes here (default: demo_output)")
    p.add_argument("--real-images", type=int, default=1000, help="held-out real images for calibration (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--figures-dir", default=None,
                   help="also copy the plots and two heatmaps here (the README's pictures: --figures-dir docs)")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    t0 = time.perf_counter()

    model_dir = out / "model"
    code = run("1/3 train", ["train.py", "--preset", "smoke", "--dataset", "synthetic", "--out-dir", model_dir,
                             "--seed", args.seed, "--no-progress", "--overwrite"])
    if code:
        raise SystemExit(code)
    checkpoint = model_dir / "model_best_checkpoint.ckpt"

    # real images the model never saw: same generator, another seed
    real_dir = out / "real_heldout"
    save_pngs(dead_leaves(args.real_images, 32, seed=args.seed + 1000), real_dir, "real")
    code = run("2/3 calibrate", ["calibrate.py", "--checkpoint", checkpoint, "--real-dir", real_dir,
                                 "--num-noise", 1000, "--num-hard", 500, "--output", out / "thresholds_calibrated.json",
                                 "--plots-dir", out, "--scores-out", out / "calibration_scores.csv", "--no-progress"])
    if code:
        raise SystemExit(code)

    examples = out / "examples"
    save_pngs(dead_leaves(6, 32, seed=args.seed + 2000), examples, "real_like")
    save_pngs(fakes.uniform_noise(3, 32, seed=1), examples, "noise")
    save_pngs(fakes.flat_colours(3, 32, seed=2), examples, "flat")
    save_pngs(fakes.gradients(3, 32, seed=3), examples, "gradient")
    (examples / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    code = run("3/3 inference", ["inference_example.py", examples, "--checkpoint", checkpoint,
                                 "--thresholds", out / "thresholds_calibrated.json", "--score", "combined",
                                 "--output", out / "results.csv", "--heatmaps", out / "heatmaps"])
    # exit 1 is expected: the corrupt file is reported and skipped
    if code not in (0, 1):
        raise SystemExit(code)

    if args.figures_dir:
        copy_figures(out, Path(args.figures_dir))
    print(f"\nDone in {time.perf_counter() - t0:.0f}s. Everything is in {out}/:")
    for name, what in [("model/", "checkpoints, metrics.jsonl, loss_curve.png, release/ (safetensors)"),
                       ("thresholds_calibrated.json", "thresholds, p-value calibration, AUROC per score and fake set"),
                       ("threshold_calibration.png", "error distributions with thresholds"),
                       ("roc_curve.png", "ROC per score and fake set"),
                       ("reconstruction_comparison.png", "originals / reconstructions / error maps"),
                       ("calibration_scores.csv", "every calibration score"),
                       ("examples/", "the classified example folder"),
                       ("results.csv", "one row per example image"),
                       ("heatmaps/", "original / reconstruction / error map per example")]:
        print(f"  {out / name}  -- {what}")


if __name__ == "__main__":
    main()
