"""Images in, model inputs out: `preprocess`, the ONE function every script uses to turn uint8
pixels into model inputs (so the same image gets the same score everywhere), the robust image
reader, and the data sets (CIFAR-10, a folder of images, synthetic dead leaves)."""

import glob
import io
import os
import socket
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from utils import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
PREPROCESSING = ("uint8 RGB -> float / 255 -> bilinear resize to image_size x image_size "
                 "(antialiased, as PIL's Resize) -> rounded to 8 bits (as PIL's Resize) -> (x - 0.5) / 0.5, giving [-1, 1]")
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are refused as decompression bombs
MAX_SIDE = 65_535  # JPEG's and WebP's limit: a longer side is a line of pixels that costs seconds to no purpose


def preprocess(images, size=128):
    """uint8 [B, 3, H, W] (or [3, H, W]) on any device -> float32 [B, 3, size, size] in [-1, 1]: the card's
    Resize((128, 128)) + ToTensor + Normalize(0.5, 0.5), resized on floats (antialiased, the tensor twin of
    PIL's bilinear Resize) so that it runs batched on the GPU. The resized pixels are rounded to 8 bits, as
    PIL's are: then to_uint8(preprocess(x)) is exact, and batches can travel as bytes and be normalized on
    the device with the same result."""
    if images.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 pixels, got {images.dtype}")
    x = (images.unsqueeze(0) if images.dim() == 3 else images).float()  # [B, 3, H, W] in [0, 255]
    # no shortcut at size x size (there the resize is exactly the identity): one graph for every size, so that
    # export.py's ONNX graph holds this very code
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).div(255).sub(0.5).div(0.5)  # [B, 3, size, size] in [-1, 1]


def to_uint8(x):
    """Inverse of the normalization: float [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
    """Decodes one file into a uint8 tensor [3, H, W] in RGB; raises ImageReadError. EXIF orientation
    is applied; GIF / TIFF give their first frame. With min_size, a large image is read at reduced scale, which
    changes little once it is resized to min_size (a mean 0.4 grey levels at 128, tests/test_inference.py) and
    saves most of the decode or the resize: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (PIL draft mode), any other
    format is decoded, then box-filtered by an integer factor (PIL reduce), both keeping both sides >= 2 x min_size
    (at >= 1 x, draft mode moved a JPEG by a mean 3 grey levels)."""
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not wait forever for a writer; then only a
        # regular file is read at all
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f, warnings.catch_warnings():
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageReadError("not a regular file")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageReadError(f"decompression bomb: {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS:,}")
                if max(img.size) > MAX_SIDE:
                    raise ImageReadError(f"{img.width}x{img.height} pixels: a side longer than {MAX_SIDE:,}")
                # libjpeg fills a JPEG that ends early with grey and says nothing; every 8x8 block costs at least
                # a bit, so fewer bits than blocks means the file cannot hold what it declares
                if img.format == "JPEG" and os.fstat(f.fileno()).st_size * 8 < img.width * img.height / 64:
                    raise ImageReadError(f"truncated: {os.fstat(f.fileno()).st_size:,} bytes cannot hold a "
                                         f"{img.width}x{img.height} JPEG")
                img.seek(0)
                if min_size and img.format == "JPEG":
                    img.draft("RGB", (2 * min_size, 2 * min_size))  # picks the smallest scale still >= 2 x min_size
                img.load()
                rgb = pil_to_rgb(ImageOps.exif_transpose(img) or img)
                rgb = box_reduce(rgb, min_size) if min_size and img.format != "JPEG" else rgb
                return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageReadError("file not found (vanished?)" if isinstance(e, FileNotFoundError) else
                             "is a directory" if isinstance(e, IsADirectoryError) else "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        empty = not os.path.exists(path) or os.path.getsize(path) == 0
        raise ImageReadError("empty file (0 bytes)" if empty else "not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageReadError(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def box_reduce(img, min_size):
    """A PIL image box-filtered by the largest integer factor that keeps both sides >= 2 x min_size (or itself)."""
    factor = min(img.size) // (2 * min_size)
    return img.reduce(factor) if factor >= 2 else img


def iter_image_files(paths, on_error=None):
    """Yields image file paths from files, directories (recursive) and glob patterns, lazily, sorted within
    each directory. Explicit files are yielded whatever their extension. Problems (a pattern that matches
    nothing, a symlink loop, which is followed only once) go to on_error(path, reason)."""
    report = on_error or (lambda path, reason: None)
    for p in map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        # a name that exists (even as a broken symlink) is taken literally, else as a glob pattern
        matches = [p] if os.path.lexists(p) else sorted(glob.iglob(p, recursive=True)) if glob.has_magic(p) else []
        if not matches:
            report(p, "pattern matches nothing" if glob.has_magic(p) else "no such file or directory")
        for m in matches:
            yield from (_walk(m, report) if os.path.isdir(m) else [m])


def _walk(top, report):
    # top-down and depth-first in name order, following directory symlinks, but into each directory only once;
    # a stack, not recursion (os.walk recurses on Python 3.11): a folder 1,000 levels deep is listed like any other
    seen, stack = set(), [top]
    while stack:
        d = stack.pop()
        try:
            # a directory is known by (device, inode): one stat, where realpath costs one per level of the path
            st = os.stat(d)
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
            except OSError as err:  # a symlink that leads back to itself (ELOOP) cannot be followed at all
                report(e.path, f"cannot follow: {err.strerror or err}")
        yield from (f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        stack.extend(reversed(dirs))  # popped in name order


# ---- data sets, each returned as one uint8 tensor [N, 3, H, W]
def load_cifar10(data_dir, train=True):
    from torchvision.datasets import CIFAR10  # here: torchvision is slow to import, and only CIFAR-10 runs need it
    try:
        ds = CIFAR10(str(data_dir), train=train, download=False)
    except RuntimeError:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # never hang on a network that drops packets
        try:
            ds = CIFAR10(str(data_dir), train=train, download=True)
        except Exception as e:  # any network or archive failure ends in the same advice
            raise UserError(f"CIFAR-10 not found in {data_dir} and the download failed "
                            f"({type(e).__name__}: {str(e)[:120]}); put cifar-10-python.tar.gz or its "
                            f"extracted cifar-10-batches-py/ folder in {data_dir}") from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8


def load_image_folder(paths, size, on_error=None, crops_per_image=0, seed=0):
    """Decodes every readable image under `paths` into uint8 size x size samples: the whole image resized with
    the shared filter, or, with crops_per_image, that many seeded random crops of its original pixels (never
    resized: what the coding model learns). Returns (samples [N, 3, size, size], their paths, number skipped)."""
    kept, skipped, g = [], 0, torch.Generator().manual_seed(seed)  # (path, samples [n, 3, size, size]) pairs
    for path in iter_image_files(paths, on_error):
        try:
            if not crops_per_image:
                kept.append((path, to_uint8(preprocess(read_image(path, min_size=size), size))))
                continue
            image = read_image(path)  # [3, H, W], every original pixel
            h, w = image.shape[-2:]
            if h < size or w < size:
                raise ImageReadError(f"{w}x{h} is smaller than one {size}x{size} crop")
            ys, xs = (torch.randint(0, n - size + 1, (crops_per_image,), generator=g).tolist() for n in (h, w))
            kept.append((path, torch.stack([image[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])))  # copies
        except ImageReadError as e:
            skipped += 1
            if on_error:
                on_error(path, str(e))
    if not kept:
        raise UserError(f"no readable images under {', '.join(map(str, paths if isinstance(paths, list) else [paths]))}")
    return torch.cat([images for _, images in kept]), [p for p, images in kept for _ in images], skipped


def dead_leaves(n, size=64, seed=0, leaves=150):
    """Procedural images with natural-image statistics, the dead-leaves model: opaque discs with
    power-law radii (scale invariance, the 1/f spectrum of photos) and random colours dropped front
    to back, then a mild blur and sensor noise. Deterministic per seed. uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    px, rmin, rmax = torch.arange(size, dtype=torch.float32), size / 16, size / 2  # pixel coordinates, radii
    kernel = (torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16).expand(3, 1, 3, 3)  # blur
    for start in range(0, n, 256):  # chunks bound the float memory
        b = min(256, n - start)
        palette = torch.rand(b, 3, 1, 1, generator=g)
        img = torch.full((b, 3, size, size), torch.nan)  # NaN: no leaf here yet
        for _ in range(leaves):
            # radius density ~ r^-3 between rmin and rmax (inverse-CDF sampling)
            r = (rmin ** -2 - torch.rand(b, 1, 1, generator=g) * (rmin ** -2 - rmax ** -2)) ** -0.5  # [b, 1, 1]
            cx, cy = torch.rand(b, 1, 1, generator=g) * size, torch.rand(b, 1, 1, generator=g) * size
            # colours near a per-image palette, as photos have a few dominant hues
            color = (palette + 0.25 * torch.randn(b, 3, 1, 1, generator=g)).clamp(0, 1)  # [b, 3, 1, 1]
            disc = ((px - cx) ** 2 + (px.view(-1, 1) - cy) ** 2 <= r ** 2).unsqueeze(1)  # [b, 1, size, size]
            img = torch.where(disc & img[:, :1].isnan(), color, img)  # earlier leaves occlude later ones
        img = torch.where(img.isnan(), palette, img)  # the background, where no leaf fell
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        out[start:start + b] = ((img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1) * 255).round().byte()
    return out


def split_indices(n, val_fraction, seed):
    """Fixed, seeded split of range(n) into (train, val) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise UserError(f"cannot hold out {val_fraction:.0%} of {n} images for validation")
    return perm[n_val:], perm[:n_val]


def batches(images, batch_size, size, device, perm=None):
    """Yields preprocessed float batches from a uint8 tensor kept on `device`; from Labeled data, (batch, labels)."""
    for idx in (perm if perm is not None else torch.arange(images.shape[0], device=images.device)).split(batch_size):
        part = images[idx]
        x = preprocess((part.images if isinstance(part, Labeled) else part).to(device, non_blocking=True), size)
        yield (x, part.labels.to(device)) if isinstance(part, Labeled) else x


# ---- aligned real / generated pairs, for the artifact detector
@dataclass
class Labeled:
    """Samples with labels, indexed and moved like the uint8 tensors the other data sets are."""
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # float [N], 1 = generated

    shape = property(lambda self: self.images.shape)
    device = property(lambda self: self.images.device)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return Labeled(self.images[idx], self.labels[idx])

    def to(self, device):
        return Labeled(self.images.to(device), self.labels.to(device))


RESAMPLING = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)


def resize(pil, factor, rng):
    side = lambda n: max(8, round(n * factor))
    return pil.resize((side(pil.width), side(pil.height)), RESAMPLING[rng.integers(len(RESAMPLING))])


def augmented_tile(pil, size, rng, real):
    """One training tile of a pair's image. Both classes get the same processing (resize, blur, JPEG) in the same
    proportions, so that neither size nor format tells them apart; a real crop is also up- or down-sampled by plain
    interpolation, so that "interpolated" is not what the model learns to call generated. uint8 [3, size, size]."""
    if real and rng.random() < 0.3:
        pil = resize(pil, 2 ** rng.uniform(-1, 1), rng)  # benign resampling, 0.5x to 2x: REAL
    if rng.random() < 0.15:
        pil = resize(pil, rng.uniform(0.5, 1.5), rng)
    if rng.random() < 0.1:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(rng.integers(60, 101)))
        pil = Image.open(buf).convert("RGB")
    if min(pil.size) < size:
        pil = pil.resize((max(size, pil.width), max(size, pil.height)), Image.Resampling.BICUBIC)
    x, y = (int(rng.integers(0, n - size + 1)) for n in pil.size)
    tile = torch.rot90(torch.from_numpy(np.array(pil.crop((x, y, x + size, y + size)))).permute(2, 0, 1),
                       int(rng.integers(4)), dims=(1, 2))
    return (tile.flip(2) if rng.random() < 0.5 else tile).contiguous()


def load_pairs(data_dir, size, seed=0, fakes_per_image=2):
    """data_dir/real/STEM.png and data_dir/GENERATOR/STEM.png (scripts/generated/make_pairs.py) -> (Labeled tiles,
    the source photo of each (STEM up to its last '_c'), generator names). Each fake gives fakes_per_image augmented
    tiles and each real as many as all its fakes together: the classes are balanced."""
    root = Path(data_dir)
    generators = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "real") if root.is_dir() else []
    if not generators or not (root / "real").is_dir():
        raise UserError(f"{data_dir}: expected real/ and one folder of fakes per generator (make_pairs.py)")
    rng, tiles, labels, photos = np.random.default_rng(seed), [], [], []
    for path in sorted((root / "real").glob("*.png")):
        fakes = [root / g / path.name for g in generators if (root / g / path.name).is_file()]
        try:  # a pair is whole or left out
            images = [read_image(str(file)) for file in [path, *fakes]]
        except ImageReadError as e:
            print(f"skipped the pair {path.name}: {e}", file=sys.stderr)
            continue
        counts = [fakes_per_image * len(fakes)] + [fakes_per_image] * len(fakes)  # balanced: the real as all its fakes
        for image, label, k in zip(images, [0.0] + [1.0] * len(fakes), counts):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            tiles += [augmented_tile(pil, size, rng, real=not label) for _ in range(k)]
            labels += [label] * k
            photos += [path.stem.rsplit("_c", 1)[0]] * k
    if not tiles:
        raise UserError(f"{data_dir}: no readable pairs (real/*.png with a fake of the same name)")
    return Labeled(torch.stack(tiles), torch.tensor(labels)), photos, generators
