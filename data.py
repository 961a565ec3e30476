"""Images in, model inputs out: `preprocess` (the one uint8 -> model input path of every script), the robust
image reader, and the data sets (CIFAR-10, image folders, synthetic dead leaves, real / generated pairs)."""

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

IMAGE_EXTENSIONS = set(".jpg .jpeg .png .webp .bmp .gif .tif .tiff .ppm .pgm .jfif".split())
PREPROCESSING = ("uint8 RGB -> float / 255 -> bilinear resize to image_size x image_size "
                 "(antialiased, as PIL's Resize) -> rounded to 8 bits (as PIL's Resize) -> (x - 0.5) / 0.5, "
                 "giving [-1, 1]")
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are refused as decompression bombs
MAX_SIDE = 65_535  # JPEG's and WebP's limit


def preprocess(images, size=128):
    """uint8 [B, 3, H, W] or [3, H, W] on any device -> float32 [B, 3, size, size] in [-1, 1]: antialiased
    bilinear resize rounded to 8 bits (as PIL's Resize), then Normalize(0.5, 0.5). ValueError if not uint8."""
    if images.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 pixels, got {images.dtype}")
    x = (images.unsqueeze(0) if images.dim() == 3 else images).float()  # [B, 3, H, W] in [0, 255]
    # no identity shortcut at size x size: one graph for every size, which export.py's ONNX graph holds
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # rounded as PIL rounds: to_uint8(preprocess(x)) is exact, so batches can travel as bytes
    return x.round().clamp(0, 255).div(255).sub(0.5).div(0.5)  # [B, 3, size, size] in [-1, 1]


def to_uint8(x):
    """Inverse of the normalization: float [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image):
    """uint8 [3, H, W] -> PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(pil):
    """PIL image (any mode) -> uint8 [3, H, W] RGB."""
    return torch.from_numpy(np.array(pil_to_rgb(pil), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def jpeg_resave(pil, quality):
    """The PIL image saved as a JPEG at `quality` and decoded again (RGB)."""
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    return Image.open(buf).convert("RGB")


MAX_TILES_PER_SIDE = 4  # at most 4 x 4 = 16 tiles per image, whatever its size


def tile_origins(length, tile, per_side=MAX_TILES_PER_SIDE):
    """Evenly spread starts of at most per_side tiles along one side, deterministic and disjoint where the
    side allows; on multiples of 8 so that every tile sees the same JPEG block phase."""
    n = min(per_side, length // tile)
    starts = torch.linspace(0, length - tile, n) if n > 1 else torch.zeros(1)
    return [int(s) // 8 * 8 for s in starts.tolist()]


def tiles_of(image, tile):
    """uint8 [3, H, W] -> [T, 3, tile, tile], T <= MAX_TILES_PER_SIDE^2; ValueError if smaller than a tile."""
    h, w = image.shape[-2:]
    if h < tile or w < tile:
        raise ValueError(f"too small to tile for the artifact score: {w}x{h} pixels, "
                         f"it needs at least {tile}x{tile}")
    ys, xs = tile_origins(h, tile), tile_origins(w, tile)
    return torch.stack([image[:, y:y + tile, x:x + tile] for y in ys for x in xs])


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
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageReadError("not a regular file")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageReadError(f"decompression bomb: {w}x{h} pixels exceeds {MAX_IMAGE_PIXELS:,}")
                if max(img.size) > MAX_SIDE:
                    raise ImageReadError(f"{w}x{h} pixels: a side longer than {MAX_SIDE:,}")
                # libjpeg silently greys out a JPEG that ends early; every 8x8 block costs at least a bit
                if img.format == "JPEG" and (nbytes := os.fstat(f.fileno()).st_size) * 8 < w * h / 64:
                    raise ImageReadError(f"truncated: {nbytes:,} bytes cannot hold a {w}x{h} JPEG")
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
        empty = not os.path.exists(path) or os.path.getsize(path) == 0
        raise ImageReadError("empty file (0 bytes)" if empty else "not an image (unknown format)") from None
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
    # depth-first in name order, following directory symlinks into each directory once; a stack, not
    # recursion (os.walk recurses on Python 3.11), so any depth works
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


# ---- data sets, each returned as one uint8 tensor [N, 3, H, W]
def load_cifar10(data_dir, train=True):
    from torchvision.datasets import CIFAR10  # here: torchvision is slow to import and only CIFAR-10 needs it
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
    """Readable images under `paths` -> (uint8 [N, 3, size, size], each sample's path, number skipped): each
    image resized by preprocess or, with crops_per_image, that many seeded random crops of its own pixels."""
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
            ys, xs = (torch.randint(0, n - size + 1, [crops_per_image], generator=g).tolist() for n in (h, w))
            kept.append((path, torch.stack([image[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])))
        except ImageReadError as e:
            skipped += 1
            if on_error:
                on_error(path, str(e))
    if not kept:
        names = ", ".join(map(str, paths if isinstance(paths, list) else [paths]))
        raise UserError(f"no readable images under {names}")
    return torch.cat([images for _, images in kept]), [p for p, images in kept for _ in images], skipped


def dead_leaves(n, size=64, seed=0, leaves=150):
    """Seeded dead leaves (discs with power-law radii, as photos' 1/f spectrum): uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    px, rmin, rmax = torch.arange(size, dtype=torch.float32), size / 16, size / 2  # pixel coordinates, radii
    kernel = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16).expand(3, 1, 3, 3)  # a mild blur
    for start in range(0, n, 256):  # chunks bound the float memory
        b = min(256, n - start)
        palette = torch.rand(b, 3, 1, 1, generator=g)  # photos have a few dominant hues
        img = torch.full((b, 3, size, size), torch.nan)  # NaN: no leaf here yet
        for _ in range(leaves):
            # radius density ~ r^-3 between rmin and rmax (inverse-CDF sampling)
            u = torch.rand(b, 1, 1, generator=g)
            r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5  # [b, 1, 1]
            cx, cy = torch.rand(b, 1, 1, generator=g) * size, torch.rand(b, 1, 1, generator=g) * size
            color = (palette + 0.25 * torch.randn(b, 3, 1, 1, generator=g)).clamp(0, 1)  # [b, 3, 1, 1]
            disc = ((px - cx) ** 2 + (px.view(-1, 1) - cy) ** 2 <= r ** 2).unsqueeze(1)  # [b, 1, size, size]
            img = torch.where(disc & img[:, :1].isnan(), color, img)  # earlier leaves occlude later ones
        img = torch.where(img.isnan(), palette, img)  # the background, where no leaf fell
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        noisy = img + 0.02 * torch.randn(img.shape, generator=g)
        out[start:start + b] = (noisy.clamp(0, 1) * 255).round().byte()
    return out


def split_indices(n, val_fraction, seed):
    """Fixed, seeded split of range(n) into (train, val) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise UserError(f"cannot hold out {val_fraction:.0%} of {n} images for validation")
    return perm[n_val:], perm[:n_val]


def batches(images, batch_size, size, device, perm=None):
    """Yields preprocessed float batches of uint8 `images` on `device`; from Labeled data, (batch, labels)."""
    order = perm if perm is not None else torch.arange(images.shape[0], device=images.device)
    for idx in order.split(batch_size):
        part = images[idx]
        labeled = isinstance(part, Labeled)
        x = preprocess((part.images if labeled else part).to(device, non_blocking=True), size)
        yield (x, part.labels.to(device)) if labeled else x


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
    """One augmented training tile of a pair's image: uint8 [3, size, size]. Both classes get the same resize,
    blur and JPEG; reals are also resampled, so that "interpolated" is not what the model calls generated."""
    if real and rng.random() < 0.3:
        pil = resize(pil, 2 ** rng.uniform(-1, 1), rng)  # benign resampling, 0.5x to 2x: REAL
    if rng.random() < 0.15:
        pil = resize(pil, rng.uniform(0.5, 1.5), rng)
    if rng.random() < 0.1:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    if rng.random() < 0.5:
        pil = jpeg_resave(pil, rng.integers(60, 101))
    if min(pil.size) < size:
        pil = pil.resize((max(size, pil.width), max(size, pil.height)), Image.Resampling.BICUBIC)
    x, y = (int(rng.integers(0, n - size + 1)) for n in pil.size)
    tile = torch.rot90(torch.from_numpy(np.array(pil.crop((x, y, x + size, y + size)))).permute(2, 0, 1),
                       int(rng.integers(4)), dims=(1, 2))
    return (tile.flip(2) if rng.random() < 0.5 else tile).contiguous()


def load_pairs(data_dir, size, seed=0, fakes_per_image=2):
    """data_dir/{real,GENERATOR}/STEM.png (make_pairs.py) -> (Labeled tiles, each one's photo: STEM up to its
    last '_c', generator names), balanced: a real gives as many tiles as all its fakes together."""
    root = Path(data_dir)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    generators = [name for name in folders if name != "real"]
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
        counts = [fakes_per_image * len(fakes)] + [fakes_per_image] * len(fakes)
        for image, label, k in zip(images, [0.0] + [1.0] * len(fakes), counts):
            pil = to_pil(image)
            tiles += [augmented_tile(pil, size, rng, real=not label) for _ in range(k)]
            labels += [label] * k
            photos += [path.stem.rsplit("_c", 1)[0]] * k
    if not tiles:
        raise UserError(f"{data_dir}: no readable pairs (real/*.png with a fake of the same name)")
    return Labeled(torch.stack(tiles), torch.tensor(labels)), photos, generators
