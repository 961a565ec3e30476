"""Scoring images with a trained autoencoder: the Python API, and the code that calibrate.py and
inference_example.py share.

    from detector import Detector
    det = Detector("runs/cifar10/model_best_checkpoint.ckpt", thresholds="thresholds_calibrated.json")
    for row in det.score(["photos/", "img.jpg", pil_image, uint8_tensor]):
        print(row["path"], row["score"], row.get("p_value"), row["verdict"])

Scores (higher = more anomalous / more likely fake) of a preprocessed input x (data.preprocess)
and its reconstruction r, with D = 3 * S * S values (docs/method.md derives them):
- mse:        mean((r - x)^2), the card's score.
- local:      the largest mean squared error over 16x16 windows (stride 8): for manipulations confined
              to a region, which a global mean dilutes.
- complexity: Serra et al. (ICLR 2020), the model's code length minus PNG's, in bits/dim, q = NOISE_FLOOR:
                  0.5 * log2(2 pi e * max(mse, q)) - log2(2/255)  -  PNG bits / D
- coding:     with a coding model (coding.py, --coding-model): the gap between the actual and the expected
              coding cost of the ORIGINAL pixels, bits/dim, over at most 16 tiles; two-sided (both signs are
              evidence), so it decides by its p-value.
- artifact:   with the detector of generator traces (model.ArtifactDetector, --artifact-model; one ships in
              ARTIFACT_WEIGHTS): its mean logit over at most 16 tiles of the ORIGINAL pixels; needs no autoencoder.
- combined:   the conformal p-values of the scores above against real calibration scores, Bonferroni-combined
              (thresholds.combined_pvalue). Lower = more fake.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import thresholds as thresholds_file
from coding import CodingModel, tiles_of
from data import ImageReadError, box_reduce, iter_image_files, pil_to_rgb, preprocess, read_image, to_uint8
from fakes import png_bits
from model import ArtifactDetector, ResidualAutoencoder, load_model, squared_error
from utils import UserError, autocast, pick_device, precision_name, weights_fingerprint

AE_SCORES = ("mse", "local", "complexity")  # the autoencoder's
BASE_SCORES = AE_SCORES + ("coding", "artifact")
ARTIFACT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifact_detector")  # the shipped one
SCORES = BASE_SCORES + ("combined",)
RUNTIMES = ("torch", "onnx", "openvino")  # the last two run export.py's graph on the CPU
LOCAL_WINDOW = 16
BIN_WIDTH = 2 / 255  # one 8-bit level in [-1, 1] units
NOISE_FLOOR = BIN_WIDTH ** 2 / 12  # variance of the rounding to 8 bits


def prepare_model(model, device):
    """channels_last on both devices: measured faster for this network on CPU and GPU (bench.py)."""
    return model.to(device, memory_format=torch.channels_last).eval()


def model_bits_per_dim(mse):
    mse = np.maximum(np.asarray(mse, dtype=np.float64), NOISE_FLOOR)
    return 0.5 * np.log2(2 * math.pi * math.e * mse) - math.log2(BIN_WIDTH)


def complexity_score(mse, png, dims):
    return model_bits_per_dim(mse) - np.asarray(png, dtype=np.float64) / dims


def reconstruction_scores(model, x):
    """float [B, 3, S, S] from preprocess -> (recon [B, 3, S, S], pixel error [B, S, S], mse [B], local [B]): plain
    tensor ops, so that export.py puts this very code in the ONNX graph."""
    recon = model(x)
    pixel = squared_error(recon, x).mean(dim=1)  # [B, S, S]
    window = min(LOCAL_WINDOW, pixel.shape[-1])
    local = F.avg_pool2d(pixel.unsqueeze(1), window, stride=max(window // 2, 1)).amax(dim=(1, 2, 3))
    return recon, pixel, pixel.flatten(1).mean(dim=1), local


@torch.no_grad()
def score_batch(model, x, png=None, keep_maps=False):
    """x: uint8 [B, 3, S, S] (preprocessed on the model's device: the copy moves bytes, a quarter of float32's)
    or float [B, 3, S, S] from preprocess -> dict score -> float64 numpy [B] (complexity only when PNG bits
    are given), plus 'maps' ([B, S, S] pixel error), 'recon' and 'input' (float) if keep_maps.
    model: a torch autoencoder, or export.OnnxAutoencoder (uint8 input only)."""
    if not isinstance(model, torch.nn.Module):  # an exported graph (export.py) in its runtime
        recon, pixel, mse, local = model(x)
        x = preprocess(x, model.config.image_size) if keep_maps else x
    else:
        x = x.to(model_device(model), non_blocking=True)  # asynchronous from a pinned batch
        x = (preprocess(x, model.config.image_size) if x.dtype == torch.uint8 else x).contiguous(memory_format=torch.channels_last)
        with autocast(x.device):
            recon, pixel, mse, local = reconstruction_scores(model, x)
    out = {"mse": mse.double().cpu().numpy(), "local": local.double().cpu().numpy()}
    if png is not None:
        out["complexity"] = complexity_score(out["mse"], png, 3 * model.config.image_size ** 2)
    if keep_maps:
        out["maps"], out["recon"], out["input"] = pixel.float().cpu(), recon.float().cpu(), x.float().cpu()
    return out


def model_device(model):
    return next(model.parameters()).device if isinstance(model, torch.nn.Module) else model.device


@torch.no_grad()
def tile_scores(model, tiles, counts):
    """Tiles of several images, uint8 [sum(counts), 3, t, t] -> float64 numpy [len(counts)]: each image's mean tile
    score, the coding model's gap or the artifact detector's logit (in fp32 on every device)."""
    if isinstance(model, CodingModel):
        per_tile = model.tile_gaps(tiles)  # [T]
    else:
        x = preprocess(tiles.to(model_device(model)), tiles.shape[-1]).contiguous(memory_format=torch.channels_last)
        per_tile = model(x).double().cpu()  # [T]
    return np.array([part.mean().item() for part in per_tile.split(list(counts))])


def tile_models(coding, artifact):
    """{score name: model} of the models that read tiles of original pixels."""
    return {name: m for name, m in (("coding", coding), ("artifact", artifact)) if m is not None}


def image_tiles(images, tile):
    """uint8 images [3, H, W] (a list, or a batch [N, 3, H, W]) -> (their tiles [T, 3, tile, tile], tiles per image)."""
    tiles = [tiles_of(im, tile) for im in images]
    return torch.cat(tiles), [len(t) for t in tiles]


def reduced(image, size):
    """uint8 [3, H, W] -> box-reduced as read_image reduces a file, so that an image scores the same in memory."""
    if min(image.shape[-2:]) < 4 * size:
        return image  # box_reduce would keep it as it is
    pil = box_reduce(Image.fromarray(image.permute(1, 2, 0).numpy()), size)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def score_images(model, images, coding=None, with_complexity=True, batch_size=32, progress=None, artifact=None):
    """Scores in-memory uint8 images, [N, 3, H, W] or a list of [3, H, W] of any sizes, each at the autoencoder's
    input size (model None: no autoencoder) and, with a coding model or an artifact detector, on tiles of its
    original pixels; returns dict score -> float64 numpy [N]."""
    parts, tilers = [], tile_models(coding, artifact)
    # PNG coding runs in a thread while the model scores the batch: zlib releases the GIL
    with ThreadPoolExecutor(max_workers=1) as pool:
        for start in range(0, len(images), batch_size):
            batch, part = images[start:start + batch_size], {}
            if model is not None:
                size = model.config.image_size
                x = torch.cat([to_uint8(preprocess(reduced(im.cpu(), size), size)) for im in batch])  # [B, 3, S, S]
                png = pool.submit(png_bits, x) if with_complexity else None
                part = score_batch(model, x)
                if png is not None:
                    part["complexity"] = complexity_score(part["mse"], png.result(), x[0].numel())
            for name, m in tilers.items():
                part[name] = tile_scores(m, *image_tiles(batch, m.config.image_size))
            parts.append(part)
            if progress is not None:
                progress.update(len(batch))
    return {name: np.concatenate([p[name] for p in parts]) for name in (parts[0] if parts else ())}


# ---- files: decoded in worker processes while the model runs
class ImageFiles(IterableDataset):
    """Lists `paths` lazily and yields (path, uint8 input [3, S, S] or None, PNG bits or None, {tile side: tiles
    [T, 3, t, t]}, error), or (path, None, None, None, error). Worker w of W on rank r of R takes every (W*R)-th
    file; one of them reports listing errors. Tiles are cut from a second, full-resolution decode: the autoencoder's
    input (size > 0) comes from the same (JPEG draft) decode with or without them, so its scores never depend on them."""

    def __init__(self, paths, size, rank=0, world=1, with_complexity=True, tiles=()):
        self.paths, self.size, self.rank, self.world = list(map(str, paths)), size, rank, world
        self.with_complexity, self.tiles = with_complexity and size > 0, tuple(tiles)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info:
            torch.set_num_threads(1)  # decode workers must not fight the model for cores
        shard, shards = self.rank * workers + worker, self.world * workers
        errors = []  # listing errors, yielded in order before the next file
        report = (lambda p, reason: errors.append((p, None, None, None, reason))) if shard == 0 else None
        for i, path in enumerate(iter_image_files(self.paths, on_error=report)):
            yield from errors
            errors.clear()
            if i % shards == shard:
                try:
                    x = to_uint8(preprocess(read_image(path, min_size=self.size), self.size)) if self.size else None
                    full = read_image(path) if self.tiles else None
                    yield (path, x[0] if self.size else None, png_bits(x)[0] if self.with_complexity else None,
                           {t: tiles_of(full, t) for t in self.tiles}, None)
                except (ImageReadError, ValueError) as e:  # ValueError: too small to tile
                    yield path, None, None, None, str(e)
        yield from errors


def collate(items):
    """In the worker: one input tensor per batch, not one per image (each is a shared-memory file descriptor,
    and batch x prefetch x workers of them ran out of descriptors).
    -> ([(path, error)], uint8 x [G, 3, S, S] or None, PNG bits [G] or None, {tile side: (tiles [T, 3, t, t],
    tiles per image [G])})"""
    good = [it for it in items if it[4] is None]
    x = torch.stack([it[1] for it in good]) if good and good[0][1] is not None else None
    png = np.array([it[2] for it in good]) if good and good[0][2] is not None else None
    tiles = {t: (torch.cat([it[3][t] for it in good]), [len(it[3][t]) for it in good]) for t in (good[0][3] if good else ())}
    return [(it[0], it[4]) for it in items], x, png, tiles


def score_files(model, paths, batch_size=64, workers=None, rank=0, world=1, with_complexity=True, keep_maps=False,
                coding=None, artifact=None):
    """Yields one dict per input: its path and scores, or its error. Streams: memory stays flat.
    model None: no autoencoder scores (then a coding model or an artifact detector gives them)."""
    tilers = tile_models(coding, artifact)
    files = ImageFiles(paths, model.config.image_size if model is not None else 0, rank, world, with_complexity,
                       {m.config.image_size for m in tilers.values()})
    device = model_device(model if model is not None else next(iter(tilers.values())))
    loader = DataLoader(files, collate_fn=collate, batch_size=batch_size, pin_memory=device.type == "cuda",
                        num_workers=min(4, os.cpu_count() or 1) if workers is None else workers)  # the batch is pinned
    for items, x, png, tiles in loader:
        scores = score_batch(model, x, png, keep_maps=keep_maps) if x is not None else {}
        for name, m in tilers.items():
            if tiles:
                scores[name] = tile_scores(m, *tiles[m.config.image_size])
        j = 0
        for path, error in items:
            if error is not None:
                yield {"path": path, "error": error}
                continue
            row = {"path": path, **{k: float(v[j]) for k, v in scores.items() if k not in ("maps", "recon", "input")}}
            if keep_maps:
                row.update(input=scores["input"][j], map=scores["maps"][j], recon=scores["recon"][j])
            yield row
            j += 1


# ---- the API
def add_device_flags(add):
    """--device and --runtime, as every script that scores takes them (check them with check_device_flags)."""
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available (cpu for onnx / openvino)")
    add("--runtime", choices=RUNTIMES, default="torch", help="onnx / openvino: --checkpoint is export.py's .onnx file, "
        "run by ONNX Runtime / OpenVINO on the CPU")


def check_device_flags(parser, args):
    """The exported runtimes run on the CPU: auto means cpu there, and cuda is a usage error."""
    if args.runtime != "torch":
        if args.device == "cuda":
            parser.error(f"--runtime {args.runtime} runs on the CPU: use --device cpu, or --runtime torch on the GPU")
        args.device = "cpu"
    return args


def load_kind(source, kind, device):
    """The model in `source`, checked to be of class `kind` (the flag named a model of that kind), ready to score."""
    model = load_model(source, device)
    if not isinstance(model, kind):
        what = {ResidualAutoencoder: ("an autoencoder", "--checkpoint"), CodingModel: ("a coding model", "--coding-model"),
                ArtifactDetector: ("an artifact detector", "--artifact-model")}
        raise UserError(f"{source} holds {what[type(model)][0]}, not {what[kind][0]}: give it with {what[type(model)][1]}")
    return prepare_model(model, device)


def load_models(checkpoint, coding_checkpoint, device, runtime="torch", artifact_checkpoint=None):
    """(autoencoder or None, coding model or None, artifact detector or None), each checked to be the kind its flag
    asks for. runtime 'onnx' or 'openvino': the autoencoder is an exported graph (export.py) run on the CPU."""
    coding = coding_checkpoint and load_kind(coding_checkpoint, CodingModel, device)
    artifact = artifact_checkpoint and load_kind(artifact_checkpoint, ArtifactDetector, device)
    if checkpoint and runtime != "torch":
        if device.type != "cpu":
            raise UserError(f"--runtime {runtime} runs on the CPU: add --device cpu, or use --runtime torch on the GPU")
        from export import OnnxAutoencoder  # here: export.py imports this module

        return OnnxAutoencoder(checkpoint, runtime), coding, artifact
    return checkpoint and load_kind(checkpoint, ResidualAutoencoder, device), coding, artifact


class Detector:
    """Loads a model (and optionally its thresholds file) once; scores anything.

    score: 'mse' (the card's), 'local', 'complexity', 'coding' or 'combined' (see the module doc).
    threshold: a name in the thresholds file (strict / balanced / sensitive / optimal, default
    balanced) or a number; for 'coding' and 'combined' a p-value level (FAKE when p <= level), default 0.05.
    coding_model: a coding model (coding.py) for the 'coding' score; 'combined' then includes it.
    artifact_model: an artifact detector (train.py --preset artifact) for the 'artifact' score; ARTIFACT_WEIGHTS when
    the score is 'artifact' and none is given. checkpoint (the autoencoder) may then be None, and the thresholds
    default to the file beside the artifact detector.
    runtime: 'torch', or 'onnx' / 'openvino' for a graph written by export.py (checkpoint = the .onnx file), run by
    ONNX Runtime / OpenVINO on the CPU; without a thresholds file it uses the thresholds exported inside it."""

    def __init__(self, checkpoint, thresholds=None, device="auto", score="mse", threshold=None,
                 batch_size=None, workers=None, coding_model=None, runtime="torch", artifact_model=None):
        if score not in SCORES:
            raise UserError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if not checkpoint and score != "artifact":
            raise UserError(f"--score {score} needs the autoencoder: give --checkpoint")
        artifact_model = artifact_model or (ARTIFACT_WEIGHTS if score == "artifact" else None)
        self.device = pick_device("cpu" if runtime != "torch" and device == "auto" else device)
        self.model, self.coding, self.artifact = load_models(checkpoint, coding_model, self.device, runtime, artifact_model)
        self.fingerprint = weights_fingerprint(self.model) if self.model is not None else None
        if not thresholds and not checkpoint and (own := thresholds_file.beside(artifact_model)).is_file():
            thresholds = str(own)  # the artifact detector's own calibration
        # small batches on a CPU keep decode and model overlapped; a GPU wants large ones
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        self.score_name, self.workers = score, workers
        cfg, self.thresholds_source = (thresholds_file.read(thresholds), thresholds) if thresholds else (None, None)
        if not thresholds and runtime != "torch":
            # a calibration beside the .onnx (calibrate.py --runtime onnx writes it there), else the exported one
            beside, found = thresholds_file.beside(checkpoint), thresholds_file.find(checkpoint)
            cfg, self.thresholds_source = ((self.model.thresholds, f"exported inside {checkpoint}")
                                           if self.model.thresholds and not beside.is_file()
                                           else (found and thresholds_file.read(found), found))
        self.thresholds = cfg
        self.calibration = {s: v for s, v in thresholds_file.calibration(cfg).items() if s in BASE_SCORES}
        fingerprints = {"coding": self.coding and weights_fingerprint(self.coding),
                        "artifact": self.artifact and weights_fingerprint(self.artifact)}
        self.warnings = thresholds_file.binding_warnings(cfg, self.fingerprint, precision_name(self.device),
                                                         fingerprints) if cfg else []
        # PNG coding costs ~3 ms per image on a CPU core: only when the score uses it
        self.needs_complexity = score == "complexity" or (score == "combined" and "complexity" in self.calibration)
        if score == "combined" and not self.calibration:
            raise UserError("--score combined needs the calibration scores of a thresholds file written by calibrate.py")
        if (score == "coding" or score == "combined" and "coding" in self.calibration) and not self.coding:
            raise UserError(f"--score {score} needs the coding model (--coding-model; train one with "
                            f"train.py --preset coding)" + (": the thresholds file includes its score" * (score != "coding")))
        if score == "combined" and "artifact" in self.calibration and not self.artifact:
            raise UserError("--score combined needs the artifact detector (--artifact-model): the thresholds file "
                            "includes its score")
        choice = "balanced" if threshold is None else threshold
        scores_only = cfg is None and threshold is None and score != "combined"  # nothing to decide with
        self.threshold, self.threshold_label = (None, None) if scores_only else thresholds_file.threshold(cfg, score, choice)
        if score == "coding" and self.threshold is not None and "coding" not in self.calibration:
            raise UserError("--score coding decides by p-value: give a thresholds file that calibrate.py wrote with "
                            "--coding-model")

    def record(self, row):
        """A row as result files hold it: plain values only, None where absent."""
        return {"path": row["path"], "score_name": self.score_name, "score": row.get("score"),
                "p_value": row.get("p_value"), "verdict": "UNREADABLE" if "error" in row else row.get("verdict"),
                "threshold": self.threshold, "error": row.get("error"), **{s: row.get(s) for s in BASE_SCORES}}

    def _finish(self, rows):
        """Adds score, p-value and verdict to the scored rows (in place); a non-finite score is an error, not a verdict."""
        for r in rows:
            if "error" not in r and not all(math.isfinite(r[s]) for s in BASE_SCORES if r.get(s) is not None):
                r["error"] = "the model gave a non-finite score (NaN or inf): its weights or its runtime are broken"
        good = [r for r in rows if "error" not in r]
        name, p = self.score_name, None
        if good and (name == "combined" or name in self.calibration):
            values = {s: [r[s] for r in good] for s in self.calibration if s in good[0]}  # combined: all are there
            p = thresholds_file.score_pvalues(self.calibration, values, name)
        by_p = name in thresholds_file.P_VALUE_SCORES  # decided by the p-value: small means fake
        for i, r in enumerate(good):
            r["score"] = float(p[i]) if name == "combined" else r[name]
            if p is not None:
                r["p_value"] = float(p[i])
            if self.threshold is not None:
                r["verdict"] = "FAKE" if (r["p_value"] <= self.threshold if by_p else r["score"] > self.threshold) else "REAL"
        return rows

    def score_paths(self, paths, rank=0, world=1, keep_maps=False):
        """Yields one row per input file, streamed in batches; under torchrun each rank its share."""
        rows = score_files(self.model, paths, self.batch_size, self.workers, rank, world, with_complexity=self.needs_complexity,
                           keep_maps=keep_maps and self.model is not None, coding=self.coding, artifact=self.artifact)
        while batch := list(islice(rows, self.batch_size)):
            yield from self._finish(batch)

    def score_tensors(self, images):
        """PIL images or uint8 [3, H, W] tensors (or one uint8 [N, 3, H, W] tensor) -> rows."""
        images = [torch.from_numpy(np.array(pil_to_rgb(im), dtype=np.uint8)).permute(2, 0, 1)
                  if isinstance(im, Image.Image) else im for im in images]
        if not all(torch.is_tensor(im) and im.dtype == torch.uint8 and im.dim() == 3 and im.shape[0] == 3 for im in images):
            raise UserError("cannot score that: give paths, PIL images or uint8 [3, H, W] tensors")
        try:
            scores = score_images(self.model, images, self.coding, self.needs_complexity, self.batch_size,
                                  artifact=self.artifact)
        except ValueError as e:  # an image too small to tile
            raise UserError(str(e)) from None
        return self._finish([{"path": f"<image {i}>", **{k: float(v[i]) for k, v in scores.items()}}
                             for i in range(len(images))])

    def score(self, inputs):
        """Paths (files, folders, globs), PIL images and uint8 tensors, mixed; returns a list of rows:
        first the files (in listing order), then the in-memory images in the order given."""
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        paths = [i for i in inputs if isinstance(i, (str, os.PathLike))]
        images = [i for i in inputs if not isinstance(i, (str, os.PathLike))]
        return (list(self.score_paths(paths)) if paths else []) + (self.score_tensors(images) if images else [])
