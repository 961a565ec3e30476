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
not in the graph: the runtime computes them as the torch path does.

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
from detector import OnnxAutoencoder, prepare_model, reconstruction_scores, score_batch
from model import ResidualAutoencoder, load_model
from utils import ArgumentParser, UserError, atomic_write, check_writable, number, run_cli, weights_fingerprint

ROOT = Path(__file__).resolve().parent
OUTPUTS = ["recon", "error_map", "mse", "local"]


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
