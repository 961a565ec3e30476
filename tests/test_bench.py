import importlib.util
import json

import pytest
import torch

from data import dead_leaves, preprocess
from detector import prepare_model, score_batch
from model import ResidualAutoencoder
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


# the exported runtimes whose packages are here: CI installs requirements-export.txt, a GPU box may lack it
RUNTIMES = [variant for variant, modules in {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}.items()
            if all(importlib.util.find_spec(m) for m in modules)]


def test_bench_cli_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    variants = ["eager", "channels_last", *RUNTIMES]
    proc = run_script("bench.py", "--preset", "smoke", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                      "--variants", ",".join(variants), "--folder-images", "4", "--batch-size", "8", "--json", out)
    result = json.loads(out.read_text())
    assert "best inference variant" in proc.stdout
    assert result["peak_tflops"] > 0 and result["peak_precision"] == "fp32"
    assert result["gflops_per_image"] > 0
    assert [v["variant"] for v in result["variants"]] == variants
    assert all("error" not in v for v in result["variants"]), result["variants"]
    for v in result["variants"]:
        assert v["infer_images_per_s"] > 0 and ("train_images_per_s" in v) == (v["variant"] not in ("onnx", "openvino"))
        # the peak is the best of several readings interleaved with the variants: never below what they achieve
        assert 0 < v["infer_utilisation"] <= 1 and 0 < v.get("train_utilisation", 1) <= 1
    assert all(result[f"{runtime}_vs_channels_last"] > 0 for runtime in RUNTIMES)
    for key in ("cifar_batch_images_per_s", "png_coding_images_per_s", "JPEG_read_reduced_images_per_s",
                "PNG_read_full_images_per_s", "WEBP_read_reduced_images_per_s"):
        assert result["data_path"][key] > 0
    assert 0 < result["data_path"]["PNG_reduced_input_change_grey_levels"] < 2
    assert result["folder"]["speedup_vs_card_recipe"] > 0
