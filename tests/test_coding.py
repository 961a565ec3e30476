"""The coding-cost score: its costs and entropies, the two-sided p-value, the tiling, and the CLI round trip
(train.py --model coding -> calibrate.py --coding-model -> inference_example.py --score coding / combined)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import fakes
import inference_example
import metrics
from coding import (MAX_TILES_PER_SIDE, CodingConfig, CodingModel, logistic_entropy_bits, logistic_log_prob, tile_origins,
                    tiles_of)
from data import dead_leaves
from detector import Detector, image_tiles
from fakes import benign_versions
from model import load_model
from tests.conftest import run_script, save_checkpoint
from utils import UserError, run_cli


def exact_entropy_bits(mean, scale):
    k = torch.arange(-4000, 4000, dtype=torch.float64)
    logp = logistic_log_prob(k, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64))
    return float(-(logp.exp() * logp).sum() / math.log(2)), float(logp.exp().sum())


@pytest.mark.parametrize("scale", [0.03, 0.3, 0.99, 1.0, 2.5, 40.0])
@pytest.mark.parametrize("mean", [100.0, 100.25, 100.5])
def test_entropy_matches_the_exact_sum(mean, scale):
    exact, mass = exact_entropy_bits(mean, scale)
    assert mass == pytest.approx(1, abs=1e-9)  # a distribution on the integers
    got = logistic_entropy_bits(torch.tensor([mean], dtype=torch.float64), torch.tensor([math.log(scale)], dtype=torch.float64))
    assert float(got) == pytest.approx(exact, abs=5e-4)


def test_pixels_drawn_from_the_prediction_cost_what_is_expected():
    """The gap is zero on average exactly when the pixels follow the predicted distribution; pixels closer to the
    mean than predicted (smoother) cost less than expected, pixels further away (sharper) cost more."""
    g = torch.Generator().manual_seed(0)
    n, mean, log_scale = 200_000, torch.full((200_000,), 120.3), torch.full((200_000,), math.log(2.0))
    u = torch.rand(n, generator=g).clamp(1e-7, 1 - 1e-7)
    drawn = (mean + 2.0 * torch.log(u / (1 - u))).round()  # a logistic draw, then its unit bin
    expected = logistic_entropy_bits(mean, log_scale)

    def gap(pixels):
        return float((-logistic_log_prob(pixels, mean, log_scale) / math.log(2) - expected).mean())

    assert abs(gap(drawn)) < 0.01  # bits per pixel, against ~3 bits of cost
    assert gap((mean + 0.5 * (drawn - mean)).round()) < -0.3  # residuals halved: more predictable than predicted
    assert gap((mean + 2.0 * (drawn - mean)).round()) > 0.3  # residuals doubled: more surprising than predicted
    exact = torch.full((1,), 120.0)  # a pixel predicted exactly, with near certainty, costs ~nothing, as expected
    sure = torch.full((1,), math.log(0.05))
    cost, entropy = float(-logistic_log_prob(exact, exact, sure) / math.log(2)), float(logistic_entropy_bits(exact, sure))
    assert cost < 1e-3 and entropy < 2e-3 and cost == pytest.approx(entropy, abs=2e-3)


def test_two_sided_pvalues():
    cal = np.arange(1.0, 100.0)  # 99 calibration scores
    p = metrics.conformal_pvalues(cal, [0.0, 50.0, 200.0], two_sided=True)
    assert p[0] == pytest.approx(2 / 100) and p[2] == pytest.approx(2 / 100)  # both tails are evidence
    assert p[1] == 1.0
    one = metrics.conformal_pvalues(cal, [0.0, 200.0])
    assert one[0] == 1.0 and one[1] == pytest.approx(1 / 100)  # one-sided: only the upper tail
    # valid: a real score exchangeable with the calibration ones has P(p <= a) <= a
    rng = np.random.default_rng(0)
    hits = [metrics.conformal_pvalues(np.sort(rng.normal(size=99)), rng.normal(size=1), two_sided=True)[0] <= 0.1
            for _ in range(4000)]
    assert np.mean(hits) <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 4000)


def test_tiles_are_bounded_deterministic_and_on_the_jpeg_grid():
    big = torch.randint(0, 256, (3, 4000, 6000), dtype=torch.uint8)
    tiles = tiles_of(big, 64)
    assert tiles.shape == (MAX_TILES_PER_SIDE ** 2, 3, 64, 64)
    assert torch.equal(tiles, tiles_of(big, 64))
    assert all(o % 8 == 0 for o in tile_origins(6000, 64) + tile_origins(4000, 64))
    assert tile_origins(6000, 64)[-1] + 64 > 5900  # spread over the whole side
    assert tiles_of(big[:, :100, :130], 64).shape[0] == 2  # 1 x 2 tiles fit
    with pytest.raises(ValueError, match="too small to tile for the coding and artifact scores: 63x100"):
        tiles_of(big[:, :100, :63], 64)


def test_benign_versions():
    image = dead_leaves(1, 96, seed=2)[0]
    out = benign_versions(image, seed=1)
    assert set(out) == set(fakes.BENIGN)
    assert out["down2"].shape == (3, 48, 48) and out["sharpen"].shape == out["jpeg75-95"].shape == (3, 96, 96)
    assert out["up2-bicubic"].shape == (3, 192, 192) and out["up4-lanczos"].shape == (3, 384, 384)
    assert set(benign_versions(dead_leaves(1, 1032, seed=2, leaves=3)[0])) == {"jpeg75-95", "down2", "sharpen"}
    assert not torch.equal(out["sharpen"], image) and not torch.equal(out["jpeg75-95"], image)


def test_config_is_checked_before_any_layer():
    with pytest.raises(ValueError, match="divisible"):
        CodingConfig(image_size=60, channels=(8, 8, 8))
    with pytest.raises(ValueError):
        CodingConfig(channels=(10 ** 6,))


# ---- the CLI round trip, on a coding model trained by train.py
@pytest.fixture(scope="module")
def coding_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coding")
    photos = root / "photos"
    photos.mkdir()
    for i, image in enumerate(dead_leaves(12, 160, seed=5)):  # "photos" larger than a crop
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(photos / f"p{i}.png")
    proc = run_script("train.py", "--preset", "coding", "--data-dir", photos, "--out-dir", root / "run",
                      "--image-size", "32", "--channels", "8,8", "--crops-per-image", "24", "--epochs", "2", "--max-images", "0",
                      "--batch-size", "16", "--no-progress", "--device", "cpu")
    return root, root / "run" / "model_best_checkpoint.ckpt", proc


def test_train_cli_trains_the_coding_model_on_crops(coding_run):
    root, ckpt, proc = coding_run
    assert "288 crops (24 per image, original pixels)" in proc.stdout
    results = json.loads((root / "run" / "results.json").read_text())
    assert 0 < results["test_bits_per_dim"] < 8 and results["config"]["model"] == "coding"
    model = load_model(ckpt)
    assert isinstance(model, CodingModel) and model.config.channels == (8, 8)
    assert isinstance(load_model(root / "run" / "release"), CodingModel)  # the hub layout loads too
    history = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"] + 1  # trains, and stays finite


def test_cifar_is_refused_for_the_coding_model(tmp_path):
    proc = run_script("train.py", "--preset", "coding", "--dataset", "cifar10", "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "CIFAR-10's" in proc.stderr


def test_smoothing_and_sharpening_move_the_gap_in_opposite_directions(coding_run):
    from torchvision.transforms.v2.functional import adjust_sharpness, gaussian_blur
    model = load_model(coding_run[1])
    images = dead_leaves(8, 128, seed=11)
    gap = {name: model.tile_gaps(image_tiles(batch, 32)[0]).mean().item() for name, batch in {
        "original": images, "smoothed": gaussian_blur(images, [5, 5], [1.0, 1.0]),
        "sharpened": adjust_sharpness(images, 3.0)}.items()}
    assert gap["smoothed"] < gap["original"] < gap["sharpened"]


def test_same_pixels_same_score_whatever_the_file_format(coding_run, tiny_model, tmp_path):
    ckpt = tmp_path / "ae.ckpt"
    torch.save({"model": tiny_model.state_dict(), "config": tiny_model.config.__dict__}, ckpt)
    image = Image.fromarray(dead_leaves(1, 150, seed=9)[0].permute(1, 2, 0).numpy())
    for ext, kwargs in [("png", {}), ("bmp", {}), ("tiff", {}), ("webp", {"lossless": True})]:
        image.save(tmp_path / f"same.{ext}", **kwargs)
    det = Detector(ckpt, device="cpu", score="coding", coding_model=coding_run[1], workers=0)
    rows = det.score(sorted(map(str, tmp_path.glob("same.*"))) + [image])
    assert len({row["coding"] for row in rows}) == 1 and len(rows) == 5  # files and the in-memory image alike


def test_coding_verdicts_need_a_coding_calibration(coding_run, tiny_model, tmp_path):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ae.ckpt")
    th = tmp_path / "thresholds.json"  # thresholds without the coding score's calibration, as the card's file
    th.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.1}}}}))
    with pytest.raises(UserError, match="--score coding decides by p-value"):
        Detector(ckpt, th, device="cpu", score="coding", coding_model=coding_run[1])
    scores_only = Detector(ckpt, device="cpu", score="coding", coding_model=coding_run[1], workers=0)
    assert scores_only.threshold is None and scores_only.score([dead_leaves(1, 64, seed=3)[0]])[0]["coding"]


def test_calibrate_and_infer_with_the_coding_score(coding_run, tiny_model, tmp_path, capsys):
    root, coding_ckpt, _ = coding_run
    ae = tmp_path / "ae.ckpt"
    torch.save({"model": tiny_model.state_dict(), "config": tiny_model.config.__dict__}, ae)
    real = tmp_path / "real"
    real.mkdir()
    for i, image in enumerate(dead_leaves(240, 64, seed=21)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(real / f"r{i:03d}.png")
    out = tmp_path / "thr.json"
    proc = run_script("calibrate.py", "--checkpoint", ae, "--coding-model", coding_ckpt, "--real-dir", real,
                      "--num-noise", "50", "--num-hard", "40", "--num-benign", "20", "--bootstrap", "0", "--holdout-fraction", "0.2",
                      "--output", out, "--no-progress", "--workers", "0", "--device", "cpu")
    cfg = json.loads(out.read_text())
    assert len(cfg["calibration_scores"]["scores"]["coding"]) == 192
    levels = cfg["score_thresholds"]["coding"]["levels"]
    assert set(levels) == {"strict", "balanced", "sensitive"} and "two-sided" in cfg["score_thresholds"]["coding"]["rule"]
    assert set(levels["balanced"]["benign_fpr"]) == set(fakes.BENIGN)
    assert cfg["binding"]["coding_fingerprint"] and "coding" in cfg["evaluation"]["scores"]
    assert cfg["evaluation"]["scores"]["coding"]["noise"]["auroc"] > 0.9  # noise costs far more than expected
    assert "coding balanced" in proc.stdout and "sharpen" in proc.stdout

    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(25):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(noise / f"n{i}.png")

    def infer(folder, *flags):  # in this process: calibrate.py above went through the real command line
        status = inference_example.main([str(folder), "--checkpoint", str(ae), "--device", "cpu", "--workers", "0",
                                         *map(str, flags)])
        return status, capsys.readouterr()

    for score in ("coding", "combined"):
        status, got = infer(noise, "--coding-model", coding_ckpt, "--thresholds", out, "--score", score)
        assert status == 0 and got.out.count("\tFAKE") == 25
        assert got.err.count("do not look like the calibration images") == 1  # the domain check, once
    status, got = infer(real, "--coding-model", coding_ckpt, "--thresholds", out, "--score", "coding")
    assert "do not look like" not in got.err and got.out.count("\tREAL") > 200  # like its calibration set
    status, got = infer(real, "--thresholds", out, "--score", "combined")
    assert status == 2 and "needs the coding model (--coding-model" in got.err
    status = inference_example.main([str(real), "--checkpoint", str(coding_ckpt), "--device", "cpu"])
    assert status == 2 and "holds a coding model" in capsys.readouterr().err


# ---- evaluate.py on a matched set: SET/real, SET/fake and SET/pairs.csv
def write_set(folder, real, fake, per_photo):
    """Images [N, 3, S, S] as SET/real and SET/fake PNGs under the same stems, per_photo crops per source photo."""
    for part, images in (("real", real), ("fake", fake)):
        (folder / part).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / part / f"photo{i // per_photo}_c{i % per_photo}.png")
    stems = [f"photo{i // per_photo}_c{i % per_photo}" for i in range(len(real))]
    (folder / "pairs.csv").write_text("stem,source_photo\n" + "".join(f"{s},{s.split('_c')[0]}.jpg\n" for s in stems))


def test_leave_one_photo_out_calibrates_on_the_other_photos_only(tmp_path):
    import evaluate

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "pairs.csv").write_text("stem,source_photo\n" + "".join(
        f"{p}_c{k},{p}.jpg\n" for p in ("a", "b") for k in range(20)))
    rows = {part: [{"path": f"set/{part}/{p}_c{k}.png", "coding": value} for p, value in (("a", 0.0), ("b", 10.0))
                   for k in range(20)] for part in ("real", "fake")}
    p = evaluate.leave_one_photo_out({"coding": None}, rows, evaluate.read_pairs(tmp_path / "set"), "coding")
    # each image is judged against the 20 crops of the other photo only: all of them lie on one side of it
    assert np.allclose(p["real"], 2 / 21) and np.allclose(p["fake"], 2 / 21)


def calibrate_tiny(ae, cal_dir, out, coding_model=None):
    """thresholds that calibrate.py writes for `ae` (and the coding model) on the images in cal_dir, in seconds."""
    import calibrate

    assert calibrate.main(["--checkpoint", str(ae), *(["--coding-model", str(coding_model)] if coding_model else []),
                           "--real-dir", str(cal_dir), "--num-noise", "50", "--hard-fakes", "none", "--num-benign", "0",
                           "--bootstrap", "0", "--holdout-fraction", "0.2", "--output", str(out), "--no-progress",
                           "--workers", "0", "--device", "cpu"]) is None
    return out


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    """(tiny autoencoder, its thresholds without a coding model, the calibration folder): evaluate.py end to end
    in seconds."""
    from model import ResidualAutoencoder
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    ae = save_checkpoint(ResidualAutoencoder(TINY).eval(), root / "ae.ckpt")
    (root / "cal").mkdir()
    for i, image in enumerate(dead_leaves(130, 64, seed=32)):  # 64: one coding tile each
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "cal" / f"c{i:03d}.png")
    return ae, calibrate_tiny(ae, root / "cal", root / "thr.json"), root / "cal"


def test_evaluate_cli_on_a_matched_set(coding_run, eval_models, tmp_path):
    ae, _, cal_dir = eval_models
    real = dead_leaves(40, 64, seed=31)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 3, 64, 64), dtype=np.uint8))
    write_set(tmp_path / "sr_noise", real, noise, per_photo=8)
    out = calibrate_tiny(ae, cal_dir, tmp_path / "thr.json", coding_run[1])
    proc = run_script("evaluate.py", tmp_path / "sr_noise", "--checkpoint", ae, "--coding-model", coding_run[1],
                      "--thresholds", out, "--leave-one-photo-out", "--bootstrap", "50", "--output", tmp_path / "e.json",
                      "--device", "cpu")
    row = json.loads((tmp_path / "e.json").read_text())["sets"]["sr_noise"]
    assert row["n_real"] == row["n_fake"] == 40 and set(row) >= {"mse", "coding", "combined"}
    assert row["coding"]["auroc"] > 0.9 and row["coding"]["auroc_leave_one_photo_out"] > 0.9  # noise costs far more
    assert 0 <= row["coding"]["real_flagged_leave_one_photo_out"] <= 1 and "auroc_leave_one_photo_out" not in row["mse"]
    assert "| sr_noise | 40 |" in proc.stdout and "--leave-one-photo-out" in proc.stdout


def test_leave_one_photo_out_without_pairs_is_one_line_before_any_scoring(tmp_path, capsys):
    import evaluate

    write_set(tmp_path / "set", dead_leaves(4, 32, seed=1), dead_leaves(4, 32, seed=2), per_photo=2)
    (tmp_path / "set" / "pairs.csv").write_text("stem,source_photo\nphoto0_c0,photo0.jpg\n")
    argv = [str(tmp_path / "set"), "--checkpoint", "missing.ckpt", "--thresholds", "thresholds_calibrated.json",
            "--leave-one-photo-out"]
    for case in ("three stems missing", "no pairs.csv"):
        if case == "no pairs.csv":
            (tmp_path / "set" / "pairs.csv").unlink()
        with pytest.raises(SystemExit) as stop:
            run_cli(evaluate.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and "pairs.csv" in err[0], (case, err)  # before the checkpoint


# ---- evaluate.py against hostile sets: FIFOs, unreadable files, forged names, clashing names, bad --output
def evaluate_up_front(capsys, *argv):
    """evaluate.py's exit status and stderr lines, with a checkpoint that does not exist: a refusal that comes
    before any model is loaded names the problem, not the checkpoint."""
    import evaluate

    with pytest.raises(SystemExit) as stop:
        run_cli(evaluate.main, [*map(str, argv), "--checkpoint", "missing.ckpt", "--thresholds", "thresholds_calibrated.json"])
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_evaluate_refuses_a_fifo_pairs_csv_without_hanging(tmp_path):
    import os

    write_set(tmp_path / "set", dead_leaves(4, 32, seed=1), dead_leaves(4, 32, seed=2), per_photo=2)
    (tmp_path / "set" / "pairs.csv").unlink()
    os.mkfifo(tmp_path / "set" / "pairs.csv")  # no writer: a blocking open waits forever
    proc = run_script("evaluate.py", tmp_path / "set", "--checkpoint", "missing.ckpt", "--thresholds",
                      "thresholds_calibrated.json", "--leave-one-photo-out", check=False, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "pairs.csv" in err[0] and "not a regular file" in err[0], err


def test_evaluate_jpeg_fakes_skip_unreadable_files_without_hanging(eval_models, tmp_path):
    import os

    ae, thr, _ = eval_models
    write_set(tmp_path / "set", dead_leaves(4, 32, seed=1), dead_leaves(4, 32, seed=2), per_photo=2)
    fake = tmp_path / "set" / "fake"
    os.mkfifo(fake / "fifo.png")
    (fake / "README.txt").write_text("not an image")
    (fake / "sub").mkdir()
    (fake / "empty.png").write_bytes(b"")
    proc = run_script("evaluate.py", tmp_path / "set", "--checkpoint", ae, "--thresholds", thr, "--scores", "mse",
                      "--fake-jpeg-quality", "80", "--bootstrap", "5", "--device", "cpu", "--output", tmp_path / "e.json",
                      check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # 1: some inputs were unreadable
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    # the JPEG run scores the very files the plain run scores, and skips the same unreadable ones, with the same words
    assert [(row["n_fake"], row["n_unreadable"]) for row in sets.values()] == [(4, 2), (4, 2)], sets
    assert proc.stderr.count("skipped 2 unreadable") == 2, proc.stderr


def test_leave_one_photo_out_scores_a_fake_without_real_crops_against_all_of_them(tmp_path):
    import evaluate
    import thresholds

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "pairs.csv").write_text("stem,source_photo\n" + "".join(
        f"{p}_c{k},{p}.jpg\n" for p in ("a", "b", "c") for k in range(20)))
    rows = {"real": [{"path": f"set/real/{p}_c{k}.png", "coding": v} for p, v in (("a", 0.0), ("b", 10.0)) for k in range(20)],
            "fake": [{"path": f"set/fake/{p}_c{k}.png", "coding": v} for p, v in (("a", 0.0), ("b", 10.0), ("c", 7.0))
                     for k in range(20)]}
    p = evaluate.leave_one_photo_out({"coding": None}, rows, evaluate.read_pairs(tmp_path / "set"), "coding")
    # photo c has no real crop: every real crop is one of another photo's, so all 40 are its calibration set
    want = thresholds.score_pvalues({"coding": np.array([0.0] * 20 + [10.0] * 20)}, {"coding": np.array([7.0])}, "coding")
    assert np.allclose(p["fake"][40:], want[0]) and np.allclose(p["fake"][:40], 2 / 21) and np.allclose(p["real"], 2 / 21)


def test_leave_one_photo_out_with_a_photo_without_fakes(tmp_path):
    import evaluate

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "pairs.csv").write_text("stem,source_photo\n" + "".join(
        f"{p}_c{k},{p}.jpg\n" for p in ("a", "b") for k in range(20)))
    rows = {"real": [{"path": f"set/real/{p}_c{k}.png", "coding": v} for p, v in (("a", 0.0), ("b", 10.0)) for k in range(20)],
            "fake": [{"path": f"set/fake/a_c{k}.png", "coding": 0.0} for k in range(20)]}  # none of photo b
    p = evaluate.leave_one_photo_out({"coding": None}, rows, evaluate.read_pairs(tmp_path / "set"), "coding")
    assert np.allclose(p["real"], 2 / 21) and np.allclose(p["fake"], 2 / 21)


def test_leave_one_photo_out_needs_real_crops_of_two_photos(tmp_path, capsys):
    import evaluate

    write_set(tmp_path / "set", dead_leaves(4, 32, seed=1), dead_leaves(4, 32, seed=2), per_photo=4)  # one photo
    status, err = evaluate_up_front(capsys, tmp_path / "set", "--leave-one-photo-out")
    assert status == 2 and len(err) == 1 and "at least two source photos" in err[0], err  # before the checkpoint
    rows = {part: [{"path": f"set/{part}/photo0_c{k}.png", "coding": 1.0} for k in range(4)] for part in ("real", "fake")}
    with pytest.raises(UserError, match="at least two source photos"):  # its other real crops were unreadable, say
        evaluate.leave_one_photo_out({"coding": None}, rows, evaluate.read_pairs(tmp_path / "set"), "coding")


def test_evaluate_refuses_two_sets_of_one_name(tmp_path, capsys):
    for parent in ("a", "b"):
        write_set(tmp_path / parent / "x", dead_leaves(2, 32, seed=1), dead_leaves(2, 32, seed=2), per_photo=1)
    status, err = evaluate_up_front(capsys, tmp_path / "a" / "x", tmp_path / "b" / "x")
    assert status == 2 and len(err) == 1 and "same name" in err[0], err


def test_evaluate_checks_output_before_any_scoring(tmp_path, capsys):
    write_set(tmp_path / "set", dead_leaves(2, 32, seed=1), dead_leaves(2, 32, seed=2), per_photo=1)
    # a folder; a path under a regular file; a file the run reads (the thresholds)
    for output in (tmp_path, tmp_path / "set" / "pairs.csv" / "x.json", "thresholds_calibrated.json"):
        status, err = evaluate_up_front(capsys, tmp_path / "set", "--output", output)
        assert status == 2 and len(err) == 1 and f"cannot write {output}" in err[0], err


def test_evaluate_escapes_file_names_and_exits_1_on_unreadable_inputs(eval_models, tmp_path, capsys):
    import evaluate

    ae, thr, _ = eval_models
    write_set(tmp_path / "set", dead_leaves(4, 32, seed=1), dead_leaves(4, 32, seed=2), per_photo=2)
    (tmp_path / "set" / "fake" / "zz\nFORGED: all 10 fakes detected\n.png").write_bytes(b"")
    status = run_cli(evaluate.main, [str(tmp_path / "set"), "--checkpoint", str(ae), "--thresholds", str(thr),
                                     "--scores", "mse", "--bootstrap", "5", "--device", "cpu"])
    got = capsys.readouterr()
    lines = (got.out + got.err).splitlines()
    assert status == 1 and not any(line.startswith("FORGED") for line in lines), lines
    assert any("unreadable" in line and "zz\\nFORGED" in line for line in lines), lines
