"""Hostile input through the real command lines: names that inject or forge, files that would block,
flags and files with impossible values, Ctrl-C. Each gets one clear line (or a row), never a hang."""
import csv
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model import ResidualAutoencoder
from utils import run_cli
from tests.conftest import ROOT, TINY, run_script, save_checkpoint

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    torch.manual_seed(0)
    return save_checkpoint(ResidualAutoencoder(TINY), path)


def image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, format="PNG")


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_formula_file_names_are_not_live_in_csv_and_kept_exact_in_json(ckpt, tmp_path):
    names = ["=1+1.png", "@SUM(1+1).png", "+1+1.png", "-2+3.png", "=cmd|' -C calc'!A0.png"]
    for i, name in enumerate(names):
        image(tmp_path / name, i)
    for out in ("r.csv", "r.json"):  # relative names, run from their folder, as a user would type them
        subprocess.run([sys.executable, ROOT / "inference_example.py", "--checkpoint", ckpt, "--threshold", "0.5",
                        "--output", out, "--workers", "0", "--", *names], cwd=tmp_path, check=True,
                       capture_output=True, env={**os.environ, **ONE_THREAD}, timeout=300)
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        cells = [row["path"] for row in csv.DictReader(f)]
    assert sorted(cells) == sorted("'" + n for n in names)  # shown as text by any spreadsheet
    assert sorted(r["path"] for r in json.loads((tmp_path / "r.json").read_text())) == sorted(names)


def test_a_file_name_cannot_forge_a_result_line(ckpt, tmp_path):
    forged = "x\nFORGED.png\tmse=0.0001\tREAL\ny.png"  # an image name, as the folder walk lists them
    image(tmp_path / forged)
    image(tmp_path / "honest.png", 1)
    proc = run_script("inference_example.py", tmp_path, "--checkpoint", ckpt, "--threshold", "0.5",
                      "--workers", "0", env=ONE_THREAD)
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FORGED.png")]
    assert sum(line.endswith(("\tREAL", "\tFAKE")) for line in lines) == 2  # one line per image, no more
    assert any(line.startswith(str(tmp_path / "x\\nFORGED.png\\tmse=0.0001\\tREAL\\ny.png\t")) for line in lines)


def test_a_fifo_never_blocks_the_run(ckpt, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")  # opening it for reading would wait for a writer forever
    image(folder / "real.png")
    for inputs in ([folder], [folder / "pipe.png", folder / "real.png"]):
        proc = run_script("inference_example.py", *inputs, "--checkpoint", ckpt, "--threshold", "0.5",
                          "--workers", "1", check=False, env=ONE_THREAD, timeout=120)
        assert proc.returncode == 1, proc.stderr  # one input unreadable, the rest scored
        assert f"{folder / 'pipe.png'}\tUNREADABLE: not a regular file" in proc.stdout
        assert f"{folder / 'real.png'}\tmse=" in proc.stdout


@pytest.mark.parametrize("script, flags, fragment", [
    ("train.py", ["--batch-size", "0"], "--batch-size: 0 is outside [1, inf]"),
    ("train.py", ["--lr", "nan"], "--lr: nan is outside"),
    ("train.py", ["--lr", "-1"], "--lr: -1 is outside"),
    ("train.py", ["--epochs", "-1"], "--epochs: -1 is outside"),
    ("train.py", ["--lr-factor", "1"], "--lr-factor: 1 is outside"),
    ("inference_example.py", ["x.png", "--checkpoint", "c", "--batch-size", "-5"], "--batch-size: -5 is outside"),
    ("inference_example.py", ["x.png", "--checkpoint", "c", "--workers", "-1"], "--workers: -1 is outside"),
    ("calibrate.py", ["--batch-size", "0"], "--batch-size: 0 is outside"),
    ("calibrate.py", ["--holdout-fraction", "2"], "--holdout-fraction: 2 is outside"),
    ("calibrate.py", ["--seed", "-5"], "--seed: -5 is outside"),
    ("train.py", ["--seed", str(2**70)], f"--seed: {2**70} is outside"),
    ("calibrate.py", ["--fake-dir", "real=x"], "the set name 'real' is taken"),
    ("calibrate.py", ["--fake-dir", "a/x", "--fake-dir", "b/x"], "the set name 'x' is taken"),
    ("calibrate.py", ["--optimal-against", "bogus"], "'bogus' is not one of the fake sets"),
    ("bench.py", ["--variants", "eager,bogus"], "--variants: unknown bogus"),
    ("bench.py", ["--device", "foo"], "invalid choice: 'foo'"),
    ("bench.py", ["--json", "/tmp"], "cannot write /tmp: is a directory"),  # before minutes of timing, not after
    ("inference_example.py", ["x.png", "--checkpoint", "c", "--output", ""], "--output: an empty value"),
    ("calibrate.py", ["--real-dir", ""], "--real-dir: an empty value"),
])
def test_impossible_flags_are_one_line_and_touch_nothing(tmp_path, capsys, script, flags, fragment):
    out = tmp_path / "out"
    extra = ["--out-dir", out] if script == "train.py" else ["--output", out / "t.json"] if script == "calibrate.py" else []
    with pytest.raises(SystemExit) as stop:  # in this process (the flags are parsed before anything is touched)
        run_cli(importlib.import_module(script.removesuffix(".py")).main, [*map(str, flags), *map(str, extra)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and fragment in one_error_line(SimpleNamespace(stderr=err))
    assert not out.exists()


@pytest.mark.parametrize("content, fragment", [
    ({"balanced": {"value": -1}}, "cannot be negative"),
    ({"balanced": {"value": True}}, "must be a finite number"),
    ({"balanced": {"value": "0.4"}}, "must be a finite number"),
    ({"balanced": {"value": 1e400}}, "must be a finite number"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_thresholds_values_are_one_line(ckpt, tmp_path, content, fragment):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": content}}).replace("1e+400", "1e400"))
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", path,
                      check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and fragment in one_error_line(proc)


def test_a_binding_that_is_not_a_string_is_one_line(ckpt, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.1}}},
                                "binding": {"artifact_fingerprint": 5}}))
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", path,
                      check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and "binding.artifact_fingerprint must be a string" in one_error_line(proc)


def test_a_negative_mse_threshold_is_one_line(ckpt, tmp_path):
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--threshold", "-5",
                      check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and "cannot be negative" in one_error_line(proc)  # it would call everything FAKE


def test_results_never_replace_the_thresholds_they_use(ckpt, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.1}}}}))
    before = path.read_bytes()
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", path,
                      "--output", path, check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and "which this run reads" in one_error_line(proc) and path.read_bytes() == before


def test_thresholds_nested_too_deep_are_one_line(ckpt, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 50000 + "]" * 50000)  # json.loads raises RecursionError, which is no ValueError
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", path,
                      check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and "not valid JSON" in one_error_line(proc)


def test_a_thresholds_file_cannot_forge_lines_through_its_warnings(ckpt, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.1}}},
                                "binding": {"precision": "\x1b[2J\nerror: FORGED", "weights_fingerprint": "x\ny"}}))
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", path,
                      env=ONE_THREAD)
    assert "\x1b" not in proc.stderr and not any(line.startswith("error:") for line in proc.stderr.splitlines())
    assert [line.split(":")[0] for line in proc.stderr.splitlines()] == ["warning", "warning"], proc.stderr


def test_thresholds_or_checkpoint_from_a_device_file_are_refused(ckpt, tmp_path):
    image(tmp_path / "a.png")
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", ckpt, "--thresholds", "/dev/zero",
                      check=False, env=ONE_THREAD, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in one_error_line(proc)
    proc = run_script("inference_example.py", tmp_path / "a.png", "--checkpoint", "/dev/zero", check=False,
                      env=ONE_THREAD, timeout=60)
    assert proc.returncode == 2 and "/dev/zero: not a regular file" in one_error_line(proc)  # not "not found"


def test_ctrl_c_is_one_line_and_leaves_valid_output(ckpt, tmp_path):
    # a long folder name makes 400 result lines overflow the 64 KiB pipe the test does not read: the run
    # blocks there, so it cannot finish before the signal however fast the machine is
    folder = tmp_path / ("many" + "x" * 160)
    folder.mkdir()
    for i in range(400):
        image(folder / f"{i:04d}.png", i)
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "inference_example.py", folder, "--checkpoint", ckpt, "--threshold", "0.5",
                             "--output", out, "--workers", "0", "--batch-size", "1"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ONE_THREAD},
                            # a suite started in the background inherits an ignored SIGINT, and Python then keeps it
                            # ignored: give the run the default a user's terminal gives it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()  # scoring has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert first.endswith(("\tREAL\n", "\tFAKE\n"))
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not out.exists()  # the results file is whole or absent
    rows = json.loads((tmp_path / "r.json.partial").read_text())  # closed properly: every row so far, a valid list
    assert 1 <= len(rows) < 400 and "the rows so far are in" in err


def test_large_batches_do_not_run_out_of_file_descriptors(ckpt, tmp_path):
    import resource

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(600):
        image(folder / f"{i:04d}.png", i)
    proc = subprocess.run([sys.executable, "inference_example.py", folder, "--checkpoint", ckpt, "--threshold", "0.5",
                           "--batch-size", "256", "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(line.endswith(("\tREAL", "\tFAKE")) for line in proc.stdout.splitlines()) == 600


TRAIN = ["--image-size", "32", "--channels", "8,8,16,16,16", "--latent-dim", "16", "--batch-size", "16",
         "--dataset", "synthetic", "--synthetic-images", "300", "--no-progress", "--device", "cpu"]


def test_a_second_training_into_the_same_out_dir_is_refused(tmp_path):
    import time

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *TRAIN, "--epochs", "500", "--out-dir", out], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / ".lock").exists() and (out / ".lock").read_text().strip()):
            time.sleep(0.1)
        second = run_script("train.py", *TRAIN, "--epochs", "1", "--out-dir", out, "--overwrite", check=False)
        assert second.returncode == 2 and f"in use by another training run (pid {first.pid})" in one_error_line(second)
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the lock with the process: the folder is usable again
    assert run_script("train.py", *TRAIN, "--epochs", "1", "--out-dir", out, "--overwrite").returncode == 0


def test_a_flipped_bit_in_a_checkpoint_is_named_as_corruption(tmp_path):
    out = tmp_path / "run"
    run_script("train.py", *TRAIN, "--epochs", "1", "--out-dir", out)
    path = out / "last_checkpoint.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensors, which torch.load would read without complaint
    path.write_bytes(bytes(data))
    proc = run_script("train.py", "--resume", "--epochs", "2", "--out-dir", out, check=False)
    assert proc.returncode == 2 and "corrupt" in one_error_line(proc)
    assert path.read_bytes() == bytes(data)  # nothing was written over it


def test_a_jpeg_that_declares_more_than_it_holds_is_truncated_not_grey(tmp_path):
    import io
    import struct

    from images import ImageReadError, read_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, 9000, 9000)  # the frame header now claims 9000x9000
    (tmp_path / "liar.jpg").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "liar.jpg", min_size=128)  # libjpeg alone would return a grey 1125x1125 image


def no_space(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device", "out/some file")


def test_a_full_disk_during_inference_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    import inference_example

    image(tmp_path / "a.png")
    monkeypatch.setattr(inference_example.ResultWriter, "write", no_space)
    with pytest.raises(SystemExit) as stop:
        run_cli(inference_example.main, [str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--threshold", "0.5",
                                         "--output", str(tmp_path / "r.csv"), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1] == "error: cannot write out/some file: No space left on device"
    assert not [line for line in err if "Traceback" in line] and not (tmp_path / "r.csv").exists()


def test_a_full_disk_during_calibration_writes_no_thresholds(ckpt, tmp_path, monkeypatch, capsys):
    import calibrate
    from data import dead_leaves
    from utils import run_cli

    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(dead_leaves(220, 32, seed=1)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(real / f"{i}.png")
    monkeypatch.setattr(calibrate, "write_scores_csv", no_space)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(calibrate.main, [
            "--checkpoint", str(ckpt), "--real-dir", str(real), "--num-noise", "20", "--hard-fakes", "none",
            "--output", str(out / "t.json"), "--scores-out", str(out / "s.csv"), "--no-progress", "--workers", "0",
            "--bootstrap", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: cannot write out/some file: No space left on device"
    assert not (out / "t.json").exists()  # no thresholds without the rest of what calibration writes


def test_a_line_of_pixels_is_refused_before_it_is_decoded(tmp_path):
    from images import ImageReadError, read_image

    Image.new("RGB", (70_000, 1), (200, 10, 10)).save(tmp_path / "thin.png")  # 89M x 1 took seconds and gigabytes
    with pytest.raises(ImageReadError, match="a side longer than 65,535"):
        read_image(tmp_path / "thin.png", min_size=128)


def test_a_folder_1100_levels_deep_is_listed(tmp_path):
    from images import iter_image_files

    deep = str(tmp_path)
    for _ in range(1100):  # one level at a time: os.makedirs and os.walk recurse, and would hit Python's limit (1000)
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    open(os.path.join(deep, "x.png"), "wb").close()
    (tmp_path / "top.png").write_bytes(b"")
    try:
        assert list(iter_image_files(str(tmp_path))) == [str(tmp_path / "top.png"), os.path.join(deep, "x.png")]
    finally:  # bottom up: pytest's own clean-up recurses too
        os.remove(os.path.join(deep, "x.png"))
        while deep != str(tmp_path):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


def test_a_symlink_loop_in_a_folder_is_a_row_and_the_rest_is_scored(ckpt, tmp_path):
    image(tmp_path / "a.png")
    os.symlink("loop", tmp_path / "loop")  # points at itself: following it fails with ELOOP
    proc = run_script("inference_example.py", tmp_path, "--checkpoint", ckpt, "--threshold", "0.5", "--workers", "1",
                      "--output", tmp_path.parent / f"{tmp_path.name}.csv", check=False, env=ONE_THREAD)
    assert proc.returncode == 1, proc.stderr  # some input unreadable: every other image still gets its verdict
    with open(tmp_path.parent / f"{tmp_path.name}.csv", newline="", encoding="utf-8") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["a.png"]["verdict"] in ("REAL", "FAKE") and "Too many levels" in rows["loop"]["error"]


def test_weights_that_give_nan_are_an_error_row_never_a_verdict(tmp_path, capsys):
    import inference_example

    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    broken = save_checkpoint(model, tmp_path / "nan.ckpt")
    image(tmp_path / "a.png")
    status = inference_example.main([str(tmp_path / "a.png"), "--checkpoint", str(broken), "--threshold", "0.01",
                                     "--workers", "0", "--output", str(tmp_path / "out.csv")])
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert status == 1 and rows[0]["verdict"] == "UNREADABLE" and "non-finite score" in rows[0]["error"]
    assert "UNREADABLE: the model gave a non-finite score" in capsys.readouterr().out
