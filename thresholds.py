"""
The thresholds file (thresholds_calibrated.json): where it lives, how it is written,
read and checked, and how its contents turn scores into thresholds and p-values.

The card's schema is kept exactly: users read the mse thresholds as
`cfg["reconstruction_thresholds"]["thresholds"][NAME]["value"]`. Every other score's
table sits under `score_thresholds[SCORE]`, and `calibration_scores.scores[SCORE]` holds
the sorted real calibration scores that conformal p-values are computed against.
"""

import math
import os
from pathlib import Path

import numpy as np

import metrics
from utils import UserError, write_json

THRESHOLDS_NAME = "thresholds_calibrated.json"
REPO_THRESHOLDS = Path(__file__).resolve().parent / THRESHOLDS_NAME  # the card's published values
FPR_LEVELS = {"strict": 0.01, "balanced": 0.05, "sensitive": 0.10}  # conformal false-positive levels
MAX_BYTES = 256 << 20  # a file with 10,000 scores per score is ~1 MB


def beside(checkpoint):
    """Where the thresholds of a checkpoint live: in its folder, so they travel with the weights;
    for a hub id, a folder of its own under runs/ (never the repo's card file)."""
    path = Path(checkpoint)
    if path.exists():
        return (path if path.is_dir() else path.parent) / THRESHOLDS_NAME
    return Path("runs") / str(checkpoint).replace("/", "--").replace("@", "--") / THRESHOLDS_NAME


def find(checkpoint):
    """The calibration of these weights if it sits beside them, else the card's file (or None)."""
    return next((str(p) for p in (beside(checkpoint), REPO_THRESHOLDS) if p.is_file()), None)


def build(tables, levels, calibration, **sections):
    """The file's dict. tables: score -> {name: entry with 'value'}; levels: the combined p-value
    levels; calibration: score -> real calibration scores; sections: anything else to record."""
    return {
        "reconstruction_thresholds": {
            "score": "mse: per-image mean squared reconstruction error on inputs normalized to [-1, 1]",
            "rule": "FAKE when error > value", "thresholds": tables["mse"]},
        "score_thresholds": {
            **{s: {"rule": "FAKE when score > value", "thresholds": t} for s, t in tables.items() if s != "mse"},
            "combined": {"rule": "FAKE when combined p-value <= value", "levels": levels}},
        "calibration_scores": {
            "note": "sorted real calibration scores; p-value of a new score s = (1 + #{scores >= s}) / (n + 1)",
            "n": len(next(iter(calibration.values()))),
            "scores": {s: np.sort(v).tolist() for s, v in calibration.items()}},
        **sections,
    }


def write(path, cfg):
    validate(cfg, path)
    write_json(path, cfg)


def read(path):
    """Parses and checks a thresholds file; every problem is a one-line UserError."""
    import json

    try:
        if not os.path.isfile(path):
            raise UserError(f"thresholds file not found: {path}" if not os.path.exists(path)
                            else f"{path}: not a regular file")
        if os.path.getsize(path) > MAX_BYTES:
            raise UserError(f"{path}: {os.path.getsize(path):,} bytes is too large for a thresholds file")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f, parse_constant=lambda c: math.nan)  # NaN / Infinity fail validation below
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    validate(cfg, path)
    return cfg


def validate(cfg, path):
    """Every value inference reads must be what it claims: a finite number, a p-value level in (0, 1),
    sorted finite calibration scores. Anything else is one UserError naming the entry."""
    def number(x):
        return type(x) in (int, float) and math.isfinite(x)

    def obj(value, where):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {where} must be a JSON object, got {type(value).__name__}")
        return value

    def check_table(table, where):
        if not obj(table, where):
            raise UserError(f"{path}: {where} is empty")
        for name, entry in table.items():
            if not number(obj(entry, f"{where}.{name}").get("value")):
                raise UserError(f"{path}: {where}.{name}.value must be a finite number, got {entry.get('value')!r}")

    obj(cfg, "the file")
    check_table(obj(cfg.get("reconstruction_thresholds"), "reconstruction_thresholds").get("thresholds"),
                "reconstruction_thresholds.thresholds")
    for score, entry in obj(cfg.get("score_thresholds", {}), "score_thresholds").items():
        if "thresholds" in obj(entry, f"score_thresholds.{score}"):
            check_table(entry["thresholds"], f"score_thresholds.{score}.thresholds")
        for name, level in obj(entry.get("levels", {}), f"score_thresholds.{score}.levels").items():
            if not (number(obj(level, name).get("value")) and 0 < level["value"] < 1):
                raise UserError(f"{path}: score_thresholds.{score}.levels.{name}.value must lie in (0, 1)")
    calibration = obj(cfg.get("calibration_scores", {}), "calibration_scores")
    for score, values in obj(calibration.get("scores", {}), "calibration_scores.scores").items():
        if not (isinstance(values, list) and all(number(v) for v in values)) or values != sorted(values):
            raise UserError(f"{path}: calibration_scores.scores.{score} must be a sorted list of finite numbers")
    obj(cfg.get("binding", {}), "binding")


def table(cfg, score):
    """The threshold table of a score: the card's place for mse, score_thresholds for the rest."""
    if score == "mse":
        return cfg["reconstruction_thresholds"]["thresholds"]
    found = cfg.get("score_thresholds", {}).get(score, {}).get("thresholds")
    if not found:
        raise UserError(f"the thresholds file has no thresholds for score {score!r}; rerun calibrate.py, or use --score mse")
    return found


def threshold(cfg, score, choice):
    """(value, label) for a threshold name in the file or a number; cfg may be None for a number."""
    try:
        value, label = float(choice), f"{float(choice):g} (given)"
    except (TypeError, ValueError):
        if cfg is None:
            raise UserError(f"threshold {choice!r} needs a thresholds file (--thresholds)") from None
        names = table(cfg, score)
        if choice not in names:
            raise UserError(f"unknown threshold {choice!r} for score {score!r}; choose one of "
                            f"{', '.join(names)} or a number")
        value = float(names[choice]["value"])
        label = f"{choice} = {value:.6g}"
    if not math.isfinite(value):  # nan / inf would silently call everything REAL (or FAKE)
        raise UserError(f"threshold must be a finite number, got {choice!r}")
    return value, label


def p_level(choice):
    """The combined score's threshold: a p-value level, given as a number or a level name."""
    level = FPR_LEVELS.get(choice, choice)
    try:
        level = float(level)
    except ValueError:
        raise UserError(f"for --score combined the threshold is a p-value level: a number or "
                        f"{' / '.join(FPR_LEVELS)}, not {choice!r}") from None
    if not 0 < level < 1:
        raise UserError(f"p-value level must lie in (0, 1), got {level}")
    return level, f"p <= {level:g}"


def calibration(cfg):
    """score -> sorted numpy array of real calibration scores (only the non-empty ones)."""
    stored = cfg.get("calibration_scores", {}).get("scores", {}) if cfg else {}
    return {s: np.asarray(v, dtype=np.float64) for s, v in stored.items() if v}


def combined_pvalue(cal, values):
    """Bonferroni over every calibrated score: min(1, K * min_k p_k), with p_k the conformal
    p-value of values[k] against cal[k]. Valid whatever the dependence between the scores."""
    p = np.stack([metrics.conformal_pvalues(cal[s], values[s]) for s in cal])  # [K, N]
    return np.minimum(1.0, len(cal) * p.min(axis=0))


def binding_warnings(cfg, fingerprint, precision):
    """Why this file's thresholds may not apply to the loaded weights (empty when they do)."""
    binding = cfg.get("binding", {})
    if binding.get("precision") and binding["precision"] != precision:
        return [f"the thresholds were calibrated in {binding['precision']}, this run scores in {precision}: "
                f"scores shift slightly; calibrate on this device for exact thresholds"]
    bound = binding.get("weights_fingerprint")
    if bound is None:
        return ["the thresholds file records no checkpoint fingerprint (e.g. the card's published values): "
                "its thresholds were not calibrated for these weights; run calibrate.py"]
    if bound != fingerprint:
        return [f"the thresholds file was calibrated for other weights (fingerprint {str(bound)[:12]}..., these are "
                f"{fingerprint[:12]}...): its thresholds and p-values do not apply; run calibrate.py"]
    return []
