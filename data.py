"""
Images in, model inputs out: the ONE preprocessing function every script uses, the
robust image reader, and the data sets (CIFAR-10, a folder of images, synthetic).

Every path -- training batches on the GPU, calibration, inference of a JPEG from
disk -- turns uint8 pixels into model inputs with `preprocess`, so the same image
gets the same score everywhere.
"""

import glob
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
PREPROCESSING = ("uint8 RGB -> float / 255 -> bilinear resize to image_size x image_size "
                 "(antialiased, as PIL's Resize) -> (x - 0.5) / 0.5, giving [-1, 1]")

# Images above this many pixels are refused as decompression bombs (PIL's own
# limit only warns below twice this value).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def preprocess(images, size=128):
    """uint8 [B, 3, H, W] (or [3, H, W]) on any device -> float32 [B, 3, size, size] in [-1, 1].

    The card's recipe is Resize((128, 128)) + ToTensor + Normalize(0.5, 0.5). Here the
    resize runs on floats with antialiasing (torchvision's tensor equivalent of PIL's
    bilinear Resize) so that it can run batched on the GPU, and skips PIL's
    intermediate rounding to uint8.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 pixels, got {images.dtype}")
    x = images.float().div_(255)  # [B, 3, H, W] in [0, 1]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.sub_(0.5).div_(0.5)  # [B, 3, size, size] in [-1, 1]


def to_uint8(x):
    """Inverse of the normalization: float [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_uint8(images, size):
    """Resize uint8 images with the same filter as preprocess, back to uint8 (for storage)."""
    return to_uint8(preprocess(images, size))


# ----------------------------------------------------------------------------
# reading images

class ImageReadError(Exception):
    """An input that is not a usable image; the message is the reason, in one line."""


def pil_to_rgb(img):
    """Any PIL mode (grayscale, palette, RGBA, CMYK, 16-bit) -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a / top * 255).round().clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(path, min_size=None):
    """Decodes one file into a uint8 tensor [3, H, W] in RGB; raises ImageReadError.

    EXIF orientation is applied; GIF / TIFF give their first frame. With min_size,
    a large JPEG is decoded at reduced scale (PIL draft mode) while keeping both
    sides >= min_size, which is much faster and changes little after resizing.
    """
    path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageReadError(f"decompression bomb: {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS:,}")
                img.seek(0)
                if min_size and img.format == "JPEG":
                    img.draft("RGB", (min_size, min_size))  # picks the smallest scale still >= min_size
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = pil_to_rgb(img)
                return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file not found (vanished?)") from None
    except IsADirectoryError:
        raise ImageReadError("is a directory") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageReadError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ImageReadError("empty file (0 bytes)" if size == 0 else "not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageReadError(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def iter_image_files(paths, on_error=None):
    """Yields image file paths from files, directories (recursive) and glob patterns,
    lazily and in sorted order within each directory. Symlinked directories are
    followed once: a symlink loop is reported through on_error(path, reason), not
    followed forever. Explicit files are yielded whatever their extension."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            yield from _walk(p, on_error)
        elif os.path.exists(p) or os.path.islink(p):
            yield p
        elif glob.has_magic(p):
            matches = sorted(glob.iglob(p, recursive=True))
            if not matches and on_error:
                on_error(p, "pattern matches nothing")
            for m in matches:
                yield from (_walk(m, on_error) if os.path.isdir(m) else [m])
        elif on_error:
            on_error(p, "no such file or directory")


def _walk(top, on_error):
    seen = set()
    stack = [top]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            if on_error:
                on_error(d, "directory symlink loop (already visited), skipped")
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            if on_error:
                on_error(d, f"cannot list directory: {e.strerror or e}")
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(e.path)
            elif Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                yield e.path
        stack.extend(reversed(subdirs))  # depth-first, in name order


# ----------------------------------------------------------------------------
# data sets, each returned as one uint8 tensor [N, 3, H, W]

class DataError(Exception):
    """A data set that cannot be loaded; the message says what to do."""


def load_cifar10(data_dir, train=True, download=True):
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(data_dir), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(f"CIFAR-10 not found in {data_dir}: put cifar-10-python.tar.gz "
                            f"or its extracted cifar-10-batches-py/ there") from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # never hang on a network that drops packets
        try:
            ds = CIFAR10(str(data_dir), train=train, download=True)
        except Exception as e:  # any network or archive failure ends in the same advice
            raise DataError(f"CIFAR-10 not found in {data_dir} and the download failed "
                            f"({type(e).__name__}: {str(e)[:120]}); put cifar-10-python.tar.gz or its "
                            f"extracted cifar-10-batches-py/ folder in {data_dir}") from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8


def load_image_folder(paths, size, limit=None, on_error=None):
    """Decodes every readable image under `paths`, resized to size x size with the shared
    filter and kept as uint8. Returns (images [N, 3, size, size], list of paths, number skipped)."""
    images, kept, skipped = [], [], 0
    for path in iter_image_files(paths, on_error):
        try:
            images.append(resize_uint8(read_image(path, min_size=size), size)[0])
            kept.append(path)
        except ImageReadError as e:
            skipped += 1
            if on_error:
                on_error(path, str(e))
        if limit and len(images) >= limit:
            break
    if not images:
        raise DataError(f"no readable images under {', '.join(map(str, paths if isinstance(paths, list) else [paths]))}")
    return torch.stack(images), kept, skipped


def dead_leaves(n, size=64, seed=0, leaves=150):
    """Procedural images with natural-image statistics: the dead-leaves model.

    Opaque discs with power-law radii (scale invariance, the 1/f spectrum of photos)
    and random colours are dropped front to back; a mild blur and sensor noise
    finish each image. Deterministic for a given seed. Returns uint8 [n, 3, size, size].
    """
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    chunk = 256
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        palette = torch.rand(b, 3, 1, 1, generator=g)
        img = palette.expand(b, 3, size, size).clone()  # background
        covered = torch.zeros(b, 1, size, size, dtype=torch.bool)
        rmin, rmax = size / 16, size / 2
        for _ in range(leaves):
            # radius density ~ r^-3 between rmin and rmax (inverse-CDF sampling)
            u = torch.rand(b, generator=g)
            r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5
            cx, cy = torch.rand(b, generator=g) * size, torch.rand(b, generator=g) * size
            # colours near a per-image palette, as photos have a few dominant hues
            color = (palette + 0.25 * torch.randn(b, 3, 1, 1, generator=g)).clamp(0, 1)
            disc = ((xx - cx.view(b, 1, 1)) ** 2 + (yy - cy.view(b, 1, 1)) ** 2 <= r.view(b, 1, 1) ** 2).unsqueeze(1)
            new = disc & ~covered  # front-to-back: earlier leaves occlude later ones
            img = torch.where(new, color.expand(b, 3, size, size), img)
            covered |= disc
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3), groups=3)
        img = img + 0.02 * torch.randn(img.shape, generator=g)
        out[start:start + b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def split_indices(n, val_fraction, seed):
    """Fixed, seeded split of range(n) into (train, val) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(f"cannot hold out {val_fraction:.0%} of {n} images for validation")
    return perm[n_val:], perm[:n_val]


def batches(images, batch_size, size, device, perm=None, drop_last=False):
    """Yields preprocessed float batches from a uint8 tensor kept on `device`."""
    idx = perm if perm is not None else torch.arange(images.shape[0], device=images.device)
    n = idx.shape[0]
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield preprocess(images[idx[start:start + batch_size]].to(device, non_blocking=True), size)


def describe_count(n, what="image"):
    return f"{n:,} {what}{'' if n == 1 else 's'}"


__all__ = ["preprocess", "to_uint8", "resize_uint8", "read_image", "ImageReadError", "iter_image_files",
           "load_cifar10", "load_image_folder", "dead_leaves", "split_indices", "batches", "DataError",
           "PREPROCESSING", "IMAGE_EXTENSIONS"]
