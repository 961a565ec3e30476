"""Scoring images: the Python API, and the scoring code every script shares.

    from detector import Detector
    det = Detector("runs/cifar10/model_best_checkpoint.ckpt", thresholds="thresholds_calibrated.json")
    for row in det.score(["photos/", "img.jpg", pil_image, uint8_tensor]):
        print(row["path"], row["score"], row.get("p_value"), row["verdict"])
    strict = det.with_rule("mse", "strict")   # the same weights, another decision rule
SCORES names every score (docs/method.md defines them); higher = more fake."""

import copy
import math
import os
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import metrics
import thresholds as thresholds_file
from checkpoints import weights_fingerprint
from data import from_pil, preprocess, reduced, tiles_of, to_uint8
from images import ImageReadError, iter_image_files, read_image
from model import load_models, pixel_error
from utils import UserError, autocast, pick_device, precision_name

SCORES = {  # the registry: name -> what it measures (the CLIs' --score, the result files' columns)
    "mse": "the card's: the autoencoder's mean squared reconstruction error at its input size",
    "artifact": "the detector of generator traces: its mean logit over at most 16 tiles of original pixels",
}
ARTIFACT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifact_detector")  # shipped


def model_device(model):
    return next(model.parameters()).device


# ---- the scores
@torch.no_grad()
def score_batch(model, x, keep_maps=False):
    """x: uint8 [B, 3, S, S] (preprocessed; moved as bytes, normalized on the device) or float [B, 3, S, S]
    -> {"mse": float64 numpy [B]}, plus 'maps' [B, S, S], 'recon' and 'input' if keep_maps."""
    x = x.to(model_device(model), non_blocking=True)  # asynchronous from a pinned batch
    x = (preprocess(x, model.config.image_size) if x.dtype == torch.uint8 else x).contiguous(
        memory_format=torch.channels_last)
    with autocast(x.device):
        recon = model(x)
        pixel = pixel_error(recon, x)  # [B, S, S]
        mse = pixel.flatten(1).mean(dim=1)
    out = {"mse": mse.double().cpu().numpy()}
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


def score_images(model, images, batch_size=32, progress=None, artifact=None):
    """In-memory uint8 images, [N, 3, H, W] or a list of [3, H, W] of any sizes -> dict score -> float64 [N]:
    mse at the autoencoder's input size (model None: none), the artifact score on original pixels."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch, part = images[start:start + batch_size], {}
        if model is not None:
            size = model.config.image_size
            part = score_batch(model, torch.cat([to_uint8(preprocess(reduced(im.cpu(), size), size))
                                                 for im in batch]))
        if artifact is not None:
            tiles = [tiles_of(im, artifact.config.image_size) for im in batch]  # [T_i, 3, t, t] each
            part["artifact"] = tile_scores(artifact, torch.cat(tiles), [len(t) for t in tiles])
        parts.append(part)
        if progress is not None:
            progress.update(len(batch))
    return {name: np.concatenate([p[name] for p in parts]) for name in (parts[0] if parts else ())}


# ---- files: listed once, decoded in worker processes while the model runs
def list_files(paths):
    """[(path, listing error or None)], up front: the rows keep this order whatever the workers."""
    entries = []
    for path in iter_image_files(paths, on_error=lambda p, reason: entries.append((p, reason))):
        entries.append((path, None))
    return entries


class ImageFiles(Dataset):
    """entries from list_files -> (path, uint8 input [3, S, S], tiles [T, 3, t, t], None), None where not
    asked for, or (path, None, None, error)."""

    def __init__(self, entries, size, tile=0):
        self.entries, self.size, self.tile = entries, size, tile

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        path, error = self.entries[i]
        if error is None:
            try:
                return path, *self.read(path), None
            except (ImageReadError, ValueError) as e:  # ValueError: too small to tile
                error = str(e)
        return path, None, None, error

    def read(self, path):
        """(autoencoder input uint8 [3, S, S], tiles [T, 3, t, t]), None where not asked for."""
        x = to_uint8(preprocess(read_image(path, min_size=self.size), self.size))[0] if self.size else None
        return x, tiles_of(read_image(path), self.tile) if self.tile else None


def collate(items):
    """-> ([(path, error)], x [G, 3, S, S], (tiles [T, 3, t, t], per image [G])), None where absent: one
    tensor per batch, made in the worker (one per image ran out of file descriptors)."""
    good = [it for it in items if it[3] is None]
    x = torch.stack([it[1] for it in good]) if good and good[0][1] is not None else None
    tiles = None if not good or good[0][2] is None else (torch.cat([it[2] for it in good]),
                                                          [len(it[2]) for it in good])
    return [(it[0], it[3]) for it in items], x, tiles


def one_thread(worker_id):
    torch.set_num_threads(1)  # decode workers must not fight the model for cores


def default_workers(device):
    """Decode processes: every core on a GPU (decoding is the bottleneck); at most 4 beside a CPU model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if device.type == "cuda" else min(4, cores)


def score_files(model, paths, batch_size=64, workers=None, artifact=None):
    """Yields one dict per input in listing order: its path and scores, or its error.
    model None: no autoencoder scores (the artifact detector gives its own)."""
    size = lambda m: m.config.image_size if m is not None else 0  # noqa: E731
    files = ImageFiles(list_files(paths), size(model), size(artifact))
    device = model_device(model if model is not None else artifact)
    workers = default_workers(device) if workers is None else workers
    loader = DataLoader(files, batch_size, collate_fn=collate, pin_memory=device.type == "cuda",
                        num_workers=workers, worker_init_fn=one_thread,
                        prefetch_factor=4 if workers else None)  # a GPU waits less on decoding
    for items, x, tiles in loader:
        scores = score_batch(model, x) if x is not None else {}
        if tiles is not None:
            scores["artifact"] = tile_scores(artifact, *tiles)
        j = 0
        for path, error in items:
            if error is not None:
                yield {"path": path, "error": error}
                continue
            yield {"path": path, **{k: float(v[j]) for k, v in scores.items()}}
            j += 1


# ---- the API
class Detector:
    """Loaded models, their thresholds file, and a decision rule (score, threshold); scores anything.

    checkpoint: the autoencoder (None: the artifact score only). artifact_model: an artifact detector; the
    shipped one (ARTIFACT_WEIGHTS) when the score is artifact and none is given. thresholds: a file, "find"
    (the scripts' rule, thresholds.resolve), or None: scores only, unless the artifact detector alone
    brings its own file. threshold: a name in the file (default balanced) or a number."""

    def __init__(self, checkpoint, thresholds=None, device="auto", score="mse", threshold=None,
                 batch_size=None, workers=None, artifact_model=None):
        artifact_model = artifact_model or (ARTIFACT_WEIGHTS if score == "artifact" else None)
        self.device = pick_device(device)
        self.model, self.artifact = load_models(checkpoint, self.device, artifact_model)
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)  # a GPU wants large ones
        self.workers = workers
        self.thresholds, self.thresholds_source = None, None
        if thresholds or not checkpoint or score == "artifact":  # the artifact score: its detector's own file
            self.thresholds, self.thresholds_source = thresholds_file.resolve(
                None if thresholds == "find" else thresholds, checkpoint if score != "artifact" else None,
                artifact_model)
        cfg = self.thresholds
        self.calibration = thresholds_file.calibration(cfg)
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
        if score == "mse" and self.model is None:
            raise UserError("--score mse needs the autoencoder: give --checkpoint")
        if score == "artifact" and self.artifact is None:
            raise UserError("--score artifact needs the artifact detector (--artifact-model)")
        self.score_name = score
        scores_only = self.thresholds is None and threshold is None  # no rule
        self.threshold, self.threshold_label = (None, None) if scores_only else thresholds_file.threshold(
            self.thresholds, score, "balanced" if threshold is None else threshold)

    def record(self, row):
        """A row as result files hold it: plain values only, None where absent."""
        verdict = "UNREADABLE" if "error" in row else row.get("verdict")
        return {"path": row["path"], "score_name": self.score_name, "score": row.get("score"),
                "p_value": row.get("p_value"), "verdict": verdict, "threshold": self.threshold,
                "error": row.get("error"), **{s: row.get(s) for s in SCORES}}

    def _finish(self, rows):
        """Adds score, p-value and verdict to the scored rows (in place); a non-finite score is an error."""
        name = self.score_name
        for r in rows:
            if "error" not in r and not math.isfinite(r[name]):
                r["error"] = "the model gave a non-finite score (NaN or inf): broken weights?"
        good = [r for r in rows if "error" not in r]
        cal = self.calibration.get(name)
        p = metrics.conformal_pvalues(cal, [r[name] for r in good]) if good and cal is not None else None
        for i, r in enumerate(good):
            r["score"] = r[name]
            if p is not None:
                r["p_value"] = float(p[i])
            if self.threshold is not None:
                r["verdict"] = "FAKE" if r["score"] > self.threshold else "REAL"
        return rows

    def _models(self):
        """(autoencoder, artifact detector): only the one whose score the rule reads runs."""
        return (self.model, None) if self.score_name == "mse" else (None, self.artifact)

    def score_paths(self, paths):
        """Yields one row per input file in listing order, streamed in batches."""
        model, artifact = self._models()
        rows = score_files(model, paths, self.batch_size, self.workers, artifact)
        while batch := list(islice(rows, self.batch_size)):
            yield from self._finish(batch)

    def score_tensors(self, images):
        """PIL images or uint8 [3, H, W] tensors (or one uint8 [N, 3, H, W] tensor) -> rows."""
        images = [from_pil(im) if isinstance(im, Image.Image) else im for im in images]
        if not all(torch.is_tensor(im) and im.dtype == torch.uint8 and im.shape[:-2] == (3,)
                   for im in images):
            raise UserError("cannot score that: give paths, PIL images or uint8 [3, H, W] tensors")
        model, artifact = self._models()
        try:
            scores = score_images(model, images, self.batch_size, artifact=artifact)
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
