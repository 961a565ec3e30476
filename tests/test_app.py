"""app.py: started through its CLI and driven in headless Chromium. The page must show, for each uploaded file,
exactly what the Detector API gives for that file (verdict, score, p-value, heatmap), the decoder's reason for a
file that is not a usable image, follow the threshold selector, and keep serving: a tiny untrained model; with no
flags, the shipped artifact detector. The browser test needs gradio, selenium (requirements-app.txt), Chromium and
its driver (Debian: chromium, chromium-driver); without them it is skipped, saying which is missing."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
import data
import detector
import fakes
import thresholds
from detector import Detector
from utils import run_cli
from checkpoints import weights_fingerprint
from tests.conftest import ROOT, run_script, save_checkpoint
from tests.test_inference import bomb_png

skdata = pytest.importorskip("skimage.data")

SERVER_START_S = 120  # importing gradio and torch on a busy 2-core machine: ~10-30 s
PAGE_S = 60  # any one change on the page
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the model is tiny: a second thread only spins on a busy machine


def missing_for_browser_test():
    """Why the browser test cannot run here, or None."""
    modules = [m for m in ("gradio", "selenium") if importlib.util.find_spec(m) is None]
    programs = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    hints = (["pip install -r requirements-app.txt"] * bool(modules)
             + ["apt-get install chromium chromium-driver"] * bool(programs))
    return f"needs {', '.join(modules + programs)} ({'; '.join(hints)})" if modules or programs else None


BROWSER_MISSING = missing_for_browser_test()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


def wait_for_server(proc, url, log):
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited {proc.returncode}:\n{log.read_text()}")
        try:
            if get(url) == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.25)
    pytest.fail(f"app.py did not serve {url} within {SERVER_START_S} s:\n{log.read_text()}")


@pytest.fixture
def model_files(tiny_model, tmp_path):
    """A checkpoint and a thresholds file whose calibration scores are real-like images (dead leaves). The mse
    threshold sits halfway between the photo's and the noise's scores, so that the page must show both verdicts,
    and the strict one (twice as high) turns the noise REAL."""
    ckpt = save_checkpoint(tiny_model, tmp_path / "model" / "model_best_checkpoint.ckpt")
    (uploads := tmp_path / "uploads").mkdir()
    Image.fromarray(skdata.chelsea()).save(uploads / "chelsea.png")  # a real photograph, 451x300
    Image.fromarray(fakes.uniform_noise(1, 32, seed=1)[0].permute(1, 2, 0).numpy()).save(uploads / "noise.png")
    (uploads / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    (uploads / "notes.png").write_text("this is not a picture\n")
    bomb_png(uploads / "bomb.png")  # 18 kB on disk, 144 Mpixels decoded
    cal = detector.score_images(tiny_model, data.dead_leaves(40, 32, seed=1))  # every autoencoder score
    photo, noise = Detector(ckpt, workers=0).score_paths([uploads / "chelsea.png", uploads / "noise.png"])
    assert photo["mse"] < noise["mse"]  # else no threshold separates them
    balanced = {"mse": (photo["mse"] + noise["mse"]) / 2, "complexity": float(np.median(cal["complexity"]))}
    tables = {s: {name: {"value": f * b} for name, f in (("strict", 2), ("balanced", 1), ("sensitive", 0.5))}
              for s, b in balanced.items()}
    thresholds.write(th := tmp_path / "thresholds.json", thresholds.build(
        tables, {}, cal, binding={"weights_fingerprint": weights_fingerprint(tiny_model)}))
    return ckpt, th, sorted(uploads.iterdir())


@pytest.fixture
def server(model_files, tmp_path):
    """app.py through its CLI, on a free port; yields its URL and log, and stops it however the test ends."""
    ckpt, th, _ = model_files
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}  # uploads land in the test's folder
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(ckpt), "--thresholds", str(th),
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}/", log
    finally:
        proc.kill()  # the server holds nothing that needs a clean stop: its files are in tmp_path
        proc.wait()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(PAGE_S)
    try:
        yield driver
    finally:
        driver.quit()


def cards(driver):
    """name -> the result card's web element, of the results now on the page."""
    from selenium.webdriver.common.by import By
    return {e.get_attribute("data-name"): e for e in driver.find_elements(By.CSS_SELECTOR, "#results .result")}


def shows(driver, expected, label):
    """Whether the page shows exactly the expected rows' verdicts, scored with the threshold named `label`."""
    from selenium.common.exceptions import StaleElementReferenceException
    try:
        now = cards(driver)
        return set(now) == set(expected) and all(
            now[name].get_attribute("data-verdict") == r.get("verdict", "UNREADABLE") for name, r in expected.items()) \
            and all(label in now[name].text for name, r in expected.items() if "error" not in r)
    except StaleElementReferenceException:  # the results were replaced while being read
        return False


def check_cards(driver, expected):
    from selenium.webdriver.common.by import By
    for name, row in expected.items():
        card = cards(driver)[name]
        if "error" in row:  # the decoder's one-line reason, never a stack trace
            assert card.find_element(By.CSS_SELECTOR, ".error").text == f"could not read this file: {row['error']}"
            continue
        assert f"mse = {row['score']:.4g}" in card.find_element(By.CSS_SELECTOR, ".decision").text
        assert card.find_element(By.CSS_SELECTOR, ".p-value").text == f"p-value {row['p_value']:.3g}"
        heatmap = card.find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) > 300
    assert "Traceback" not in driver.page_source


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
def test_page_shows_what_the_detector_says_for_each_upload(model_files, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt, th, uploads = model_files
    proc, url, log = server
    def rows(label):  # what the page must show: the Detector API's rows for the same files (the CLI's decode path)
        return {Path(r["path"]).name: r for r in Detector(ckpt, th, threshold=label, workers=0).score_paths(uploads)}
    expected = {label: rows(label) for label in ("balanced", "strict")}
    assert [expected[label][name]["verdict"] for label, name in (("balanced", "noise.png"), ("balanced", "chelsea.png"),
                                                                 ("strict", "noise.png"))] == ["FAKE", "REAL", "REAL"]
    assert expected["balanced"]["notes.png"]["error"] == "not an image (unknown format)"
    assert expected["balanced"]["bomb.png"]["error"].startswith("decompression bomb")

    wait_for_server(proc, url, log)
    browser.get(url)
    wait = WebDriverWait(browser, PAGE_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]"))
    assert str(ckpt) in browser.page_source and str(th) in browser.page_source  # the files in use are named
    assert "anomaly scores, not detectors of generated images" in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys("\n".join(map(str, uploads)))
    wait.until(lambda d: shows(d, expected["balanced"], "balanced"))
    check_cards(browser, expected["balanced"])

    # after the bad uploads the server still answers, and re-scores with the threshold the user picks
    browser.find_element(By.XPATH, "//*[@id='threshold']//label[normalize-space()='strict']").click()
    wait.until(lambda d: shows(d, expected["strict"], "strict"))
    check_cards(browser, expected["strict"])
    assert proc.poll() is None and get(url) == 200
    assert "Traceback" not in log.read_text()


def test_the_page_offers_the_scores_of_the_loaded_models(model_files, tmp_path):
    th, own = model_files[1], str(ROOT / "artifact_detector" / "thresholds_calibrated.json")  # own: the artifact's
    dets = app.load_detectors(app.parse_args([]))  # no flags: the shipped detector, nothing to make first
    assert list(dets) == ["artifact"] and dets["artifact"].model is None and dets["artifact"].thresholds_source == own
    # chelsea is one of the detector's calibration photos; astronaut and coffee are test photos it never saw
    photos = [tmp_path / "chelsea.png", tmp_path / "astronaut.jpg", tmp_path / "coffee.png"]
    for photo in photos:
        Image.fromarray(getattr(skdata, photo.stem)()).save(photo, quality=90)
    page = app.score_uploads(dets, photos, "artifact", "balanced")
    for row in Detector(None, score="artifact", workers=0).score_paths(photos):
        assert row["verdict"] == "REAL" and f'data-name="{Path(row["path"]).name}" data-verdict="REAL"' in page
        assert f"artifact = {row['score']:.4g} &lt;= threshold (balanced = " in page
        assert f"p-value {row['p_value']:.3g}" in page
    assert page.count('src="data:image/png;base64,') == 3  # each card shows its picture
    if importlib.util.find_spec("gradio"):  # the page itself builds (the browser test serves the autoencoder's)
        app.build_app(dets, app.parse_args([]))
    # with an autoencoder: its scores, one copy of its weights; the artifact score keeps its own thresholds
    dets = app.load_detectors(app.parse_args(["--checkpoint", str(model_files[0]), "--thresholds", str(th)]))
    assert list(dets) == ["mse", "complexity", "artifact", "combined"] and dets["artifact"].thresholds_source == own
    assert dets["mse"].model is dets["complexity"].model is dets["combined"].model is not None


def test_a_missing_checkpoint_or_a_bad_thresholds_file_is_one_line_and_exit_2(model_files, tmp_path, capsys):
    proc = run_script("app.py", "--checkpoint", tmp_path / "nope.ckpt", check=False, env=ONE_THREAD, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: checkpoint not found: {tmp_path / 'nope.ckpt'}\n"
    bad = tmp_path / "bad.json"
    bad.write_text('{"reconstruction_thresholds": {', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        run_cli(app.main, ["--checkpoint", str(model_files[0]), "--thresholds", str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {bad}: not valid JSON")
