import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import AutoencoderConfig, ResidualAutoencoder  # noqa: E402

# Tiny enough that CPU tests take milliseconds, with every part of the real network.
TINY = AutoencoderConfig(image_size=32, channels=(8, 8, 16, 16, 16), blocks_per_stage=1, latent_dim=16)


def save_checkpoint(model, path):
    """A checkpoint of `model` as train.py writes its weights and config: what every script loads."""
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, path)
    return path


@pytest.fixture
def tiny_config():
    return TINY


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY).eval()
    # non-trivial BatchNorm statistics so that a loading bug cannot hide behind defaults
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny_batch():
    torch.manual_seed(1)
    return torch.rand(4, 3, 32, 32) * 2 - 1


def run_script(*args, check=True, env=None, timeout=300):
    """Runs a repo script as a user would, returning the CompletedProcess."""
    import os
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_cifar_folder(root, n_train=100, n_test=40, seed=0):
    """A folder in CIFAR-10's python format (cifar-10-batches-py), small, with random pixels
    that have some structure. torchvision reads it; its md5 check cannot pass (the files are not
    the official ones), so tests that load it disable that check."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(n):
        base = rng.integers(0, 256, size=(n, 3, 1, 1))
        ramp = np.linspace(-40, 40, 32)[None, None, None, :]
        return np.clip(base + ramp + rng.normal(0, 10, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)

    per_batch = n_train // 5
    for i in range(5):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": images(per_batch).reshape(per_batch, -1), "labels": [0] * per_batch}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images(n_test).reshape(n_test, -1), "labels": [0] * n_test}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return Path(root)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    return write_cifar_folder(tmp_path / "cifar")
