"""
The built-in "fake" image sets a reconstruction detector is calibrated and evaluated
against, and the compression-based input complexity of Serra et al. (ICLR 2020).

Every generator returns uint8 [N, 3, H, W], the format of data.dead_leaves and
data.load_cifar10: `data.preprocess` turns them into model inputs later, so nothing
here normalizes or resizes to the model's size. Every generator is deterministic
for a given seed (its own torch.Generator, never the global RNG).

Why more than noise (see FIELD.md): the card calibrates on uniform noise, which any
autoencoder separates. The known failure runs the other way: smooth, low-complexity
inputs reconstruct *better* than the training data and pass as real (Nalisnick et
al., ICLR 2019; Serra et al., ICLR 2020). So the sets run from that easiest fake
(noise) through low-complexity synthetic images (flat, gradient) to subtle edits
of real photos (blur, jpeg, splice).

    import data, fakes
    sets = fakes.make_fake_sets(fakes.ALL_FAKES, real=test_images, n=1000, size=128, seed=0)
    x = data.preprocess(sets["gradient"], 128)
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# zlib level for png_bits. Measured on 128x128 RGB images (one CPU core, Pillow 13):
#   level 6: 2.4 ms/image (dead leaves), 3.2 ms (photos), 1.5 ms (noise)
#   level 9: 2.4 ms/image (dead leaves), 4.1 ms (photos), 1.6 ms (noise)
# and the code lengths differ by at most 0.006 bits/dim (4.865 vs 4.859 on photos,
# identical on dead leaves and noise). Level 9 buys ~0.1% shorter codes for up to
# 30% more time, so 6 (zlib's own default) it is.
PNG_COMPRESS_LEVEL = 6


# ----------------------------------------------------------------------------
# synthetic fakes: n images of size x size, no real images needed

def uniform_noise(n, size, seed):
    """Uniform random pixels: the card's fake set, and the easiest one to catch.

    Each sub-pixel is independent and uniform on 0..255, so no autoencoder trained on
    photos can reconstruct it (and PNG cannot compress it: ~8 bits per dim).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def flat_colours(n, size, seed):
    """Each image one random solid RGB colour: the lowest-complexity input there is.

    A detector that scores by reconstruction error tends to call these real (they are
    trivially reconstructed), which is the failure mode an honest report must show.
    """
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.uint8)
    return colours.expand(n, 3, size, size).contiguous()


def gradients(n, size, seed, min_contrast=0.25):
    """Two-colour linear gradients at random angles: smooth, low complexity, not flat.

    The ramp runs from colour c0 at one corner of the image to c1 at the opposite one
    along a random direction, so every image spans its full two-colour range. Where
    two random colours happen to be close (largest channel difference < min_contrast
    of the range), c1 is moved half the range away in every channel so that no image
    degenerates into a flat one.
    """
    g = torch.Generator().manual_seed(seed)
    c0 = torch.rand(n, 3, generator=g)
    c1 = torch.rand(n, 3, generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    weak = (c1 - c0).abs().amax(dim=1) < min_contrast
    c1 = torch.where(weak[:, None], torch.where(c0 < 0.5, c0 + 0.5, c0 - 0.5), c1)

    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [size, size]
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    chunk = 256  # bounds memory at ~3 floats per pixel per image in flight
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        cos, sin = angle[sl].cos().view(-1, 1, 1), angle[sl].sin().view(-1, 1, 1)
        t = xx * cos + yy * sin  # [b, size, size], position along the ramp direction
        lo = t.amin(dim=(1, 2), keepdim=True)
        hi = t.amax(dim=(1, 2), keepdim=True)
        t = ((t - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)  # [b, 1, size, size] in [0, 1]
        a, b = c0[sl].view(-1, 3, 1, 1), c1[sl].view(-1, 3, 1, 1)
        out[sl] = ((a + (b - a) * t) * 255).round().clamp(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------
# derived fakes: edits of given real uint8 images [N, 3, H, W], same size out

def _check_real(real):
    if not isinstance(real, torch.Tensor) or real.dtype != torch.uint8 or real.dim() != 4 or real.shape[1] != 3:
        shape = tuple(real.shape) if hasattr(real, "shape") else type(real).__name__
        raise ValueError(f"expected real images as a uint8 tensor [N, 3, H, W], got {shape} "
                         f"{getattr(real, 'dtype', '')}".rstrip())


def gaussian_kernel(sigma):
    """Normalized 1-D Gaussian of radius ceil(3 sigma) (covers 99.7% of the mass)."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blurred(real, sigma=1.5, seed=0):
    """Gaussian blur of real images: removes the fine texture a photo-trained model expects.

    Separable convolution (rows, then columns) with reflect padding, so borders are not
    darkened; replicate padding stands in where an image is too small to reflect the
    kernel radius. Deterministic; `seed` is unused and accepted so every generator can
    be called alike.
    """
    _check_real(real)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    n, _, h, w = real.shape
    mode = "reflect" if r < min(h, w) else "replicate"
    kx = k.view(1, 1, 1, -1).expand(3, 1, 1, len(k))  # one depthwise kernel per channel
    ky = k.view(1, 1, -1, 1).expand(3, 1, len(k), 1)
    out = torch.empty_like(real)
    chunk = max(1, 2 ** 22 // (h * w))  # ~48 MB of floats per chunk whatever the image size
    for start in range(0, n, chunk):
        x = real[start:start + chunk].float()
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kx, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), ky, groups=3)
        out[start:start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def jpeg(real, quality=10):
    """Each real image re-encoded as a JPEG at `quality` by PIL and decoded back.

    Low quality leaves 8x8 block edges and ringing, the artefacts of heavy
    recompression (PIL's default 4:2:0 chroma subsampling applies). Same size out.
    """
    _check_real(real)
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    pixels = real.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, 3] for PIL
    out = np.empty_like(pixels)
    for i, a in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def derangement(n, seed):
    """A uniformly random permutation of range(n) with no fixed points (n >= 2).

    Rejection sampling: a random permutation is a derangement with probability ~1/e,
    so this takes e tries on average, and is deterministic for a given seed.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == idx).any():
            return perm


def splice(real, seed=0):
    """Top half of image i replaced by the top half of another image j (j != i).

    A proxy for a manipulation confined to a region (inpainting, a face swap, a pasted
    object): half of every image is untouched real content, so a detector that
    averages error over the whole image sees only part of the evidence. The cut is a
    horizontal seam at the middle row (rows [0, H // 2) come from j); the hard seam
    is itself an edge a careful forger would blend away. j is a seeded derangement,
    so no image is spliced with itself. Requires N >= 2 (ValueError otherwise).
    """
    _check_real(real)
    n, _, h, _ = real.shape
    if n < 2:
        raise ValueError(f"splice needs at least 2 real images to swap halves between, got {n}")
    j = derangement(n, seed)
    out = real.clone()
    out[:, :, : h // 2] = real[j, :, : h // 2]
    return out


# ----------------------------------------------------------------------------
# the registry

# name -> builder(real, n, size, seed); synthetic sets ignore `real`, derived ones
# ignore `n` and `size` (make_fake_sets has already taken at most n real images).
HARD_FAKES = {
    "noise": lambda real, n, size, seed: uniform_noise(n, size, seed),
    "flat": lambda real, n, size, seed: flat_colours(n, size, seed),
    "gradient": lambda real, n, size, seed: gradients(n, size, seed),
    "blur": lambda real, n, size, seed: blurred(real, seed=seed),
    "jpeg": lambda real, n, size, seed: jpeg(real),
    "splice": lambda real, n, size, seed: splice(real, seed=seed),
}
DESCRIPTIONS = {
    "noise": "uniform random pixels (the card's fake set)",
    "flat": "one random solid colour per image",
    "gradient": "two-colour linear gradient at a random angle",
    "blur": "real image, Gaussian blur sigma 1.5",
    "jpeg": "real image, re-encoded as JPEG quality 10",
    "splice": "real image with its top half from another real image",
}
DERIVED_FAKES = ("blur", "jpeg", "splice")  # the sets made from real images
DEFAULT_FAKES = ("noise",)  # the card's
# easiest first: noise, then the low-complexity synthetic sets, then edits of real photos
ALL_FAKES = ("noise", "flat", "gradient", "blur", "jpeg", "splice")


def make_fake_sets(names, real=None, n=1000, size=128, seed=0):
    """Builds {name: uint8 [N, 3, H, W]} for the named fake sets, in the order given.

    Synthetic sets are n images of size x size. Derived sets are edits of at most n
    of the `real` images (a seeded random subset, in original order, when there are
    more), kept at the real images' own size since preprocess resizes later. Each set
    draws from its own seed (seed + its index in ALL_FAKES), so that e.g. the flat
    colours are not the gradients' first colours.
    """
    if isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in HARD_FAKES]
    if unknown:
        raise ValueError(f"unknown fake set(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(ALL_FAKES)}")
    subset = None
    if any(name in DERIVED_FAKES for name in names):
        if real is None:
            raise ValueError(f"fake sets {', '.join(nm for nm in names if nm in DERIVED_FAKES)} are made from real images: pass real")
        _check_real(real)
        subset = real
        if real.shape[0] > n:
            keep = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
            subset = real[keep.sort().values]
    return {name: HARD_FAKES[name](subset, n, size, seed + ALL_FAKES.index(name)) for name in names}


# ----------------------------------------------------------------------------
# input complexity (Serra et al., ICLR 2020)

def png_bits(images_uint8):
    """Length in bits of each image's lossless PNG encoding: float64 numpy [N].

    images_uint8: uint8 [N, 3, H, W] (or one [3, H, W]) as a numpy array or a torch
    tensor on any device. PIL's PNG writer at compress_level PNG_COMPRESS_LEVEL (6);
    the count is the whole file (file size * 8, headers included: ~70 bytes, which
    dominates only for tiny flat images). A pure function of its input, so it can be
    mapped over chunks in worker processes.
    """
    if isinstance(images_uint8, torch.Tensor):
        images_uint8 = images_uint8.detach().cpu().numpy()
    a = np.asarray(images_uint8)
    if a.ndim == 3:
        a = a[None]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"png_bits expects uint8 [N, 3, H, W], got {a.dtype} {a.shape}")
    bits = np.empty(a.shape[0], dtype=np.float64)
    for i, img in enumerate(a):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        bits[i] = 8 * buf.tell()
    return bits


def complexity_bits_per_dim(images_uint8):
    """Normalized complexity L(x) = png_bits / (3 H W), in bits per sub-pixel: float64 [N].

    A flat image compresses to almost nothing (< 0.1 bits/dim at 128x128; the fixed
    PNG overhead makes it ~0.27 at 32x32), uniform noise is incompressible at ~8 bits/dim
    (a little above, with the overhead), and photos fall in between (~3-6). Serra et
    al.'s complexity-corrected score is the model's score in bits/dim minus L(x).
    """
    a = images_uint8
    h, w = a.shape[-2], a.shape[-1]
    return png_bits(a) / (3 * h * w)


__all__ = ["uniform_noise", "flat_colours", "gradients", "blurred", "jpeg", "splice", "derangement",
           "gaussian_kernel", "make_fake_sets", "png_bits", "complexity_bits_per_dim", "HARD_FAKES",
           "DESCRIPTIONS", "DERIVED_FAKES", "DEFAULT_FAKES", "ALL_FAKES", "PNG_COMPRESS_LEVEL"]
