"""The whole pipeline, end to end, offline, on a CPU in a few minutes:

    python demo.py --out-dir demo_output

trains the smoke model on synthetic dead leaves (train.py), calibrates it on held-out ones (calibrate.py)
and classifies an example folder -- real-like images, noise, flat colours, gradients and one corrupt
file -- (inference_example.py), running each script as a user would. It writes:
  model/                         checkpoints, metrics.jsonl, loss_curve.png, release/ (safetensors)
  thresholds_calibrated.json     thresholds, p-value calibration, AUROC per score and fake set
  threshold_calibration.png      error distributions with thresholds
  roc_curve.png                  ROC per score and fake set
  reconstruction_comparison.png  originals / reconstructions / error maps
  calibration_scores.csv         every calibration score
  examples/                      the classified example folder
  results.csv                    one row per example image"""

import subprocess
import sys
import time
from pathlib import Path

import fakes
from data import dead_leaves, to_pil
from utils import ArgumentParser, number


def save_pngs(folder, **sets):  # prefix=uint8 images [N, 3, H, W] -> folder/prefix_0000.png, ...
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, images in sets.items():
        for i, image in enumerate(images):
            to_pil(image).save(folder / f"{prefix}_{i:04d}.png")


def run(step, args, ok=(0,)):
    print(f"\n=== {step}: {' '.join(map(str, args))}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, *map(str, args)]).returncode
    print(f"=== {step} finished in {time.perf_counter() - t0:.1f}s (exit {code})", flush=True)
    if code not in ok:
        raise SystemExit(code)


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--out-dir", default="demo_output", help="everything goes here")
    add("--real-images", type=number(int, 200), default=1000, help="held-out real images for calibration")
    add("--seed", type=int, default=0, help="seed of training and of the generated images")
    args = p.parse_args(argv)
    out, t0 = Path(args.out_dir), time.perf_counter()
    checkpoint, thresholds = out / "model" / "model_best_checkpoint.ckpt", out / "thresholds_calibrated.json"
    run("1/3 train", ["train.py", "--preset", "smoke", "--dataset", "synthetic", "--out-dir", out / "model",
                      "--seed", args.seed, "--no-progress", "--overwrite"])
    # real images the model never saw: same generator, another seed
    save_pngs(out / "real_heldout", real=dead_leaves(args.real_images, 32, seed=args.seed + 1000))
    run("2/3 calibrate", ["calibrate.py", "--checkpoint", checkpoint, "--real-dir", out / "real_heldout",
                          "--num-noise", 1000, "--num-hard", 500, "--output", thresholds, "--plots-dir", out,
                          "--scores-out", out / "calibration_scores.csv", "--no-progress"])
    save_pngs(out / "examples", real_like=dead_leaves(6, 32, seed=args.seed + 2000),
              noise=fakes.uniform_noise(3, 32, seed=1), flat=fakes.flat_colours(3, 32, seed=2),
              gradient=fakes.gradients(3, 32, seed=3))
    (out / "examples" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    run("3/3 inference", ["inference_example.py", out / "examples", "--checkpoint", checkpoint,
                          "--thresholds", thresholds, "--score", "mse", "--output", out / "results.csv"],
        ok=(0, 1))  # 1: the corrupt file, reported
    written = __doc__.split("It writes:")[1]
    print(f"\nDone in {time.perf_counter() - t0:.0f}s. Everything is in {out}/:{written}")


if __name__ == "__main__":
    main()
