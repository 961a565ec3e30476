import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import metrics
import thresholds
from utils import UserError


def tied_scores(seed, n_real=300, n_fake=200, shift=0.7, decimals=1):
    """Overlapping groups rounded to one decimal, so many scores tie within and across groups."""
    rng = np.random.default_rng(seed)
    real = np.round(rng.normal(0.0, 1.0, n_real), decimals)
    fake = np.round(rng.normal(shift, 1.0, n_fake), decimals)
    return real, fake


# ----------------------------------------------------------------------------- conformal

@pytest.mark.parametrize("alpha,k", [(0.01, 9901), (0.05, 9501), (0.10, 9001), (0.1, 9001)])
def test_conformal_rank_without_float_rounding(alpha, k):
    assert metrics.conformal_rank(10000, alpha) == k
    assert metrics.conformal_rank(10000, np.float64(alpha)) == k


def test_conformal_rank_exact_products():
    # (n + 1)(1 - alpha) an integer in decimal: the binary double of alpha must not push ceil up
    assert metrics.conformal_rank(99, 0.1) == 90
    assert metrics.conformal_rank(9, 0.3) == 7
    assert metrics.conformal_rank(99, 0.45) == 55     # naive float ceil gives 56
    assert metrics.conformal_rank(9999, 0.95) == 500  # naive float ceil gives 501
    assert metrics.conformal_rank(19, 0.05) == 19
    assert metrics.conformal_rank(18, 0.05) == 19  # > n


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.10])
def test_conformal_threshold_is_that_order_statistic(alpha):
    rng = np.random.default_rng(0)
    ordered = np.arange(10000, dtype=np.float64) * 0.5  # k-th smallest is (k - 1) * 0.5
    shuffled = rng.permutation(ordered)
    k = metrics.conformal_rank(10000, alpha)
    assert metrics.conformal_threshold(shuffled, alpha) == (k - 1) * 0.5
    assert metrics.conformal_threshold(torch.from_numpy(shuffled), alpha) == (k - 1) * 0.5
    assert metrics.conformal_threshold(list(shuffled), alpha) == (k - 1) * 0.5


def test_conformal_threshold_too_few_images_is_inf():
    assert metrics.conformal_threshold(np.arange(18.0), 0.05) == math.inf  # k = 19 > 18
    assert metrics.conformal_threshold(np.arange(19.0), 0.05) == 18.0      # k = 19 = n
    assert metrics.conformal_threshold([3.0], 0.4) == math.inf             # k = ceil(1.2) = 2


def test_conformal_guarantee_on_exchangeable_data():
    # 2000 calibrations of n = 99 real scores, each judged on fresh reals from the same law.
    # With continuous scores E[FPR] = 1 - k/(n+1) = 1 - 90/100 = 0.10 exactly.
    rng = np.random.default_rng(1234)
    trials, n_cal, n_test, alpha = 2000, 99, 200, 0.1
    fprs = np.empty(trials)
    for i in range(trials):
        cal = rng.gamma(2.0, 1.0, n_cal)
        test = rng.gamma(2.0, 1.0, n_test)
        t = metrics.conformal_threshold(cal, alpha)
        fprs[i] = np.mean(test > t)  # the detector's rule
    assert fprs.mean() <= alpha + 0.005  # std error of the mean is ~0.0007
    assert fprs.mean() >= 0.07


def test_conformal_pvalues_are_uniform_on_exchangeable_data():
    rng = np.random.default_rng(7)
    pvals = []
    for _ in range(500):
        cal = np.sort(rng.lognormal(0.0, 1.0, 99))
        pvals.append(metrics.conformal_pvalues(cal, rng.lognormal(0.0, 1.0, 50)))
    p = np.concatenate(pvals)
    assert p.dtype == np.float64 and p.min() >= 0.01 and p.max() <= 1.0
    for level in (0.05, 0.10, 0.50):
        assert abs(np.mean(p <= level) - level) <= 0.01


def test_conformal_pvalues_exact_values_and_ties():
    cal = np.array([1.0, 2.0, 2.0, 3.0])
    p = metrics.conformal_pvalues(cal, [0.0, 2.0, 2.5, 3.0, 9.0])
    # #{cal >= s} = 4, 3, 1, 1, 0 over n + 1 = 5
    np.testing.assert_allclose(p, np.array([5, 4, 2, 2, 1]) / 5.0)


def test_unsorted_calibration_scores_never_reach_the_pvalues():
    # conformal_pvalues counts by binary search: the thresholds file is where unsorted scores are refused
    cfg = {"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.1}}},
           "calibration_scores": {"scores": {"mse": [3.0, 1.0]}}}
    with pytest.raises(UserError, match="calibration_scores.scores.mse must be a sorted list"):
        thresholds.validate(cfg, "t.json")


# ----------------------------------------------------------------------------- Clopper-Pearson

GRID = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (0, 100), (1, 100), (50, 100), (99, 100),
        (0, 10000), (1, 10000), (100, 10000), (500, 10000), (9999, 10000), (10000, 10000),
        (0, 100000), (7, 100000), (5000, 100000), (99990, 100000), (100000, 100000)]


@pytest.mark.parametrize("conf", [0.95, 0.99, 0.8])
@pytest.mark.parametrize("k,n", GRID)
def test_clopper_pearson_solves_the_binomial_tails(k, n, conf):
    # the definition, checked through the binomial distribution rather than the beta quantiles
    # the implementation uses: P(X >= k | lo) = P(X <= k | hi) = (1 - conf) / 2
    lo, hi = metrics.clopper_pearson(k, n, conf)
    tail = (1 - conf) / 2
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k == 0:
        assert lo == 0.0 and hi == pytest.approx(1 - tail ** (1 / n), rel=1e-9)  # (1 - hi)^n = tail
    else:
        assert stats.binom.sf(k - 1, n, lo) == pytest.approx(tail, rel=1e-6)
    if k == n:
        assert hi == 1.0 and lo == pytest.approx(tail ** (1 / n), rel=1e-9)  # lo^n = tail
    else:
        assert stats.binom.cdf(k, n, hi) == pytest.approx(tail, rel=1e-6)


def test_clopper_pearson_known_values():
    # published as about [0.0081, 0.0122] and [0.0458, 0.0545] (rounded outward);
    # the exact bounds are 0.0081436 / 0.0121495 and 0.0458099 / 0.0544545
    lo, hi = metrics.clopper_pearson(100, 10000)
    assert (round(lo, 4), round(hi, 4)) == (0.0081, 0.0121)
    assert lo == pytest.approx(0.0081, abs=1e-4) and hi == pytest.approx(0.0122, abs=1e-4)
    lo, hi = metrics.clopper_pearson(500, 10000)
    assert (round(lo, 4), round(hi, 4)) == (0.0458, 0.0545)
    assert (round(lo, 7), round(hi, 7)) == (0.0458099, 0.0544545)


# ----------------------------------------------------------------------------- ROC / AUROC / AUPR
# checked against their definitions, counted pair by pair or threshold by threshold

def by_threshold(pos, neg):
    """Each distinct score t, descending, with the numbers of positives and of negatives >= t."""
    t = np.unique(np.r_[pos, neg])[::-1]
    return t, np.array([np.sum(pos >= v) for v in t]), np.array([np.sum(neg >= v) for v in t])


def average_precision(pos, neg):
    """Sum over thresholds of (recall gained) * precision, the step-wise area under precision-recall."""
    _, tp, fp = by_threshold(pos, neg)
    return float(np.sum(np.diff(np.r_[0, tp]) / pos.size * tp / (tp + fp)))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_the_pairwise_win_rate_with_ties(seed):
    real, fake = tied_scores(seed)
    diff = fake[:, None] - real[None, :]
    expected = np.mean(diff > 0) + np.mean(diff == 0) / 2
    assert metrics.auroc(real, fake) == pytest.approx(expected, abs=1e-12)
    assert metrics.auroc(torch.from_numpy(real), fake.tolist()) == pytest.approx(expected, abs=1e-12)


def test_auroc_ties_count_half():
    assert metrics.auroc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert metrics.auroc([0.0], [1.0]) == 1.0
    assert metrics.auroc([1.0], [0.0]) == 0.0
    assert metrics.auroc([0.0, 1.0], [1.0]) == 0.75
    assert metrics.auroc([0.0, 1.0, 2.0], [0.5, 1.0]) == pytest.approx(2.5 / 6)  # wins 1, 1 + 1/2 of 6 pairs


def test_aupr_hand_examples():
    # ranked 0.8 F, 0.4 R, 0.35 F, 0.1 R: precision 1 at recall 1/2, 2/3 at recall 1
    assert metrics.aupr([0.1, 0.4], [0.35, 0.8]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3, abs=1e-15)
    # AUPR-In ranks reals by -score: 0.1 R, 0.35 F, 0.4 R, 0.8 F, the same steps
    assert metrics.aupr([0.1, 0.4], [0.35, 0.8], positive="real") == pytest.approx(5 / 6, abs=1e-15)
    # a tie is one step: t = 2 gives precision 1 at recall 1/2, t = 1 precision 2/4 at recall 1
    assert metrics.aupr([1.0, 1.0], [1.0, 2.0]) == pytest.approx(0.75, abs=1e-15)
    assert metrics.aupr([0.0, 0.0], [1.0]) == 1.0
    assert metrics.aupr([1.0, 1.0, 1.0], [1.0]) == 0.25  # all tied: the class balance


@pytest.mark.parametrize("seed", range(5))
def test_aupr_against_counting_both_conventions(seed):
    real, fake = tied_scores(seed)
    assert metrics.aupr(real, fake) == pytest.approx(average_precision(fake, real), abs=1e-12)
    assert metrics.aupr(real, fake, positive="real") == pytest.approx(average_precision(-real, -fake),
                                                                      abs=1e-12)
    assert metrics.aupr(real, fake) != pytest.approx(metrics.aupr(real, fake, positive="real"), abs=1e-3)


def test_aupr_bad_positive():
    with pytest.raises(ValueError, match="positive"):
        metrics.aupr([0.0], [1.0], positive="ood")


def test_roc_curve_hand_example():
    # a tie across the classes at 2 moves the curve diagonally, in one step
    fpr, tpr, thr = metrics.roc_curve([1.0, 2.0], [2.0, 3.0])
    np.testing.assert_array_equal(thr, [np.inf, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_counts_score_at_least_t(seed):
    real, fake = tied_scores(seed)
    t, tp, fp = by_threshold(fake, real)
    fpr, tpr, thr = metrics.roc_curve(real, fake)
    np.testing.assert_array_equal(thr, np.r_[np.inf, t])  # one point per distinct score
    np.testing.assert_allclose(tpr, np.r_[0, tp / fake.size], rtol=0, atol=1e-15)
    np.testing.assert_allclose(fpr, np.r_[0, fp / real.size], rtol=0, atol=1e-15)


@pytest.mark.parametrize("call", [metrics.roc_curve, metrics.auroc, metrics.aupr, metrics.fpr_at_tpr])
def test_ranking_metrics_refuse_infinite_scores(call):
    with pytest.raises(ValueError, match="infinity"):
        call([0.0, np.inf], [1.0])


def test_fpr_at_tpr_hand_example():
    fake = np.arange(1.0, 21.0)          # 1 .. 20; 95% of 20 = 19 fakes => t = 2
    real = np.array([0.0, 1.0, 2.0, 2.0, 3.0, 10.0, 25.0, 0.5, 1.9, 2.1])
    assert metrics.fpr_at_tpr(real, fake, 0.95) == 0.6  # reals >= 2: 2, 2, 3, 10, 25, 2.1
    assert metrics.fpr_at_tpr(real, fake, 1.0) == 0.8   # t = 1: also 1.0 and 1.9
    assert metrics.fpr_at_tpr(real, fake, 0.5) == 0.1   # 10 fakes => t = 11: only 25
    assert metrics.fpr_at_tpr(real, fake, 0.52) == 0.2  # ceil(10.4) = 11 fakes => t = 10: 10 and 25


def test_fpr_at_tpr_against_roc():
    real, fake = tied_scores(3)
    fpr, tpr, _ = metrics.roc_curve(real, fake)
    for target in (0.5, 0.8, 0.9, 0.95, 0.99):
        assert metrics.fpr_at_tpr(real, fake, target) == pytest.approx(fpr[np.argmax(tpr >= target)])


def test_youden_on_separable_groups():
    real = np.array([0.1, 0.3, 0.2, 0.25])
    fake = np.array([0.9, 0.6, 0.7])
    t, tpr, fpr = metrics.youden_threshold(real, fake)
    assert (tpr, fpr) == (1.0, 0.0)
    assert 0.3 <= t < 0.6
    assert (np.mean(real > t), np.mean(fake > t)) == (0.0, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_youden_against_brute_force(seed):
    real, fake = tied_scores(seed, n_real=120, n_fake=80)
    t, tpr, fpr = metrics.youden_threshold(real, fake)
    # brute force over every cut of `score > c`: each distinct score, and below the minimum
    cands = np.r_[np.unique(np.r_[real, fake]), -np.inf]
    best = max(np.mean(fake > c) - np.mean(real > c) for c in cands)
    assert tpr - fpr == pytest.approx(best, abs=1e-12)
    assert (fpr, tpr) == (np.mean(real > t), np.mean(fake > t))  # the rule `score > t` realises them
    assert t in real


def test_youden_when_fakes_score_lower():
    t, tpr, fpr = metrics.youden_threshold([5.0, 6.0], [1.0, 2.0])
    assert (t, tpr, fpr) == (6.0, 0.0, 0.0)  # J = 0: flag nothing rather than everything


def test_youden_ties_go_to_fewest_false_alarms():
    # t = 1: TPR 1, FPR 1/2; t = 3: TPR 1/2, FPR 0; both J = 1/2 -> the higher threshold
    assert metrics.youden_threshold([1.0, 3.0], [2.0, 4.0]) == (3.0, 0.5, 0.0)


# ----------------------------------------------------------------------------- bootstrap, summary

def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 10000):
        real, fake = rng.normal(0, 1, n), rng.normal(1, 1, n)
        est = metrics.auroc(real, fake)
        lo, hi = metrics.bootstrap_ci(metrics.auroc, real, fake, n_boot=200, seed=1)
        assert lo <= est <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 50x more data, ~7x narrower


def test_bootstrap_ci_resamples_both_groups():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(0, 1, 400), rng.normal(0, 1, 900)
    for fn, n in [(lambda r, f: float(np.mean(r)), 400), (lambda r, f: float(np.mean(f)), 900)]:
        lo, hi = metrics.bootstrap_ci(fn, real, fake, n_boot=300, seed=0)
        assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(n), rel=0.2)


def test_bootstrap_ci_deterministic_and_real_only():
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, 500)
    fn = lambda r, f: float(np.mean(r))  # noqa: E731
    a = metrics.bootstrap_ci(fn, real, None, n_boot=300, seed=5)
    assert a == metrics.bootstrap_ci(fn, real, None, n_boot=300, seed=5)
    assert a[0] < real.mean() < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 / math.sqrt(500), rel=0.2)


def test_summary_stats():
    rng = np.random.default_rng(3)
    s = rng.exponential(1.0, 1001)
    out = metrics.summary_stats(torch.from_numpy(s))
    keys = ["n", "mean", "median", "std", "min", "max"] + [f"p{p}" for p in (1, 5, 10, 25, 75, 90, 95, 99)]
    assert sorted(out) == sorted(keys)
    assert out["n"] == 1001 and type(out["n"]) is int
    assert all(type(out[k]) is float for k in keys if k != "n")
    json.dumps(out)
    assert out["mean"] == pytest.approx(s.mean())
    assert out["median"] == pytest.approx(np.median(s))
    assert out["std"] == pytest.approx(s.std())
    assert (out["min"], out["max"]) == (s.min(), s.max())
    for p in (1, 5, 10, 25, 75, 90, 95, 99):
        assert out[f"p{p}"] == pytest.approx(np.percentile(s, p))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call", [
    lambda bad: metrics.conformal_threshold(bad, 0.1),
    lambda bad: metrics.conformal_pvalues(bad, [1.0]),
    lambda bad: metrics.conformal_pvalues([1.0], bad),
    lambda bad: metrics.auroc(bad, [1.0]),
    lambda bad: metrics.auroc([1.0], bad),
    lambda bad: metrics.aupr(bad, [1.0]),
    lambda bad: metrics.roc_curve([1.0], bad),
    lambda bad: metrics.fpr_at_tpr(bad, [1.0]),
    lambda bad: metrics.youden_threshold([1.0], bad),
    lambda bad: metrics.as_scores(bad),
    lambda bad: metrics.aupr([1.0], bad, positive="real"),
    lambda bad: metrics.bootstrap_ci(metrics.auroc, [1.0], bad, n_boot=2),
    lambda bad: metrics.bootstrap_ci(metrics.auroc, bad, [1.0], n_boot=2),
    lambda bad: metrics.summary_stats(bad),
])
@pytest.mark.parametrize("bad", [None, [], np.array([]), torch.tensor([]), [1.0, float("nan")],
                                 torch.tensor([np.nan])])
def test_bad_scores_raise(call, bad):
    with pytest.raises(ValueError):
        call(bad)

