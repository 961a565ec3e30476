"""Exports the detector to one ONNX file that carries everything a verdict needs:

    pip install -r requirements-export.txt
    python export.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt --output model.onnx
    python inference_example.py photos/ --checkpoint model.onnx --runtime onnx     # or --runtime openvino

The graph takes uint8 RGB images [B, 3, H, W] (any batch size, any H and W), preprocesses them exactly as
data.preprocess does (antialiased resize to the model's size, rounded to 8 bits, scaled to [-1, 1]) and returns
  recon [B, 3, S, S]     the reconstruction, in [-1, 1]
  error_map [B, S, S]    the squared error per pixel, mean over channels
  mse [B]                the card's score
  local [B]              the largest mean error over 16x16 windows
Its metadata (ONNX metadata_props) holds the thresholds file (--thresholds, else the one beside the checkpoint;
none if neither exists), the model config, the preprocessing, the weights' fingerprint and the repo version, so
the file alone reproduces the verdicts and p-values. The complexity score's PNG coding and the coding score are
not in the graph: the runtime computes them as the torch path does. OnnxAutoencoder, below, is that runtime: it runs
the file with ONNX Runtime or OpenVINO for inference_example.py, calibrate.py and Detector (--runtime onnx|openvino).

After writing, the export is verified: ONNX Runtime's scores on --verify-images (default: scikit-image's real
photos when installed, else synthetic images), fed as inference_example.py --runtime onnx feeds them (resized to
the model's size by data.preprocess), must equal the PyTorch path's to --tolerance (relative), or the file is not
written. Fed at their own size, the graph's resize can put a pixel on the other side of a rounding tie: one grey
level at a few pixels, a relative score difference up to ~1e-4 (printed). OpenVINO (--runtime openvino) ignores
the resize's antialiasing: feed it images at the model's size, as the runtime switch does.
"""

import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import thresholds as thresholds_file
from data import PREPROCESSING, ImageReadError, dead_leaves, iter_image_files, preprocess, read_image, to_uint8
from detector import prepare_model, reconstruction_scores, score_batch
from model import AutoencoderConfig, ResidualAutoencoder, config_from_dict, load_model
from utils import ArgumentParser, UserError, atomic_write, check_writable, number, run_cli, weights_fingerprint

ROOT = Path(__file__).resolve().parent
OUTPUTS = ["recon", "error_map", "mse", "local"]


# ---- running it: --runtime onnx | openvino
def onnxruntime_session(path):
    """(metadata, run: uint8 numpy [B, 3, H, W] -> the graph's outputs) with ONNX Runtime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_modelmeta().custom_metadata_map, lambda x: session.run(None, {"images": x})


def openvino_session(path):
    """The same with OpenVINO: in fp32 as the other runtimes (on a CPU with AMX it would pick bf16 by itself),
    with the latency hint (one stream, every core on one batch: about twice its throughput hint on 2 cores)."""
    import openvino
    from openvino.frontend import FrontEndManager

    onnx_reader = FrontEndManager().load_by_framework("onnx")  # only: other readers log noise on a bad file
    model = onnx_reader.convert(onnx_reader.load(str(path)))
    core = openvino.Core()
    info = model.get_rt_info()  # the ONNX metadata_props are its "framework" entries
    meta = {k: v.astype(str) for k, v in info["framework"].items()} if "framework" in info else {}
    request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
                                 ).create_infer_request()
    return meta, lambda x: list(request.infer({0: x}).values())


class OnnxAutoencoder:
    """An exported scoring graph (export.py) run on the CPU by ONNX Runtime ('onnx') or OpenVINO ('openvino'),
    standing in for the autoencoder: uint8 [B, 3, H, W] -> the same (recon, pixel error, mse, local) as
    reconstruction_scores. Its metadata gives the config, the weights fingerprint and the thresholds file."""

    device = torch.device("cpu")

    def __init__(self, path, runtime="onnx"):
        package = "onnxruntime" if runtime == "onnx" else "openvino"
        if not Path(path).is_file():
            raise UserError(f"{path}: not a regular file" if Path(path).exists() else
                            f"ONNX model not found: {path} (write one with export.py)")
        try:
            meta, self.run = (onnxruntime_session if runtime == "onnx" else openvino_session)(path)
        except ImportError:
            raise UserError(f"--runtime {runtime} needs {package}: pip install -r requirements-export.txt") from None
        except Exception as e:  # each runtime raises its own exception types for a missing or malformed file
            raise UserError(f"cannot load ONNX model {path} with {package}: {str(e).strip().splitlines()[0][:200]}") from None
        if "config" not in meta or "weights_fingerprint" not in meta:
            raise UserError(f"{path} was not written by export.py: its metadata has no model config and fingerprint")
        try:
            self.config, self.fingerprint = config_from_dict(AutoencoderConfig, json.loads(meta["config"])), meta["weights_fingerprint"]
            self.thresholds = (thresholds_file.validate(json.loads(meta["thresholds"]), f"{path} (its thresholds)")
                               if meta.get("thresholds") else None)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
            raise UserError(f"{path}: its metadata is not what export.py writes ({e})") from None
        self.check(path)

    def check(self, path):
        """Scores batches of one and three grey images: a graph that does not take uint8 [B, 3, S, S] for any B, or
        does not return export.py's four outputs, at the size and with the finite float scores its metadata
        promises, is refused at load."""
        s = self.config.image_size
        for b in (1, 3):  # two batch sizes: a graph fixed to one would fail later, on a folder's last batch
            try:
                out = self.run(np.full((b, 3, s, s), 128, dtype=np.uint8))
            except Exception as e:  # each runtime raises its own exception types
                raise UserError(f"{path}: its graph does not take uint8 [B, 3, {s}, {s}] images "
                                f"({str(e).strip().splitlines()[0][:160]})") from None
            shapes = [(b, 3, s, s), (b, s, s), (b,), (b,)]
            if len(out) != 4 or any(o.shape != shape or o.dtype != np.float32 for o, shape in zip(out, shapes)) \
                    or not all(np.isfinite(o).all() for o in out):
                raise UserError(f"{path}: its graph does not return export.py's recon, error_map, mse and local "
                                f"(finite float32 of shapes {shapes} for a batch of {b})")

    def __call__(self, images):
        recon, pixel, mse, local = self.run(np.ascontiguousarray(images.cpu().numpy()))
        return tuple(map(torch.from_numpy, (recon, pixel, mse, local)))


# ---- writing it
class ScoringGraph(torch.nn.Module):
    """What the ONNX file computes: preprocessing, the autoencoder and the scores, in one graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):  # uint8 [B, 3, H, W]
        recon, pixel, mse, local = reconstruction_scores(self.model, preprocess(images, self.model.config.image_size))
        return recon, pixel, mse, local


def repo_version():
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def metadata(model, cfg):
    """The metadata_props: plain strings, JSON where structured."""
    return {"config": json.dumps(asdict(model.config)), "weights_fingerprint": weights_fingerprint(model),
            "thresholds": json.dumps(cfg) if cfg else "",
            "preprocessing": f"input uint8 RGB [B, 3, H, W]; {PREPROCESSING}",
            "outputs": ", ".join(OUTPUTS), "repo_version": repo_version(), "exported_with": f"torch {torch.__version__}"}


def export_graph(model, path, opset):
    """Writes the bare graph (no metadata yet) with dynamic batch, height and width."""
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}
    example = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    torch.onnx.export(ScoringGraph(model).eval(), (example,), path, input_names=["images"], output_names=OUTPUTS,
                      dynamic_shapes={"images": dims}, opset_version=opset, dynamo=True, verbose=False)


def verification_images(paths):
    """uint8 [3, H, W] images of several sizes: the given files, else scikit-image's photos, else synthetic ones."""
    if paths:
        images = []
        for path in iter_image_files(paths):
            try:
                images.append(read_image(path))
            except ImageReadError:
                continue  # verification needs images, not a report on the folder
            if len(images) == 16:
                break
        if not images:
            raise UserError(f"--verify-images: no readable images under {', '.join(paths)}")
        return images, f"{len(images)} images under {', '.join(paths)}"
    try:
        from skimage import data as skdata
        photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
        return [torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in photos], "4 photos from scikit-image"
    except ImportError:
        return list(dead_leaves(4, 96, seed=0)) + list(dead_leaves(4, 200, seed=1)), "8 synthetic images (dead leaves)"


def verify(model, onnx_path, images):
    """The largest relative differences between ONNX Runtime's scores and the PyTorch path's over `images`:
    (fed as this repo's runtime feeds them, already resized to the model's size by data.preprocess; fed at their
    own size, resized inside the graph). The second can be larger: the two resizes differ by float rounding, and a
    pixel that lands on a rounding tie ends one grey level apart."""
    runtime, size = OnnxAutoencoder(onnx_path), model.config.image_size
    worst = [0.0, 0.0]
    for image in images:
        for i, x in enumerate((to_uint8(preprocess(image, size)), image.unsqueeze(0))):
            reference, exported = score_batch(model, x), score_batch(runtime, x)
            for name in ("mse", "local"):
                worst[i] = max(worst[i], float(np.abs(exported[name] / reference[name] - 1).max()))
    return worst


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--checkpoint", required=True, help="train.py checkpoint, hub-layout folder or hub repo id (an autoencoder)")
    add("--thresholds", default=None, help="thresholds JSON to embed (default: the one beside the checkpoint, if any)")
    add("--output", default="model.onnx", help="the .onnx file to write")
    add("--opset", type=number(int, 18, 23), default=18, help="ONNX opset (18 or later: the antialiased resize needs it)")
    add("--verify-images", action="append", default=[], help="real images to verify on (files, folders, globs)")
    add("--tolerance", type=number(float, 0), default=1e-5, help="largest relative score difference accepted")
    args = p.parse_args(argv)
    try:
        import onnx
    except ImportError:
        raise UserError("export needs onnx, onnxscript and onnxruntime: pip install -r requirements-export.txt") from None
    if Path(args.output).suffix.lower() != ".onnx" or Path(args.output).is_dir():
        raise UserError(f"--output {args.output}: must be a file name ending in .onnx")
    check_writable(args.output)  # before the export, which takes a while
    model = load_model(args.checkpoint, torch.device("cpu"))
    if not isinstance(model, ResidualAutoencoder):
        raise UserError(f"{args.checkpoint} holds a coding model; export.py exports the autoencoder")
    model = prepare_model(model, torch.device("cpu"))
    beside = thresholds_file.beside(args.checkpoint)  # never the repo's card file: it belongs to no weights
    found = args.thresholds or (str(beside) if beside.is_file() else None)
    cfg = thresholds_file.read(found) if found else None
    images, described = verification_images(args.verify_images)

    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.onnx"
        export_graph(model, bare, args.opset)
        graph = onnx.load(str(bare))
        onnx.helper.set_model_props(graph, metadata(model, cfg))
        onnx.checker.check_model(graph)
        final = Path(tmp) / "model.onnx"
        onnx.save(graph, str(final))
        worst, worst_any_size = verify(model, final, images)
        if worst > args.tolerance:
            raise UserError(f"ONNX Runtime's scores differ from PyTorch's by {worst:.2e} (relative) on {described}, "
                            f"more than --tolerance {args.tolerance:g}: nothing written")
        try:
            atomic_write(args.output, lambda out: shutil.copyfile(final, out))
        except OSError as e:  # a full disk, say
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.1f} MB): uint8 [B, 3, H, W] -> {', '.join(OUTPUTS)}")
    print(f"thresholds inside: {found or 'none (give --thresholds, or calibrate first)'}")
    print(f"verified with ONNX Runtime on {described}: scores within {worst:.1e} (relative) of PyTorch's; "
          f"fed at their own size (resized in the graph), within {worst_any_size:.1e}")


if __name__ == "__main__":
    run_cli(main)
