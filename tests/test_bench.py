import json

import pytest
import torch

from data import dead_leaves, preprocess
from detector import score_batch
from model import ResidualAutoencoder, prepare_model
from tests.conftest import TINY, run_script


def scores_of(model, x):
    return score_batch(model, x)["mse"]


@pytest.fixture
def trained_like_tiny():
    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY).eval()
    x = preprocess(dead_leaves(16, 32, seed=2), 32)
    return model, x


def test_channels_last_keeps_scores_within_one_percent(trained_like_tiny):
    model, x = trained_like_tiny
    with torch.no_grad():
        eager = model.reconstruction_error(x, reduction="none").double().numpy()  # fp32, NCHW
    fast = scores_of(prepare_model(model, torch.device("cpu")), x)  # what inference and calibration use
    assert model.head.weight.is_contiguous(memory_format=torch.channels_last)
    assert abs(fast / eager - 1).max() < 0.01


def test_compiled_model_keeps_scores_within_one_percent(trained_like_tiny):
    model, x = trained_like_tiny
    with torch.no_grad():
        eager = model.reconstruction_error(x, reduction="none").double().numpy()
    compiled = prepare_model(ResidualAutoencoder(TINY).eval(), torch.device("cpu"))
    compiled.load_state_dict(model.state_dict())
    compiled.compile()
    assert abs(scores_of(compiled, x) / eager - 1).max() < 1e-3  # fp32 both: only summation order differs


def test_bench_cli_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    variants = ["eager", "channels_last"]
    proc = run_script("bench.py", "--preset", "smoke", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                      "--variants", ",".join(variants), "--batch-size", "8", "--json", out)
    result = json.loads(out.read_text())
    assert "best inference variant" in proc.stdout and "theoretical" in proc.stdout
    assert result["peak_tflops"] > 0 and result["peak_precision"] == "fp32"
    # the measured peak can pass the theoretical one only by turbo clocks above the reported one
    assert 0 < result["peak_tflops"] < 2 * result["theoretical_tflops"]
    assert result["gflops_per_image"] > 0
    assert [v["variant"] for v in result["variants"]] == variants
    assert all("error" not in v for v in result["variants"]), result["variants"]
    for v in result["variants"]:
        assert v["infer_images_per_s"] > 0 and v["train_images_per_s"] > 0
        # the peak is the best of several readings interleaved with the variants: never below what they achieve
        assert 0 < v["infer_utilisation"] <= 1 and 0 < v["train_utilisation"] <= 1
