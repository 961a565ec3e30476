"""Pairing rule shared by every super-resolution set (no torch needed: the native-runtime venv uses it too).

real = a 256x256 crop of ORIGINAL pixels of an eval-pool photo (photo_crops.detailed_crops: the 6 most
detailed of a fixed 5x4 grid of positions); fake = that crop downscaled by the network's factor (PIL bicubic,
antialiased) and super-resolved back to 256x256. Both are lossless PNGs of one stem in <set>/real/ and
<set>/fake/, one row per pair in <set>/pairs.csv. Used by make_sr_sets.py and make_sr_ncnn_native.py.
"""
import csv
import os
import shutil
import time
from pathlib import Path

from PIL import Image

from photo_crops import CROP, detailed_crops

PER_PHOTO, COLS, ROWS = 6, 5, 4
HEADER = ['stem', 'source_photo', 'crop_box_x0y0x1y1', 'lr_size', 'fake_size', 'generator']


def eval_crops(photos_dir):
    """[(stem, photo file name, box, PIL crop)] for all eval photos, in a fixed (sorted) order."""
    out = []
    for photo in sorted(Path(photos_dir).iterdir()):
        for k, (box, crop) in enumerate(detailed_crops(photo, PER_PHOTO, COLS, ROWS)):
            out.append((f'{photo.stem}_c{k}', photo.name, box, crop))
    return out


def write_set(set_dir, crops, scale, upscale, generator):
    """Write one set from scratch. upscale: PIL LR image -> PIL RGB image of CROP x CROP."""
    shutil.rmtree(set_dir, ignore_errors=True)
    os.makedirs(f'{set_dir}/real')
    os.makedirs(f'{set_dir}/fake')
    lr_side, t = CROP // scale, time.time()
    with open(f'{set_dir}/pairs.csv', 'w', newline='') as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for stem, src, box, crop in crops:
            sr = upscale(crop.resize((lr_side, lr_side), Image.BICUBIC))
            assert sr.size == crop.size, (sr.size, crop.size)
            crop.save(f'{set_dir}/real/{stem}.png')
            sr.save(f'{set_dir}/fake/{stem}.png')
            w.writerow([stem, src, ' '.join(map(str, box)), f'{lr_side}x{lr_side}', f'{CROP}x{CROP}',
                        generator])
    print(os.path.basename(set_dir), len(crops), 'pairs', round(time.time() - t, 1), 's', flush=True)
