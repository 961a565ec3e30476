"""inference_example.py and the Detector file path: every image kind decodes, every bad
input becomes a row with a reason, output files round-trip, exit statuses, warnings, and
torchrun is refused. A tiny untrained model: nothing is trained."""

import csv
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
import detector
import inference_example
import metrics
import thresholds
from images import ImageReadError, read_image
from detector import Detector, score_files
from model import ResidualAutoencoder

from checkpoints import weights_fingerprint
from tests.conftest import ROOT, TINY, run_script, save_checkpoint
from utils import run_cli

skdata = pytest.importorskip("skimage.data")

FLOATS = ("score", "p_value", "threshold", "mse", "complexity")
# The model is tiny: a second intra-op thread only adds spin-waiting, which on a busy 2-core
# machine makes every op up to 100x slower. Subprocesses get the same setting.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo(name, size=(48, 40)):
    """A real photograph from scikit-image's wheel, small: (W, H) = size."""
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.BILINEAR)


# ----------------------------------------------------------------------------
# fixtures: one tiny model, a folder of good images, a folder of bad ones, thresholds files

GOOD = ["a/same name.png", "b/same name.png", "café au lait ☕ 猫.jpg", "rocket 🚀 launch.webp", "gray.bmp"]


def write_good(folder):
    folder.mkdir(parents=True)
    for sub in ("a", "b"):
        (folder / sub).mkdir()
    photo("astronaut").save(folder / GOOD[0])
    photo("chelsea").save(folder / GOOD[1])
    photo("coffee").save(folder / GOOD[2], quality=90)
    photo("rocket").save(folder / GOOD[3], lossless=True)
    photo("camera", (40, 40)).save(folder / GOOD[4])
    return [str(folder / g) for g in GOOD]


def bomb_png(path, side=12000):
    """A valid 1-bit PNG of side x side pixels: ~18 kB on disk, 144 Mpixels decoded."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def half_of(img, fmt):
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# bad file name -> a fragment its reason must contain
BAD = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.png": "not an image",
    "bomb.png": "decompression bomb",
    "gone.jpg": "file not found",  # a dangling symlink: listed, then nothing to open
    "loop": "symlink loop",
}


def write_bad(folder):
    folder.mkdir(parents=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(half_of(photo("astronaut", (64, 64)), "JPEG"))
    (folder / "truncated.png").write_bytes(half_of(photo("chelsea", (64, 64)), "PNG"))
    (folder / "text.png").write_text("this is not a picture\n")
    bomb_png(folder / "bomb.png")
    os.symlink(folder / "never-existed.jpg", folder / "gone.jpg")
    os.symlink(folder, folder / "loop")  # a directory symlink to its own parent
    return {str(folder / name): reason for name, reason in BAD.items()}


def write_thresholds(path, fingerprint, cal, balanced):
    """The card's schema, plus the calibration scores calibrate.py adds."""
    def table(b):
        return {"strict": {"value": 2 * b}, "balanced": {"value": b}, "sensitive": {"value": b / 2},
                "optimal": {"value": b}}

    cfg = {"reconstruction_thresholds": {"metric": "mse", "thresholds": table(balanced["mse"])},
           "calibration_scores": {"scores": {s: sorted(map(float, v)) for s, v in cal.items()}}}
    if fingerprint is not None:
        cfg["binding"] = {"weights_fingerprint": fingerprint}
    Path(path).write_text(json.dumps(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY).eval()
    ckpt = save_checkpoint(model, root / "model" / "tiny.ckpt")
    good, bad = write_good(root / "good"), write_bad(root / "bad")

    # calibration: the model's scores of procedural "real" images; thresholds at the median
    # score of the good photos, so that both verdicts occur
    det = Detector(ckpt, workers=0)
    cal = detector.score_images(det.model, data.dead_leaves(40, 32, seed=1))  # {"mse": [40]}
    scored = list(score_files(det.model, good, workers=0))
    balanced = {"mse": float(np.median([r["mse"] for r in scored]))}
    fp = weights_fingerprint(model)
    th = {"bound": write_thresholds(root / "bound.json", fp, cal, balanced),
          "other": write_thresholds(root / "other.json", "0" * 64, cal, balanced),
          "none": write_thresholds(root / "none.json", None, cal, balanced)}
    write_thresholds(ckpt.parent / "thresholds_calibrated.json", fp, cal, balanced)  # found by default
    (root / "malformed.json").write_text('{"reconstruction_thresholds": {', encoding="utf-8")
    return dict(root=root, ckpt=ckpt, good=good, bad=bad, th=th, cal={s: np.sort(v) for s, v in cal.items()},
                balanced=balanced, missing=str(root / "no such file.png"))


def run_main(capsys, *args):
    """inference_example.py's CLI in this process (no interpreter start-up): (status, stdout, stderr)."""
    try:
        status = run_cli(inference_example.main, [str(a) for a in args])
    except SystemExit as stop:  # a usage error: exit status 2
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def read_rows(path):
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = list(csv.DictReader(text.splitlines()))
    for r in rows:  # CSV holds strings; empty means absent
        for k, v in r.items():
            r[k] = None if v == "" else float(v) if k in FLOATS else v
    return rows


def by_path(rows):
    rows = list(rows)
    out = {r["path"]: r for r in rows}
    assert len(out) == len(rows), Counter(r["path"] for r in rows).most_common(3)  # each input exactly once
    return out


def check_rows(rows, env, threshold, score="mse"):
    """Every input once, names exact, bad ones with their reason, verdicts and p-values right."""
    rows = by_path(rows)
    expected_bad = {**env["bad"], env["missing"]: "no such file or directory"}
    assert set(rows) == set(env["good"]) | set(expected_bad)
    for path, reason in expected_bad.items():
        r = rows[path]
        assert r["verdict"] == "UNREADABLE" and reason in r["error"], (path, r)
        assert r["score"] is None and r["p_value"] is None
    for path in env["good"]:
        r = rows[path]
        assert r["error"] is None and r["score_name"] == score and r["threshold"] == threshold
        assert r["score"] == r[score] and math.isfinite(r["score"])
        assert r["verdict"] == ("FAKE" if r["score"] > threshold else "REAL"), r
        p = metrics.conformal_pvalues(env["cal"][score], [r[score]])[0]
        assert r["p_value"] == pytest.approx(p, rel=1e-12, abs=0)
    assert {rows[p]["verdict"] for p in env["good"]} == {"REAL", "FAKE"}  # the threshold splits them
    return rows


# ----------------------------------------------------------------------------
# every image kind a user may have decodes, with the right pixels

def make_kinds(folder):
    """name -> check(tensor [3, H, W] uint8)."""
    folder.mkdir(exist_ok=True)
    checks = {}
    astro = photo("astronaut")
    astro.save(folder / "photo.jpg", quality=95)
    checks["photo.jpg"] = lambda t: t.shape == (3, 40, 48) and \
        np.abs(t.permute(1, 2, 0).numpy().astype(int) - np.asarray(astro)).mean() < 6
    chelsea = photo("chelsea")
    chelsea.save(folder / "photo.png")
    checks["photo.png"] = lambda t: np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(chelsea))
    coffee = photo("coffee")
    coffee.save(folder / "photo.webp", lossless=True)
    checks["photo.webp"] = lambda t: np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(coffee))
    rocket = photo("rocket")
    rocket.save(folder / "photo.bmp")
    checks["photo.bmp"] = lambda t: np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(rocket))

    red, green, blue = (Image.new("RGB", (10, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    red.save(folder / "animated.gif", save_all=True, append_images=[green, blue], duration=50, loop=0)
    checks["animated.gif"] = lambda t: t.shape == (3, 8, 10) and t[:, 0, 0].tolist() == [255, 0, 0]
    green.save(folder / "pages.tiff", save_all=True, append_images=[red, blue])
    checks["pages.tiff"] = lambda t: t.shape == (3, 8, 10) and t[:, 0, 0].tolist() == [0, 255, 0]

    # stored 40 wide x 20 high, EXIF orientation 6 = "rotate 90 degrees clockwise to display"
    tall = Image.new("RGB", (40, 20), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 40, 10))  # white top half
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    # after rotating clockwise, the stored top half becomes the right half: 20 wide x 40 high
    checks["exif_rotated.jpg"] = lambda t: t.shape == (3, 40, 20) and t[:, 20, 15].min() > 200 and t[:, 20, 4].max() < 50

    gray = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (6, 1)), mode="L")
    gray.save(folder / "gray_L.png")
    checks["gray_L.png"] = lambda t: (t[0] == t[1]).all() and (t[1] == t[2]).all() and \
        np.array_equal(t[0].numpy(), np.asarray(gray))
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * (254 * 3))
    pal.paste(1, (0, 0, 3, 4))
    pal.save(folder / "palette_P.png")
    checks["palette_P.png"] = lambda t: t[:, 0, 0].tolist() == [200, 100, 50] and t[:, 0, 5].tolist() == [0, 0, 0]
    Image.new("RGBA", (6, 4), (10, 20, 30, 40)).save(folder / "rgba.png")
    checks["rgba.png"] = lambda t: t.shape == (3, 4, 6) and t[:, 1, 1].tolist() == [10, 20, 30]
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)  # pure cyan ink
    checks["cmyk.jpg"] = lambda t: (t[:, 4, 4].to(torch.int) - torch.tensor([0, 255, 255])).abs().max() < 8

    # 16-bit: 0, 100 * 257 and 65535 must become 0, 100 and 255 (scaled), not 0, 255, 255 (clipped)
    deep = np.array([[0, 100 * 257, 65535]] * 2, dtype=np.uint16)
    Image.fromarray(deep).save(folder / "gray16.png")
    checks["gray16.png"] = lambda t: t[0, 0].tolist() == [0, 100, 255] and (t[0] == t[2]).all()
    # float TIFFs: in [0, 1], and with PIL's own 0-255 levels; both are the same grey image, not saturated white
    Image.fromarray(np.asarray(gray, dtype=np.float32) / 255).save(folder / "float01.tiff")  # mode F
    gray.convert("F").save(folder / "float255.tiff")
    for name in ("float01.tiff", "float255.tiff"):
        checks[name] = lambda t: np.array_equal(t[1].numpy(), np.asarray(gray)) and (t[0] == t[2]).all()
    return checks


KINDS = ["photo.jpg", "photo.png", "photo.webp", "photo.bmp", "animated.gif", "pages.tiff", "exif_rotated.jpg",
         "gray_L.png", "palette_P.png", "rgba.png", "cmyk.jpg", "gray16.png", "float01.tiff", "float255.tiff"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    return folder, make_kinds(folder)


def test_kind_fixture_covers_the_list(kinds):
    assert sorted(kinds[1]) == sorted(KINDS)


@pytest.mark.parametrize("name", KINDS)
def test_read_image_decodes_every_kind(kinds, name):
    folder, checks = kinds
    with Image.open(folder / name) as img:  # the file really is what its name says
        assert img.format == {"jpg": "JPEG", "tiff": "TIFF"}.get(name.split(".")[-1], name.split(".")[-1].upper())
    t = read_image(folder / name)
    assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == 3
    assert checks[name](t), (name, tuple(t.shape), t[:, 0, :4].tolist())


def test_every_kind_is_scored_end_to_end(kinds, env):
    rows = list(Detector(env["ckpt"], workers=0).score_paths([kinds[0]]))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(KINDS)
    assert all("error" not in r and math.isfinite(r["mse"]) for r in rows), [r for r in rows if "error" in r]


# ----------------------------------------------------------------------------
# bad inputs: a row with a reason each, and the run goes on

def test_bad_inputs_are_reported_and_never_stop_the_run(env):
    det = Detector(env["ckpt"], env["th"]["bound"], workers=0, batch_size=3)
    glob_nothing = str(env["root"] / "nothing-*.png")
    rows = by_path(det.score_paths([str(env["root"] / "bad"), env["missing"], glob_nothing, str(env["root"] / "good")]))
    for path, reason in env["bad"].items():
        assert reason in rows[path]["error"], (path, rows[path])
    assert rows[env["missing"]]["error"] == "no such file or directory"
    assert rows[glob_nothing]["error"] == "pattern matches nothing"
    assert all("error" not in rows[p] and rows[p]["verdict"] in ("REAL", "FAKE") for p in env["good"])


def test_bad_inputs_with_decoding_workers(env):
    # the same through DataLoader worker processes: errors reported once, not once per worker
    rows = list(Detector(env["ckpt"], workers=2, batch_size=2).score_paths([str(env["root"] / "bad"), str(env["root"] / "good")]))
    assert sorted(r["path"] for r in rows) == sorted(list(env["bad"]) + env["good"])


def test_file_vanishing_between_listing_and_decoding(env, tmp_path, monkeypatch):
    victim = tmp_path / "vanishing.png"
    photo("astronaut").save(victim)
    photo("chelsea").save(tmp_path / "stays.png")
    listed = images.iter_image_files

    def list_then_delete(paths, on_error=None):
        for p in listed(paths, on_error):
            if p.endswith("vanishing.png"):
                os.remove(p)  # gone after it was listed, before it is opened
            yield p

    monkeypatch.setattr(detector, "iter_image_files", list_then_delete)
    rows = by_path(Detector(env["ckpt"], workers=0).score_paths([tmp_path]))
    assert rows[str(victim)]["error"] == "file not found (vanished?)"
    assert math.isfinite(rows[str(tmp_path / "stays.png")]["mse"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root from reading the file "
                           "(the reason mapping is tested by the monkeypatched test below)")
def test_unreadable_permissions(tmp_path):
    p = tmp_path / "locked.png"
    photo("astronaut").save(p)
    p.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        read_image(p)


def test_permission_error_and_directory_become_reasons(tmp_path, monkeypatch):
    folder = tmp_path / "folder.jpg"  # a directory named like an image
    folder.mkdir()
    with pytest.raises(ImageReadError, match="^is a directory$"):
        read_image(folder)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    photo("astronaut").save(tmp_path / "locked.png")
    monkeypatch.setattr(images.os, "open", refuse)  # what opening a file we may not read raises
    with pytest.raises(ImageReadError, match="^permission denied$"):
        read_image(tmp_path / "locked.png")


@pytest.mark.parametrize("size", [(48, 40), (1400, 1100)])  # small, and large enough to be read reduced
def test_api_path_and_pil_image_give_the_same_score(env, tmp_path, size):
    det = Detector(env["ckpt"], env["th"]["bound"], workers=0)
    png = tmp_path / "photo.png"
    photo("astronaut", size).save(png)
    with Image.open(png) as img:
        by_file, by_pil = det.score([png, img.copy()])
    assert by_file["mse"] == pytest.approx(by_pil["mse"], rel=1e-6) and by_file["verdict"] == by_pil["verdict"]


def test_file_batches_travel_as_bytes_and_score_as_the_float_path(env):
    # a pinned uint8 batch is a quarter of float32's bytes and copies asynchronously; it is normalized on the device
    det = Detector(env["ckpt"], workers=0)
    files = detector.ImageFiles(detector.list_files(env["good"]), TINY.image_size)
    items = [files[i] for i in range(len(files))]
    _, x, _ = detector.collate(items)
    assert x.dtype == torch.uint8 and x.shape == (len(env["good"]), 3, TINY.image_size, TINY.image_size)
    floats = torch.cat([data.preprocess(read_image(p, min_size=TINY.image_size), TINY.image_size) for p in env["good"]])
    assert torch.equal(data.preprocess(x, TINY.image_size), floats)  # the round trip through bytes is exact
    # the bytes are normalized on the model's device: on a GPU, fused multiply-adds round the last bit differently
    rtol = 0 if detector.model_device(det.model).type == "cpu" else 1e-5
    np.testing.assert_allclose(detector.score_batch(det.model, x)["mse"], detector.score_batch(det.model, floats)["mse"],
                               rtol=rtol, atol=0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_large_images_are_read_reduced_in_every_format(tmp_path, fmt):
    path = tmp_path / f"astronaut.{fmt.lower()}"
    Image.fromarray(skdata.astronaut()).resize((1400, 1100), Image.BICUBIC).save(path, fmt, quality=95)
    full, reduced = read_image(path), read_image(path, min_size=128)
    assert full.shape[-2:] == (1100, 1400)
    assert reduced.shape[-2:] == (275, 350)  # JPEG draft scale 1/4, or box factor 4: both sides >= 2 x 128
    grey_levels = (data.preprocess(reduced, 128) - data.preprocess(full, 128)) * 127.5  # what the model sees
    assert grey_levels.abs().mean() < 0.5 and grey_levels.pow(2).mean().sqrt() < 1  # measured: 0.36 and 0.72


# ----------------------------------------------------------------------------
# the script

@pytest.fixture(scope="module")
def cli_csv(env):
    """One real command-line run: good and bad inputs, CSV output, thresholds bound to the weights."""
    out = env["root"] / "out dir" / "results é.csv"
    proc = run_script("inference_example.py", env["root"] / "good", env["root"] / "bad", env["missing"],
                      "--checkpoint", env["ckpt"], "--thresholds", env["th"]["bound"], "--output", out, check=False, env=ONE_THREAD)
    return proc, out


def test_cli_exit_1_when_some_inputs_unreadable_and_rows_are_right(cli_csv, env):
    proc, out = cli_csv
    assert proc.returncode == 1, proc.stderr
    assert "warning:" not in proc.stderr and "Traceback" not in proc.stderr  # thresholds match these weights
    rows = check_rows(read_rows(out), env, env["balanced"]["mse"])
    lines = proc.stdout.splitlines()
    for path, r in rows.items():  # one stdout line per input, the same verdict as the file
        [line] = [line for line in lines if line.startswith(path + "\t")]
        if r["error"]:
            assert line == f"{path}\tUNREADABLE: {r['error']}"
        else:
            assert line == f"{path}\tmse={r['score']:.6g}\tp={r['p_value']:.6g}\t{r['verdict']}"
    verdicts = Counter(r["verdict"] for r in rows.values())
    assert f"{len(rows)} inputs: {verdicts['REAL']} REAL, {verdicts['FAKE']} FAKE, {len(env['bad']) + 1} unreadable" in lines
    assert f"threshold: balanced = {env['balanced']['mse']:.6g}" in proc.stdout


@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_every_output_format_holds_the_same_rows(cli_csv, env, capsys, tmp_path, ext):
    out = tmp_path / f"résultats {ext[1:]}{ext}"
    status, stdout, _ = run_main(capsys, env["root"] / "good", env["root"] / "bad", env["missing"], "--checkpoint",
                                 env["ckpt"], "--thresholds", env["th"]["bound"], "--output", out, "--workers", "0")
    assert status == 1
    rows = check_rows(read_rows(out), env, env["balanced"]["mse"])
    assert rows == by_path(read_rows(cli_csv[1]))  # CSV, JSON and JSON Lines agree exactly
    assert "café au lait ☕ 猫.jpg" in out.read_text(encoding="utf-8")  # stored as is, not \\u-escaped


def test_exit_0_when_everything_is_scored_and_thresholds_found_beside_the_checkpoint(env, capsys):
    status, out, err = run_main(capsys, env["root"] / "good", "--checkpoint", env["ckpt"], "--workers", "0")
    assert status == 0 and err == ""
    assert str(env["ckpt"].parent / "thresholds_calibrated.json") in out
    assert f"{len(env['good'])} inputs:" in out and "0 unreadable" in out


@pytest.mark.parametrize("case", ["bad checkpoint", "malformed thresholds", "unknown threshold name"])
def test_cli_exit_2_with_one_line(env, tmp_path, case):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    args = {"bad checkpoint": ["--checkpoint", garbage, "--thresholds", env["th"]["bound"]],
            "malformed thresholds": ["--checkpoint", env["ckpt"], "--thresholds", env["root"] / "malformed.json"],
            "unknown threshold name": ["--checkpoint", env["ckpt"], "--threshold", "paranoid"]}[case]
    proc = run_script("inference_example.py", env["root"] / "good", *args, check=False, env=ONE_THREAD)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and {"bad checkpoint": "garbage.ckpt", "malformed thresholds": "not valid JSON",
                                           "unknown threshold name": "paranoid"}[case] in line, line


def test_exit_2_usage_errors_in_process(env, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--checkpoint", env["ckpt"], "--workers", "0"]
    cases = [([empty, "--output", tmp_path / "none.json"], "no image files found"),
             ([env["root"] / "good", "--output", tmp_path / "r.xlsx"], ".csv, .json, .jsonl"),
             ([env["root"] / "good", "--threshold", "nan"], "finite"),
             ([env["root"] / "good", "--thresholds", tmp_path / "nope.json"], "thresholds file not found")]
    if not torch.cuda.is_available():
        cases.append(([env["root"] / "good", "--device", "cuda"], "no CUDA device"))
    for args, fragment in cases:
        status, out, err = run_main(capsys, *args, *common)
        assert status == 2, (args, err)
        [line] = err.strip().splitlines()
        assert line.startswith("error: ") and fragment in line, line
    assert json.loads((tmp_path / "none.json").read_text()) == []  # still a valid JSON file


def test_all_unreadable_still_writes_valid_json(env, capsys, tmp_path):
    out = tmp_path / "all bad.json"
    status, stdout, _ = run_main(capsys, env["root"] / "bad", "--checkpoint", env["ckpt"], "--output", out,
                                 "--workers", "0")
    assert status == 1
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(r["path"] for r in rows) == sorted(env["bad"])
    assert all(r["verdict"] == "UNREADABLE" and r["score"] is None for r in rows)
    assert f"0 REAL, 0 FAKE, {len(env['bad'])} unreadable" in stdout


def test_fingerprint_warning_once_before_any_result(env):
    # stderr merged into stdout, as a terminal shows them: the warning must come first
    proc = subprocess.run([sys.executable, "inference_example.py", env["root"] / "good", "--checkpoint", env["ckpt"],
                           "--thresholds", env["th"]["other"]], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}, timeout=300)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    warnings = [i for i, line in enumerate(lines) if line.startswith("warning:")]
    results = [i for i, line in enumerate(lines) if line.endswith(("\tREAL", "\tFAKE"))]
    assert len(warnings) == 1 and "other weights" in lines[warnings[0]]
    assert len(results) == len(env["good"]) and warnings[0] < min(results)


@pytest.mark.parametrize("which, expect", [("none", "no checkpoint fingerprint"), ("bound", None)])
def test_fingerprint_warning_without_binding_and_not_when_it_matches(env, capsys, which, expect):
    status, out, err = run_main(capsys, env["root"] / "good", "--checkpoint", env["ckpt"], "--thresholds",
                                env["th"][which], "--workers", "0")
    assert status == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == (1 if expect else 0) and (expect is None or expect in warnings[0]), err


def test_repo_thresholds_are_the_fallback(env, capsys, tmp_path, monkeypatch):
    lone = tmp_path / "lone.ckpt"  # no thresholds file beside it
    lone.write_bytes(env["ckpt"].read_bytes())
    monkeypatch.setattr(thresholds, "REPO_THRESHOLDS", tmp_path / "absent.json")
    status, _, err = run_main(capsys, env["root"] / "good", "--checkpoint", lone, "--workers", "0")
    assert status == 2 and "needs a thresholds file" in err
    monkeypatch.setattr(thresholds, "REPO_THRESHOLDS", Path(env["th"]["none"]))  # like the card's values
    status, out, err = run_main(capsys, env["root"] / "good", "--checkpoint", lone, "--workers", "0")
    assert status == 0 and str(env["th"]["none"]) in out and err.count("warning:") == 1


def test_numeric_threshold(env, capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    t = env["balanced"]["mse"] * 1.01
    status, stdout, _ = run_main(capsys, env["root"] / "good", "--checkpoint", env["ckpt"], "--threshold", repr(t),
                                 "--output", out, "--workers", "0")
    rows = read_rows(out)
    assert status == 0 and len(rows) == len(env["good"])
    assert all(r["threshold"] == t and r["verdict"] == ("FAKE" if r["mse"] > t else "REAL") for r in rows)
    assert {r["verdict"] for r in rows} == {"REAL", "FAKE"}
    assert f"threshold: {t:g} (given)" in stdout


def test_p_values_are_conformal_against_the_calibration_scores(env, capsys, tmp_path):
    out = tmp_path / "r.csv"
    status, _, _ = run_main(capsys, env["root"] / "good", env["root"] / "bad", "--checkpoint", env["ckpt"],
                            "--output", out, "--workers", "0")
    rows = [r for r in read_rows(out) if r["error"] is None]
    assert status == 1 and len(rows) == len(env["good"])
    for r in rows:  # p = (1 + #{calibration scores >= s}) / (n + 1)
        p = (1 + np.sum(env["cal"]["mse"] >= r["mse"])) / (len(env["cal"]["mse"]) + 1)
        assert r["score"] == r["mse"] and r["p_value"] == pytest.approx(p, rel=1e-12)


def test_non_utf8_file_name_does_not_stop_the_run(env, capsys, tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # not valid UTF-8: a surrogate escape in Python
    photo("coffee").save(os.fsdecode(raw))
    out = tmp_path / "r.json"
    status, stdout, _ = run_main(capsys, folder, "--checkpoint", env["ckpt"], "--output", out, "--workers", "0")
    [row] = json.loads(out.read_text(encoding="utf-8"))
    assert status == 0 and os.fsencode(row["path"]) == raw  # round-trips to the very bytes
    assert "caf\\udce9.png" in stdout


def test_torchrun_is_refused_in_one_line_and_nothing_written(env, tmp_path):
    # one process already decodes on every core (--workers): torchrun would only score every file N times
    out = tmp_path / "r.csv"
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # what it sets in each process
    proc = run_script("inference_example.py", env["root"] / "good", "--checkpoint", env["ckpt"],
                      "--output", out, check=False, env={**ONE_THREAD, **torchrun})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: inference_example.py runs as one process: start it with python, not torchrun"]
    assert not list(tmp_path.iterdir())


def test_a_thresholds_file_with_the_removed_scores_still_applies(env, capsys, tmp_path):
    cfg = json.loads(Path(env["th"]["bound"]).read_text(encoding="utf-8"))
    cfg["score_thresholds"] = {"complexity": {"thresholds": {"balanced": {"value": 1.0}}},  # files before
                               "combined": {"levels": {"balanced": {"value": 0.05}}}}      # their removal
    cfg["calibration_scores"]["scores"]["complexity"] = [0.5, 1.5]
    (old := tmp_path / "old.json").write_text(json.dumps(cfg), encoding="utf-8")
    status, out, err = run_main(capsys, env["root"] / "good", "--checkpoint", env["ckpt"], "--thresholds", old,
                                "--workers", "0")
    assert status == 0 and out.count("\tmse=") == len(env["good"]) and "warning" not in err, err
