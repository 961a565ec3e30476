"""
The statistics that calibration and evaluation use, in numpy only (no scipy or
sklearn at runtime, so inference and calibration stay light to install).

Conventions, everywhere in this file:
  - a score is a per-image reconstruction error: higher = more fake / more anomalous;
  - "fake" (or OOD) is the POSITIVE class, "real" the negative one;
  - the detector rule at inference is `score > threshold` => FAKE (strictly greater).
    The ROC-style functions (roc_curve, aupr, fpr_at_tpr) follow sklearn and sweep
    `score >= t`; this only matters at exactly tied scores and each docstring says which.

Every function accepts lists, numpy arrays or torch tensors (CPU or GPU). Empty input
and NaN scores raise ValueError: a NaN reconstruction error means a broken image or
model, and silently sorting it to one end would move every threshold.

    import metrics
    t = metrics.conformal_threshold(real_cal_scores, alpha=0.05)   # FPR <= 5% on new reals
    lo, hi = metrics.clopper_pearson(k_flagged, n_real)           # exact CI on a measured FPR
    metrics.auroc(real_scores, fake_scores)
"""

import math
from fractions import Fraction

import numpy as np

SUMMARY_PERCENTILES = (1, 5, 10, 25, 75, 90, 95, 99)


# -----------------------------------------------------------------------------
# input handling

def as_scores(x, name="scores"):
    """A flat float64 numpy array of scores; ValueError if empty or if any is NaN."""
    if x is None:
        raise ValueError(f"{name}: got None, expected a sequence of scores")
    if hasattr(x, "detach"):  # torch tensor: leave autograd, come back from the GPU; no torch import needed
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: empty, need at least one score")
    if np.isnan(a).any():
        raise ValueError(f"{name}: {int(np.isnan(a).sum())} NaN score(s) of {a.size}")
    return a


def _exact(x, name):
    """x as the exact fraction its shortest decimal spells, so 0.99 is 99/100, not the
    binary double just below it; ceil((n + 1) * 0.99) must not depend on rounding."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return Fraction(repr(x))


def _check_level(x, name):
    if not 0.0 < float(x) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {x}")


# -----------------------------------------------------------------------------
# split conformal calibration

def conformal_rank(n, alpha):
    """k = ceil((n + 1) * (1 - alpha)): the 1-based rank among n sorted real calibration
    scores whose value, used as threshold, flags a new exchangeable real image with
    probability <= alpha. Exact arithmetic: n=10000 gives 9901 / 9501 / 9001 at
    alpha = 0.01 / 0.05 / 0.10. k may exceed n (see conformal_threshold)."""
    _check_level(alpha, "alpha")
    if int(n) != n or n < 1:
        raise ValueError(f"need n >= 1 calibration scores, got {n}")
    q = (int(n) + 1) * (1 - _exact(alpha, "alpha"))
    return math.ceil(q)  # Fraction ceil is exact


def conformal_threshold(cal_scores, alpha):
    """Split-conformal threshold at false-positive level alpha: the k-th smallest of the
    n real calibration scores, k = conformal_rank(n, alpha).

    Guarantee: for a new real image exchangeable with the calibration set,
    P(score > threshold) <= alpha (marginally over calibration draws), and with
    continuous scores also >= alpha - 1/(n + 1). Returns +inf when k > n, i.e.
    n < 1/alpha - 1: too few calibration images to certify that level, so nothing
    may be flagged."""
    s = as_scores(cal_scores, "cal_scores")
    k = conformal_rank(s.size, alpha)
    if k > s.size:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])  # k-th order statistic without a full sort


def conformal_pvalues(cal_scores_sorted, scores):
    """Conformal p-values p(s) = (1 + #{cal >= s}) / (n + 1) against ascending-sorted
    real calibration scores. For an exchangeable real image P(p <= a) <= a, so a small p
    is evidence of fake. Returns a float64 array shaped like the flattened `scores`."""
    cal = as_scores(cal_scores_sorted, "cal_scores_sorted")
    if cal.size > 1 and np.any(cal[1:] < cal[:-1]):
        raise ValueError("cal_scores_sorted must be sorted ascending (np.sort it once, reuse it)")
    s = as_scores(scores, "scores")
    n_ge = cal.size - np.searchsorted(cal, s, side="left")  # ties count as >=, the conservative side
    return (1.0 + n_ge) / (cal.size + 1.0)


# -----------------------------------------------------------------------------
# exact binomial interval (Clopper-Pearson) without scipy

def _betacf(a, b, x, eps=1e-15, max_iter=100_000):
    """Continued fraction of the incomplete beta function (modified Lentz, as in
    Numerical Recipes 6.4). Converges in O(sqrt(max(a, b))) terms for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1. For integers,
    I_p(k, n - k + 1) = P(Binomial(n, p) >= k), the link Clopper-Pearson uses."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    # the fraction converges fast only on one side of the mode; use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q, a, b, lo=0.0, hi=1.0):
    """The x with I_x(a, b) = q, by bisection (I_x is increasing in x) inside [lo, hi].
    Stops at a relative width of 1e-13 rather than an absolute one, so tiny bounds
    such as 1 success in 1e6 keep their significant digits."""
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if hi - lo <= 1e-13 * mid or mid in (lo, hi):
            break
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k, n, confidence=0.95):
    """Exact (conservative) two-sided binomial confidence interval (lo, hi) for a rate
    measured as k successes in n trials, e.g. the FPR of a threshold on n held-out real
    images. lo solves P(X >= k | p) = (1-conf)/2 and hi solves P(X <= k | p) = (1-conf)/2,
    i.e. beta quantiles Beta(k, n-k+1) at (1-conf)/2 and Beta(k+1, n-k) at (1+conf)/2.
    k = 0 gives lo = 0 and k = n gives hi = 1."""
    if int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    _check_level(confidence, "confidence")
    tail = (1.0 - float(confidence)) / 2.0
    p_hat = k / n  # lo <= p_hat <= hi, which halves the bisection brackets
    lo = 0.0 if k == 0 else beta_ppf(tail, k, n - k + 1, 0.0, p_hat)
    hi = 1.0 if k == n else beta_ppf(1.0 - tail, k + 1, n - k, p_hat, 1.0)
    return lo, hi


# -----------------------------------------------------------------------------
# ranking metrics: ROC, AUROC, AUPR, FPR at TPR

def _counts_by_threshold(pos, neg):
    """For each distinct score t, descending: thresholds and the cumulative numbers of
    positives / negatives with score >= t (one point per distinct score, so ties move
    the curve diagonally instead of inventing an order between tied images)."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each tie block
    tps = np.cumsum(is_pos)[last]
    fps = (last + 1) - tps
    return scores[last], tps, fps


def roc_curve(real_scores, fake_scores):
    """ROC of the sweep `score >= t` with fake positive: (fpr, tpr, thresholds), one
    point per distinct score, thresholds descending, starting at (0, 0) with threshold
    +inf. Same points as sklearn.metrics.roc_curve(..., drop_intermediate=False)."""
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    thr, tps, fps = _counts_by_threshold(fake, real)
    fpr = np.r_[0.0, fps / real.size]
    tpr = np.r_[0.0, tps / fake.size]
    return fpr, tpr, np.r_[np.inf, thr]


def _average_ranks(x):
    """1-based ranks of x with ties given their average rank (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="stable")
    _, inverse, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie block
    avg = ends - (counts - 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[inverse]
    return ranks


def auroc(real_scores, fake_scores):
    """Area under the ROC: P(fake score > real score) + P(tie) / 2, the Mann-Whitney U
    statistic over n_real * n_fake, computed from average ranks in O(n log n)."""
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    ranks = _average_ranks(np.concatenate([real, fake]))
    u = ranks[real.size:].sum() - fake.size * (fake.size + 1) / 2.0
    return float(u / (real.size * fake.size))


def _average_precision(pos, neg):
    # AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds, sklearn's definition:
    # a step function, no interpolation between operating points
    _, tps, fps = _counts_by_threshold(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr(real_scores, fake_scores, positive="fake"):
    """Average precision (sklearn's average_precision_score) of the sweep `score >= t`.
    positive="fake" (AUPR-Out): fakes are positives, high score = positive.
    positive="real" (AUPR-In): reals are positives, ranked by the negated score.
    Depends on the class balance, unlike AUROC: report the counts with it."""
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    if positive == "fake":
        return _average_precision(fake, real)
    if positive == "real":
        return _average_precision(-real, -fake)
    raise ValueError(f"positive must be 'fake' or 'real', got {positive!r}")


def fpr_at_tpr(real_scores, fake_scores, tpr=0.95):
    """FPR at `tpr` (e.g. FPR@95TPR): the fraction of real images with score >= t, at the
    LARGEST threshold t for which at least `tpr` of the fakes have score >= t. That t is
    the m-th largest fake score, m = ceil(tpr * n_fake) (exact arithmetic); taking the
    largest such t gives the smallest FPR that reaches the TPR. `>=` here, like the ROC."""
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    m = math.ceil(fake.size * _exact(tpr, "tpr"))
    t = -np.partition(-fake, m - 1)[m - 1]  # m-th largest fake score
    return float(np.mean(real >= t))


# -----------------------------------------------------------------------------
# operating points for the rule `score > threshold` => FAKE

def youden_threshold(real_scores, fake_scores):
    """The threshold maximizing Youden's J = TPR - FPR under the inference rule
    `score > threshold` => FAKE (strictly greater). Returns (threshold, tpr, fpr).

    The threshold is always an attained real-image score: moving a cut onto a value held
    only by fakes flags fewer fakes and no fewer reals, so an optimum with J > 0 sits on a
    real score, and t = max(real) (flag no real, J >= 0) covers the rest. Ties in J go to
    the highest threshold, i.e. the fewest false alarms. Needs labelled fakes; for a
    threshold from real images alone use conformal_threshold."""
    real, fake = as_scores(real_scores, "real_scores"), as_scores(fake_scores, "fake_scores")
    real_sorted, fake_sorted = np.sort(real), np.sort(fake)
    cand = np.unique(real_sorted)
    fp = real.size - np.searchsorted(real_sorted, cand, side="right")  # reals > t
    tp = fake.size - np.searchsorted(fake_sorted, cand, side="right")  # fakes > t
    j = tp * real.size - fp * fake.size  # J * n_real * n_fake, integer: no float ties
    i = cand.size - 1 - int(np.argmax(j[::-1]))  # last maximum = highest threshold
    return float(cand[i]), float(tp[i] / fake.size), float(fp[i] / real.size)


def rates_at_threshold(real_scores, fake_scores_or_None, threshold):
    """(fpr, tpr) of the rule `score > threshold`: FPR = mean(real > t) and
    TPR = mean(fake > t); tpr is None when no fake scores are given."""
    real = as_scores(real_scores, "real_scores")
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold is NaN")
    fpr = float(np.mean(real > t))
    if fake_scores_or_None is None:
        return fpr, None
    fake = as_scores(fake_scores_or_None, "fake_scores")
    return fpr, float(np.mean(fake > t))


# -----------------------------------------------------------------------------
# uncertainty and summaries

def bootstrap_ci(fn, real, fake, n_boot=1000, confidence=0.95, seed=0):
    """Percentile bootstrap interval (lo, hi) for the statistic fn(real, fake),
    resampling real and fake separately with replacement (the two sets are sampled
    independently, and their sizes are fixed by design). fake may be None, for a
    statistic of the real scores alone (fn then receives None). Deterministic per seed."""
    _check_level(confidence, "confidence")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    real = as_scores(real, "real")
    fake = None if fake is None else as_scores(fake, "fake")
    rng = np.random.default_rng(seed)
    stats = np.empty(int(n_boot), dtype=np.float64)
    chunk = max(1, 2_000_000 // (real.size + (0 if fake is None else fake.size)))  # bound index memory
    for start in range(0, int(n_boot), chunk):
        rows = min(chunk, int(n_boot) - start)
        ri = rng.integers(0, real.size, size=(rows, real.size))
        fi = None if fake is None else rng.integers(0, fake.size, size=(rows, fake.size))
        for r in range(rows):
            stats[start + r] = fn(real[ri[r]], None if fake is None else fake[fi[r]])
    tail = (1.0 - float(confidence)) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return float(lo), float(hi)


def summary_stats(scores):
    """n, mean, median, std (population, ddof=0), min, max and percentiles p1 ... p99
    (numpy's linear interpolation) as plain Python numbers, ready for json.dump."""
    s = as_scores(scores)
    out = {
        "n": int(s.size),
        "mean": float(s.mean()),
        "median": float(np.median(s)),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
    }
    for p, v in zip(SUMMARY_PERCENTILES, np.percentile(s, SUMMARY_PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out
