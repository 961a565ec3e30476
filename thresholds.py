"""The thresholds file (thresholds_calibrated.json): which one applies (`resolve`), how it is written, read
and checked, and which threshold a name or number means. mse keeps the card's schema
(`cfg["reconstruction_thresholds"]["thresholds"][NAME]["value"]`); the other scores' tables sit under
`score_thresholds[SCORE]`, their sorted real calibration scores under `calibration_scores.scores[SCORE]`."""

import json
import math
from pathlib import Path

import numpy as np

from utils import UserError, printable, write_json

THRESHOLDS_NAME = "thresholds_calibrated.json"
REPO_THRESHOLDS = Path(__file__).resolve().parent / THRESHOLDS_NAME  # the card's published values
MAX_BYTES = 256 << 20  # a file with 10,000 scores per score is ~1 MB


def beside(checkpoint):
    """The thresholds path of a checkpoint: in its folder, so they travel with the weights; for a hub id,
    a folder of its own under runs/ (never the repo's card file)."""
    path, hub = Path(checkpoint), Path("runs") / str(checkpoint).replace("/", "--").replace("@", "--")
    return (path if path.is_dir() else path.parent if path.exists() else hub) / THRESHOLDS_NAME


def resolve(given=None, checkpoint=None, artifact_model=None):
    """(thresholds dict or None, its source). The first that exists of: `given`; the file beside the
    autoencoder's weights; the card's file. With no autoencoder, the file beside the artifact detector's."""
    beside_weights = beside(checkpoint or artifact_model) if checkpoint or artifact_model else None
    for path in (given, beside_weights, checkpoint and REPO_THRESHOLDS):
        if path and (given or Path(path).is_file()):
            return read(path), str(path)
    return None, None


def build(tables, calibration, **sections):
    """The file's dict. tables: score -> {name: {'value': v}} (FAKE when score > v); calibration: score ->
    real calibration scores; sections: anything else."""
    card = {"reconstruction_thresholds": {
        "score": "mse: per-image mean squared reconstruction error on inputs normalized to [-1, 1]",
        "rule": "FAKE when error > value", "thresholds": tables["mse"]}} if "mse" in tables else {}
    return {
        **card,
        "score_thresholds": {s: {"rule": "FAKE when score > value", "thresholds": t}
                             for s, t in tables.items() if s != "mse"},
        "calibration_scores": {
            "note": "sorted real calibration scores; "
                    "p-value of a new score s = (1 + #{scores >= s}) / (n + 1)",
            "n": len(next(iter(calibration.values()))),
            "scores": {s: np.sort(v).tolist() for s, v in calibration.items()}},
        **sections}


def write(path, cfg):
    write_json(path, validate(cfg, path))


def read(path):
    """The checked thresholds dict of a file; every problem is a one-line UserError."""
    file = Path(path)
    try:
        if not file.is_file():
            raise UserError(f"{path}: not a regular file" if file.exists()
                            else f"thresholds file not found: {path}")
        if file.stat().st_size > MAX_BYTES:
            raise UserError(f"{path}: {file.stat().st_size:,} bytes is too large for a thresholds file")
        cfg = json.loads(file.read_text(encoding="utf-8"))  # NaN / Infinity load; validate() rejects them
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep to parse
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return validate(cfg, path)


def validate(cfg, path):
    """cfg, if every value inference reads is a finite number, a p-value level in (0, 1) or sorted finite
    calibration scores; else a UserError naming the entry."""
    def fail(message):
        raise UserError(f"{path}: {message}")

    def number(x):
        return type(x) in (int, float) and math.isfinite(x)

    def obj(value, where):
        if not isinstance(value, dict):
            fail(f"{where} must be a JSON object, got {type(value).__name__}")
        return value

    def check_table(table, where):
        if not obj(table, where):
            fail(f"{where} is empty")
        for name, entry in table.items():
            if not number(value := obj(entry, f"{where}.{name}").get("value")):
                fail(f"{where}.{name}.value must be a finite number, got {value!r}")

    # the card's mse table, which only the artifact detector's own file (no autoencoder) goes without
    if "reconstruction_thresholds" in obj(cfg, "the file") or "artifact" not in obj(
            cfg.get("score_thresholds", {}), "score_thresholds"):
        mse = obj(cfg.get("reconstruction_thresholds"), "reconstruction_thresholds").get("thresholds")
        check_table(mse, "reconstruction_thresholds.thresholds")
        if any(entry["value"] < 0 for entry in mse.values()):
            fail("reconstruction_thresholds.thresholds: an mse threshold cannot be negative")
    for score, entry in obj(cfg.get("score_thresholds", {}), "score_thresholds").items():
        if "thresholds" in obj(entry, f"score_thresholds.{score}"):  # older files' p-value levels: unread
            check_table(entry["thresholds"], f"score_thresholds.{score}.thresholds")
    calibration = obj(cfg.get("calibration_scores", {}), "calibration_scores")
    for score, values in obj(calibration.get("scores", {}), "calibration_scores.scores").items():
        if not (isinstance(values, list) and all(number(v) for v in values)) or values != sorted(values):
            fail(f"calibration_scores.scores.{score} must be a sorted list of finite numbers")
    for key, value in obj(cfg.get("binding", {}), "binding").items():
        if (key.endswith("fingerprint") or key == "precision") and not isinstance(value, str | None):
            fail(f"binding.{key} must be a string, got {value!r}")
    return cfg


def table(cfg, score):
    """The threshold table of a score: the card's place for mse, score_thresholds for the rest."""
    section = (cfg.get("reconstruction_thresholds", {}) if score == "mse"
               else cfg.get("score_thresholds", {}).get(score, {}))
    if not section.get("thresholds"):
        hint = ", or use --score mse" * (score != "mse" and "mse" in calibration(cfg))
        raise UserError(f"the thresholds file has no thresholds for score {score!r}; calibrate it with "
                        f"calibrate.py{hint}")
    return section["thresholds"]


def threshold(cfg, score, choice):
    """(value, label) of a threshold given by name or as a number. UserError on an unknown or invalid one."""
    try:
        value, label = float(choice), f"{float(choice):g} (given)"
    except ValueError:
        if cfg is None:
            raise UserError(f"threshold {choice!r} needs a thresholds file (--thresholds)") from None
        if choice not in (names := table(cfg, score)):
            raise UserError(f"unknown threshold {choice!r} for score {score!r}; "
                            f"choose one of {', '.join(names)} or a number") from None
        value, label = float(names[choice]["value"]), f"{choice} = {names[choice]['value']:.6g}"
    if not math.isfinite(value):  # nan would call everything REAL
        raise UserError(f"threshold must be a finite number, got {choice!r}")
    if score == "mse" and value < 0:  # an error is never negative: everything would be FAKE
        raise UserError(f"an mse threshold cannot be negative, got {choice!r}")
    return value, label


def calibration(cfg):
    """score -> sorted float64 array of its real calibration scores (the non-empty ones only)."""
    stored = cfg.get("calibration_scores", {}).get("scores", {}) if cfg else {}
    return {s: np.asarray(v, dtype=np.float64) for s, v in stored.items() if v}


def binding_warnings(cfg, fingerprint, precision, fingerprints=None):
    """Why this file's thresholds may not apply to the loaded weights (empty when they do). fingerprint: the
    autoencoder's (None: none loaded); fingerprints: {'artifact': that model's fingerprint or None}."""
    binding = cfg.get("binding", {})
    bound, calibrated_in = binding.get("weights_fingerprint"), binding.get("precision")
    warnings = []  # every reason: a milder one (precision) must not hide a graver one (other weights)
    if fingerprint is not None and bound is None:
        warnings.append("the thresholds file records no checkpoint fingerprint (e.g. the card's published "
                        "values): its thresholds were not calibrated for these weights; run calibrate.py")
    elif fingerprint is not None and bound != fingerprint:
        warnings.append(f"the thresholds file was calibrated for other weights (fingerprint {bound[:12]}..., "
                        f"these are {fingerprint[:12]}...): its thresholds and p-values do not apply; "
                        "run calibrate.py")
    for name, loaded in (fingerprints or {}).items():
        if (other := binding.get(f"{name}_fingerprint")) and loaded and other != loaded:
            warnings.append(f"the thresholds file was calibrated with another {name} detector (fingerprint "
                            f"{other[:12]}..., this one is {loaded[:12]}...): its {name} thresholds and "
                            "p-values do not apply; run calibrate.py")
    if calibrated_in and calibrated_in != precision:
        warnings.append(f"the thresholds were calibrated in {calibrated_in}, this run scores in {precision}: "
                        "scores shift slightly; calibrate on this device for exact thresholds")
    return [printable(w) for w in warnings]  # the values come from a file: they must not forge a printed line

