"""Fake image sets to calibrate and test the detector on, easiest first: noise, smooth images (they pass as
real), edits of real photos. All uint8 [N, 3, H, W], seeded by their own Generator, not the global RNG."""

import math

import numpy as np
import torch
from PIL import Image, ImageFilter

from data import from_pil, jpeg_resave, to_pil


def uniform_noise(n, size, seed):
    """Independent uniform sub-pixels: uint8 [n, 3, size, size], the easiest fake."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def flat_colours(n, size, seed):
    """One random solid colour per image: uint8 [n, 3, size, size]."""
    return uniform_noise(n, 1, seed).expand(n, 3, size, size).contiguous()  # 1x1 noise, stretched


def gradients(n, size, seed, min_contrast=0.25):
    """Two-colour linear ramps at random angles, contrast >= min_contrast: uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    c0, c1 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    angle = (torch.rand(n, generator=g) * 2 * math.pi).view(-1, 1, 1)
    weak = (c1 - c0).abs().amax(dim=1, keepdim=True) < min_contrast  # [n, 1, 1, 1]: would be nearly flat
    c1 = torch.where(weak, torch.where(c0 < 0.5, c0 + 0.5, c0 - 0.5), c1)  # so move c1 half the range away
    px = torch.arange(size, dtype=torch.float32)  # pixel coordinates
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for sl in (slice(start, start + 256) for start in range(0, n, 256)):  # chunks bound the float memory
        t = px * angle[sl].cos() + px.view(-1, 1) * angle[sl].sin()  # [b, size, size]
        lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
        t = ((t - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)  # [b, 1, size, size] in [0, 1]
        out[sl] = ((c0[sl] + (c1[sl] - c0[sl]) * t) * 255).round().clamp(0, 255).to(torch.uint8)
    return out


# ---- derived fakes: edits of real uint8 images [N, 3, H, W], same size out
def blurred(real, sigma=1.5):
    """Gaussian blur of radius ceil(3 sigma), reflect-padded (no dark border)."""
    import torchvision.transforms.v2.functional as TF  # here: torchvision costs every scoring script ~3 s

    r = math.ceil(3 * sigma)
    pad = r if r >= min(real.shape[-2:]) else 0  # too small to reflect the radius: replicate the edge first
    x = torch.nn.functional.pad(real, (pad,) * 4, mode="replicate") if pad else real
    out = torch.cat([TF.gaussian_blur(c, [2 * r + 1] * 2, [sigma] * 2) for c in x.split(256)])  # chunked
    return out[..., pad:out.shape[-2] - pad, pad:out.shape[-1] - pad]


def jpeg(real, quality=10):
    """Each image re-encoded by PIL as a JPEG at `quality` (1..95)."""
    images = [from_pil(jpeg_resave(to_pil(image), quality)) for image in real]
    return torch.stack(images) if images else real.clone()


def splice(real, seed=0):
    """Image i with its top half (rows < H // 2) from image j[i] != i, a seeded derangement; needs N >= 2."""
    n, h = real.shape[0], real.shape[2]
    if n < 2:
        raise ValueError(f"splice needs at least 2 real images to swap halves between, got {n}")
    g, j = torch.Generator().manual_seed(seed), torch.arange(n)
    while (j == torch.arange(n)).any():  # rejection: ~1/e of permutations qualify
        j = torch.randperm(n, generator=g)
    return torch.cat([real[j, :, : h // 2], real[:, :, h // 2:]], dim=2)  # top half from j, bottom half own


_FAKES = {  # name -> (builder(real, n, size, seed), description, made from real images?)
    "noise": (lambda r, *a: uniform_noise(*a), "uniform random pixels (the card's fake set)", False),
    "flat": (lambda r, *a: flat_colours(*a), "one random solid colour per image", False),
    "gradient": (lambda r, *a: gradients(*a), "two-colour linear gradient at a random angle", False),
    "blur": (lambda r, n, s, k: blurred(r), "real image, Gaussian blur sigma 1.5", True),
    "jpeg": (lambda r, n, s, k: jpeg(r), "real image, re-encoded as JPEG quality 10", True),
    "splice": (lambda r, n, s, k: splice(r, k), "real image with its top half from another real image", True),
}
ALL_FAKES = tuple(_FAKES)  # easiest first
DESCRIPTIONS = {name: desc for name, (_, desc, _) in _FAKES.items()}


def make_fake_sets(names, real=None, n=1000, size=128, seed=0):
    """{name: uint8 [N, 3, H, W]}: n synthetic size x size images, or edits of a seeded, ordered subset of
    at most n `real` images. Set i of ALL_FAKES draws from seed + i. ValueError: unknown name, no real."""
    names = [names] if isinstance(names, str) else list(names)
    if unknown := [name for name in names if name not in _FAKES]:
        raise ValueError(f"unknown fake set(s) {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(ALL_FAKES)}")
    if derived := [name for name in names if _FAKES[name][2]]:
        if real is None:
            raise ValueError(f"fake sets {', '.join(derived)} are made from real images: pass real")
        subset = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        real = real[subset.sort().values]
    return {name: _FAKES[name][0](real, n, size, seed + ALL_FAKES.index(name)) for name in names}


# ---- benign processing of real photos: its outputs are REAL, and a detector must pass them
def benign_versions(image, seed=0):
    """uint8 [3, H, W] -> {name in BENIGN: processed copy}: JPEG at a seeded quality 75..95, Lanczos 1/2,
    unsharp mask, and (sides <= 1024 only) bicubic 2x and Lanczos 4x up-scales."""
    pil, (h, w) = to_pil(image), image.shape[-2:]
    versions = {"jpeg75-95": jpeg_resave(pil, np.random.default_rng(seed).integers(75, 96)),
                "down2": pil.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
                "sharpen": pil.filter(ImageFilter.UnsharpMask(radius=1.5, percent=50, threshold=0))}
    if max(w, h) <= 1024:  # 4x stays under 16 MP
        versions.update({"up2-bicubic": pil.resize((2 * w, 2 * h), Image.Resampling.BICUBIC),
                         "up4-lanczos": pil.resize((4 * w, 4 * h), Image.Resampling.LANCZOS)})
    return {name: from_pil(version) for name, version in versions.items()}


BENIGN = ("jpeg75-95", "down2", "sharpen", "up2-bicubic", "up4-lanczos")
BENIGN_DESCRIPTION = "a held-out real photo, benignly processed (fakes.benign_versions): REAL"
