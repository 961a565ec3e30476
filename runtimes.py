"""--runtime onnx|openvino: export.py's graph run by ONNX Runtime or OpenVINO (requirements-export.txt)."""

import json
from pathlib import Path

import numpy as np
import torch

import thresholds as thresholds_file
from model import AutoencoderConfig, config_from_dict
from utils import UserError


def onnxruntime_session(path):
    """(metadata, run: uint8 numpy [B, 3, H, W] -> the graph's outputs) with ONNX Runtime's CPU provider."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_modelmeta().custom_metadata_map, lambda x: session.run(None, {"images": x})


def openvino_session(path):
    """The same with OpenVINO: in fp32 like the others (not bf16 on AMX CPUs), with the latency hint."""
    import openvino
    from openvino.frontend import FrontEndManager
    onnx_reader = FrontEndManager().load_by_framework("onnx")  # only: others log noise on a bad file
    model = onnx_reader.convert(onnx_reader.load(str(path)))
    core = openvino.Core()
    info = model.get_rt_info()  # the ONNX metadata_props are its "framework" entries
    meta = {k: v.astype(str) for k, v in info["framework"].items()} if "framework" in info else {}
    hints = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    request = core.compile_model(model, "CPU", hints).create_infer_request()
    return meta, lambda x: list(request.infer({0: x}).values())


class OnnxAutoencoder:
    """export.py's graph on ONNX Runtime or OpenVINO in the autoencoder's place: uint8 [B, 3, H, W] -> (recon,
    pixel error, mse) as detector.reconstruction_scores; config, fingerprint, thresholds from its metadata."""

    device = torch.device("cpu")

    def __init__(self, path, runtime="onnx"):
        package = "onnxruntime" if runtime == "onnx" else "openvino"
        if not Path(path).is_file():
            raise UserError(f"{path}: not a regular file" if Path(path).exists() else
                            f"ONNX model not found: {path} (write one with export.py)")
        try:
            meta, self.run = (onnxruntime_session if runtime == "onnx" else openvino_session)(path)
        except ImportError:
            raise UserError(f"--runtime {runtime} needs {package}: "
                            f"pip install -r requirements-export.txt") from None
        except Exception as e:  # each runtime raises its own exception types
            hint = "" if Path(path).suffix == ".onnx" else (
                "; it is not an .onnx file: export the weights first (python export.py --checkpoint "
                f"{path} --output model.onnx), or use --runtime torch")
            raise UserError(f"cannot load ONNX model {path} with {package}: "
                            f"{str(e).strip().splitlines()[0][:200]}{hint}") from None
        if "config" not in meta or "weights_fingerprint" not in meta:
            raise UserError(f"{path} was not written by export.py: "
                            f"its metadata has no model config and fingerprint")
        try:
            self.config = config_from_dict(AutoencoderConfig, json.loads(meta["config"]))
            self.fingerprint = meta["weights_fingerprint"]
            raw, where = meta.get("thresholds"), f"{path} (its thresholds)"
            self.thresholds = thresholds_file.validate(json.loads(raw), where) if raw else None
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
            raise UserError(f"{path}: its metadata is not what export.py writes ({e})") from None
        self.check(path)

    def check(self, path):
        """UserError unless the graph takes uint8 [B, 3, S, S] grey images (B = 1, 3) and returns export.py's
        recon, error map and mse: finite float32 at the metadata's size S."""
        s = self.config.image_size
        for b in (1, 3):  # two batch sizes: a graph fixed to one would fail later, on a folder's last batch
            try:
                out = self.run(np.full((b, 3, s, s), 128, dtype=np.uint8))
            except Exception as e:  # each runtime raises its own exception types
                raise UserError(f"{path}: its graph does not take uint8 [B, 3, {s}, {s}] images "
                                f"({str(e).strip().splitlines()[0][:160]})") from None
            shapes = [(b, 3, s, s), (b, s, s), (b,)]
            bad = len(out) != 3 or any(o.shape != sh or o.dtype != np.float32 for o, sh in zip(out, shapes))
            if bad or not all(np.isfinite(o).all() for o in out):
                raise UserError(f"{path}: its graph does not return export.py's recon, error_map and mse "
                                f"(finite float32 of shapes {shapes} for a batch of {b})")

    def __call__(self, images):
        return tuple(map(torch.from_numpy, self.run(np.ascontiguousarray(images.cpu().numpy()))))
