"""The scores beyond the card's MSE, on constructed cases with known answers."""
import math

import numpy as np
import torch

from detector import NOISE_FLOOR, complexity_score, model_bits_per_dim, png_bits
from thresholds import combined_pvalue
from fakes import flat_colours, uniform_noise


class FixedReconstruction(torch.nn.Module):
    """A stand-in model whose reconstruction is always `target`: the error is then exactly
    the difference we construct."""

    def __init__(self, target):
        super().__init__()
        self.target = torch.nn.Parameter(target, requires_grad=False)

    def forward(self, x):
        return self.target.expand_as(x)


def test_model_bits_per_dim_formula():
    # Gaussian code length of an 8-bit value with error variance mse, bin width 2/255
    mse = 0.01
    expected = 0.5 * math.log2(2 * math.pi * math.e * mse) - math.log2(2 / 255)
    assert model_bits_per_dim([mse])[0] == expected
    # below the quantization noise floor the cost stops falling
    assert model_bits_per_dim([0.0])[0] == model_bits_per_dim([NOISE_FLOOR])[0]


def test_flat_images_are_nearly_free_for_png_and_noise_is_not():
    flat, noise = flat_colours(4, 64, seed=0), uniform_noise(4, 64, seed=0)  # uint8 [4, 3, 64, 64]
    dims = 3 * 64 * 64
    assert (png_bits(flat) / dims < 0.2).all()
    assert (png_bits(noise) / dims > 7.5).all()
    # same reconstruction error, very different complexity: the flat image's low error is
    # no longer an unearned "real" signal
    mse = np.full(4, 0.01)
    assert (complexity_score(mse, png_bits(flat), dims) > complexity_score(mse, png_bits(noise), dims) + 5).all()


def test_combined_pvalue_keeps_the_false_positive_guarantee_on_exchangeable_data():
    rng = np.random.default_rng(0)
    n_cal, n_test, trials, alpha = 199, 50, 400, 0.05
    rates = []
    for _ in range(trials):
        # three dependent scores per image, as mse / complexity / artifact can be
        base = rng.normal(size=(n_cal + n_test, 1))
        scores = base + 0.5 * rng.normal(size=(n_cal + n_test, 3))
        cal, test = scores[:n_cal], scores[n_cal:]
        p = combined_pvalue({k: np.sort(cal[:, k]) for k in range(3)}, {k: test[:, k] for k in range(3)})
        rates.append(np.mean(p <= alpha))
    assert np.mean(rates) <= alpha + 0.005
    # Bonferroni is conservative, but not useless: it still flags a fair share
    assert np.mean(rates) > alpha / 4


def test_combined_pvalue_is_bonferroni_of_the_minimum():
    cal = {"a": np.arange(1.0, 10.0), "b": np.arange(1.0, 10.0)}  # p(s) = (1 + #{cal >= s}) / 10
    # a: p = 0.1, 1.0, 0.6; b: p = 0.6, 0.6, 0.6 -> min(1, 2 * min)
    values = {"a": [9.5, 0.0, 5.0], "b": [5.0, 5.0, 5.0]}
    np.testing.assert_allclose(combined_pvalue(cal, values), [0.2, 1.0, 1.0])
    np.testing.assert_allclose(combined_pvalue({"a": cal["a"]}, values), [0.1, 1.0, 0.6])  # one score: itself
