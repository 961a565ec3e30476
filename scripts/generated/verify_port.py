"""Checks the PyTorch port of the UpscalerJS TF.js models (tfjs_keras_torch.py) against pure @tensorflow/tfjs
(CPU backend, custom layers registered by the package's own code; tfjs_ref.js) on a real 24x24 image patch,
for every model the sets use plus a few siblings. Exits 1 if any output differs by >= 0.05 grey levels.

    python scripts/generated/verify_port.py OUT_DIR [PHOTO]

PHOTO defaults to OUT_DIR/eval_photos_src/skimage_astronaut.png.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from tfjs_keras_torch import KerasGraph

torch.set_num_threads(1)
TOL = 0.05  # grey levels (0..255); the port agrees to < 0.0005 in practice
# (package, model.json, input range): RDN models take 0..255, RRDN models 0..1, as the packages declare
MODELS = [('esrgan-slim', 'models/x4/model.json', 255), ('esrgan-medium', 'models/x2/model.json', 255),
          ('esrgan-thick', 'models/x4/model.json', 1), ('esrgan-legacy', 'models/gans/model.json', 1),
          ('default-model', 'models/model.json', 255), ('esrgan-thick', 'models/x2/model.json', 1),
          ('esrgan-medium', 'models/x4/model.json', 255),
          ('esrgan-legacy', 'models/div2k/x2/model.json', 255)]


def max_diff(out, pkg, rel, rng, patch):
    """Max |tfjs - port| in grey levels for one model on an HxWx3 uint8-valued float patch."""
    pkg_dir = f'{os.path.abspath(out)}/node_modules/@upscalerjs/{pkg}'
    x = (patch / 255.0 * rng).astype(np.float32)
    h, w = x.shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        x.tofile(f'{tmp}/in.f32')
        js = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tfjs_ref.js')
        env = dict(os.environ, NODE_PATH=os.path.abspath(f'{out}/node_modules'))
        # output captured: tfjs prints a banner on every run; shown only if the reference run fails
        r = subprocess.run(['node', js, pkg_dir, rel, f'{tmp}/in.f32', str(h), str(w), f'{tmp}/out.f32'],
                           env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f'tfjs reference failed for {pkg}/{rel}:\n{r.stdout}{r.stderr}')
        ref = np.fromfile(f'{tmp}/out.f32', dtype=np.float32)
    port = KerasGraph(f'{pkg_dir}/{rel}')(torch.from_numpy(x[None].copy())).numpy().ravel()
    return np.abs(ref - port).max() / rng * 255


def main(out, photo):
    patch = np.asarray(Image.open(photo).convert('RGB'))[100:124, 100:124].astype(np.float32)
    ok = True
    for pkg, rel, rng in MODELS:
        d = max_diff(out, pkg, rel, rng, patch)
        print(f'{pkg}/{rel}: max abs diff = {d:.5f} grey levels', flush=True)
        ok &= d < TOL
    print('PORT OK' if ok else 'PORT MISMATCH')
    return ok


if __name__ == '__main__':
    out = sys.argv[1] if len(sys.argv) > 1 else 'generated'
    photo = sys.argv[2] if len(sys.argv) > 2 else f'{out}/eval_photos_src/skimage_astronaut.png'
    sys.exit(0 if main(out, photo) else 1)
