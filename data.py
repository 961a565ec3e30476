"""Images in, model inputs out: `preprocess` (the one uint8 -> model input path of every script), PIL / tensor
helpers, tiles of original pixels, and the data sets (CIFAR-10, folders, dead leaves, real / fake pairs)."""

import contextlib
import fcntl
import io
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageFilter

from images import ImageReadError, box_reduce, iter_image_files, pil_to_rgb, read_image
from utils import UserError, gather

PREPROCESSING = ("uint8 RGB -> float / 255 -> bilinear resize to image_size x image_size (antialiased, as "
                 "PIL's Resize) -> rounded to 8 bits (as PIL's Resize) -> (x - 0.5) / 0.5, giving [-1, 1]")


def preprocess(images, size=128):
    """uint8 [B, 3, H, W] or [3, H, W] -> float32 [B, 3, size, size] as PREPROCESSING says; or ValueError."""
    if images.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 pixels, got {images.dtype}")
    x = (images.unsqueeze(0) if images.dim() == 3 else images).float()  # [B, 3, H, W] in [0, 255]
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
    return [int(s) // 8 * 8 for s in torch.linspace(0, length - tile, n).tolist()]


def tiles_of(image, tile):
    """uint8 [3, H, W] -> [T, 3, tile, tile], T <= MAX_TILES_PER_SIDE^2; ValueError if smaller than a tile."""
    h, w = image.shape[-2:]
    if h < tile or w < tile:
        raise ValueError(f"{w}x{h} pixels: too small for the artifact score's {tile}x{tile} tiles")
    ys, xs = tile_origins(h, tile), tile_origins(w, tile)
    return torch.stack([image[:, y:y + tile, x:x + tile] for y in ys for x in xs])


def reduced(image, size):
    """uint8 [3, H, W] -> box-reduced as read_image reduces a file: an image scores the same in memory."""
    if min(image.shape[-2:]) < 4 * size:
        return image  # box_reduce would keep it as it is
    return from_pil(box_reduce(to_pil(image), size))


# ---- data sets, each returned as one uint8 tensor [N, 3, H, W]
def load_cifar10(data_dir, train=True):
    """CIFAR-10 from data_dir, downloaded if missing; processes loading it at once wait for one download
    (the folder is the lock: it may be read-only)."""
    from torchvision.datasets import CIFAR10  # here: torchvision is slow to import and only CIFAR-10 needs it
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    folder, old = os.open(data_dir, os.O_RDONLY), socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # never hang on a network that drops packets
    try:  # torchvision downloads only when data_dir holds neither the data nor its archive
        with contextlib.suppress(OSError):  # a file system without locks: load without one
            fcntl.flock(folder, fcntl.LOCK_EX)
        ds = CIFAR10(str(data_dir), train=train, download=True)
    except Exception as e:  # any network or archive failure ends in the same advice
        raise UserError(f"CIFAR-10 not found in {data_dir} and the download failed "
                        f"({type(e).__name__}: {str(e)[:120]}); put cifar-10-python.tar.gz or its "
                        f"extracted cifar-10-batches-py/ folder in {data_dir}") from None
    finally:
        socket.setdefaulttimeout(old)
        os.close(folder)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8


def load_image_folder(paths, size, on_error=lambda path, reason: None):
    """Readable images under `paths`, resized by preprocess -> (uint8 [N, 3, size, size], number unreadable);
    problems go to on_error(path, reason). Under torchrun ranks split the decoding; all get all, in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems, kept, names = [], [], ", ".join(map(str, paths if isinstance(paths, list) else [paths]))
    files = list(iter_image_files(paths, lambda path, reason: problems.append((-1, path, reason))))
    if world > 1 and any(other != files for other in gather(files)):
        raise UserError(f"the ranks list different files under {names}: give every rank the same data")
    for i in range(rank, len(files), world):
        try:
            kept.append((i, to_uint8(preprocess(read_image(files[i], min_size=size), size))))
        except ImageReadError as e:
            problems.append((i, files[i], str(e)))
    if world > 1:  # every rank listed alike: its listing problems are rank 0's to report
        parts = gather((kept, [p for p in problems if p[0] >= 0 or rank == 0]))
        kept, problems = sorted(sum((k for k, _ in parts), [])), sorted(sum((p for _, p in parts), []))
    for _, path, reason in problems:
        on_error(path, reason)
    if not kept:
        raise UserError(f"no readable images under {names}")
    return torch.cat([image for _, image in kept]), sum(i >= 0 for i, _, _ in problems)


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
            # radii [b, 1, 1] of density ~ r^-3 between rmin and rmax (inverse-CDF sampling)
            r = (rmin ** -2 - torch.rand(b, 1, 1, generator=g) * (rmin ** -2 - rmax ** -2)) ** -0.5
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


def epoch_shard(n, batch_size, seed, epoch, rank, world, device):
    """Indices rank `rank` trains on in `epoch`: a seeded permutation (the same on every rank, and on
    resume), dealt round-robin and cut to equal whole batches -- DDP deadlocks if one rank steps alone."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen, device=device)
    return perm[rank::world][:n // world // batch_size * batch_size]


def batches(images, batch_size, size, device, perm):
    """Yields (x [B, 3, size, size] preprocessed on `device`, channels_last, target) for images[perm]: the
    target is x itself (the autoencoder's), or a Labeled set's labels [B]."""
    for idx in perm.split(batch_size):
        part = images[idx]
        labeled = isinstance(part, Labeled)
        x = preprocess((part.images if labeled else part).to(device, non_blocking=True), size)
        yield x.contiguous(memory_format=torch.channels_last), part.labels.to(device) if labeled else x


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


def resize(pil, factor, rng):
    side = tuple(max(8, round(n * factor)) for n in pil.size)
    filters = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)
    return pil.resize(side, filters[rng.integers(len(filters))])


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
    tile = torch.rot90(from_pil(pil.crop((x, y, x + size, y + size))), int(rng.integers(4)), dims=(1, 2))
    return (tile.flip(2) if rng.random() < 0.5 else tile).contiguous()


def load_pairs(data_dir, size, seed=0, fakes_per_image=2):
    """data_dir/{real,GENERATOR}/STEM.png (make_pairs.py) -> (Labeled tiles, each one's photo: STEM up to its
    last '_c', generator names), balanced: a real gives as many tiles as all its fakes together."""
    root = Path(data_dir)
    generators = sorted(d.name for d in root.glob("*/") if d.name != "real")  # "*/": folders only
    if not generators or not (root / "real").is_dir():
        raise UserError(f"{data_dir}: expected real/ and one folder of fakes per generator (make_pairs.py)")
    rng, tiles, labels, photos = np.random.default_rng(seed), [], [], []
    for path in sorted((root / "real").glob("*.png")):
        fakes = [root / g / path.name for g in generators if (root / g / path.name).is_file()]
        try:  # a pair is whole or left out
            images = [to_pil(read_image(str(file))) for file in [path, *fakes]]
        except ImageReadError as e:
            print(f"skipped the pair {path.name}: {e}", file=sys.stderr)
            continue
        counts = [fakes_per_image * len(fakes)] + [fakes_per_image] * len(fakes)
        for pil, label, k in zip(images, [0.0] + [1.0] * len(fakes), counts):
            tiles += [augmented_tile(pil, size, rng, real=not label) for _ in range(k)]
            labels += [label] * k
            photos += [path.stem.rsplit("_c", 1)[0]] * k
    if not tiles:
        raise UserError(f"{data_dir}: no readable pairs (real/*.png with a fake of the same name)")
    return Labeled(torch.stack(tiles), torch.tensor(labels)), photos, generators


def load_datasets(cfg, device):
    """TrainConfig -> uint8 (train, val, test) [N, 3, H, W] (pairs: Labeled) on `device`, and their source."""
    if (cfg.model == "artifact") != (cfg.dataset == "pairs"):
        raise UserError("only the artifact detector trains on labeled pairs: use --preset artifact --data-dir"
                        " PAIRS (real/ and one folder per generator, scripts/generated/make_pairs.py)")
    if cfg.dataset == "pairs":  # val and test hold whole source photos: no scene is on both sides of a split
        pool, photos, generators = load_pairs(cfg.data_dir, cfg.image_size, cfg.seed)
        rest, test = split_by_photo(photos, cfg.test_fraction, cfg.seed + 1)
        train, val = (rest[i] for i in split_by_photo([photos[i] for i in rest], cfg.val_fraction, cfg.seed))
        source = f"{len(set(photos))} photos' pairs in {cfg.data_dir}, generators {', '.join(generators)}"
        return pool[train].to(device), pool[val].to(device), pool[test].to(device), source
    if cfg.dataset == "cifar10":
        pool, test = load_cifar10(cfg.data_dir, train=True), load_cifar10(cfg.data_dir, train=False)
        source = f"CIFAR-10 in {cfg.data_dir}"
    elif cfg.dataset == "synthetic":
        pool = dead_leaves(cfg.synthetic_images, cfg.synthetic_size, seed=cfg.seed)
        source = f"{cfg.synthetic_images:,} dead-leaves images at {cfg.synthetic_size}x{cfg.synthetic_size}"
    else:
        skipped = []
        pool, n_skipped = load_image_folder(cfg.data_dir, cfg.image_size, lambda *e: skipped.append(e))
        for path, reason in skipped[:5]:  # enough to see what is wrong, without flooding the terminal
            print(f"skipped {path}: {reason}", file=sys.stderr)
        source = f"{pool.shape[0]:,} images from {cfg.data_dir} ({n_skipped} unreadable skipped)"
    if cfg.dataset != "cifar10":  # a fixed test split, seeded apart from the validation split
        pool, test = (pool[i] for i in split_indices(pool.shape[0], cfg.test_fraction, cfg.seed + 1))
    train, val = (pool[i] for i in split_indices(pool.shape[0], cfg.val_fraction, cfg.seed))
    if cfg.max_images:
        n = max(cfg.max_images // 8, 1)
        train, val, test = train[:cfg.max_images], val[:n], test[:n]
    # the whole data set lives on the device as uint8 at native size; batches are cut there
    return train.to(device), val.to(device), test.to(device), source


def split_by_photo(photos, fraction, seed):
    """(kept, held) sample indices: `fraction` of the distinct photos (seeded) are held, all their samples."""
    names = sorted(set(photos))
    held = {names[i] for i in split_indices(len(names), fraction, seed)[1].tolist()}
    is_held = torch.tensor([p in held for p in photos])
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)
