"""GPU paths. Skipped (and reported as skipped) where no CUDA device is present; the
rest of the suite covers the same code on the CPU."""
import pytest
import torch

from data import dead_leaves, preprocess
from detector import score_batch
from model import ResidualAutoencoder, prepare_model
from tests.conftest import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """These tests (and train.main) set process-wide flags: later tests in this worker must not inherit them."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_bf16_channels_last_scores_stay_within_one_percent_of_fp32():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    torch.manual_seed(0)
    model = ResidualAutoencoder(TINY).cuda().eval()
    x = preprocess(dead_leaves(64, 32, seed=4).cuda(), 32)
    with torch.no_grad():
        reference = model.reconstruction_error(x, reduction="none").double().cpu().numpy()
    fast = score_batch(prepare_model(model, torch.device("cuda")), x)["mse"]
    assert abs(fast / reference - 1).max() < 0.01


def test_training_runs_on_cuda(tmp_path):
    import train

    train.main(["--image-size", "32", "--channels", "8,8,16,16,16", "--latent-dim", "16", "--batch-size", "16",
                "--dataset", "synthetic", "--synthetic-images", "300", "--epochs", "2", "--no-progress",
                "--out-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "model_best_checkpoint.ckpt").exists()
