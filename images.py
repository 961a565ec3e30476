"""Reading image files safely, every input guard in one place: a file that is not a usable image (not a
regular file, a bomb, truncated, undecodable) is an ImageReadError with a one-line reason, not a hang."""

import glob
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = set(".jpg .jpeg .png .webp .bmp .gif .tif .tiff .ppm .pgm .jfif".split())
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are refused as decompression bombs
MAX_SIDE = 65_535  # JPEG's and WebP's limit


class ImageReadError(Exception):
    """An input that is not a usable image; the message is the reason, in one line."""


def pil_to_rgb(img):
    """Any PIL mode (grayscale, palette, RGBA, CMYK, 16-bit, float) -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N", "F"):
        # 16/32-bit or float grayscale: scale its full range to 8 bits instead of clipping at 255
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F":  # float: [0, 1] by convention, but PIL's own convert("F") keeps the 0-255 levels
            top = 1.0 if a.max() <= 1 else 255.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a / top * 255).round().clip(0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(path, min_size=None):
    """One file -> uint8 [3, H, W] RGB, EXIF orientation applied, first frame only; raises ImageReadError.
    With min_size, a large image is decoded at reduced scale, both sides kept >= 2 x min_size."""
    try:
        # O_NONBLOCK: opening a FIFO or a device must not wait forever for a writer
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f, warnings.catch_warnings():
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageReadError("not a regular file")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageReadError(f"decompression bomb: {w}x{h} pixels exceeds {MAX_IMAGE_PIXELS:,}")
                if max(img.size) > MAX_SIDE:
                    raise ImageReadError(f"{w}x{h} pixels: a side longer than {MAX_SIDE:,}")
                # libjpeg silently greys out a JPEG that ends early; every 8x8 block costs at least a bit
                if img.format == "JPEG" and st.st_size * 8 < w * h / 64:
                    raise ImageReadError(f"truncated: {st.st_size:,} bytes cannot hold a {w}x{h} JPEG")
                img.seek(0)
                if min_size and img.format == "JPEG":
                    img.draft("RGB", (2 * min_size, 2 * min_size))  # the smallest 1/2^k scale >= 2 x min_size
                img.load()
                rgb = pil_to_rgb(ImageOps.exif_transpose(img) or img)
                rgb = box_reduce(rgb, min_size) if min_size and img.format != "JPEG" else rgb
                return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        why = ("file not found (vanished?)" if isinstance(e, FileNotFoundError) else
               "is a directory" if isinstance(e, IsADirectoryError) else "permission denied")
        raise ImageReadError(why) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        why = "not an image (unknown format)" if st.st_size else "empty file (0 bytes)"
        raise ImageReadError(why) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"cannot decode: {reason}") from None


def box_reduce(img, min_size):
    """img box-reduced by the largest integer factor >= 2 keeping both sides >= 2 x min_size, else img."""
    factor = min(img.size) // (2 * min_size)
    return img.reduce(factor) if factor >= 2 else img


def iter_image_files(paths, on_error=None):
    """Lazily yields image paths from files (any extension), folders (recursive, sorted) and glob patterns;
    problems (no match, a symlink loop) go to on_error(path, reason)."""
    report = on_error or (lambda path, reason: None)
    for p in map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        # a name that exists (even as a broken symlink) is taken literally, else as a glob pattern
        magic = glob.has_magic(p)
        matches = [p] if os.path.lexists(p) else sorted(glob.iglob(p, recursive=True)) if magic else []
        if not matches:
            report(p, "pattern matches nothing" if magic else "no such file or directory")
        for m in matches:
            yield from (_walk(m, report) if os.path.isdir(m) else [m])


def _walk(top, report):
    # depth-first in name order, each directory once (symlinks followed); a stack, as 3.11's os.walk recurses
    seen, stack = set(), [top]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)  # (device, inode) names a directory in one stat; realpath costs one per level
            if (st.st_dev, st.st_ino) in seen:
                report(d, "directory symlink loop (already visited), skipped")
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            report(d, f"cannot list directory: {e.strerror or e}")
            continue
        dirs, files = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.path)  # is_dir follows symlinks
            except OSError as err:  # a symlink to itself (ELOOP) cannot be followed at all
                report(e.path, f"cannot follow: {err.strerror or err}")
        yield from (f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        stack.extend(reversed(dirs))  # popped in name order
