"""Scoring images: the Python API, and the scoring code every script shares.

    from detector import Detector
    det = Detector("runs/cifar10/model_best_checkpoint.ckpt", thresholds="thresholds_calibrated.json")
    for row in det.score(["photos/", "img.jpg", pil_image, uint8_tensor]):
        print(row["path"], row["score"], row.get("p_value"), row["verdict"])
    strict = det.with_rule("combined", "strict")   # the same weights, another decision rule
SCORES names every score (docs/method.md defines them); higher = more fake, except combined, a p-value."""

import copy
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import thresholds as thresholds_file
from checkpoints import weights_fingerprint
from data import from_pil, image_tiles, preprocess, reduced, tiles_of, to_uint8
from images import ImageReadError, iter_image_files, read_image
from model import load_models, pixel_error
from utils import UserError, autocast, gather, pick_device, precision_name

SCORES = {  # the registry: name -> what it measures (the CLIs' --score, the page, the result files)
    "mse": "the card's: mean squared reconstruction error at the autoencoder's input size",
    "complexity": "the autoencoder's code length minus PNG's, bits/dim (Serra et al.): flags smooth images",
    "artifact": "the detector of generator traces: its mean logit over at most 16 tiles of original pixels",
    "combined": "the conformal p-values of the calibrated scores, Bonferroni-combined: lower = more fake",
}
AE_SCORES = ("mse", "complexity")  # the autoencoder's
BASE_SCORES = AE_SCORES + ("artifact",)  # what a model computes; combined derives from them
ARTIFACT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifact_detector")  # shipped
BIN_WIDTH = 2 / 255  # one 8-bit level in [-1, 1] units
NOISE_FLOOR = BIN_WIDTH ** 2 / 12  # variance of the rounding to 8 bits
PNG_COMPRESS_LEVEL = 6  # zlib's default; 9 is <= 0.1% shorter on 128x128 images but up to 30% slower


def model_device(model):
    return next(model.parameters()).device


# ---- the scores
def png_bits(images_uint8):
    """Input complexity (Serra et al., ICLR 2020): bits of each image's PNG file, headers included.
    uint8 [N, 3, H, W] or [3, H, W], numpy or torch -> float64 [N]; a pure function: workers can map it."""
    a = np.asarray(images_uint8.detach().cpu() if isinstance(images_uint8, torch.Tensor) else images_uint8)
    a = a[None] if a.ndim == 3 else a
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"png_bits expects uint8 [N, 3, H, W], got {a.dtype} {a.shape}")
    bits = []
    for img in a:
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0).copy()).save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        bits.append(8.0 * buf.tell())
    return np.array(bits, dtype=np.float64)


def model_bits_per_dim(mse):
    mse = np.maximum(np.asarray(mse, dtype=np.float64), NOISE_FLOOR)
    return 0.5 * np.log2(2 * math.pi * math.e * mse) - math.log2(BIN_WIDTH)


def complexity_score(mse, png, dims):
    return model_bits_per_dim(mse) - np.asarray(png, dtype=np.float64) / dims


def reconstruction_scores(model, x):
    """float [B, 3, S, S] from preprocess -> (recon [B, 3, S, S], pixel error [B, S, S], mse [B]); export.py
    puts this very code in the ONNX graph."""
    recon = model(x)
    pixel = pixel_error(recon, x)
    return recon, pixel, pixel.flatten(1).mean(dim=1)


@torch.no_grad()
def score_batch(model, x, png=None, keep_maps=False):
    """x: uint8 [B, 3, S, S] (preprocessed; moved as bytes, normalized on the device) or float [B, 3, S, S]
    -> dict score -> float64 numpy [B] (complexity with PNG bits), plus 'maps' [B, S, S], 'recon' and
    'input' if keep_maps."""
    x = x.to(model_device(model), non_blocking=True)  # asynchronous from a pinned batch
    x = (preprocess(x, model.config.image_size) if x.dtype == torch.uint8 else x).contiguous(
        memory_format=torch.channels_last)
    with autocast(x.device):
        recon, pixel, mse = reconstruction_scores(model, x)
    out = {"mse": mse.double().cpu().numpy()}
    if png is not None:
        out["complexity"] = complexity_score(out["mse"], png, 3 * model.config.image_size ** 2)
    if keep_maps:
        out["maps"], out["recon"], out["input"] = pixel.float().cpu(), recon.float().cpu(), x.float().cpu()
    return out


@torch.no_grad()
def tile_scores(model, tiles, counts):
    """The artifact detector on tiles of several images, uint8 [sum(counts), 3, t, t] -> float64
    [len(counts)]: each image's mean tile logit, in fp32 on every device."""
    x = preprocess(tiles.to(model_device(model)), tiles.shape[-1]).contiguous(
        memory_format=torch.channels_last)
    return np.array([part.mean().item() for part in model(x).double().cpu().split(list(counts))])


def score_images(model, images, with_complexity=True, batch_size=32, progress=None, artifact=None):
    """In-memory uint8 images, [N, 3, H, W] or a list of [3, H, W] of any sizes -> dict score -> float64 [N]:
    the autoencoder's scores at its input size (model None: none), the artifact score on original pixels."""
    parts, threads = [], min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:  # PNG coding beside the model: zlib releases the GIL
        for start in range(0, len(images), batch_size):
            batch, part = images[start:start + batch_size], {}
            if model is not None:
                size = model.config.image_size
                x = torch.cat([to_uint8(preprocess(reduced(im.cpu(), size), size)) for im in batch])
                png = pool.map(png_bits, x.chunk(threads)) if with_complexity else None  # started now
                part = score_batch(model, x)
                if png is not None:
                    png = np.concatenate(list(png))
                    part["complexity"] = complexity_score(part["mse"], png, x[0].numel())
            if artifact is not None:
                part["artifact"] = tile_scores(artifact, *image_tiles(batch, artifact.config.image_size))
            parts.append(part)
            if progress is not None:
                progress.update(len(batch))
    return {name: np.concatenate([p[name] for p in parts]) for name in (parts[0] if parts else ())}


# ---- files: listed once, decoded in worker processes while the model runs
def list_files(paths, rank=0, world=1):
    """[(index, path, listing error or None)] in listing order: rank 0 lists (a tree is walked once), every
    rank gets its share, every world-th entry."""
    entries = []
    if rank == 0:
        for path in iter_image_files(paths, on_error=lambda p, reason: entries.append((p, reason))):
            entries.append((path, None))
    if world > 1:
        entries = gather(entries)[0]  # rank 0's listing, on every rank
    return [(i, path, error) for i, (path, error) in enumerate(entries)][rank::world]


class ImageFiles(Dataset):
    """entries from list_files -> (index, path, uint8 input [3, S, S], PNG bits, tiles [T, 3, t, t], None),
    None where not asked for, or (index, path, None, None, None, error)."""

    def __init__(self, entries, size, with_complexity=True, tile=0):
        self.entries, self.size, self.tile = entries, size, tile
        self.with_complexity = with_complexity and size > 0

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        index, path, error = self.entries[i]
        if error is None:
            try:
                return index, path, *self.read(path), None
            except (ImageReadError, ValueError) as e:  # ValueError: too small to tile
                error = str(e)
        return index, path, None, None, None, error

    def read(self, path):
        """(autoencoder input uint8 [3, S, S], its PNG bits, tiles [T, 3, t, t]), None where not asked for."""
        x = to_uint8(preprocess(read_image(path, min_size=self.size), self.size))[0] if self.size else None
        tiles = tiles_of(read_image(path), self.tile) if self.tile else None
        return x, png_bits(x)[0] if self.with_complexity else None, tiles


def collate(items):
    """-> ([(index, path, error)], x [G, 3, S, S], PNG bits [G], (tiles [T, 3, t, t], per image [G])), None
    where absent: one tensor per batch, made in the worker (one per image ran out of file descriptors)."""
    good = [it for it in items if it[5] is None]
    x = torch.stack([it[2] for it in good]) if good and good[0][2] is not None else None
    png = np.array([it[3] for it in good]) if good and good[0][3] is not None else None
    tiles = None if not good or good[0][4] is None else (torch.cat([it[4] for it in good]),
                                                          [len(it[4]) for it in good])
    return [(it[0], it[1], it[5]) for it in items], x, png, tiles


def one_thread(worker_id):
    torch.set_num_threads(1)  # decode workers must not fight the model for cores


def default_workers(device):
    """Decode processes per rank: on a GPU every core of this rank's share (decoding is the bottleneck); on
    a CPU at most 4, which share the cores with the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return per_rank if device.type == "cuda" else min(4, per_rank)


def score_files(model, paths, batch_size=64, workers=None, rank=0, world=1, with_complexity=True,
                keep_maps=False, artifact=None):
    """Yields one dict per input in listing order: its listing index, path and scores, or its error.
    model None: no autoencoder scores (the artifact detector gives its own)."""
    size = lambda m: m.config.image_size if m is not None else 0  # noqa: E731
    files = ImageFiles(list_files(paths, rank, world), size(model), with_complexity, size(artifact))
    device = model_device(model if model is not None else artifact)
    workers = default_workers(device) if workers is None else workers
    loader = DataLoader(files, batch_size, collate_fn=collate, pin_memory=device.type == "cuda",
                        num_workers=workers, worker_init_fn=one_thread,
                        prefetch_factor=4 if workers else None)  # a GPU waits less on decoding
    for items, x, png, tiles in loader:
        scores = score_batch(model, x, png, keep_maps=keep_maps) if x is not None else {}
        if tiles is not None:
            scores["artifact"] = tile_scores(artifact, *tiles)
        j = 0
        for index, path, error in items:
            if error is not None:
                yield {"index": index, "path": path, "error": error}
                continue
            row = {"index": index, "path": path,
                   **{k: float(v[j]) for k, v in scores.items() if k in BASE_SCORES}}
            if keep_maps:
                row.update(input=scores["input"][j], map=scores["maps"][j], recon=scores["recon"][j])
            yield row
            j += 1


# ---- the API
class Detector:
    """Loaded models, their thresholds file, and a decision rule (score, threshold); scores anything.

    checkpoint: the autoencoder (None: the artifact score only). artifact_model: an artifact detector; the
    shipped one (ARTIFACT_WEIGHTS) when the score is artifact and none is given. thresholds: a file, "find"
    (the scripts' rule, thresholds.resolve), or None: scores only, unless the artifact detector alone
    brings its own file. threshold: a name in the file (default balanced) or a number; for combined a p-value
    level."""

    def __init__(self, checkpoint, thresholds=None, device="auto", score="mse", threshold=None,
                 batch_size=None, workers=None, artifact_model=None):
        artifact_model = artifact_model or (ARTIFACT_WEIGHTS if score == "artifact" else None)
        self.device = pick_device(device)
        self.model, self.artifact = load_models(checkpoint, self.device, artifact_model)
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)  # a GPU wants large ones
        self.workers = workers
        cfg, self.thresholds_source = None, None
        if thresholds or not checkpoint or score == "artifact":
            given = None if thresholds == "find" else thresholds
            # the artifact score decides with its detector's own file, unless told otherwise
            weights = checkpoint if score != "artifact" else None
            cfg, self.thresholds_source = thresholds_file.resolve(given, weights, artifact_model)
        self.thresholds = cfg
        self.calibration = {s: v for s, v in thresholds_file.calibration(cfg).items() if s in BASE_SCORES}
        prints = [m and weights_fingerprint(m) for m in (self.model, self.artifact)]
        precision = precision_name(self.device, self.model is not None)
        self.warnings = cfg and thresholds_file.binding_warnings(cfg, prints[0], precision,
                                                                 {"artifact": prints[1]}) or []
        self._set_rule(score, threshold)

    def with_rule(self, score, threshold=None):
        """The same loaded models and thresholds file, another decision rule: nothing is loaded again."""
        det = copy.copy(self)
        det._set_rule(score, threshold)
        return det

    def _set_rule(self, score, threshold):
        if score not in SCORES:
            raise UserError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if score == "combined" and not self.calibration:
            raise UserError("--score combined needs the calibration scores of a calibrate.py thresholds file")
        uses = {score} | (set(self.calibration) if score == "combined" else set())  # what it reads
        if self.model is None and uses & set(AE_SCORES):
            raise UserError(f"--score {score} needs the autoencoder: give --checkpoint")
        if "artifact" in uses and self.artifact is None:
            raise UserError(f"--score {score} needs the artifact detector (--artifact-model)"
                            + ": the thresholds file includes its score" * (score == "combined"))
        self.score_name, self.uses = score, uses
        scores_only = self.thresholds is None and threshold is None and score != "combined"  # no rule
        self.threshold, self.threshold_label = (None, None) if scores_only else thresholds_file.threshold(
            self.thresholds, score, "balanced" if threshold is None else threshold)

    def record(self, row):
        """A row as result files hold it: plain values only, None where absent."""
        verdict = "UNREADABLE" if "error" in row else row.get("verdict")
        return {"path": row["path"], "score_name": self.score_name, "score": row.get("score"),
                "p_value": row.get("p_value"), "verdict": verdict, "threshold": self.threshold,
                "error": row.get("error"), **{s: row.get(s) for s in BASE_SCORES}}

    def _finish(self, rows):
        """Adds score, p-value and verdict to the scored rows (in place); a non-finite score is an error."""
        for r in rows:
            if "error" not in r and not all(math.isfinite(r[s]) for s in BASE_SCORES if r.get(s) is not None):
                r["error"] = "the model gave a non-finite score (NaN or inf): broken weights?"
        good = [r for r in rows if "error" not in r]
        name, p = self.score_name, None
        if good and (name == "combined" or name in self.calibration):
            values = {s: [r[s] for r in good] for s in self.calibration if s in good[0]}
            p = thresholds_file.score_pvalues(self.calibration, values, name)
        for i, r in enumerate(good):
            r["score"] = float(p[i]) if name == "combined" else r[name]
            if p is not None:
                r["p_value"] = float(p[i])
            if self.threshold is not None:
                fake = r["p_value"] <= self.threshold if name == "combined" else r["score"] > self.threshold
                r["verdict"] = "FAKE" if fake else "REAL"
        return rows

    def _models(self):
        """(autoencoder, artifact detector, PNG coding?): each only if the rule reads its scores (PNG coding
        costs ~3 ms per image on a CPU core: complexity only)."""
        return (self.model if self.uses & set(AE_SCORES) else None,
                self.artifact if "artifact" in self.uses else None, "complexity" in self.uses)

    def score_paths(self, paths, rank=0, world=1, keep_maps=False):
        """Yields one row per input file in listing order (its "index"), streamed in batches; under torchrun
        each rank its share."""
        model, artifact, png = self._models()
        rows = score_files(model, paths, self.batch_size, self.workers, rank, world, png,
                           keep_maps and model is not None, artifact)
        while batch := list(islice(rows, self.batch_size)):
            yield from self._finish(batch)

    def score_tensors(self, images):
        """PIL images or uint8 [3, H, W] tensors (or one uint8 [N, 3, H, W] tensor) -> rows."""
        images = [from_pil(im) if isinstance(im, Image.Image) else im for im in images]
        if not all(torch.is_tensor(im) and im.dtype == torch.uint8 and im.shape[:-2] == (3,)
                   for im in images):
            raise UserError("cannot score that: give paths, PIL images or uint8 [3, H, W] tensors")
        model, artifact, png = self._models()
        try:
            scores = score_images(model, images, png, self.batch_size, artifact=artifact)
        except ValueError as e:  # an image too small to tile
            raise UserError(str(e)) from None
        return self._finish([{"path": f"<image {i}>", **{k: float(v[i]) for k, v in scores.items()}}
                             for i in range(len(images))])

    def score(self, inputs):
        """Paths (files, folders, globs), PIL images and uint8 tensors, mixed -> a list of rows: first the
        files in listing order, then the in-memory images in the order given."""
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        paths = [i for i in inputs if isinstance(i, (str, os.PathLike))]
        images = [i for i in inputs if not isinstance(i, (str, os.PathLike))]
        return [*(self.score_paths(paths) if paths else []), *(self.score_tensors(images) if images else [])]
