"""Deterministic 256x256 crops of the original pixels of a folder of photos: per photo, the PER_PHOTO most
detailed (mean |Laplacian| of the grey crop) of a fixed grid of candidate positions, so that crops of shallow
depth-of-field photos are not defocused blur. The evaluation sets' real crops and the calibration crops alike.

    python scripts/generated/photo_crops.py generated/calib_real generated/calib_crops --per-photo 24 \
        --grid 10x8
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CROP = 256


def detailed_crops(path, per_photo, cols, rows):
    """[(box, PIL crop)] of one photo, most detailed first."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scored = []
    for fy in np.linspace(0.2, 0.8, rows):
        for fx in np.linspace(0.1, 0.9, cols):
            x0, y0 = int(round(fx * (w - CROP))), int(round(fy * (h - CROP)))
            box = (x0, y0, x0 + CROP, y0 + CROP)
            g = np.asarray(im.crop(box).convert("L"), np.float32)
            laplacian = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
            detail = np.abs(laplacian).mean()
            scored.append((-detail, len(scored), box))
    return [(box, im.crop(box)) for _, _, box in sorted(scored)[:per_photo]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos")
    p.add_argument("out")
    p.add_argument("--per-photo", type=int, default=6)
    p.add_argument("--grid", default="5x4", help="candidate positions, COLSxROWS")
    args = p.parse_args()
    cols, rows = map(int, args.grid.split("x"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    n = 0
    for photo in sorted(Path(args.photos).iterdir()):
        for k, (_, crop) in enumerate(detailed_crops(photo, args.per_photo, cols, rows)):
            crop.save(Path(args.out) / f"{photo.stem}_c{k}.png")
            n += 1
    print(f"wrote {n} crops to {args.out}")


if __name__ == "__main__":
    main()
