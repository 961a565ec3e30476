"""The thresholds file (thresholds_calibrated.json): where it lives, how it is written, read and checked,
and how its contents turn scores into thresholds and p-values.

The card's schema is kept exactly: users read `cfg["reconstruction_thresholds"]["thresholds"][NAME]["value"]`
for mse. Every other score's table sits under `score_thresholds[SCORE]`, and `calibration_scores.scores[SCORE]`
holds the sorted real calibration scores that conformal p-values are computed against.
"""

import json
import math
from pathlib import Path

import numpy as np

import metrics
from utils import UserError, printable, write_json

THRESHOLDS_NAME = "thresholds_calibrated.json"
REPO_THRESHOLDS = Path(__file__).resolve().parent / THRESHOLDS_NAME  # the card's published values
FPR_LEVELS = {"strict": 0.01, "balanced": 0.05, "sensitive": 0.10}  # conformal false-positive levels
MAX_BYTES = 256 << 20  # a file with 10,000 scores per score is ~1 MB
TWO_SIDED = ("coding",)  # scores whose both tails are evidence of fake (coding.py)
P_VALUE_SCORES = TWO_SIDED + ("combined",)  # decided by a p-value level, not by a threshold on the score


def beside(checkpoint):
    """Where the thresholds of a checkpoint live: in its folder, so they travel with the weights;
    for a hub id, a folder of its own under runs/ (never the repo's card file)."""
    path, hub = Path(checkpoint), Path("runs") / str(checkpoint).replace("/", "--").replace("@", "--")
    return (path if path.is_dir() else path.parent if path.exists() else hub) / THRESHOLDS_NAME


def find(checkpoint):
    """The calibration of these weights if it sits beside them, else the card's file (or None)."""
    return next((str(p) for p in (beside(checkpoint), REPO_THRESHOLDS) if p.is_file()), None)


def build(tables, levels, calibration, **sections):
    """The file's dict. tables: score -> {name: entry with 'value'} (FAKE when score > value); levels: score ->
    p-value levels (coding, combined); calibration: score -> real calibration scores; sections: anything else."""
    card = {"reconstruction_thresholds": {
        "score": "mse: per-image mean squared reconstruction error on inputs normalized to [-1, 1]",
        "rule": "FAKE when error > value", "thresholds": tables["mse"]}} if "mse" in tables else {}
    return {
        **card,
        "score_thresholds": {
            **{s: {"rule": "FAKE when score > value", "thresholds": t} for s, t in tables.items() if s != "mse"},
            **{s: {"rule": f"FAKE when {'two-sided ' * (s in TWO_SIDED)}{s} p-value <= value", "levels": t}
               for s, t in levels.items()}},
        "calibration_scores": {
            "note": "sorted real calibration scores; p-value of a new score s = (1 + #{scores >= s}) / (n + 1); "
                    "two-sided for " + ", ".join(TWO_SIDED) + ": min(1, 2 min(that, (1 + #{scores <= s}) / (n + 1)))",
            "n": len(next(iter(calibration.values()))), "scores": {s: np.sort(v).tolist() for s, v in calibration.items()}},
        **sections}


def write(path, cfg):
    write_json(path, validate(cfg, path))


def read(path):
    """Parses and checks a thresholds file; every problem is a one-line UserError."""
    file = Path(path)
    try:
        if not file.is_file():
            raise UserError(f"{path}: not a regular file" if file.exists() else f"thresholds file not found: {path}")
        if file.stat().st_size > MAX_BYTES:
            raise UserError(f"{path}: {file.stat().st_size:,} bytes is too large for a thresholds file")
        cfg = json.loads(file.read_text(encoding="utf-8"))  # NaN / Infinity load as floats; validate() rejects them
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8 (a ValueError), or nested too deep to parse
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return validate(cfg, path)


def validate(cfg, path):
    """Returns cfg if every value inference reads is what it claims: a finite number, a p-value level in (0, 1),
    sorted finite calibration scores. Anything else is one UserError naming the entry."""
    def number(x):
        return type(x) in (int, float) and math.isfinite(x)

    def obj(value, where):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {where} must be a JSON object, got {type(value).__name__}")
        return value

    def check_table(table, where, levels=False):  # thresholds: at least one; levels: each in (0, 1)
        if not obj(table, where) and not levels:
            raise UserError(f"{path}: {where} is empty")
        for name, entry in table.items():
            if not number(value := obj(entry, f"{where}.{name}").get("value")) or levels and not 0 < value < 1:
                raise UserError(f"{path}: {where}.{name}.value must be {'in (0, 1)' if levels else 'a finite number'}, "
                                f"got {value!r}")

    # the card's mse table, which only the artifact detector's own file (no autoencoder) goes without
    if "reconstruction_thresholds" in obj(cfg, "the file") or "artifact" not in obj(cfg.get("score_thresholds", {}),
                                                                                   "score_thresholds"):
        check_table(obj(cfg.get("reconstruction_thresholds"), "reconstruction_thresholds").get("thresholds"),
                    "reconstruction_thresholds.thresholds")
        if any(entry["value"] < 0 for entry in cfg["reconstruction_thresholds"]["thresholds"].values()):
            raise UserError(f"{path}: reconstruction_thresholds.thresholds: an mse threshold cannot be negative")
    for score, entry in obj(cfg.get("score_thresholds", {}), "score_thresholds").items():
        if "thresholds" in obj(entry, f"score_thresholds.{score}"):
            check_table(entry["thresholds"], f"score_thresholds.{score}.thresholds")
        check_table(entry.get("levels", {}), f"score_thresholds.{score}.levels", levels=True)
    calibration = obj(cfg.get("calibration_scores", {}), "calibration_scores")
    for score, values in obj(calibration.get("scores", {}), "calibration_scores.scores").items():
        if not (isinstance(values, list) and all(number(v) for v in values)) or values != sorted(values):
            raise UserError(f"{path}: calibration_scores.scores.{score} must be a sorted list of finite numbers")
    for key, value in obj(cfg.get("binding", {}), "binding").items():
        if (key.endswith("fingerprint") or key == "precision") and not isinstance(value, str | None):
            raise UserError(f"{path}: binding.{key} must be a string, got {value!r}")
    return cfg


def table(cfg, score):
    """The threshold table of a score: the card's place for mse, score_thresholds for the rest."""
    section = cfg.get("reconstruction_thresholds", {}) if score == "mse" else cfg.get("score_thresholds", {}).get(score, {})
    if not section.get("thresholds"):
        raise UserError(f"the thresholds file has no thresholds for score {score!r}; rerun calibrate.py, or use --score mse")
    return section["thresholds"]


def threshold(cfg, score, choice):
    """(value, label) of a threshold given by name or as a number. For coding and combined it is a p-value
    level (FAKE when p <= level), and the names mean their false-positive levels (FPR_LEVELS)."""
    combined = score in P_VALUE_SCORES
    try:
        value, label = float(choice), f"{float(choice):g} (given)"
    except ValueError:
        if cfg is None and not combined:
            raise UserError(f"threshold {choice!r} needs a thresholds file (--thresholds)") from None
        names = {k: {"value": v} for k, v in FPR_LEVELS.items()} if combined else table(cfg, score)
        if choice not in names:
            raise UserError(f"unknown threshold {choice!r} for score {score!r}; choose one of {', '.join(names)} "
                            f"or a number{' (a p-value level)' if combined else ''}") from None
        value, label = float(names[choice]["value"]), f"{choice} = {names[choice]['value']:.6g}"
    if not math.isfinite(value) or combined and not 0 < value < 1:  # nan would call everything REAL
        raise UserError(f"threshold must be a finite number{' in (0, 1)' if combined else ''}, got {choice!r}")
    if score == "mse" and value < 0:  # an error is never negative: everything would be FAKE
        raise UserError(f"an mse threshold cannot be negative, got {choice!r}")
    return value, f"p <= {value:g}" if combined else label


def calibration(cfg):
    """score -> sorted numpy array of real calibration scores (only the non-empty ones)."""
    stored = cfg.get("calibration_scores", {}).get("scores", {}) if cfg else {}
    return {s: np.asarray(v, dtype=np.float64) for s, v in stored.items() if v}


def pvalues(cal, values, score):
    """Conformal p-values of a score's values against its sorted real calibration scores, two-sided where
    both tails are evidence (TWO_SIDED)."""
    return metrics.conformal_pvalues(cal, values, two_sided=score in TWO_SIDED)


def combined_pvalue(cal, values):
    """Bonferroni over every calibrated score: min(1, K * min_k p_k), with p_k the conformal
    p-value of values[k] against cal[k]. Valid whatever the dependence between the scores."""
    return np.minimum(1.0, len(cal) * np.min([pvalues(cal[s], values[s], s) for s in cal], axis=0))


def score_pvalues(cal, values, score):
    """The p-values of one score, combined included, from values: {score: array of one value per image}."""
    return combined_pvalue(cal, values) if score == "combined" else pvalues(cal[score], values[score], score)


def binding_warnings(cfg, fingerprint, precision, fingerprints=None):
    """Why this file's thresholds may not apply to the loaded weights (empty when they do). fingerprint: the
    autoencoder's (None: none loaded); fingerprints: {'coding' / 'artifact': that model's fingerprint or None}."""
    bound, calibrated_in = (cfg.get("binding", {}).get(key) for key in ("weights_fingerprint", "precision"))
    warnings = []  # each reason: a milder one (precision) must not hide a graver one (other weights)
    if fingerprint is not None and bound != fingerprint:  # bound is None in a file that records no fingerprint
        warnings.append("the thresholds file records no checkpoint fingerprint (e.g. the card's published values): "
                        "its thresholds were not calibrated for these weights; run calibrate.py" if bound is None else
                        f"the thresholds file was calibrated for other weights (fingerprint {bound[:12]}..., these "
                        f"are {fingerprint[:12]}...): its thresholds and p-values do not apply; run calibrate.py")
    for name, loaded in (fingerprints or {}).items():
        if (other := cfg.get("binding", {}).get(f"{name}_fingerprint")) and loaded and other != loaded:
            what = "coding model" if name == "coding" else "artifact detector"
            warnings.append(f"the thresholds file was calibrated with another {what} (fingerprint {other[:12]}..., this "
                            f"one is {loaded[:12]}...): its {name} thresholds and p-values do not apply; run calibrate.py")
    if calibrated_in and calibrated_in != precision:
        warnings.append(f"the thresholds were calibrated in {calibrated_in}, this run scores in {precision}: "
                        f"scores shift slightly; calibrate on this device for exact thresholds")
    return [printable(w) for w in warnings]  # the values come from a file: they must not forge a printed line
