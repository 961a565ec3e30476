"""
Scoring images with a trained autoencoder: the code calibrate.py and
inference_example.py share, and the Python API.

    from detector import Detector
    det = Detector("runs/cifar10/model_best_checkpoint.ckpt", thresholds="thresholds_calibrated.json")
    for row in det.score(["photos/", "img.jpg", pil_image, uint8_tensor]):
        print(row["path"], row["score"], row["p_value"], row["verdict"])

Scores (higher = more anomalous / more likely fake), all from the same preprocessed
input x (data.preprocess) and its reconstruction r, with D = 3 * S * S values:
- mse:        mean((r - x)^2), the card's score.
- local:      the largest mean squared error over 16x16 windows (stride 8): for
              manipulations confined to a region, which a global mean dilutes.
- complexity: Serra et al. (ICLR 2020): the model's code length minus a lossless
              compressor's, in bits per dimension:
                  0.5 * log2(2 pi e * max(mse, q)) + log2(127.5)  -  PNG bits / D
              the first term is the cost of coding x to 8-bit precision under a Gaussian
              error model N(r, mse) (bin width 2/255 in [-1, 1] units; q = (2/255)^2 / 12 is
              the quantization noise floor); the second is the PNG size of the quantized
              input. Smooth images are cheap for PNG, so they lose their unearned low score.
- combined:   each of the three turned into a conformal p-value against real
              calibration scores; p = min(1, 3 * min p_i) (Bonferroni), which keeps the
              false-positive guarantee of each single p-value. Lower = more fake.
"""

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import metrics
from data import ImageReadError, iter_image_files, preprocess, read_image, to_uint8
from fakes import png_bits
from model import autocast, load_model, precision_name, weights_fingerprint

BASE_SCORES = ("mse", "local", "complexity")
SCORES = BASE_SCORES + ("combined",)
FPR_LEVELS = {"strict": 0.01, "balanced": 0.05, "sensitive": 0.10}  # conformal false-positive levels
LOCAL_WINDOW = 16
BIN_WIDTH = 2 / 255  # one 8-bit level in [-1, 1] units
NOISE_FLOOR = BIN_WIDTH ** 2 / 12


class ConfigError(ValueError):
    """A usage or configuration problem (bad thresholds file, unknown name, ...)."""


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def prepare_model(model, device):
    """channels_last on both devices: measured faster for this network on CPU and GPU (bench.py)."""
    return model.to(device, memory_format=torch.channels_last).eval()


# ----------------------------------------------------------------------------
# scores of one batch

def model_bits_per_dim(mse):
    mse = np.maximum(np.asarray(mse, dtype=np.float64), NOISE_FLOOR)
    return 0.5 * np.log2(2 * math.pi * math.e * mse) - math.log2(BIN_WIDTH)


def complexity_score(mse, png, dims):
    """Model code length minus PNG code length, in bits per dimension (see the module doc)."""
    return model_bits_per_dim(mse) - np.asarray(png, dtype=np.float64) / dims


def input_png_bits(x):
    """PNG code length in bits of each preprocessed image, quantized back to uint8."""
    return png_bits(to_uint8(x.cpu()))


@torch.no_grad()
def score_batch(model, x, png=None, keep_maps=False):
    """x: float [B, 3, S, S] from preprocess. Returns dict name -> float64 numpy [B]
    (complexity only when png bits are given), plus 'maps' (pixel error [B, S, S]) and
    'recon' if keep_maps."""
    device = next(model.parameters()).device
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device):
        recon = model(x)
    sq = (recon.float() - x.float()).pow(2)  # [B, 3, S, S]
    mse = sq.flatten(1).mean(dim=1)  # [B], computed as model.reconstruction_error(x, 'none') does
    pixel = sq.mean(dim=1)  # [B, S, S]
    window = min(LOCAL_WINDOW, pixel.shape[-1])
    local = F.avg_pool2d(pixel.unsqueeze(1), window, stride=max(window // 2, 1)).amax(dim=(1, 2, 3))
    out = {"mse": mse.double().cpu().numpy(), "local": local.double().cpu().numpy()}
    if png is not None:
        out["complexity"] = complexity_score(out["mse"], png, x[0].numel())
    if keep_maps:
        out["maps"], out["recon"] = pixel.cpu(), recon.float().cpu()
    return out


def score_uint8(model, images, batch_size=256, with_complexity=True, progress=None):
    """Scores an in-memory uint8 set [N, 3, H, W]; returns dict name -> float64 numpy [N]."""
    device = next(model.parameters()).device
    size = model.config.image_size
    parts = {}
    # PNG coding runs in a thread while the model scores the batch: zlib releases the GIL
    with ThreadPoolExecutor(max_workers=1) as pool:
        for start in range(0, images.shape[0], batch_size):
            x = preprocess(images[start:start + batch_size].to(device), size)
            png = pool.submit(input_png_bits, x) if with_complexity else None
            scores = score_batch(model, x)
            if png is not None:
                scores["complexity"] = complexity_score(scores["mse"], png.result(), x[0].numel())
            for name, values in scores.items():
                parts.setdefault(name, []).append(values)
            if progress is not None:
                progress.update(x.shape[0])
    return {name: np.concatenate(v) for name, v in parts.items()}


# ----------------------------------------------------------------------------
# scoring files: decoding in worker processes while the model runs

class ImageFiles(IterableDataset):
    """Lazily lists `paths` and yields (path, input [3, S, S] or None, png bits or None,
    error or None). Worker w of W (on rank r of R) takes every (W*R)-th file."""

    def __init__(self, paths, size, rank=0, world=1, with_complexity=True):
        self.paths, self.size, self.rank, self.world = list(map(str, paths)), size, rank, world
        self.with_complexity = with_complexity

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shard, shards = self.rank * workers + worker, self.world * workers
        listing_errors = []
        report = shard == 0  # every worker walks the tree; one reports its problems
        for i, path in enumerate(iter_image_files(self.paths, on_error=lambda p, r: listing_errors.append((p, r)))):
            while listing_errors:
                p, reason = listing_errors.pop(0)
                if report:
                    yield p, None, None, reason
            if i % shards != shard:
                continue
            try:
                x = preprocess(read_image(path, min_size=self.size), self.size)  # [1, 3, S, S]
                yield path, x[0], (input_png_bits(x)[0] if self.with_complexity else None), None
            except ImageReadError as e:
                yield path, None, None, str(e)
        for p, reason in listing_errors:
            if report:
                yield p, None, None, reason


def _init_worker(_):
    torch.set_num_threads(1)  # decode workers must not fight the model for cores


def iter_file_batches(paths, size, batch_size=64, workers=None, rank=0, world=1, with_complexity=True,
                      pin_memory=False):
    """Yields lists of (path, x, png, error) of up to batch_size decoded files."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    loader = DataLoader(ImageFiles(paths, size, rank, world, with_complexity), batch_size=batch_size,
                        num_workers=workers, collate_fn=list, worker_init_fn=_init_worker,
                        prefetch_factor=2 if workers else None, persistent_workers=False, pin_memory=pin_memory)
    yield from loader


def score_files(model, paths, batch_size=64, workers=None, rank=0, world=1, with_complexity=True, keep_maps=False):
    """Yields one dict per input: path, the scores (or error). Files stream through: memory
    stays flat however many there are."""
    size = model.config.image_size
    cuda = next(model.parameters()).device.type == "cuda"  # pinned batches make the copy truly asynchronous
    for items in iter_file_batches(paths, size, batch_size, workers, rank, world, with_complexity, pin_memory=cuda):
        good = [it for it in items if it[3] is None]
        scores = {}
        if good:
            x = torch.stack([it[1] for it in good])
            png = np.array([it[2] for it in good]) if with_complexity else None
            scores = score_batch(model, x, png, keep_maps=keep_maps)
        j = 0
        for path, _, _, error in items:
            if error is not None:
                yield {"path": path, "error": error}
                continue
            row = {"path": path, **{k: float(v[j]) for k, v in scores.items() if k not in ("maps", "recon")}}
            if keep_maps:
                row["input"], row["map"], row["recon"] = good[j][1], scores["maps"][j], scores["recon"][j]
            yield row
            j += 1


# ----------------------------------------------------------------------------
# thresholds files

def read_thresholds(path):
    """Parses and validates a thresholds file in the card's schema; raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"thresholds file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        table = cfg["reconstruction_thresholds"]["thresholds"]
        for name, entry in table.items():
            value = float(entry["value"])
            if not math.isfinite(value):
                raise ConfigError(f"{path}: threshold {name!r} is not a finite number")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not a thresholds file: expected "
                          f"reconstruction_thresholds.thresholds.NAME.value ({type(e).__name__}: {e})") from None
    return cfg


def calibration_scores(cfg):
    """dict score name -> sorted numpy array of real calibration scores (may be empty)."""
    stored = cfg.get("calibration_scores", {}).get("scores", {})
    return {name: np.asarray(values, dtype=np.float64) for name, values in stored.items()}


def combined_pvalue(pvalues):
    """Bonferroni: min(1, K * min_i p_i). Valid whatever the dependence between scores."""
    pvalues = np.asarray(pvalues, dtype=np.float64)  # [K, N]
    return np.minimum(1.0, pvalues.shape[0] * pvalues.min(axis=0))


def score_thresholds(cfg, score):
    """The threshold table of `score`: the card's table for mse, else score_thresholds[score]."""
    if score == "mse":
        return cfg["reconstruction_thresholds"]["thresholds"]
    table = cfg.get("score_thresholds", {}).get(score, {}).get("thresholds")
    if not table:
        raise ConfigError(f"the thresholds file has no thresholds for score {score!r}; "
                          f"rerun calibrate.py, or use --score mse")
    return table


def resolve_threshold(cfg, score, threshold):
    """Returns (value, label) for a threshold name or a number."""
    try:
        return float(threshold), f"{float(threshold):g} (given)"
    except (TypeError, ValueError):
        pass
    table = score_thresholds(cfg, score)
    if threshold not in table:
        raise ConfigError(f"unknown threshold {threshold!r} for score {score!r}; choose one of "
                          f"{', '.join(table)} or a number")
    return float(table[threshold]["value"]), threshold


# ----------------------------------------------------------------------------
# the API

class Detector:
    """Loads a model (and optionally its thresholds file) once; scores anything.

    score: 'mse' (the card's), 'local', 'complexity' or 'combined' (see the module doc).
    threshold: a name in the thresholds file (strict / balanced / sensitive / optimal) or
    a number; for 'combined' it is the p-value level (FAKE when p <= level), default 0.05.
    """

    def __init__(self, checkpoint, thresholds=None, device="auto", score="mse", threshold=None,
                 batch_size=None, workers=None):
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        self.device = pick_device(device)
        self.model = prepare_model(load_model(checkpoint, self.device), self.device)
        self.fingerprint = weights_fingerprint(self.model)
        # small batches on a CPU keep decode and model overlapped; a GPU wants large ones
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        self.score_name, self.workers = score, workers
        self.thresholds = read_thresholds(thresholds) if thresholds else None
        self.calibration = calibration_scores(self.thresholds) if self.thresholds else {}
        self.warnings = self.binding_warnings()
        self.threshold, self.threshold_label = self.pick_threshold(threshold)

    def binding_warnings(self):
        if self.thresholds is None:
            return []
        precision = self.thresholds.get("binding", {}).get("precision")
        if precision and precision != precision_name(self.device):
            return [f"the thresholds were calibrated in {precision}, this run scores in "
                    f"{precision_name(self.device)}: scores shift slightly; calibrate on this device for exact thresholds"]
        bound = self.thresholds.get("binding", {}).get("weights_fingerprint")
        if bound is None:
            return ["the thresholds file records no checkpoint fingerprint (e.g. the card's published values): "
                    "its thresholds were not calibrated for these weights; run calibrate.py"]
        if bound != self.fingerprint:
            return [f"the thresholds file was calibrated for other weights (fingerprint {bound[:12]}..., these are "
                    f"{self.fingerprint[:12]}...): its thresholds and p-values do not apply; run calibrate.py"]
        return []

    def pick_threshold(self, threshold):
        if self.score_name == "combined":
            missing = [s for s in BASE_SCORES if not len(self.calibration.get(s, []))]
            if missing:
                raise ConfigError(f"--score combined needs calibration scores for {', '.join(missing)} in the "
                                  f"thresholds file; rerun calibrate.py")
            level = 0.05 if threshold is None else threshold
            try:
                level = float(level)
            except ValueError:
                level = FPR_LEVELS.get(level)
                if level is None:
                    raise ConfigError(f"for --score combined the threshold is a p-value level: a number or "
                                      f"strict / balanced / sensitive, not {threshold!r}") from None
            if not 0 < level < 1:
                raise ConfigError(f"p-value level must lie in (0, 1), got {level}")
            return level, f"p <= {level:g}"
        if self.thresholds is None:
            if threshold is None:
                return None, None
            try:
                value, label = float(threshold), f"{float(threshold):g} (given)"
            except ValueError:
                raise ConfigError(f"threshold {threshold!r} needs a thresholds file (--thresholds)") from None
        else:
            value, label = resolve_threshold(self.thresholds, self.score_name, "balanced" if threshold is None else threshold)
        if not math.isfinite(value):  # a typed nan / inf would silently call everything REAL (or FAKE)
            raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
        return value, label if label.endswith("(given)") else f"{label} = {value:.6g}"

    def p_values(self, rows):
        """Adds p_value to scored rows (in place) when calibration scores exist."""
        if not rows:
            return rows
        if self.score_name == "combined":
            per_score = [metrics.conformal_pvalues(self.calibration[s], [r[s] for r in rows]) for s in BASE_SCORES]
            for r, p in zip(rows, combined_pvalue(per_score)):
                r["p_value"], r["combined"] = float(p), float(p)
        elif len(self.calibration.get(self.score_name, [])):
            ps = metrics.conformal_pvalues(self.calibration[self.score_name], [r[self.score_name] for r in rows])
            for r, p in zip(rows, ps):
                r["p_value"] = float(p)
        return rows

    def verdicts(self, rows):
        for r in rows:
            if "error" in r:
                continue
            if self.score_name == "combined":
                r["score"] = r["combined"]
                r["verdict"] = "FAKE" if r["combined"] <= self.threshold else "REAL"
            else:
                r["score"] = r[self.score_name]
                if self.threshold is not None:
                    r["verdict"] = "FAKE" if r["score"] > self.threshold else "REAL"
        return rows

    def _finish(self, rows):
        good = [r for r in rows if "error" not in r]
        self.p_values(good)
        return self.verdicts(rows)

    def score_paths(self, paths, rank=0, world=1, keep_maps=False):
        """Yields one row per input file (streamed in batches)."""
        batch = []
        for row in score_files(self.model, paths, self.batch_size, self.workers, rank, world,
                               with_complexity=self.needs_complexity, keep_maps=keep_maps):
            batch.append(row)
            if len(batch) >= self.batch_size:
                yield from self._finish(batch)
                batch = []
        yield from self._finish(batch)

    @property
    def needs_complexity(self):
        # PNG coding costs ~3 ms per image on a CPU core: only when the score uses it
        return self.score_name in ("complexity", "combined")

    def score_tensors(self, images):
        """uint8 [N, 3, H, W] tensor (or list of PIL images / uint8 [3, H, W] tensors) -> rows."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch = [images[i] for i in range(images.shape[0])]
        else:
            batch = [pil_or_tensor_to_uint8(im) for im in images]
        size = self.model.config.image_size
        x = torch.cat([preprocess(im, size) for im in batch]) if batch else torch.empty(0, 3, size, size)
        scores = score_batch(self.model, x, input_png_bits(x) if self.needs_complexity else None)
        rows = [{"path": f"<image {i}>", **{k: float(v[i]) for k, v in scores.items()}} for i in range(len(batch))]
        return self._finish(rows)

    def score(self, inputs):
        """Paths (files, folders, globs), PIL images and uint8 tensors, mixed; returns a list of rows:
        first the files (in listing order), then the in-memory images in the order given."""
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        paths = [i for i in inputs if isinstance(i, (str, os.PathLike))]
        images = [i for i in inputs if not isinstance(i, (str, os.PathLike))]
        rows = list(self.score_paths(paths)) if paths else []
        return rows + (self.score_tensors(images) if images else [])


def pil_or_tensor_to_uint8(image):
    from PIL import Image

    from data import pil_to_rgb

    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(pil_to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
        return image
    raise ConfigError(f"cannot score a {type(image).__name__}: give paths, PIL images or uint8 [3, H, W] tensors")
