"""The artifact detector's evaluation on held-out photos: leave-one-generator-out and leave-one-family-out.

    python scripts/generated/eval_artifact.py generated/pairs --out-dir runs/artifact_eval
    python scripts/generated/eval_artifact.py generated/pairs --out-dir runs/quick --runs all --all-epochs 2

Each run trains `train.py --preset artifact` on pairs/train without its held-out generators (a folder of
links), puts its balanced threshold at the 5% split-conformal level of pairs/calib/real, and scores pairs/test
(photos that neither training nor calibration saw): AUROC with a bootstrap 95% interval per generator, plain,
with both sides JPEG-saved at q90 and q75, and as thumbnails (downscaled 2x, then JPEG q85 or WebP q80); the
test reals flagged at the balanced threshold (Clopper-Pearson interval), also after benign processing. A
JPEG-only control (a detector of "was JPEG-saved") must sit near 0.5 on the aligned pairs: format cannot tell
the classes apart. Writes OUT_DIR/results.json and prints the table.
"""
import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import metrics  # noqa: E402  (the repo's own modules)
from data import from_pil, jpeg_resave, preprocess, tiles_of, to_pil  # noqa: E402
from detector import score_images  # noqa: E402
from model import load_model  # noqa: E402
from photo_crops import detailed_crops  # noqa: E402

# one generator of each family is held out at once; then each family in turn
HELD_OUT = ["realsr_df2k_x4", "span_x4", "realcugan_se_x2", "waifu2x_cunet_denoise1_x1"]


def read(path):
    return from_pil(Image.open(path))


def processed(images, fn):
    return [from_pil(fn(to_pil(im))) for im in images]


def webp(pil, quality=80):
    buf = io.BytesIO()
    pil.save(buf, format="WEBP", quality=quality)
    return Image.open(buf)


def half(pil):
    return pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.LANCZOS)


PROCESSING = {  # what the benign rows do to real test crops (REAL all the same)
    "jpeg75-95": lambda p: jpeg_resave(p, 85), "down0.5": half,
    "sharpen": lambda p: p.filter(ImageFilter.UnsharpMask(radius=1.5, percent=50, threshold=0)),
    "up2-bicubic": lambda p: p.resize((2 * p.width, 2 * p.height), Image.Resampling.BICUBIC),
    "up2-lanczos": lambda p: p.resize((2 * p.width, 2 * p.height), Image.Resampling.LANCZOS),
    "up4-bicubic": lambda p: p.resize((4 * p.width, 4 * p.height), Image.Resampling.BICUBIC),
    "up4-lanczos": lambda p: p.resize((4 * p.width, 4 * p.height), Image.Resampling.LANCZOS)}


# the orthonormal 8-point DCT-II, [u, x]
DCT = torch.tensor([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16)
                     for x in range(8)] for u in range(8)], dtype=torch.float32)
HIGH = (torch.arange(8)[:, None] + torch.arange(8)[None]) >= 6  # the high frequencies that JPEG zeroes first


def jpeg_grid(images):
    """The JPEG-only control, a detector of "was JPEG-saved" and of nothing else: the share of near-zero
    high-frequency DCT coefficients of the 8x8 blocks on the grid, over the same share for blocks shifted by 4
    pixels. JPEG zeroes them on its grid only; without a JPEG history the two grids are alike, whatever the
    content, and a 2x or 4x up-sampler's period (2 or 4 pixels) looks the same from both."""
    out = []
    for im in images:
        g = im.float().mean(0)
        share = []
        for o in (8, 12):  # the outer 8 pixels are left out: a network's padding marks its borders
            h, w = (g.shape[0] - 20) // 8 * 8, (g.shape[1] - 20) // 8 * 8
            blocks = g[o:o + h, o:o + w].reshape(h // 8, 8, w // 8, 8).permute(0, 2, 1, 3)  # [by, bx, 8, 8]
            coef = DCT @ blocks @ DCT.T
            share.append(float((coef[..., HIGH].abs() < 1.0).float().mean()) + 1e-3)
        out.append(share[0] / share[1])
    return np.array(out)


@torch.no_grad()
def max_tile_logit(detector, images):
    """Each image's largest tile logit (the shipped score takes the mean)."""
    size = detector.config.image_size
    return np.array([detector(preprocess(tiles_of(im, size), size)).max().item() for im in images])


def auroc_ci(real, fake):
    return [metrics.auroc(real, fake), *metrics.bootstrap_ci(metrics.auroc, real, fake, n_boot=200)]


def train(pairs, generators, out, epochs):
    """Trains the preset on pairs/train of `generators` only (a folder of links); returns its release."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ["real", *generators]:
        if not (data / name).exists():
            (data / name).symlink_to((pairs / "train" / name).resolve())
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "artifact", "--data-dir", str(data),
           "--out-dir", str(out / "run"), "--no-progress", "--overwrite",
           *(["--epochs", str(epochs)] if epochs else [])]
    subprocess.run(cmd, check=True)
    return out / "run" / "release"


def native_crops(photos):
    """Crops of the photos' ORIGINAL pixels (JPEG grid, demosaicing, the camera's own processing): real photos
    as users have them, unlike the downscaled crops of the pairs. The sr_* sets' real crops: 6 per photo."""
    return [from_pil(c) for p in sorted(Path(photos).iterdir()) for _, c in detailed_crops(p, 6, 5, 4)]


def evaluate(detector, pairs, generators):
    score = lambda images: score_images(None, images, artifact=detector)["artifact"]
    variants = {"plain": None, "jpeg90": lambda p: jpeg_resave(p, 90), "jpeg75": lambda p: jpeg_resave(p, 75),
                "thumb_jpeg": lambda p: jpeg_resave(half(p), 85), "thumb_webp": lambda p: webp(half(p))}
    stems = sorted(p.name for p in (pairs / "test" / "real").glob("*.png"))
    real = [read(pairs / "test" / "real" / s) for s in stems]
    cal = np.sort(score([read(p) for p in sorted((pairs / "calib" / "real").glob("*.png"))]))
    balanced = metrics.conformal_threshold(cal, 0.05)
    flagged_share = lambda images: float(np.mean(score(images) > balanced))
    real_s = score(real)
    flagged = int(np.sum(real_s > balanced))
    row = {"balanced_threshold": balanced, "n_calibration": len(cal),
           "real_fpr": [flagged / len(real_s), *metrics.clopper_pearson(flagged, len(real_s))],
           "benign_fpr": {n: flagged_share(processed(real, fn)) for n, fn in PROCESSING.items()},
           "native_fpr": flagged_share(native_crops(pairs.parent / "eval_photos_src")),
           # the control must see JPEG where there is some: the test reals against themselves saved at q90
           "jpeg_control_on_jpeg90": metrics.auroc(jpeg_grid(real),
                                                   jpeg_grid(processed(real, variants["jpeg90"]))),
           "generators": {}}
    real_v = {v: real_s if fn is None else score(processed(real, fn)) for v, fn in variants.items()}
    for g in generators:
        fake = [read(pairs / "test" / g / s) for s in stems]
        res = {v: auroc_ci(real_v[v], score(fake if fn is None else processed(fake, fn)))
               for v, fn in variants.items()}
        res["tpr_balanced"] = flagged_share(fake)
        res["max_tile_auroc"] = metrics.auroc(max_tile_logit(detector, real), max_tile_logit(detector, fake))
        res["jpeg_control"] = metrics.auroc(jpeg_grid(real), jpeg_grid(fake))
        row["generators"][g] = res
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("runs/artifact_eval"))
    p.add_argument("--runs", default="all,heldout,families", help="which runs: all, heldout, families")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the held-out runs")
    p.add_argument("--all-epochs", type=int, default=0, help="epochs of the run on all (0: the preset's)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    with open(args.pairs / "generators.csv") as fh:
        family = {r["generator"]: r["family"] for r in csv.DictReader(fh)}
    gens = sorted(g for g in family if (args.pairs / "train" / g).is_dir())
    runs = {}
    if "all" in args.runs:
        runs["all"] = gens, gens
    if "heldout" in args.runs:
        runs["heldout_generators"] = ([g for g in gens if g not in HELD_OUT],
                                      [g for g in HELD_OUT if g in gens])
    if "families" in args.runs:
        for f in sorted(set(family[g] for g in gens)):
            runs[f"heldout_family_{f}"] = ([g for g in gens if family[g] != f],
                                           [g for g in gens if family[g] == f])
    results_path, results = args.out_dir / "results.json", {}
    if results_path.is_file():
        results = json.loads(results_path.read_text())
    for name, (train_on, test_on) in runs.items():
        epochs = args.all_epochs if name == "all" else args.epochs
        release = train(args.pairs, train_on, args.out_dir / name, epochs)
        results[name] = {"trained_on": train_on, **evaluate(load_model(release).eval(), args.pairs, test_on)}
        results_path.write_text(json.dumps(results, indent=1))
        print_table(results, family)


def print_table(results, family):
    print("| run | generator (family) | AUROC [95% CI] | max-tile AUROC | JPEG q90 | JPEG q75 "
          "| thumbnail JPEG / WebP | TPR at balanced | JPEG-only control |\n" + "|---" * 9 + "|")
    for name, r in results.items():
        for g, m in r["generators"].items():
            print(f"| {name} | {g} ({family[g]}) | {m['plain'][0]:.3f} [{m['plain'][1]:.2f}, "
                  f"{m['plain'][2]:.2f}] | {m['max_tile_auroc']:.3f} | {m['jpeg90'][0]:.3f} | "
                  f"{m['jpeg75'][0]:.3f} | {m['thumb_jpeg'][0]:.3f} / {m['thumb_webp'][0]:.3f} | "
                  f"{m['tpr_balanced']:.1%} | {m['jpeg_control']:.3f} |")
    for name, r in results.items():
        fpr = r["real_fpr"]
        print(f"{name}: test reals flagged at balanced {fpr[0]:.1%} [{fpr[1]:.1%}, {fpr[2]:.1%}]; "
              f"native-pixel crops of the test photos {r['native_fpr']:.1%}; JPEG-only control on real vs "
              f"JPEG q90 {r.get('jpeg_control_on_jpeg90', float('nan')):.3f}; benign: "
              + ", ".join(f"{k} {v:.1%}" for k, v in r["benign_fpr"].items()))


if __name__ == "__main__":
    main()
