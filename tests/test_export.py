"""export.py: the exported graph scores as PyTorch does on real photos of any size and batch, and carries its
thresholds, config, preprocessing and fingerprint."""

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import calibrate
import export
import inference_example
from checkpoints import weights_fingerprint
from data import dead_leaves, preprocess, to_uint8
from detector import score_batch
from model import ResidualAutoencoder
from tests.conftest import TINY, run_script, save_checkpoint
from utils import run_cli

onnx = pytest.importorskip("onnx", reason="the export extra is not installed (pip install -r requirements-export.txt)")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
skdata = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a folder of real photos (several sizes, one corrupt file), its calibration, and the export."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY).eval()
    ckpt = save_checkpoint(model, root / "model" / "tiny.ckpt")
    photos = root / "photos"
    photos.mkdir()
    for i, name in enumerate(PHOTOS):
        Image.fromarray(getattr(skdata, name)()).save(photos / f"{name}.{('png', 'jpg', 'webp', 'png')[i]}")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    real = root / "real"
    real.mkdir()
    for i, image in enumerate(dead_leaves(130, 48, seed=5)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(real / f"{i:03d}.png")
    assert calibrate.main(["--checkpoint", str(ckpt), "--real-dir", str(real), "--num-noise", "100", "--hard-fakes", "none",
                           "--bootstrap", "0", "--no-progress", "--workers", "0", "--device", "cpu", "--holdout-fraction", "0.2", "--output",
                           str(root / "torch" / "thresholds.json")]) is None
    onnx_path = root / "tiny.onnx"
    proc = run_script("export.py", "--checkpoint", ckpt, "--thresholds", root / "torch" / "thresholds.json",
                      "--output", onnx_path, "--verify-images", photos)
    return dict(root=root, ckpt=ckpt, model=model, photos=photos, real=real, onnx=onnx_path, export=proc,
                thresholds=root / "torch" / "thresholds.json")


def test_export_writes_and_verifies_a_graph_with_everything_inside(env):
    assert "verified with ONNX Runtime on 4 images under" in env["export"].stdout  # the corrupt file is not counted
    meta = {p.key: p.value for p in onnx.load(str(env["onnx"])).metadata_props}
    assert json.loads(meta["config"]) == json.loads(json.dumps(asdict(TINY)))
    assert meta["weights_fingerprint"] == weights_fingerprint(env["model"])
    assert json.loads(meta["thresholds"]) == json.loads(env["thresholds"].read_text())
    assert "rounded to 8 bits" in meta["preprocessing"] and meta["repo_version"] and meta["exported_with"]


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_scores_equal_torch_on_real_photos_of_any_size_and_batch(env, batch):
    session = onnxruntime.InferenceSession(str(env["onnx"]), providers=["CPUExecutionProvider"])
    size = TINY.image_size
    for h, w in ((512, 512), (300, 451), (40, 33), (size, size)):  # non-square, and near the model's input size
        photos = torch.stack([torch.from_numpy(np.array(Image.fromarray(getattr(skdata, n)()).resize((w, h))))
                              .permute(2, 0, 1) for n in PHOTOS[:batch]])  # uint8 [B, 3, h, w]
        resized = to_uint8(preprocess(photos, size))  # fed at the model's size: exact
        recon, maps, mse = map(torch.from_numpy, session.run(None, {"images": resized.numpy()}))
        theirs = score_batch(env["model"], resized, keep_maps=True)
        assert np.allclose(mse.numpy(), theirs["mse"], rtol=1e-5, atol=0), (h, w)
        assert torch.allclose(recon, theirs["recon"], atol=1e-5)
        assert torch.allclose(maps, theirs["maps"], rtol=1e-4, atol=1e-6)
        # at their own size, resized inside the graph: a pixel on a rounding tie may end one grey level apart
        mse = session.run(["mse"], {"images": photos.numpy()})[0]
        assert np.allclose(mse, score_batch(env["model"], photos)["mse"], rtol=2e-4, atol=0), (h, w)


def test_an_onnx_file_given_as_checkpoint_says_what_it_is(env, capsys):
    assert inference_example.main([str(env["photos"]), "--checkpoint", str(env["onnx"])]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exported ONNX graph" in err, err


def test_export_refuses_bad_flags_and_writes_nothing_when_verification_fails(env, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(export.main, ["--checkpoint", str(env["ckpt"]), "--output", str(tmp_path / "model.pt")])
    assert stop.value.code == 2 and "ending in .onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a file where the folder should be: refused before exporting
        run_cli(export.main, ["--checkpoint", str(env["ckpt"]), "--output", str(env["ckpt"] / "model.onnx")])
    assert stop.value.code == 2 and "cannot write" in capsys.readouterr().err
    monkeypatch.setattr(export, "export_graph", lambda model, path, opset: shutil.copy(env["onnx"], path))  # fast
    monkeypatch.setattr(export, "verify", lambda *args: (3e-3, 3e-3))
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as stop:
        run_cli(export.main, ["--checkpoint", str(env["ckpt"]), "--output", str(out)])
    assert stop.value.code == 2 and "differ from PyTorch's by 3.00e-03" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no file, no temp file left
