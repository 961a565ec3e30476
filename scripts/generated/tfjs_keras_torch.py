"""Minimal PyTorch interpreter for TensorFlow.js *layers-model* files (model.json + .bin shards).

Supports exactly the layer types used by the UpscalerJS ESRGAN/RDN/RRDN packages:
InputLayer, Conv2D, Activation(relu/linear), Concatenate(axis=-1), Add, UpSampling2D(nearest),
MultiplyBeta (x*0.2, custom UpscalerJS layer), PixelShuffleNx (tf.depthToSpace NHWC, custom layer).
Weights: float32, float16 or uint8/uint16-quantized (value = q*scale + min), as tfjs decodes them.
Checked against @tensorflow/tfjs itself by verify_port.py. Library module:

    net = KerasGraph('OUT_DIR/node_modules/@upscalerjs/esrgan-slim/models/x4/model.json')
    y = net(x)   # x: float32 [N,H,W,3] in the model's input range -> [N,4H,4W,3]
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F


def load_weights(model_json_path):
    j = json.load(open(model_json_path))
    base = os.path.dirname(model_json_path)
    weights = {}
    for group in j["weightsManifest"]:
        buf = b"".join(open(os.path.join(base, p), "rb").read() for p in group["paths"])
        off = 0
        for w in group["weights"]:
            n = int(np.prod(w["shape"])) if w["shape"] else 1
            q = w.get("quantization")
            if q:
                qdt = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}[q["dtype"]]
                size = np.dtype(qdt).itemsize
                raw = np.frombuffer(buf, dtype=qdt, count=n, offset=off)
                off += n * size
                if q["dtype"] == "float16":
                    arr = raw.astype(np.float32)
                else:
                    arr = raw.astype(np.float32) * np.float32(q["scale"]) + np.float32(q["min"])
            else:
                assert w["dtype"] == "float32", w
                arr = np.frombuffer(buf, dtype=np.float32, count=n, offset=off).copy()
                off += n * 4
            weights[w["name"]] = arr.reshape(w["shape"])
        assert off == len(buf), (off, len(buf))
    return j, weights


class KerasGraph(torch.nn.Module):
    def __init__(self, model_json_path):
        super().__init__()
        j, w = load_weights(model_json_path)
        cfg = j["modelTopology"]["model_config"]["config"]
        self.layers = cfg["layers"]
        self.inputs = [x[0] for x in cfg["input_layers"]]
        self.outputs = [x[0] for x in cfg["output_layers"]]
        self.params = {}
        for l in self.layers:
            if l["class_name"] == "Conv2D":
                name = l["config"]["name"]
                k = torch.from_numpy(w[name + "/kernel"].copy()).permute(3, 2, 0, 1).contiguous()
                b = torch.from_numpy(w[name + "/bias"].copy()) if l["config"]["use_bias"] else None
                self.params[name] = (k, b)

    @torch.no_grad()
    def forward(self, x_nhwc):
        """x_nhwc: float32 tensor [N,H,W,3]; returns [N,H',W',3]."""
        t = {self.inputs[0]: x_nhwc.permute(0, 3, 1, 2).contiguous()}
        for l in self.layers:
            cls, c, name = l["class_name"], l["config"], l["name"]
            if cls == "InputLayer":
                continue
            ins = [t[n[0]] for n in l["inbound_nodes"][0]]
            if cls == "Conv2D":
                k, b = self.params[name]
                assert tuple(c["strides"]) == (1, 1) and tuple(c["dilation_rate"]) == (1, 1)
                kh, kw = c["kernel_size"]
                if c["padding"] == "same":
                    y = F.conv2d(F.pad(ins[0], ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)), k, b)
                else:
                    y = F.conv2d(ins[0], k, b)
                act = c.get("activation", "linear")
                if act == "relu":
                    y = F.relu(y)
                else:
                    assert act == "linear", act
            elif cls == "Activation":
                assert c["activation"] in ("relu", "linear"), c["activation"]
                y = F.relu(ins[0]) if c["activation"] == "relu" else ins[0]
            elif cls == "Concatenate":
                assert c["axis"] in (3, -1)
                y = torch.cat(ins, 1)
            elif cls == "Add":
                y = ins[0]
                for z in ins[1:]:
                    y = y + z
            elif cls == "UpSampling2D":
                assert c.get("interpolation", "nearest") == "nearest"
                y = F.interpolate(ins[0], scale_factor=tuple(c["size"]), mode="nearest")
            elif cls == "MultiplyBeta":
                y = ins[0] * 0.2
            elif cls.startswith("PixelShuffle"):
                s = int(cls[len("PixelShuffle"):-1])
                n, ch, h, wd = ins[0].shape
                cc = ch // (s * s)
                # tf.depthToSpace NHWC: channel index = (i*s + j)*C + c
                y = ins[0].reshape(n, s, s, cc, h, wd).permute(0, 3, 4, 1, 5, 2).reshape(n, cc, h * s, wd * s)
            else:
                raise NotImplementedError(cls)
            t[name] = y
        return t[self.outputs[0]].permute(0, 2, 3, 1).contiguous()
