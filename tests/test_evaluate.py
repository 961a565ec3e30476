"""scripts/generated/evaluate.py: AUROC and flagged shares on SET/real + SET/fake, and its refusals."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data import dead_leaves
from detector import Detector
from tests.conftest import ROOT, TINY, run_script, save_checkpoint
from utils import run_cli

sys.path.insert(0, str(ROOT / "scripts" / "generated"))
import evaluate  # noqa: E402


def save_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"i{i:03d}.png")
    return folder


def noise(n, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def write_set(folder, n=8):
    save_pngs(folder / "real", dead_leaves(n, 96, seed=5))
    save_pngs(folder / "fake", noise(n, 96, seed=6))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(autoencoder, artifact detector, thresholds calibrated for both, for the artifact detector alone):
    untrained, so that only the plumbing is tested; real images of 64 x 64 pixels, one artifact tile each."""
    import calibrate
    from model import ArtifactConfig, ArtifactDetector, ResidualAutoencoder

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ae = save_checkpoint(ResidualAutoencoder(TINY).eval(), root / "ae.ckpt")
    detector = ArtifactDetector(ArtifactConfig()).eval()
    torch.nn.init.constant_(detector.head.bias, 5.0)  # logits > 0: calibrate.py's report divides by them
    detector.save_pretrained(root / "art")
    real, fake = save_pngs(root / "real", dead_leaves(200, 64, seed=3)), save_pngs(root / "fake", noise(20))

    def calibrated(out, *model_flags):
        calibrate.main([*map(str, model_flags), "--real-dir", str(real), "--fake-dir", f"noise={fake}",
                        "--num-noise", "0", "--hard-fakes", "none", "--num-benign", "0", "--bootstrap", "0",
                        "--output", str(out), "--no-progress", "--workers", "0", "--device", "cpu"])
        return out

    art = root / "art"
    both = calibrated(root / "both.json", "--checkpoint", ae, "--artifact-model", art)
    return ae, art, both, calibrated(root / "art.json", "--artifact-model", art)


def test_every_score_the_models_give_plain_and_with_jpeg_fakes(models, tmp_path, capsys):
    ae, art, both, _ = models
    write_set(tmp_path / "sr_noise")
    status = evaluate.main([str(tmp_path / "sr_noise"), "--checkpoint", str(ae), "--artifact-model", str(art),
                            "--thresholds", str(both), "--fake-jpeg-quality", "80", "--bootstrap", "20",
                            "--output", str(tmp_path / "e.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    assert status == 0 and list(sets) == ["sr_noise", "sr_noise (fakes JPEG q80)"], sets
    for row in sets.values():
        assert row["n_real"] == row["n_fake"] == 8 and row["n_unreadable"] == 0
        for s in ("mse", "artifact"):
            lo, hi = row[s]["auroc_ci95"]
            assert 0 <= lo <= hi <= 1 and 0 <= row[s]["auroc"] <= 1, row[s]
            assert 0 <= row[s]["real_flagged"] <= 1 and 0 <= row[s]["fake_flagged"] <= 1
    # the JPEG run scores the same fakes, re-saved: every score moves
    ae_det = Detector(str(ae), str(both), device="cpu", score="mse", artifact_model=str(art))
    dets = [ae_det, ae_det.with_rule("artifact")]
    plain, jpeg = ({r["path"]: r for r in evaluate.set_scores(dets, tmp_path / "sr_noise", q)[0]["fake"]}
                   for q in (None, 80))
    assert plain.keys() == jpeg.keys()
    assert all(plain[p][s] != jpeg[p][s] for p in plain for s in ("mse", "artifact"))
    assert "| sr_noise | 8 |" in out and "| sr_noise (fakes JPEG q80) | 8 |" in out and "mse AUROC" in out


@pytest.mark.parametrize("model, thresholds, want", [
    ("artifact", "both", ["artifact"]),  # mse needs the autoencoder
    ("artifact", "artifact", ["artifact"]),
    ("autoencoder", "both", ["mse"]),
    ("both", "both", ["mse", "artifact"]),
])
def test_scores_the_models_cannot_give_are_left_out(models, tmp_path, model, thresholds, want):
    ae, art, both, art_only = models
    flags = {"autoencoder": ["--checkpoint", str(ae)], "artifact": ["--artifact-model", str(art)],
             "both": ["--checkpoint", str(ae), "--artifact-model", str(art)]}[model]
    args = evaluate.parse_args([str(write_set(tmp_path / "s", 4)), *flags, "--bootstrap", "5", "--device",
                                "cpu", "--thresholds", str(both if thresholds == "both" else art_only)])
    results, names = evaluate.evaluate(args)
    assert names == want and set(results["s"]) == {"n_real", "n_fake", "n_unreadable", *want}


def refusal(capsys, *argv):
    """(exit status, stderr lines) of a run whose artifact detector does not exist: a refusal that comes
    before any model is loaded names the problem, not the model."""
    with pytest.raises(SystemExit) as stop:
        run_cli(evaluate.main, [*map(str, argv), "--artifact-model", "missing_detector", "--device", "cpu"])
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_refuses_two_sets_of_one_name(models, tmp_path, capsys):
    status, err = refusal(capsys, write_set(tmp_path / "a" / "x", 2), write_set(tmp_path / "b" / "x", 2),
                          "--thresholds", models[3])
    assert status == 2 and len(err) == 1 and "same name" in err[0], err


def test_checks_output_and_scores_before_any_scoring(models, tmp_path, capsys):
    write_set(tmp_path / "set", 2)
    (tmp_path / "file").write_text("x")
    # a folder; a path under a regular file; a file the run reads (the thresholds)
    for output in (tmp_path, tmp_path / "file" / "x.json", models[3]):
        status, err = refusal(capsys, tmp_path / "set", "--thresholds", models[3], "--output", output)
        assert status == 2 and len(err) == 1 and f"cannot write {output}" in err[0], err
    for scores, want in (("mse", "none of --scores mse"), ("artifact,bogus", "unknown score 'bogus'")):
        status, err = refusal(capsys, tmp_path / "set", "--thresholds", models[3], "--scores", scores)
        assert status == 2 and len(err) == 1 and want in err[0], err


def test_cli_jpeg_fakes_skip_unreadable_files_without_hanging(models, tmp_path):
    _, art, _, art_only = models
    fake = write_set(tmp_path / "set", 4) / "fake"
    os.mkfifo(fake / "fifo.png")  # no writer: a blocking open would wait forever
    (fake / "README.txt").write_text("not an image")
    (fake / "sub").mkdir()
    (fake / "empty.png").write_bytes(b"")
    proc = run_script("scripts/generated/evaluate.py", tmp_path / "set", "--artifact-model", art,
                      "--thresholds", art_only, "--fake-jpeg-quality", "80", "--bootstrap", "5",
                      "--device", "cpu", "--output", tmp_path / "e.json", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # 1: some unreadable inputs
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    # the JPEG run scores the very files the plain run scores, and skips the same unreadable ones
    assert [(row["n_fake"], row["n_unreadable"]) for row in sets.values()] == [(4, 2), (4, 2)], sets
    assert proc.stderr.count("skipped 2 unreadable") == 2, proc.stderr


def test_escapes_file_names_and_exits_1_on_unreadable_inputs(models, tmp_path, capsys):
    _, art, _, art_only = models
    write_set(tmp_path / "set", 4)
    (tmp_path / "set" / "fake" / "zz\nFORGED: all 10 fakes detected\n.png").write_bytes(b"")
    status = run_cli(evaluate.main, [str(tmp_path / "set"), "--artifact-model", str(art), "--thresholds",
                                     str(art_only), "--bootstrap", "5", "--device", "cpu"])
    got = capsys.readouterr()
    lines = (got.out + got.err).splitlines()
    assert status == 1 and not any(line.startswith("FORGED") for line in lines), lines
    assert any("unreadable" in line and "zz\\nFORGED" in line for line in lines), lines
