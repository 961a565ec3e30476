import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import AutoencoderConfig, ResidualAutoencoder  # noqa: E402

# Tiny enough that CPU tests take milliseconds, with every part of the real network.
TINY = AutoencoderConfig(image_size=32, channels=(8, 8, 16, 16, 16), blocks_per_stage=1, latent_dim=16)


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
