import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import beta
from sklearn.metrics import average_precision_score, roc_auc_score

import calibrate
import fakes
from data import dead_leaves
from detector import Detector
import thresholds
from model import load_model

from checkpoints import weights_fingerprint
from tests.conftest import run_script, save_checkpoint


@pytest.fixture
def tiny_ckpt(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, tmp_path / "model_best_checkpoint.ckpt")


@pytest.fixture
def real_dir(tmp_path):
    folder = tmp_path / "real photos"
    (folder / "sub").mkdir(parents=True)
    images = dead_leaves(220, 32, seed=3)
    for i in range(images.shape[0]):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / ("sub" if i % 3 else ".") / f"ïmg {i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return folder


def read_scores(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def calibrate_folder(tiny_ckpt, real_dir, tmp_path, *extra):
    out = tmp_path / "out"
    proc = run_script("calibrate.py", "--checkpoint", tiny_ckpt, "--real-dir", real_dir, "--num-noise", "150",
                      "--num-hard", "60", "--output", out / "thr.json", "--plots-dir", out,
                      "--scores-out", out / "scores.csv", "--no-progress", "--workers", "1", "--device", "cpu", *extra)
    return out, json.loads((out / "thr.json").read_text()), read_scores(out / "scores.csv"), proc


def test_calibrate_cli_on_a_folder(tiny_ckpt, real_dir, tmp_path):
    out, cfg, rows, proc = calibrate_folder(tiny_ckpt, real_dir, tmp_path)
    t = cfg["reconstruction_thresholds"]["thresholds"]
    # the card's users read thresholds exactly like this
    values = {name: cfg["reconstruction_thresholds"]["thresholds"][name]["value"] for name in
              ("strict", "balanced", "sensitive", "optimal")}
    assert values["strict"] >= values["balanced"] >= values["sensitive"]
    assert "AUROC" in proc.stdout and "skipped 1 unreadable real" in proc.stderr
    assert cfg["binding"]["unreadable_skipped"]["real"] == 1
    for name in ("threshold_calibration.png", "reconstruction_comparison.png", "roc_curve.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 200, name

    real = [r for r in rows if r["set"] == "real"]
    assert len(real) == 220
    cal = np.sort([float(r["mse"]) for r in real if r["split"] == "calibration"])
    held = np.array([float(r["mse"]) for r in real if r["split"] == "heldout"])
    assert len(cal) == cfg["calibration_scores"]["n"] == 110 and len(held) == 110
    # split-conformal: the k-th smallest calibration score, k = ceil((n + 1)(1 - a))
    for name, alpha in (("strict", 0.01), ("balanced", 0.05), ("sensitive", 0.10)):
        k = math.ceil((len(cal) + 1) * (1 - alpha) - 1e-9)
        assert t[name]["k"] == k
        assert t[name]["value"] == cal[k - 1]
        flagged = int(np.sum(held > t[name]["value"]))
        assert t[name]["heldout_fpr"] == flagged / len(held)
        lo = beta.ppf(0.025, flagged, len(held) - flagged + 1) if flagged else 0.0
        hi = beta.ppf(0.975, flagged + 1, len(held) - flagged) if flagged < len(held) else 1.0
        assert t[name]["heldout_fpr_ci95"] == pytest.approx([lo, hi], abs=1e-7)
    assert cfg["calibration_scores"]["scores"]["mse"] == pytest.approx(cal.tolist(), rel=0, abs=0)

    # AUROC / AUPR per fake set against an independent implementation
    for name in ("noise", "flat", "gradient", "blur", "jpeg", "splice"):
        fake = np.array([float(r["mse"]) for r in rows if r["set"] == name])
        y = np.r_[np.zeros(len(held)), np.ones(len(fake))]
        s = np.r_[held, fake]
        ev = cfg["evaluation"]["scores"]["mse"][name]
        assert ev["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert ev["aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert t["balanced"]["tpr"][name] == pytest.approx(np.mean(fake > t["balanced"]["value"]))
    assert cfg["mean_error_ratio"]["noise"] == pytest.approx(
        np.mean([float(r["mse"]) for r in rows if r["set"] == "noise"]) / np.mean([float(r["mse"]) for r in real]))
    assert cfg["binding"]["weights_fingerprint"] == weights_fingerprint(load_model(tiny_ckpt))
    assert cfg["binding"]["real_split"] == {"seed": 0, "holdout_fraction": 0.5, "n_calibration": 110, "n_heldout": 110}
    assert cfg["score_thresholds"] == {}  # mse's table is the card's, under reconstruction_thresholds


def test_calibration_and_inference_score_a_file_identically(tiny_ckpt, real_dir, tmp_path):
    _, cfg, rows, _ = calibrate_folder(tiny_ckpt, real_dir, tmp_path)
    by_path = {r["path"]: r for r in rows if r["set"] == "real"}
    paths = sorted(by_path)[:20]
    det = Detector(tiny_ckpt, thresholds=tmp_path / "out" / "thr.json", device="cpu", workers=0, score="mse")
    assert det.warnings == []  # the file is bound to these weights
    for row in det.score(paths):
        assert row["mse"] == float(by_path[row["path"]]["mse"]), row["path"]


def test_calibrate_on_cifar10_test_by_default(tiny_ckpt, cifar_dir, tmp_path, capsys):
    from tests.conftest import write_cifar_folder
    write_cifar_folder(cifar_dir, n_train=10, n_test=400)
    out = tmp_path / "cifar_out"
    calibrate.main(["--checkpoint", str(tiny_ckpt), "--data-dir", str(cifar_dir), "--num-noise", "100",
                    "--hard-fakes", "flat,blur", "--num-hard", "50", "--output", str(out / "t.json"),
                    "--no-progress", "--bootstrap", "0"])
    cfg = json.loads((out / "t.json").read_text())
    assert cfg["binding"]["real"] == "CIFAR-10 test set, 400 images"
    assert set(cfg["evaluation"]["scores"]["mse"]) == {"noise", "flat", "blur"}
    assert (out / "roc_curve.png").exists()  # plots default to the output's folder


def test_fake_dir_is_reported_by_name(tiny_ckpt, real_dir, tmp_path):
    fakes_dir = tmp_path / "generated"
    fakes_dir.mkdir()
    for i in range(30):
        Image.new("RGB", (40, 40), (i * 8, 100, 200 - i * 5)).save(fakes_dir / f"f{i}.jpg")
    _, cfg, rows, _ = calibrate_folder(tiny_ckpt, real_dir, tmp_path, "--fake-dir", f"sd14={fakes_dir}",
                                       "--hard-fakes", "none", "--num-noise", "0", "--optimal-against", "sd14")
    assert set(cfg["evaluation"]["scores"]["mse"]) == {"sd14"}
    assert "optimal" in cfg["reconstruction_thresholds"]["thresholds"]
    assert len([r for r in rows if r["set"] == "sd14"]) == 30


def test_hostile_set_and_file_names_neither_inject_nor_forge(tiny_ckpt, real_dir, tmp_path):
    fakes_dir = tmp_path / "generated"
    fakes_dir.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 8, 100, 200)).save(fakes_dir / f"f{i}.png")
    (fakes_dir / "zz\nFORGED: all fakes detected\n.png").write_bytes(b"")  # unreadable: named in the skip line
    _, _, rows, proc = calibrate_folder(tiny_ckpt, real_dir, tmp_path, "--fake-dir", f"@SUM(1+1)={fakes_dir}",
                                        "--hard-fakes", "none", "--num-noise", "0")
    assert {r["set"] for r in rows} == {"real", "'@SUM(1+1)"}  # shown as text by a spreadsheet, not computed
    assert not any(line.startswith("FORGED") for line in proc.stderr.splitlines()), proc.stderr


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tiny_ckpt, real_dir, tmp_path):
    before = tiny_ckpt.read_bytes()
    proc = run_script("calibrate.py", "--checkpoint", tiny_ckpt, "--real-dir", real_dir, "--output", tiny_ckpt,
                      check=False)
    assert proc.returncode == 2 and "which this run reads" in proc.stderr and tiny_ckpt.read_bytes() == before


@pytest.mark.parametrize("case", ["empty_real", "unwritable", "bad_checkpoint", "too_few_real"])
def test_bad_input_gives_one_line_and_exit_2(case, tiny_ckpt, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    n_real = 0 if case == "empty_real" else 40 if case == "too_few_real" else 220
    for i, img in enumerate(dead_leaves(n_real, 32, seed=1)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(real / f"{i}.png")
    ckpt, output = tiny_ckpt, tmp_path / "out" / "t.json"
    if case == "bad_checkpoint":
        ckpt = tmp_path / "broken.ckpt"
        ckpt.write_text("nope")
    if case == "unwritable":
        (tmp_path / "a_file").write_text("")
        output = tmp_path / "a_file" / "t.json"
    proc = run_script("calibrate.py", "--checkpoint", ckpt, "--real-dir", real, "--num-noise", "20",
                      "--hard-fakes", "none", "--output", output, "--no-progress", "--workers", "0", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"empty_real": "no readable images", "unwritable": "cannot write",
                "bad_checkpoint": "not a readable PyTorch checkpoint", "too_few_real": "need at least 99"}[case]
    assert expected in lines[0]


def test_thresholds_do_not_depend_on_the_number_of_decode_workers(tiny_ckpt, real_dir, tmp_path):
    # the seeded real split indexes the scores in their order: it must be the listing's, not the workers'
    runs = {}
    for workers in ("0", "3"):
        out = tmp_path / f"workers{workers}.json"
        calibrate.main(["--checkpoint", str(tiny_ckpt), "--real-dir", str(real_dir), "--num-noise", "100",
                        "--hard-fakes", "none", "--bootstrap", "0", "--no-progress", "--workers", workers,
                        "--device", "cpu", "--output", str(out)])
        runs[workers] = json.loads(out.read_text())
    assert runs["0"]["reconstruction_thresholds"] == runs["3"]["reconstruction_thresholds"]
    assert runs["0"]["evaluation"]["scores"] == runs["3"]["evaluation"]["scores"]


def test_torchrun_is_refused_in_one_line_and_nothing_written(tiny_ckpt, real_dir, tmp_path):
    out = tmp_path / "t.json"
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "calibrate.py",
                      "--checkpoint", tiny_ckpt, "--real-dir", real_dir, "--output", out, check=False, timeout=120)
    assert proc.returncode != 0 and "start it with python, not torchrun" in proc.stderr, proc.stderr
    assert not out.exists()


def test_thresholds_from_another_precision_warn(tiny_ckpt, real_dir, tmp_path):
    out, cfg, _, _ = calibrate_folder(tiny_ckpt, real_dir, tmp_path, "--hard-fakes", "none")
    assert cfg["binding"]["precision"] == "fp32"
    assert Detector(tiny_ckpt, thresholds=out / "thr.json", device="cpu").warnings == []
    cfg["binding"]["precision"] = "bf16 autocast, scores in fp32"
    (out / "bf16.json").write_text(json.dumps(cfg))
    warnings = Detector(tiny_ckpt, thresholds=out / "bf16.json", device="cpu").warnings
    assert len(warnings) == 1 and "calibrated in bf16" in warnings[0]
    cfg["binding"]["weights_fingerprint"] = "0" * 64  # and other weights: the graver reason is never hidden
    (out / "other.json").write_text(json.dumps(cfg))
    warnings = Detector(tiny_ckpt, thresholds=out / "other.json", device="cpu").warnings
    assert len(warnings) == 2 and "other weights" in warnings[0] and "calibrated in bf16" in warnings[1]


def test_default_output_for_a_hub_id_never_touches_the_card_file():
    out = thresholds.beside("someone/detector@v2")
    assert out.name == "thresholds_calibrated.json" and out.parent.name == "someone--detector--v2"


def test_inference_warns_once_when_a_folder_is_unlike_the_calibration_images(tiny_ckpt, tmp_path, capsys):
    import inference_example

    real, noise = tmp_path / "real", tmp_path / "noise"
    white = 255 - fakes.uniform_noise(25, 32, seed=3) // 16  # near-white: far from the dead leaves' colours
    for folder, images in ((real, dead_leaves(150, 32, seed=21)), (noise, white)):
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    out = tmp_path / "thr.json"
    run_script("calibrate.py", "--checkpoint", tiny_ckpt, "--real-dir", real, "--num-noise", "50", "--hard-fakes", "none",
               "--num-benign", "0", "--bootstrap", "0", "--holdout-fraction", "0.2", "--output", out, "--no-progress",
               "--workers", "0", "--device", "cpu")

    def infer(folder, score):
        status = inference_example.main([str(folder), "--checkpoint", str(tiny_ckpt), "--thresholds", str(out),
                                         "--score", score, "--device", "cpu", "--workers", "0"])
        return status, capsys.readouterr()

    status, got = infer(noise, "mse")  # every p-value small, far from uniform
    assert status == 0 and got.out.count("\tFAKE") == 25
    assert got.err.count("do not look like the calibration images") == 1  # the domain check, once
    status, got = infer(real, "mse")  # like its calibration set
    assert status == 0 and "do not look like" not in got.err
