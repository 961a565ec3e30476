"""
The residual convolutional autoencoder of the card, and how its weights are saved
and loaded.

    python model.py                      # summary: stage shapes, parameters, GFLOPs
    python model.py --write-config       # regenerate the top-level config.json

Loading, as in the card's quick start:

    from model import load_model
    model = load_model("runs/cifar10/model_best_checkpoint.ckpt", device)
    errors = model.reconstruction_error(x, reduction="none")   # [B]

`load_model` accepts a training checkpoint written by train.py (.ckpt / .pt), a
directory in the Hugging Face hub layout (config.json + model.safetensors), or a
hub repo id ("user/name" or "user/name@revision").
"""

import argparse
import hashlib
import json
import os
import pickle
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURE = "ResidualAutoencoder"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


@dataclass
class AutoencoderConfig:
    image_size: int = 128  # square input, H = W
    in_channels: int = 3
    channels: tuple = (64, 128, 256, 384, 512)  # one entry per down / up stage
    blocks_per_stage: int = 1  # residual blocks after each down / before each up
    latent_dim: int = 512

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives lists
        if self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channels)}")

    @property
    def bottleneck_size(self):
        return self.image_size // 2 ** len(self.channels)  # 128 / 32 = 4

    def to_dict(self):
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"architecture"})
        if unknown:
            raise CheckpointError(f"unknown config keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def conv_bn_relu(conv):
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU (the basic ResNet block)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


class ResidualAutoencoder(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or AutoencoderConfig()
        c, n = config.channels, config.blocks_per_stage
        s = config.bottleneck_size

        self.stem = conv_bn_relu(nn.Conv2d(config.in_channels, c[0], 3, padding=1, bias=False))
        # each stage halves the resolution: 128 -> 64 -> 32 -> 16 -> 8 -> 4
        c_in = (c[0],) + c[:-1]
        self.down = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(nn.Conv2d(ci, co, 3, stride=2, padding=1, bias=False)),
                *[ResidualBlock(co) for _ in range(n)],
            )
            for ci, co in zip(c_in, c)
        )
        self.to_latent = nn.Linear(c[-1] * s * s, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, c[-1] * s * s)
        # the decoder mirrors the encoder: 4 -> 8 -> 16 -> 32 -> 64 -> 128
        self.up = nn.ModuleList(
            nn.Sequential(
                *[ResidualBlock(ci) for _ in range(n)],
                conv_bn_relu(nn.ConvTranspose2d(ci, co, 4, stride=2, padding=1, bias=False)),
            )
            for ci, co in zip(reversed(c), reversed(c_in))
        )
        self.head = nn.Conv2d(c[0], config.in_channels, 3, padding=1)

    def check_input(self, x):
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a batch of shape [B, {', '.join(map(str, expected))}], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"expected a float tensor normalized to [-1, 1], got {x.dtype}; use data.preprocess")

    def encode(self, x):
        self.check_input(x)
        h = self.stem(x)  # [B, c0, 128, 128]
        for stage in self.down:
            h = stage(h)  # [B, c_i, H/2, W/2]
        return self.to_latent(h.flatten(1))  # [B, latent_dim]

    def decode(self, z):
        s = self.config.bottleneck_size
        h = F.relu(self.from_latent(z)).view(z.shape[0], self.config.channels[-1], s, s)  # [B, c4, 4, 4]
        h = h.contiguous(memory_format=torch.channels_last) if self.is_channels_last() else h
        for stage in self.up:
            h = stage(h)  # [B, c_{i-1}, 2H, 2W]
        return torch.tanh(self.head(h))  # [B, 3, 128, 128] in [-1, 1]

    def forward(self, x):
        return self.decode(self.encode(x))

    def is_channels_last(self):
        return self.head.weight.is_contiguous(memory_format=torch.channels_last)

    def reconstruction_error(self, x, reduction="none"):
        """Squared reconstruction error, always in fp32.

        reduction: 'none' -> [B] per-image MSE (the card's score), 'mean' -> scalar,
        'pixel' -> [B, H, W] per-pixel error averaged over channels (heatmaps).
        """
        if reduction not in ("none", "mean", "pixel"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'pixel', got {reduction!r}")
        sq = (self(x).float() - x.float()).pow(2)  # [B, 3, H, W]
        if reduction == "pixel":
            return sq.mean(dim=1)
        per_image = sq.flatten(1).mean(dim=1)
        return per_image.mean() if reduction == "mean" else per_image


def autocast(device):
    """The precision policy everywhere: bf16 autocast on CUDA; fp32 on CPU (the CPUs we
    target have no fast bf16). Errors and losses are always taken in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision_name(device):
    return "bf16 autocast, scores in fp32" if device.type == "cuda" else "fp32"


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------
# saving

def clean_state_dict(state_dict):
    """Strips the prefixes DDP ('module.') and torch.compile ('_orig_mod.') add."""
    pattern = re.compile(r"^((module|_orig_mod)\.)+")
    return {pattern.sub("", k): v for k, v in state_dict.items()}


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def weights_fingerprint(model_or_state_dict):
    """sha256 over parameter names, dtypes, shapes and bytes: identical for the same
    weights whatever file format they came from, so thresholds can be bound to them."""
    sd = model_or_state_dict
    if isinstance(sd, nn.Module):
        sd = unwrap(sd).state_dict()
    h = hashlib.sha256()
    for name, t in sorted(clean_state_dict(sd).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path, write_fn):
    """Writes through a temp file in the same directory, then renames: a crash
    at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    atomic_write(path, write)


def config_json(config):
    return {"architecture": ARCHITECTURE, **config.to_dict()}


MODEL_CARD = """---
license: mit
library_name: pytorch
pipeline_tag: image-feature-extraction
tags: [pytorch, autoencoder, deepfake-detection, anomaly-detection, cifar10]
datasets: [cifar10]
metrics: [mse]
---
# Residual Convolutional Autoencoder for Deepfake Detection

A {n_stages}-stage residual convolutional autoencoder ({size}x{size} RGB input, latent
dimension {latent}, Tanh output in [-1, 1], {params:,} parameters). Its per-image
reconstruction error (MSE on inputs normalized with mean 0.5 / std 0.5) is an
anomaly score: images unlike the training data reconstruct worse. It is not a
trained deepfake classifier; see the repository README for what it misses.

Weights fingerprint (sha256 over tensors): `{fingerprint}`

```python
from model import load_model
model = load_model("{repo}", device)
errors = model.reconstruction_error(x, reduction="none")  # one MSE per image
```
"""


def save_pretrained(model, directory, repo_id="path/to/this/folder"):
    """Hub layout: model.safetensors + config.json + README.md (model card)."""
    from safetensors.torch import save_file

    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous tensors, which channels_last weights are
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, config_json(model.config))
    card = MODEL_CARD.format(
        n_stages=len(model.config.channels), size=model.config.image_size, latent=model.config.latent_dim,
        params=count_parameters(model), fingerprint=weights_fingerprint(tensors), repo=repo_id)
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return directory


def push_to_hub(directory, repo_id, private=False, token=None, commit_message="Upload autoencoder"):
    """Uploads a save_pretrained folder (and any thresholds file in it) with huggingface_hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)


# ----------------------------------------------------------------------------
# loading

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def load_checkpoint_dict(path):
    """torch.load(weights_only=True) with one-line errors: tensors and plain data only,
    so a checkpoint can never run code while loading."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused to load: it pickles {unsafe.group(1)}, an object other than tensors "
                f"and plain data, which could run code") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line.split("error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line), "")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or not written by "
                              f"torch.save{': ' + detail[:120] if detail else ''})") from None
    except Exception as e:  # garbage bytes make the unpickler fail in many ways (IndexError, EOFError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this repo (holds a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def read_torch_checkpoint(path):
    """Returns (state_dict, config dict or None) from a torch.save file."""
    ckpt = load_checkpoint_dict(path)
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key], ckpt.get("config")
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt, None  # a bare state_dict
    raise CheckpointError(f"{path}: no model weights inside (keys: {sorted(map(str, ckpt))[:8]})")


def read_hub_folder(directory, weights_name=WEIGHTS_NAME):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_path = directory / weights_name, directory / CONFIG_NAME
    for p in (weights, config_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: hub-layout folder lacks {p.name}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    return state_dict, config


def download_from_hub(repo_ref):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = repo_ref.partition("@")
    try:
        return snapshot_download(repo_id, revision=revision or None, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "*.json"])
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"could not fetch {repo_ref!r} from the Hugging Face hub ({first[:200]})") from None


def resolve_source(source):
    """Returns (state_dict, config dict or None) for any source load_model accepts."""
    path = Path(source)
    if path.is_dir():
        return read_hub_folder(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return read_hub_folder(path.parent, path.name)
        return read_torch_checkpoint(path)
    local_looking = str(source).endswith((".ckpt", ".pt", ".pth", ".safetensors")) or Path(path.parts[0]).exists()
    if REPO_ID.match(str(source)) and not local_looking:  # e.g. runs/cifar10 with runs/ here is a missing path
        return read_hub_folder(download_from_hub(str(source)))
    raise CheckpointError(f"checkpoint not found: {source}")


def check_compatible(model, state_dict, source):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (file vs model), e.g. {'; '.join(mismatched[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{source}: weights do not fit the architecture: {' | '.join(parts)}")


def load_model(source, device="cpu", config=None):
    """Model in eval mode on `device`, loaded strictly from a checkpoint, folder or hub id.

    The architecture comes from the config stored with the weights; pass `config`
    only for bare state_dicts that carry none."""
    state_dict, stored_config = resolve_source(source)
    if stored_config is not None:
        if isinstance(stored_config, dict) and stored_config.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise CheckpointError(f"{source}: architecture {stored_config['architecture']!r} is not {ARCHITECTURE!r}")
        try:
            config = AutoencoderConfig.from_dict(stored_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad model config ({e})") from None
    model = ResidualAutoencoder(config or AutoencoderConfig())
    state_dict = clean_state_dict(state_dict)
    check_compatible(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------
# summary

def summarize(config, batch_size=1):
    from torch.utils.flop_counter import FlopCounterMode

    model = ResidualAutoencoder(config).eval()
    x = torch.zeros(batch_size, config.in_channels, config.image_size, config.image_size)
    rows = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: rows.append((name, tuple(o.shape), count_parameters(m))))
             for name, m in [("stem", model.stem)]
             + [(f"down{i + 1}", m) for i, m in enumerate(model.down)]
             + [("to_latent", model.to_latent), ("from_latent", model.from_latent)]
             + [(f"up{i + 1}", m) for i, m in enumerate(model.up)] + [("head", model.head)]]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    for h in hooks:
        h.remove()
    gflops = counter.get_total_flops() / batch_size / 1e9
    return model, rows, gflops


def forward_gflops(config):
    return summarize(config)[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--write-config", nargs="?", const="config.json", default=None, metavar="PATH",
                        help="write the default architecture to PATH (config.json when no PATH) and exit")
    args = parser.parse_args()
    config = AutoencoderConfig()
    if args.write_config:
        write_json(args.write_config, config_json(config))
        print(f"wrote {args.write_config}")
        return
    model, rows, gflops = summarize(config)
    print(f"{ARCHITECTURE}: {config}")
    print(f"{'layer':<12} {'output shape':<22} parameters")
    for name, shape, params in rows:
        print(f"{name:<12} {str(list(shape)):<22} {params:>10,}")
    print(f"parameters: {count_parameters(model):,} (card: 34,849,667)")
    print(f"forward GFLOPs per image: {gflops:.3f} (multiply-add = 2 FLOPs)")


if __name__ == "__main__":
    main()
