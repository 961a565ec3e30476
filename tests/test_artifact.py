"""The artifact detector: its residual, the pair builder on a tiny net, training, calibration and scoring through
the real CLIs, and the shipped weights."""
import json
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import thresholds
from conftest import ROOT, run_script
from detector import ARTIFACT_WEIGHTS, Detector
from model import ArtifactConfig, ArtifactDetector, count_parameters, load_model, neighbour_residual

from checkpoints import weights_fingerprint

sys.path.insert(0, str(ROOT / "scripts" / "generated"))
import make_pairs  # noqa: E402
import ncnn_torch  # noqa: E402

TINY = dict(image_size=32, channels=(8, 16), blocks_per_stage=1)


def test_the_residual_of_a_nearest_upscale_is_zero_and_of_texture_is_not():
    x = torch.rand(2, 3, 16, 16)
    blocky = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [2, 3, 32, 32], constant 2x2 blocks
    assert neighbour_residual(blocky).shape == (2, 12, 16, 16)
    assert neighbour_residual(blocky).abs().max() == 0
    assert neighbour_residual(torch.rand(2, 3, 32, 32)).abs().mean() > 0.1


def test_the_preset_network_is_small_and_loads_back_strictly(tmp_path):
    model = ArtifactDetector(ArtifactConfig()).eval()
    assert count_parameters(model) <= 2_000_000
    model.save_pretrained(tmp_path / "release")
    again = load_model(tmp_path / "release")
    assert isinstance(again, ArtifactDetector) and again.config == model.config
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), again(x)) and model(x).shape == (3,)


def write_pairs(root, photos=10, per_photo=4, seed=0):
    """A tiny pairs folder: dead-leaves 'photos' as reals; the fake of each is its half-size copy upscaled by
    nearest neighbour, the plainest up-sampling trace."""
    images = data.dead_leaves(photos * per_photo, 64, seed=seed)
    for name in ("real", "nearest_x2"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        pil, stem = Image.fromarray(im.permute(1, 2, 0).numpy()), f"photo{i // per_photo}_c{i % per_photo}"
        pil.save(root / "real" / f"{stem}.png")
        pil.resize((32, 32), Image.Resampling.BICUBIC).resize((64, 64), Image.Resampling.NEAREST).save(
            root / "nearest_x2" / f"{stem}.png")
    return root


def test_pairs_load_balanced_and_train_keeps_photos_apart(tmp_path):
    from data import split_by_photo

    pairs, photos, generators = data.load_pairs(write_pairs(tmp_path / "pairs"), 32, seed=0, fakes_per_image=2)
    assert generators == ["nearest_x2"] and pairs.images.dtype == torch.uint8 and pairs.shape[1:] == (3, 32, 32)
    assert pairs.labels.sum() == len(pairs) / 2  # as many real tiles as fake ones
    kept, held = split_by_photo(photos, 0.2, seed=0)
    assert {photos[i] for i in kept.tolist()}.isdisjoint({photos[i] for i in held.tolist()})
    assert len(kept) + len(held) == len(photos) and len({photos[i] for i in held.tolist()}) == 2


def write_tiny_ncnn(folder):
    """A real ncnn model file pair: conv 3x3 (3 -> 12, same padding, bias) then pixel shuffle x2."""
    w, b = torch.randn(12, 3, 3, 3) * 0.1, torch.rand(12) * 0.1
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny.param").write_text(
        "7767517\n3 3\nInput data 0 1 data\nConvolution conv 1 1 data c 0=12 1=3 4=1 5=1 6=324\n"
        "PixelShuffle ps 1 1 c output 0=2\n")
    (folder / "models" / "tiny.bin").write_bytes(struct.pack("<I", 0) + w.numpy().tobytes() + b.numpy().tobytes())
    return w, b


def test_the_pair_builder_runs_a_tiny_ncnn_net_as_the_port_defines_it(tmp_path, monkeypatch):
    w, b = write_tiny_ncnn(tmp_path / "pkg")
    monkeypatch.setitem(ncnn_torch.PIPELINES, "tiny", ncnn_torch.Pipeline(2, 10, "reflect", 1, False))
    monkeypatch.setattr(make_pairs, "GENERATORS", {"tiny_x2": make_pairs.Generator(
        "pixel_shuffle", 2, "ncnn", "pkg/models/tiny", 1.0, "test")})
    for pool in ("train_real", "calib_real", "eval_photos_src"):
        (tmp_path / pool).mkdir()
        Image.fromarray(data.dead_leaves(1, 300, seed=len(pool))[0].permute(1, 2, 0).numpy()).save(tmp_path / pool / "p.png")
    monkeypatch.setattr(sys, "argv", ["make_pairs.py", str(tmp_path), "--per-photo", "2"])
    make_pairs.main()
    for split in ("train", "test"):
        real = sorted((tmp_path / "pairs" / split / "real").glob("*.png"))
        assert [p.name for p in real] == ["p_c0.png", "p_c1.png"]
        for path in real:
            fake = np.array(Image.open(tmp_path / "pairs" / split / "tiny_x2" / path.name))
            lr = Image.open(path).resize((64, 64), Image.Resampling.BICUBIC)  # the builder's rule: shrink, regenerate
            x = torch.from_numpy(np.asarray(lr, np.float32) / 255).permute(2, 0, 1)[None]
            want = F.pixel_shuffle(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b), 2)  # reflect at the edge
            want = np.clip(np.floor(want[0].permute(1, 2, 0).numpy() * 255 + 0.5), 0, 255)
            assert fake.shape == (128, 128, 3) and np.abs(fake.astype(int) - want).max() <= 1
    assert not (tmp_path / "pairs" / "calib" / "tiny_x2").exists()  # calibration holds reals only
    assert "tiny_x2,pixel_shuffle,2" in (tmp_path / "pairs" / "generators.csv").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny detector trained by the real CLI, then calibrated on other reals by the real CLI."""
    root = tmp_path_factory.mktemp("artifact")
    pairs = write_pairs(root / "pairs", photos=12, per_photo=4)
    run_script("train.py", "--preset", "artifact", "--data-dir", pairs, "--out-dir", root / "run", "--epochs", "3",
               "--image-size", "32", "--channels", "8,16", "--batch-size", "16", "--no-progress")
    calib = write_pairs(root / "calib", photos=60, per_photo=4, seed=1)
    run_script("calibrate.py", "--artifact-model", root / "run" / "release", "--real-dir", calib / "real",
               "--fake-dir", f"nearest={calib / 'nearest_x2'}", "--num-noise", "0", "--hard-fakes", "none",
               "--num-benign", "10", "--bootstrap", "20", "--no-progress")
    return root


def test_training_calibration_and_scoring_through_the_clis(trained):
    release = trained / "run" / "release"
    assert json.loads((trained / "run" / "results.json").read_text())["test_bce"] > 0
    cfg = thresholds.read(release / "thresholds_calibrated.json")  # written beside the weights
    assert "reconstruction_thresholds" not in cfg and "artifact" in cfg["score_thresholds"]
    assert cfg["binding"]["artifact_fingerprint"] == weights_fingerprint(load_model(release))
    assert cfg["evaluation"]["scores"]["artifact"]["nearest"]["auroc"] > 0.5
    proc = run_script("inference_example.py", trained / "pairs", "--score", "artifact", "--artifact-model", release,
                      "--output", trained / "rows.csv")
    lines = [line for line in proc.stdout.splitlines() if "\tartifact=" in line]
    assert len(lines) == 96 and all("\tp=" in line and line.endswith(("REAL", "FAKE")) for line in lines)
    assert "thresholds file" not in proc.stderr  # they are bound to these weights: no binding warning
    assert "artifact" in (trained / "rows.csv").read_text().splitlines()[0]


def test_the_detector_api_scores_files_and_images_alike(trained):
    det = Detector(None, score="artifact", artifact_model=trained / "run" / "release", device="cpu")
    path = sorted((trained / "pairs" / "real").glob("*.png"))[0]
    from_file = det.score([str(path)])[0]
    in_memory = det.score([Image.open(path)])[0]
    assert from_file["artifact"] == pytest.approx(in_memory["artifact"], rel=1e-6)
    assert from_file["p_value"] == in_memory["p_value"] and from_file["verdict"] in ("REAL", "FAKE")


def test_artifact_needs_no_autoencoder_but_the_other_scores_do(trained, tiny_model, tmp_path):
    from conftest import save_checkpoint

    proc = run_script("inference_example.py", trained / "pairs", "--score", "mse", check=False)
    assert proc.returncode == 2 and "give --checkpoint" in proc.stderr
    ckpt = save_checkpoint(tiny_model, tmp_path / "ae.ckpt")  # an autoencoder where the detector belongs
    proc = run_script("inference_example.py", trained / "pairs", "--score", "artifact", "--artifact-model", ckpt,
                      check=False)
    assert proc.returncode == 2 and "holds an autoencoder, not an artifact detector" in proc.stderr


def test_the_shipped_detector_loads_and_scores_a_folder_with_no_flags(tmp_path):
    model = load_model(ARTIFACT_WEIGHTS)
    assert isinstance(model, ArtifactDetector) and count_parameters(model) <= 2_000_000
    cfg = thresholds.read(thresholds.beside(ARTIFACT_WEIGHTS))
    assert cfg["binding"]["artifact_fingerprint"] == weights_fingerprint(model)  # the thresholds are its own
    from skimage import data as photos  # real photographs shipped in scikit-image's wheel

    Image.fromarray(photos.astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(photos.coffee()).save(tmp_path / "coffee.jpg", quality=90)
    proc = run_script("inference_example.py", tmp_path, "--score", "artifact")
    lines = proc.stdout.splitlines()[:2]
    assert all("\tartifact=" in line and "\tp=" in line for line in lines) and "thresholds file" not in proc.stderr


def test_one_calibration_of_both_models_decides_with_either_score(trained, tiny_model, tmp_path):
    from conftest import save_checkpoint

    ckpt = save_checkpoint(tiny_model, tmp_path / "ae" / "model.ckpt")
    calib, out = trained / "calib", tmp_path / "both.json"
    run_script("calibrate.py", "--checkpoint", ckpt, "--artifact-model", trained / "run" / "release", "--real-dir",
               calib / "real", "--fake-dir", f"nearest={calib / 'nearest_x2'}", "--num-noise", "0", "--hard-fakes",
               "none", "--num-benign", "0", "--bootstrap", "0", "--no-progress", "--output", out)
    cfg = thresholds.read(out)
    assert set(cfg["evaluation"]["scores"]) == {"mse", "artifact"} and set(cfg["score_thresholds"]) == {"artifact"}
    det = Detector(ckpt, thresholds=out, score="mse", device="cpu", artifact_model=trained / "run" / "release")
    path = str(sorted((calib / "nearest_x2").glob("*.png"))[0])
    for rule, other in ((det, "artifact"), (det.with_rule("artifact"), "mse")):  # only the rule's model runs
        row = rule.score([path])[0]
        assert 0 < row["p_value"] <= 1 and row["verdict"] in ("REAL", "FAKE") and other not in row, row


def test_an_unreadable_image_leaves_its_pair_out(tmp_path, capsys):
    root = write_pairs(tmp_path / "pairs", photos=2, per_photo=2)
    (root / "nearest_x2" / "photo0_c0.png").write_bytes(b"not a png")
    pairs, photos, _ = data.load_pairs(root, 32, fakes_per_image=1)
    assert len(pairs) == 3 * 2 and sorted(set(photos)) == ["photo0", "photo1"]  # three whole pairs, two tiles each
    assert "skipped the pair photo0_c0.png: not an image" in capsys.readouterr().err
