"""export.py and --runtime onnx / openvino: the exported graph scores as PyTorch does on real photos of any size and batch,
carries its thresholds, config, preprocessing and fingerprint, and runs through the same CLIs with the same rows."""

import csv
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
from data import dead_leaves, preprocess, to_uint8
from detector import Detector, score_batch
from runtimes import OnnxAutoencoder
from model import ResidualAutoencoder
from utils import run_cli
from checkpoints import weights_fingerprint
from tests.conftest import TINY, run_script, save_checkpoint

onnx = pytest.importorskip("onnx", reason="the export extra is not installed (pip install -r requirements-export.txt)")
pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -r requirements-export.txt)")
pytest.importorskip("openvino", reason="the export extra is not installed (pip install -r requirements-export.txt)")
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


@pytest.mark.parametrize("name, batch", [("onnx", 1), ("onnx", 3), ("openvino", 3)])
def test_exported_scores_equal_torch_on_real_photos_of_any_size_and_batch(env, name, batch):
    runtime, size = OnnxAutoencoder(env["onnx"], name), TINY.image_size
    for h, w in ((512, 512), (300, 451), (40, 33), (size, size)):  # non-square, and near the model's input size
        photos = torch.stack([torch.from_numpy(np.array(Image.fromarray(getattr(skdata, n)()).resize((w, h))))
                              .permute(2, 0, 1) for n in PHOTOS[:batch]])  # uint8 [B, 3, h, w]
        resized = to_uint8(preprocess(photos, size))  # as the runtime switch feeds the graph: exact
        ours, theirs = score_batch(runtime, resized, keep_maps=True), score_batch(env["model"], resized, keep_maps=True)
        for name in ("mse",):
            assert np.allclose(ours[name], theirs[name], rtol=1e-5, atol=0), (h, w, name)
        assert torch.allclose(ours["recon"], theirs["recon"], atol=1e-5)
        assert torch.allclose(ours["maps"], theirs["maps"], rtol=1e-4, atol=1e-6)
        # at their own size, resized inside the graph: a pixel on a rounding tie may end one grey level apart.
        # Not OpenVINO: it ignores the resize's antialias attribute (--runtime openvino feeds resized images)
        if name == "onnx":
            ours, theirs = score_batch(runtime, photos), score_batch(env["model"], photos)
            assert np.allclose(ours["mse"], theirs["mse"], rtol=2e-4, atol=0), (h, w)


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_inference_cli_gives_the_same_rows_and_status_with_either_runtime(env):
    rows = {}
    for runtime, ckpt in (("torch", env["ckpt"]), ("onnx", env["onnx"]), ("openvino", env["onnx"])):
        out = env["root"] / f"results_{runtime}.csv"
        proc = run_script("inference_example.py", env["photos"], "--checkpoint", ckpt, "--runtime", runtime,
                          "--thresholds", env["thresholds"], "--score", "combined", "--output", out, "--workers", "1",
                          check=False)
        assert proc.returncode == 1, proc.stderr  # the corrupt file
        rows[runtime] = read_csv(out)
    for exported in ("onnx", "openvino"):
        assert rows["torch"].keys() == rows[exported].keys() and len(rows[exported]) == len(PHOTOS) + 1
        for path, row in rows[exported].items():
            other = rows["torch"][path]
            assert (row["verdict"], row["error"]) == (other["verdict"], other["error"])
            for name in ("mse", "complexity", "p_value"):
                assert (row[name] == other[name] == "") or float(row[name]) == pytest.approx(float(other[name]), rel=1e-5)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_runtimes_use_the_thresholds_inside_the_file(env, runtime):
    exported = Detector(env["onnx"], runtime=runtime, score="combined", workers=0)
    from_file = Detector(env["ckpt"], env["thresholds"], score="combined", workers=0)
    assert exported.thresholds_source == f"exported inside {env['onnx']}" and exported.warnings == []
    assert exported.threshold == from_file.threshold
    ours, theirs = exported.score([env["photos"]]), from_file.score([env["photos"]])
    assert [r.get("p_value") for r in ours] == pytest.approx([r.get("p_value") for r in theirs], rel=1e-5)


def test_a_calibration_beside_the_onnx_file_comes_before_the_exported_one(env, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(env["onnx"], model)
    beside = tmp_path / "thresholds_calibrated.json"
    beside.write_text(json.dumps({"reconstruction_thresholds": {"thresholds": {"balanced": {"value": 0.125}}}}))
    det = Detector(model, runtime="onnx", workers=0)
    assert det.thresholds_source == str(beside) and det.threshold == 0.125


def test_calibrate_with_the_onnx_runtime_writes_the_same_thresholds(env):
    out = env["root"] / "onnx" / "thresholds.json"
    calibrate.main(["--checkpoint", str(env["onnx"]), "--runtime", "onnx", "--real-dir", str(env["real"]), "--num-noise",
                    "100", "--hard-fakes", "none", "--bootstrap", "0", "--no-progress", "--workers", "0", "--holdout-fraction", "0.2",
                    "--output", str(out)])
    ours, theirs = json.loads(out.read_text()), json.loads(env["thresholds"].read_text())
    assert ours["binding"]["weights_fingerprint"] == theirs["binding"]["weights_fingerprint"]  # bound to the same weights
    for name, entry in theirs["reconstruction_thresholds"]["thresholds"].items():
        assert ours["reconstruction_thresholds"]["thresholds"][name]["value"] == pytest.approx(entry["value"], rel=1e-5)


def test_an_onnx_file_without_runtime_says_which_runtime_reads_it(env, capsys):
    assert inference_example.main([str(env["photos"]), "--checkpoint", str(env["onnx"])]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "score it with --runtime onnx or --runtime openvino" in err, err


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_a_pytorch_checkpoint_under_an_exported_runtime_says_to_export_it(env, capsys, runtime):
    status = inference_example.main([str(env["photos"]), "--checkpoint", str(env["ckpt"]), "--runtime", runtime])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "export the weights first" in err, err


def test_the_page_scores_uploads_with_an_exported_runtime(env):
    import app

    detectors = app.load_detectors(app.parse_args(["--checkpoint", str(env["onnx"]), "--runtime", "onnx"]))
    assert detectors["mse"].thresholds_source.startswith("exported inside")
    page = app.score_uploads(detectors, [str(env["photos"] / "chelsea.jpg")], "mse", "balanced")
    expected = Detector(env["ckpt"], env["thresholds"]).score([str(env["photos"] / "chelsea.jpg")])[0]["verdict"]
    assert f'data-verdict="{expected}"' in page and "data:image/png;base64," in page


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("case", ["not onnx", "no metadata", "missing", "cuda", "two outputs", "other size",
                                  "batch of two only", "metadata nested too deep"])
def test_bad_onnx_inputs_are_one_line(env, tmp_path, capsys, case, runtime):
    path = tmp_path / "model.onnx"
    if case == "not onnx":
        path.write_bytes(b"not a protobuf at all")
    elif case == "no metadata":
        graph = onnx.load(str(env["onnx"]))
        del graph.metadata_props[:]
        onnx.save(graph, str(path))
    elif case == "cuda":
        path = env["onnx"]
    elif case == "batch of two only":  # right outputs for a batch of 2, and only for that
        meta = {p.key: p.value for p in onnx.load(str(env["onnx"])).metadata_props}
        s, h = TINY.image_size, onnx.helper
        const = [h.make_node("Constant", [], [n], value=onnx.numpy_helper.from_array(np.full(shape, 0.1, np.float32), n))
                 for n, shape in (("recon", (2, 3, s, s)), ("error_map", (2, s, s)), ("mse", (2,)))]
        graph = h.make_graph(const, "fixed", [h.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["B", 3, s, s])],
                             [h.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in const])
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
        model.ir_version = 9
        h.set_model_props(model, meta)
        onnx.save(model, str(path))
    elif case == "metadata nested too deep":  # json.loads raises RecursionError, which is no ValueError
        graph = onnx.load(str(env["onnx"]))
        next(p for p in graph.metadata_props if p.key == "thresholds").value = "[" * 100000 + "]" * 100000
        onnx.save(graph, str(path))
    elif case != "missing":  # a graph whose outputs, or whose size, differ from what its metadata promises
        graph = onnx.load(str(env["onnx"]))
        if case == "two outputs":
            del graph.graph.output[2]
        else:
            config = next(p for p in graph.metadata_props if p.key == "config")
            config.value = json.dumps({**json.loads(config.value), "image_size": 2 * TINY.image_size})
        onnx.save(graph, str(path))
    try:  # in this process: no interpreter start-up
        status = inference_example.main([str(env["photos"]), "--checkpoint", str(path), "--runtime", runtime,
                                         *(["--device", "cuda"] if case == "cuda" else [])])
    except SystemExit as stop:  # a usage error, from argparse
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert {"not onnx": "cannot load ONNX model", "no metadata": "not written by export.py", "missing": "not found",
            "cuda": f"--runtime {runtime} runs on the CPU", "two outputs": "does not return export.py's",
            "other size": "does not return export.py's", "batch of two only": "does not return export.py's",
            "metadata nested too deep": "its metadata is not what export.py writes"}[case] in err


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
