"""Fake image sets to calibrate and evaluate the detector against, easiest first: noise, smooth images
that reconstruct *better* than photos and so pass as real (Nalisnick et al., ICLR 2019), then subtle
edits of real photos. All give uint8 [N, 3, H, W], seeded by their own torch.Generator, never the global RNG.
"""

import io
import math

import numpy as np
import torch
from PIL import Image, ImageFilter

# zlib's default; level 9, measured on 128x128 images, is <= 0.006 bits/dim (~0.1%) shorter but up to 30% slower
PNG_COMPRESS_LEVEL = 6


def uniform_noise(n, size, seed):
    """Independent uniform sub-pixels: the easiest fake (nothing can reconstruct or compress it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def flat_colours(n, size, seed):
    """One random solid colour per image: trivially reconstructed, so it tends to pass as real."""
    return uniform_noise(n, 1, seed).expand(n, 3, size, size).contiguous()  # 1x1 noise, stretched


def gradients(n, size, seed, min_contrast=0.25):
    """Linear ramps from colour c0 at one corner to c1 at the opposite one, at random angles."""
    g = torch.Generator().manual_seed(seed)
    c0, c1 = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    weak = (c1 - c0).abs().amax(dim=1, keepdim=True) < min_contrast  # [n, 1]: would be nearly flat
    c1 = torch.where(weak, torch.where(c0 < 0.5, c0 + 0.5, c0 - 0.5), c1)  # so move c1 half the range away
    px = torch.arange(size, dtype=torch.float32)  # pixel coordinates
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for sl in (slice(start, start + 256) for start in range(0, n, 256)):  # chunks bound the float memory
        t = px * angle[sl].cos().view(-1, 1, 1) + px.view(-1, 1) * angle[sl].sin().view(-1, 1, 1)  # [b, size, size]
        lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
        t = ((t - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)  # [b, 1, size, size] in [0, 1]
        a, b = c0[sl].view(-1, 3, 1, 1), c1[sl].view(-1, 3, 1, 1)
        out[sl] = ((a + (b - a) * t) * 255).round().clamp(0, 255).to(torch.uint8)
    return out


# ---- derived fakes: edits of real uint8 images [N, 3, H, W], same size out
def _check_real(real):
    if not isinstance(real, torch.Tensor) or real.dtype != torch.uint8 or real.dim() != 4 or real.shape[1] != 3:
        raise ValueError(f"expected real images as a uint8 tensor [N, 3, H, W], got "
                         f"{getattr(real, 'dtype', type(real).__name__)} {tuple(getattr(real, 'shape', ()))}")


def blurred(real, sigma=1.5, seed=0):  # seed: unused, so that every generator can be called alike
    """Gaussian blur of radius ceil(3 sigma), reflect-padded (no dark border): removes the texture of photos."""
    _check_real(real)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    # imported here: torchvision's import costs ~3 s of start-up, and every scoring script imports this module
    import torchvision.transforms.v2.functional as TF

    r = math.ceil(3 * sigma)
    pad = r if r >= min(real.shape[-2:]) else 0  # too small to reflect the radius: replicate the edge first
    x = torch.nn.functional.pad(real, (pad,) * 4, mode="replicate") if pad else real
    out = torch.cat([TF.gaussian_blur(c, [2 * r + 1] * 2, [sigma] * 2) for c in x.split(256)])  # chunks bound float memory
    return out[..., pad:out.shape[-2] - pad, pad:out.shape[-1] - pad]


def jpeg(real, quality=10):
    """Each image re-encoded by PIL as a JPEG at `quality`: the 8x8 blocks and ringing of heavy recompression."""
    _check_real(real)
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    out = torch.empty_like(real)
    for i, image in enumerate(real.permute(0, 2, 3, 1).numpy()):  # [H, W, 3] each
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        out[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out


def splice(real, seed=0):
    """Top half (rows < H // 2) of image i from image j[i] != i, j a seeded derangement (so N >= 2): a local edit."""
    _check_real(real)
    n, h = real.shape[0], real.shape[2]
    if n < 2:
        raise ValueError(f"splice needs at least 2 real images to swap halves between, got {n}")
    g, j = torch.Generator().manual_seed(seed), torch.arange(n)
    while (j == torch.arange(n)).any():  # rejection: ~1/e of permutations qualify, e tries on average
        j = torch.randperm(n, generator=g)
    return torch.cat([real[j, :, : h // 2], real[:, :, h // 2:]], dim=2)  # top half from j, bottom half own


_FAKES = {  # name -> (builder(real, n, size, seed), description, made from real images?)
    "noise": (lambda real, n, size, seed: uniform_noise(n, size, seed), "uniform random pixels (the card's fake set)", False),
    "flat": (lambda real, n, size, seed: flat_colours(n, size, seed), "one random solid colour per image", False),
    "gradient": (lambda real, n, size, seed: gradients(n, size, seed), "two-colour linear gradient at a random angle", False),
    "blur": (lambda real, n, size, seed: blurred(real), "real image, Gaussian blur sigma 1.5", True),
    "jpeg": (lambda real, n, size, seed: jpeg(real), "real image, re-encoded as JPEG quality 10", True),
    "splice": (lambda real, n, size, seed: splice(real, seed), "real image with its top half from another real image", True),
}
ALL_FAKES = tuple(_FAKES)  # easiest first
DESCRIPTIONS = {name: desc for name, (_, desc, _) in _FAKES.items()}


def make_fake_sets(names, real=None, n=1000, size=128, seed=0):
    """{name: uint8 [N, 3, H, W]}: synthetic sets of n images of size x size, derived sets edit at most n real
    images (a seeded subset, in order) at their size. Set i of ALL_FAKES draws from seed + i (not all alike)."""
    names = [names] if isinstance(names, str) else list(names)
    if unknown := [name for name in names if name not in _FAKES]:
        raise ValueError(f"unknown fake set(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(ALL_FAKES)}")
    if derived := [name for name in names if _FAKES[name][2]]:
        if real is None:
            raise ValueError(f"fake sets {', '.join(derived)} are made from real images: pass real")
        _check_real(real)
        real = real[torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    return {name: _FAKES[name][0](real, n, size, seed + ALL_FAKES.index(name)) for name in names}


# ---- benign processing: what happens to real photos every day. Its outputs are REAL: a detector must pass them.
def _pil(image):
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _tensor(pil):
    return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()


def benign_versions(image, seed=0):
    """uint8 [3, H, W] at its original resolution -> {name: processed copy}: re-saved as JPEG at a seeded quality
    in 75..95, downscaled by 2 (Lanczos), lightly sharpened (unsharp mask, radius 1.5, 50%), upscaled by plain
    interpolation (bicubic 2x, Lanczos 4x; images up to 1024 pixels on a side, which 4x keeps under 16 MP)."""
    quality = int(np.random.default_rng(seed).integers(75, 96))
    buf, pil = io.BytesIO(), _pil(image)
    pil.save(buf, format="JPEG", quality=quality)
    return {"jpeg75-95": _tensor(Image.open(buf)),
            "down2": _tensor(pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.LANCZOS)),
            "sharpen": _tensor(pil.filter(ImageFilter.UnsharpMask(radius=1.5, percent=50, threshold=0))),
            **({"up2-bicubic": _tensor(pil.resize((2 * pil.width, 2 * pil.height), Image.Resampling.BICUBIC)),
                "up4-lanczos": _tensor(pil.resize((4 * pil.width, 4 * pil.height), Image.Resampling.LANCZOS))}
               if max(pil.size) <= 1024 else {})}


BENIGN = ("jpeg75-95", "down2", "sharpen", "up2-bicubic", "up4-lanczos")
BENIGN_DESCRIPTION = "a held-out real photo, benignly processed (fakes.benign_versions): REAL"


def png_bits(images_uint8):
    """Input complexity (Serra et al., ICLR 2020): bits of each image's PNG file, ~70 bytes of headers included.
    Takes uint8 [N, 3, H, W] or one [3, H, W], numpy or torch; a pure function, so workers can map it."""
    a = np.asarray(images_uint8.detach().cpu() if isinstance(images_uint8, torch.Tensor) else images_uint8)
    a = a[None] if a.ndim == 3 else a
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"png_bits expects uint8 [N, 3, H, W], got {a.dtype} {a.shape}")
    bits = np.empty(a.shape[0], dtype=np.float64)  # [N]
    for i, img in enumerate(a):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        bits[i] = 8 * buf.tell()
    return bits
