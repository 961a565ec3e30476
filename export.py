"""Exports the autoencoder to one ONNX file that carries everything a verdict needs, for ONNX runtimes
(ONNX Runtime, OpenVINO, the browser's) outside this repo:

    pip install -r requirements-export.txt
    python export.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt --output model.onnx

The graph maps uint8 RGB [B, 3, H, W] (any batch and size) through data.preprocess and the autoencoder to
recon [B, 3, S, S], error_map [B, S, S] and mse [B]; its metadata holds the thresholds (--thresholds, else the
file beside the checkpoint), the config, the preprocessing, the weights' fingerprint and the repo version. The
file is written only if ONNX Runtime's scores on --verify-images match PyTorch's to --tolerance.
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
from checkpoints import weights_fingerprint
from data import PREPROCESSING, dead_leaves, preprocess, to_uint8
from detector import reconstruction_scores, score_batch
from images import ImageReadError, iter_image_files, read_image
from model import ResidualAutoencoder, load_model, prepare_model
from utils import ArgumentParser, UserError, atomic_write, check_output, number, run_cli

ROOT = Path(__file__).resolve().parent
OUTPUTS = ["recon", "error_map", "mse"]


class ScoringGraph(torch.nn.Module):
    """What the ONNX file computes: uint8 [B, 3, H, W] -> preprocessing, the autoencoder and its scores."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return reconstruction_scores(self.model, preprocess(images, self.model.config.image_size))


def repo_version():
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def metadata(model, cfg):
    """The metadata_props: plain strings, JSON where structured."""
    return {"config": json.dumps(asdict(model.config)), "weights_fingerprint": weights_fingerprint(model),
            "thresholds": json.dumps(cfg) if cfg else "",
            "preprocessing": f"input uint8 RGB [B, 3, H, W]; {PREPROCESSING}", "outputs": ", ".join(OUTPUTS),
            "repo_version": repo_version(), "exported_with": f"torch {torch.__version__}"}


def export_graph(model, path, opset):
    """Writes the bare graph (no metadata yet) with dynamic batch, height and width."""
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    example = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    torch.onnx.export(ScoringGraph(model).eval(), (example,), path, input_names=["images"],
                      output_names=OUTPUTS, dynamic_shapes={"images": dims}, opset_version=opset, dynamo=True,
                      verbose=False)


def verification_images(paths):
    """(uint8 [3, H, W] images of several sizes, their description): up to 16 readable files under `paths`,
    else scikit-image's photos, else synthetic ones. UserError if `paths` holds no readable image."""
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
        return [torch.from_numpy(p.transpose(2, 0, 1).copy()) for p in photos], "4 photos from scikit-image"
    except ImportError:
        return [*dead_leaves(4, 96, seed=0), *dead_leaves(4, 200, seed=1)], "8 synthetic images (dead leaves)"


def verify(model, onnx_path, images):
    """The largest relative mse differences between ONNX Runtime and PyTorch over `images`, fed resized to the
    model's size and at their own size (resized in the graph, where a pixel on a rounding tie can end one grey
    level apart)."""
    import onnxruntime  # here: an optional extra (requirements-export.txt), checked by main
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size, worst = model.config.image_size, [0.0, 0.0]
    for image in images:
        for i, x in enumerate((to_uint8(preprocess(image, size)), image.unsqueeze(0))):
            exported = session.run(["mse"], {"images": x.numpy()})[0]
            worst[i] = max(worst[i], float(np.abs(exported / score_batch(model, x)["mse"] - 1).max()))
    return worst


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--checkpoint", required=True, help="the autoencoder: train.py checkpoint, hub folder or hub repo id")
    add("--thresholds", default=None, help="thresholds to embed (default: the file beside the checkpoint)")
    add("--output", default="model.onnx", help="the .onnx file to write")
    add("--opset", type=number(int, 18, 23), default=18, help="ONNX opset (>= 18 for the antialiased resize)")
    add("--verify-images", action="append", default=[], help="real images to verify on: files, dirs, globs")
    add("--tolerance", type=number(float, 0), default=1e-5, help="largest relative score difference accepted")
    args = p.parse_args(argv)
    try:
        import onnx
        import onnxruntime  # noqa: F401  (verify needs it: fail now, not after the export)
    except ImportError:
        raise UserError("export needs onnx, onnxscript and onnxruntime: "
                        "pip install -r requirements-export.txt") from None
    if Path(args.output).suffix.lower() != ".onnx" or Path(args.output).is_dir():
        raise UserError(f"--output {args.output}: must be a file name ending in .onnx")
    check_output(args.output)  # before the export, which takes a while
    model = load_model(args.checkpoint, torch.device("cpu"))
    if not isinstance(model, ResidualAutoencoder):
        raise UserError(f"{args.checkpoint} holds an artifact detector; export.py exports the autoencoder")
    model = prepare_model(model, torch.device("cpu"))
    cfg, found = thresholds_file.resolve(args.thresholds, args.checkpoint, card=False)  # card: no weights
    images, described = verification_images(args.verify_images)
    with tempfile.TemporaryDirectory() as tmp:
        bare, final = Path(tmp) / "bare.onnx", Path(tmp) / "model.onnx"
        export_graph(model, bare, args.opset)
        graph = onnx.load(str(bare))
        onnx.helper.set_model_props(graph, metadata(model, cfg))
        onnx.checker.check_model(graph)
        onnx.save(graph, str(final))
        worst, worst_any_size = verify(model, final, images)
        if worst > args.tolerance:
            raise UserError(f"ONNX Runtime's scores differ from PyTorch's by {worst:.2e} (relative) on "
                            f"{described}, more than --tolerance {args.tolerance:g}: nothing written")
        try:
            atomic_write(args.output, lambda out: shutil.copyfile(final, out))
        except OSError as e:  # a full disk, say
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.1f} MB): "
          f"uint8 [B, 3, H, W] -> {', '.join(OUTPUTS)}")
    print(f"thresholds inside: {found or 'none (give --thresholds, or calibrate first)'}")
    print(f"verified with ONNX Runtime on {described}: scores within {worst:.1e} (relative) of PyTorch's; "
          f"fed at their own size (resized in the graph), within {worst_any_size:.1e}")


if __name__ == "__main__":
    run_cli(main)
