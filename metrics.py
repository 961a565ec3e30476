"""Statistics for calibration and evaluation. Fake is the positive class, a higher score is more fake and
flagged when `score > threshold`; the ranking metrics are sklearn's, which sweep `score >= t` (the two differ
only at ties). Inputs may be lists, numpy arrays or torch tensors."""

import math
from fractions import Fraction

import numpy as np

FPR_LEVELS = {"strict": 0.01, "balanced": 0.05, "sensitive": 0.10}  # conformal false-positive levels


def as_scores(x, name="scores"):
    """A flat float64 numpy array of scores; ValueError if None, empty or if any is NaN."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else x  # torch, even on the GPU
    a = np.asarray([] if x is None else x, dtype=np.float64).ravel()
    if a.size == 0 or np.isnan(a).any():  # a broken image or model must not silently move a threshold
        raise ValueError(f"{name}: need scores and no NaN, got {a.size} with {int(np.isnan(a).sum())} NaN")
    return a


# ---- split conformal calibration
def conformal_rank(n, alpha):
    """k = ceil((n + 1)(1 - alpha)), exactly, for n >= 1 and 0 < alpha < 1; may exceed n."""
    # alpha as the fraction its decimal spells (0.99 is 99/100, not the double just below it)
    return math.ceil((int(n) + 1) * (1 - Fraction(repr(float(alpha)))))


def conformal_threshold(cal_scores, alpha):
    """The k-th smallest of n real scores, k = conformal_rank(n, alpha): an exchangeable real image has
    P(score > threshold) <= alpha. +inf when k > n (too few scores to certify alpha)."""
    s = as_scores(cal_scores, "cal_scores")
    k = conformal_rank(s.size, alpha)
    return math.inf if k > s.size else float(np.partition(s, k - 1)[k - 1])  # no full sort needed


def conformal_pvalues(cal_scores_sorted, scores):
    """float64 [N]: p(s) = (1 + #{cal >= s}) / (n + 1) against real calibration scores sorted ascending (by
    the caller), so that P(p <= a) <= a for an exchangeable real image."""
    cal, s = as_scores(cal_scores_sorted, "cal_scores_sorted"), as_scores(scores)
    return (1.0 + cal.size - np.searchsorted(cal, s, side="left")) / (cal.size + 1.0)  # ties: conservative


def uniformity_pvalue(p_values, min_count=20):
    """One-sided KS-test p-value of "these conformal p-values are no smaller than uniform ones", as real
    images' are; None if < min_count."""
    if len(p_values) < min_count:
        return None
    from scipy.stats import kstest  # here: scipy.stats takes ~0.8 s to import, which scoring rarely needs
    return float(kstest(np.asarray(p_values, dtype=np.float64), "uniform", alternative="greater").pvalue)


def clopper_pearson(k, n, confidence=0.95):
    """Exact, conservative interval (lo, hi) of a rate of k in n >= 1; lo = 0 at k = 0, hi = 1 at k = n."""
    from scipy.stats import beta  # here: as in uniformity_pvalue
    k, n, tail = int(k), int(n), (1.0 - float(confidence)) / 2.0
    return (0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1)),
            1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k)))


# ---- ranking metrics: sklearn's, imported where used for the reason given in uniformity_pvalue
def _labelled(real_scores, fake_scores):
    # sklearn's (y_true, y_score) with fake as class 1; sklearn refuses infinite scores (ValueError)
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    return np.r_[np.zeros(real.size), np.ones(fake.size)], np.r_[real, fake]


def roc_curve(real_scores, fake_scores):
    """(fpr, tpr, thresholds) of `score >= t`, one point per distinct score, t from +inf down."""
    from sklearn.metrics import roc_curve as sk_roc_curve
    return sk_roc_curve(*_labelled(real_scores, fake_scores), drop_intermediate=False)


def auroc(real_scores, fake_scores):
    """P(fake score > real score) + P(tie) / 2, the area under roc_curve."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(*_labelled(real_scores, fake_scores)))


def aupr(real_scores, fake_scores, positive="fake"):
    """Average precision of `score >= t`: positive="fake" is AUPR-Out, "real" AUPR-In (ranking by -score).
    Unlike AUROC it depends on the class balance."""
    from sklearn.metrics import average_precision_score
    if positive not in ("fake", "real"):
        raise ValueError(f"positive must be 'fake' or 'real', got {positive!r}")
    y, s = _labelled(real_scores, fake_scores)
    return float(average_precision_score(y, s) if positive == "fake" else average_precision_score(1 - y, -s))


def fpr_at_tpr(real_scores, fake_scores, tpr=0.95):
    """FPR of `score >= t` at the largest t with TPR >= tpr: the m-th largest fake, m = ceil(tpr * n_fake)."""
    fprs, tprs, _ = roc_curve(real_scores, fake_scores)
    return float(fprs[np.argmax(tprs >= tpr)])  # rounding keeps order, so m / n >= tpr iff m >= n * tpr


def youden_threshold(real_scores, fake_scores):
    """(threshold, tpr, fpr) maximizing J = TPR - FPR of `score > threshold`, the highest t among ties."""
    # only real scores are candidates: a cut on a value held only by fakes flags fewer fakes and
    # no fewer reals, so an optimum with J > 0 sits on a real score; t = max(real) (J = 0) covers the rest
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    cand = np.unique(real)
    fp = real.size - np.searchsorted(np.sort(real), cand, side="right")  # reals > t
    tp = fake.size - np.searchsorted(np.sort(fake), cand, side="right")  # fakes > t
    j = tp * real.size - fp * fake.size  # J * n_real * n_fake in integers: no float ties
    i = cand.size - 1 - int(np.argmax(j[::-1]))  # last maximum = highest threshold
    return float(cand[i]), float(tp[i] / fake.size), float(fp[i] / real.size)


def bootstrap_ci(fn, real, fake, n_boot=1000, confidence=0.95, seed=0):
    """Percentile bootstrap (lo, hi) of fn(real, fake), resampling each separately; fake may be None."""
    real, fake = as_scores(real, "real"), None if fake is None else as_scores(fake, "fake")
    rng, stats, n_boot = np.random.default_rng(seed), [], int(n_boot)
    chunk = max(1, 2_000_000 // (real.size + (0 if fake is None else fake.size)))  # bounds the memory
    for rows in (min(chunk, n_boot - start) for start in range(0, n_boot, chunk)):
        rs = real[rng.integers(0, real.size, size=(rows, real.size))]  # [rows, n_real]
        fs = [None] * rows if fake is None else fake[rng.integers(0, fake.size, size=(rows, fake.size))]
        stats += [fn(r, f) for r, f in zip(rs, fs)]
    tail = (1.0 - float(confidence)) / 2.0
    return tuple(float(v) for v in np.quantile(np.asarray(stats, dtype=np.float64), [tail, 1.0 - tail]))


def summary_stats(scores):
    """n, mean, median, std (ddof=0), min, max and percentiles p1 ... p99 as plain Python numbers."""
    s, percentiles = as_scores(scores), (1, 5, 10, 25, 75, 90, 95, 99)
    return {"n": int(s.size), "mean": float(s.mean()), "median": float(np.median(s)), "std": float(s.std()),
            "min": float(s.min()), "max": float(s.max()),
            **{f"p{p}": float(v) for p, v in zip(percentiles, np.percentile(s, percentiles))}}


# ---- the tables calibrate.py reports, per score
def rates(flagged, held, fake_sets, benign):
    """What flagged(scores) flags: of held-out reals and of each benign set, a false-positive rate (with an
    exact 95% interval); of each fake set, its TPR."""
    def fpr(values):
        k, n = int(np.sum(flagged(values))), len(values)
        return {"fpr": k / n, "ci95": list(clopper_pearson(k, n)), "n": n}

    held_fpr = fpr(held)
    return {"heldout_fpr": held_fpr["fpr"], "heldout_fpr_ci95": held_fpr["ci95"], "heldout_n": held_fpr["n"],
            "benign_fpr": {name: fpr(v) for name, v in benign.items()},
            "tpr": {name: float(np.mean(flagged(f))) for name, f in fake_sets.items()}}


def threshold_table(cal, held, fake_sets, benign, optimal_against):
    """One score's thresholds (FAKE when score > value); fake_sets: {set name: that score of the set}."""
    table = {name: {"value": conformal_threshold(cal, a), "target_fpr": a,
                    "percentile": 100 * (1 - a), "method": "split-conformal: k-th smallest calibration score",
                    "k": conformal_rank(len(cal), a), "n_calibration": len(cal)}
             for name, a in FPR_LEVELS.items()}
    if optimal_against in fake_sets:
        value, _, fpr = youden_threshold(cal, fake_sets[optimal_against])
        method = f"maximum TPR - FPR (Youden's J) against {optimal_against}, on the calibration part"
        table["optimal"] = {"value": value, "target_fpr": None, "method": method, "calibration_fpr": fpr}
    for entry in table.values():
        entry.update(rates(lambda s: s > entry["value"], held, fake_sets, benign))
    return table


def evaluation_table(held, fake_sets, n_boot, seed):
    """AUROC (with a bootstrap interval if n_boot), AUPR, AUPR-In and FPR@95TPR of each fake set."""
    table = {}
    for name, f in fake_sets.items():
        table[name] = {"auroc": auroc(held, f), "aupr": aupr(held, f),
                       "aupr_in": aupr(held, f, positive="real"), "fpr_at_95_tpr": fpr_at_tpr(held, f)}
        if n_boot:
            table[name]["auroc_ci95"] = list(bootstrap_ci(auroc, held, f, n_boot=n_boot, seed=seed))
    return table
