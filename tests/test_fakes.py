import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import data
import fakes

SYNTHETIC = [fakes.uniform_noise, fakes.flat_colours, fakes.gradients]


def photos(size):
    """Three real photographs shipped inside scikit-image, as uint8 [3, 3, size, size]."""
    imgs = [np.asarray(Image.fromarray(f()).resize((size, size), Image.BILINEAR))
            for f in (skdata.astronaut, skdata.chelsea, skdata.coffee)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def real64():
    return photos(64)


def high_freq_energy(x):
    """Mean squared difference between neighbouring pixels, per image."""
    x = x.float()
    return ((x[..., 1:] - x[..., :-1]) ** 2).mean(dim=(1, 2, 3)) + ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean(dim=(1, 2, 3))


def psnr(a, b):
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255 ** 2 / mse)


# ----------------------------------------------------------------------------
# synthetic sets

@pytest.mark.parametrize("gen", SYNTHETIC)
def test_synthetic_shapes_and_dtype(gen):
    x = gen(5, 24, 0)
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.uint8
    assert data.preprocess(x, 32).shape == (5, 3, 32, 32)  # the shared path accepts them


@pytest.mark.parametrize("gen", SYNTHETIC)
def test_synthetic_determinism(gen):
    torch.manual_seed(123)
    a = gen(6, 16, 7)
    torch.manual_seed(456)  # the global RNG must not matter
    b = gen(6, 16, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, gen(6, 16, 8))


def test_flat_images_have_one_colour_each():
    x = fakes.flat_colours(20, 16, 0)
    assert (x == x[:, :, :1, :1]).all()
    assert len({tuple(c) for c in x[:, :, 0, 0].tolist()}) > 1  # but not all the same colour


@pytest.mark.parametrize("size", [32, 128])
def test_gradients_are_smooth_and_not_flat(size):
    x = fakes.gradients(50, size, 3).int()
    dx = (x[..., 1:] - x[..., :-1]).abs().amax()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax()
    # the ramp spans at least size - 1 pixels, so a step is at most 255 / (size - 1), plus rounding
    assert max(dx, dy) <= 255 / (size - 1) + 1
    # each image spans a real contrast: at least min_contrast of the range in some channel
    span = (x.amax(dim=(2, 3)) - x.amin(dim=(2, 3))).amax(dim=1)
    assert (span >= 0.25 * 255 - 1).all()
    # and the directions vary: not every image is a horizontal ramp
    assert ((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().amax(dim=(1, 2, 3)) > 0).any()


def test_noise_is_uniform_ish():
    x = fakes.uniform_noise(4, 64, 0).float()
    assert abs(x.mean().item() - 127.5) < 2 and x.min() == 0 and x.max() == 255


# ----------------------------------------------------------------------------
# sets derived from real images

def test_blur_lowers_high_frequencies(real64):
    b = fakes.blurred(real64, sigma=1.5)
    assert b.shape == real64.shape and b.dtype == torch.uint8
    assert (high_freq_energy(b) < 0.5 * high_freq_energy(real64)).all()
    assert torch.equal(b, fakes.blurred(real64, sigma=1.5))


def test_blur_keeps_size_and_constant_images():
    const = torch.full((2, 3, 9, 13), 77, dtype=torch.uint8)  # non-square, kernel radius 5 < 9
    assert torch.equal(fakes.blurred(const), const)  # normalized kernel, reflect padding: no dark border
    tiny = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)  # too small to reflect radius 5
    assert torch.equal(fakes.blurred(tiny), tiny)


def test_blur_matches_a_direct_2d_convolution(real64):
    # an 11x11 Gaussian of sigma 1.5 (radius ceil(3 sigma) = 5), built here in 2-D and normalized
    x = torch.arange(-5, 6, dtype=torch.float64)
    k = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    k = (k / k.sum()).expand(3, 1, 11, 11)
    ref = torch.nn.functional.conv2d(real64.double(), k, groups=3)  # no padding: the interior only
    got = fakes.blurred(real64, sigma=1.5).double()
    assert (got[..., 5:-5, 5:-5] - ref).abs().max() <= 1  # rounding only
    # and the border is reflected, not zero-padded (which would darken it)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(real64.double(), (5,) * 4, mode="reflect"), k, groups=3)
    assert (got - ref).abs().max() <= 1


def test_jpeg_differs_but_stays_close(real64):
    j = fakes.jpeg(real64, quality=10)
    assert j.shape == real64.shape and j.dtype == torch.uint8
    assert not torch.equal(j, real64)
    p = psnr(j, real64)
    assert ((p > 18) & (p < 35)).all(), p  # q=10 on 64x64 photos measures 21.6-25.6 dB
    assert (psnr(fakes.jpeg(real64, quality=90), real64) > p).all()  # higher quality, closer
    assert torch.equal(j, fakes.jpeg(real64, quality=10))
    assert fakes.jpeg(real64[:0]).shape == (0, 3, 64, 64)


def test_splice_swaps_top_halves(real64):
    real = torch.cat([real64, real64.flip(-1), real64.flip(-2)])  # 9 distinct images
    out = fakes.splice(real, seed=5)
    h = real.shape[2] // 2
    assert out.shape == real.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, :, h:], real[:, :, h:])  # bottom half untouched
    for i in range(len(real)):
        sources = [j for j in range(len(real)) if torch.equal(out[i, :, :h], real[j, :, :h])]
        assert sources and i not in sources  # top half from another image, never itself
    assert torch.equal(out, fakes.splice(real, seed=5))
    assert not torch.equal(out, fakes.splice(real, seed=6))


def test_splice_needs_two_images(real64):
    with pytest.raises(ValueError):
        fakes.splice(real64[:1])
    out = fakes.splice(real64[:2])  # the only derangement of two swaps them
    assert torch.equal(out[0, :, :32], real64[1, :, :32]) and torch.equal(out[1, :, :32], real64[0, :, :32])


def test_splice_never_takes_an_images_own_half():
    real = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous()  # image i is all i
    for seed in range(20):
        j = fakes.splice(real, seed)[:, 0, 0, 0]  # where each top half came from
        assert sorted(j.tolist()) == list(range(5)) and not (j == torch.arange(5)).any()


# ----------------------------------------------------------------------------
# the registry

def test_make_fake_sets_names_and_counts(real64):
    real = torch.cat([real64] * 3)  # 9 images of 64x64
    sets = fakes.make_fake_sets(fakes.ALL_FAKES, real=real, n=4, size=32, seed=0)
    assert list(sets) == list(fakes.ALL_FAKES)
    for name, x in sets.items():
        assert x.dtype == torch.uint8
        if name in ("blur", "jpeg", "splice"):
            assert x.shape == (4, 3, 64, 64)  # at most n, at the real images' size
        else:
            assert x.shape == (4, 3, 32, 32)
    few = fakes.make_fake_sets(["blur"], real=real64, n=100, size=32)
    assert few["blur"].shape == (3, 3, 64, 64)  # fewer real images than n: all of them
    again = fakes.make_fake_sets(fakes.ALL_FAKES, real=real, n=4, size=32, seed=0)
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    assert fakes.ALL_FAKES == ("noise", "flat", "gradient", "blur", "jpeg", "splice")
    assert set(fakes.DESCRIPTIONS) == set(fakes.ALL_FAKES)


def test_make_fake_sets_seeding(real64):
    # each set draws from seed + its index in ALL_FAKES; derived sets edit a seeded subset in order
    real = torch.cat([real64, real64.flip(-1), real64.flip(-2)])
    sets = fakes.make_fake_sets(fakes.ALL_FAKES, real=real, n=4, size=16, seed=10)
    assert torch.equal(sets["noise"], fakes.uniform_noise(4, 16, 10))
    assert torch.equal(sets["flat"], fakes.flat_colours(4, 16, 11))
    assert torch.equal(sets["gradient"], fakes.gradients(4, 16, 12))
    subset = real[torch.randperm(9, generator=torch.Generator().manual_seed(10))[:4].sort().values]
    assert torch.equal(sets["blur"], fakes.blurred(subset))
    assert torch.equal(sets["jpeg"], fakes.jpeg(subset))
    assert torch.equal(sets["splice"], fakes.splice(subset, seed=15))
    assert torch.equal(fakes.make_fake_sets("flat", n=4, size=16, seed=10)["flat"], sets["flat"])  # one name as a str


def test_make_fake_sets_rejects_bad_input(real64):
    with pytest.raises(ValueError, match="valid names: noise, flat"):
        fakes.make_fake_sets(["noise", "stylegan"], real=real64, n=2, size=16)
    with pytest.raises(ValueError, match="real"):
        fakes.make_fake_sets(["splice"], real=None, n=2, size=16)
    with pytest.raises(ValueError):
        fakes.make_fake_sets(["splice"], real=real64, n=1, size=16)  # one image cannot be spliced
