import json
import os
import subprocess
import sys

import pytest
import torch
from dataclasses import asdict

from model import AutoencoderConfig, ResidualAutoencoder, count_parameters, load_model
from tests.conftest import ROOT
from utils import UserError
from checkpoints import weights_fingerprint

CARD_PARAMS = 34_849_667


def test_default_model_matches_the_card():
    model = ResidualAutoencoder().eval()
    n = count_parameters(model)
    assert abs(n - CARD_PARAMS) / CARD_PARAMS < 0.01
    assert n == 34_757_507  # the figure the README states
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z)
    assert z.shape == (2, 512)
    assert y.shape == (2, 3, 128, 128)
    assert y.min() >= -1 and y.max() <= 1


def test_reconstruction_error_reductions(tiny_model, tiny_batch):
    with torch.no_grad():
        per_image = tiny_model.reconstruction_error(tiny_batch, reduction="none")
        mean = tiny_model.reconstruction_error(tiny_batch, reduction="mean")
        pixel = tiny_model.reconstruction_error(tiny_batch, reduction="pixel")
        manual = ((tiny_model(tiny_batch) - tiny_batch) ** 2).mean(dim=(1, 2, 3))
    assert per_image.shape == (4,) and pixel.shape == (4, 32, 32) and mean.shape == ()
    torch.testing.assert_close(per_image, manual)
    torch.testing.assert_close(pixel.mean(dim=(1, 2)), per_image)
    torch.testing.assert_close(mean, per_image.mean())
    assert per_image.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 32, 32), r"float batch \[B, 3, 32, 32\]"),
    (torch.zeros(1, 1, 32, 32), r"got \(1, 1, 32, 32\)"),
    (torch.zeros(1, 3, 64, 64), r"got \(1, 3, 64, 64\)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"got \(1, 3, 32, 32\) torch.uint8"),
])
def test_bad_inputs_raise_value_error(tiny_model, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.reconstruction_error(bad)


def test_unknown_reduction(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="reduction"):
        tiny_model.reconstruction_error(tiny_batch, reduction="sum")


def scores(model, x):
    with torch.no_grad():
        return model.reconstruction_error(x, reduction="none")


def test_round_trip_training_checkpoint(tiny_model, tiny_batch, tmp_path):
    path = tmp_path / "model_best_checkpoint.ckpt"
    torch.save({"model": tiny_model.state_dict(), "config": asdict(tiny_model.config), "epoch": 3}, path)
    loaded = load_model(str(path), "cpu")  # the card's call
    assert not loaded.training
    assert torch.equal(scores(loaded, tiny_batch), scores(tiny_model, tiny_batch))


def test_round_trip_hub_folder_and_safetensors_file(tiny_model, tiny_batch, tmp_path):
    folder = tmp_path / "export"
    tiny_model.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    for source in (folder, folder / "model.safetensors"):
        loaded = load_model(source, "cpu")
        assert torch.equal(scores(loaded, tiny_batch), scores(tiny_model, tiny_batch))
    assert weights_fingerprint(load_model(folder)) == weights_fingerprint(tiny_model)


def test_save_pretrained_accepts_channels_last(tiny_model, tiny_batch, tmp_path):
    tiny_model = tiny_model.to(memory_format=torch.channels_last)
    tiny_model.save_pretrained(tmp_path / "cl")
    loaded = load_model(tmp_path / "cl")
    assert torch.equal(scores(loaded, tiny_batch), scores(tiny_model, tiny_batch))


def test_round_trip_hub_repo_id(tiny_model, tiny_batch, tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    tiny_model.save_pretrained(folder)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(folder)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_model("someone/autoencoder@v1.0", "cpu")
    assert calls == [("someone/autoencoder", "v1.0")]
    assert torch.equal(scores(loaded, tiny_batch), scores(tiny_model, tiny_batch))


def test_prefixed_keys_from_ddp_and_compile_are_stripped(tiny_model, tiny_batch, tmp_path):
    sd = {f"module._orig_mod.{k}": v for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "prefixed.pt"
    torch.save({"model_state_dict": sd, "config": asdict(tiny_model.config)}, path)
    assert torch.equal(scores(load_model(path), tiny_batch), scores(tiny_model, tiny_batch))


def test_named_safetensors_file_loads_that_file(tiny_model, tiny_batch, tmp_path):
    folder = tmp_path / "export"
    tiny_model.save_pretrained(folder)
    other = ResidualAutoencoder(tiny_model.config).eval()
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(folder / "v2.safetensors")
    assert torch.equal(scores(load_model(folder / "v2.safetensors"), tiny_batch), scores(other, tiny_batch))


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="checkpoint not found: runs/cifar10"):
        load_model("runs/cifar10")


def test_saved_files_get_normal_permissions(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "export"
        tiny_model.save_pretrained(folder)
    finally:
        os.umask(old)
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in folder.iterdir())


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "nope.ckpt")


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_model(path)


def test_checkpoint_of_another_architecture_names_the_mismatch(tiny_model, tmp_path):
    other = ResidualAutoencoder(AutoencoderConfig(image_size=32, channels=(8, 8, 16, 16, 32), latent_dim=16))
    path = tmp_path / "other.ckpt"
    torch.save({"model": other.state_dict()}, path)  # no config: the tiny config is forced on it
    with pytest.raises(UserError, match=r"weights do not fit the architecture: size mismatch for down\.4") as err:
        load_model(path, config=tiny_model.config)
    assert "\n" not in str(err.value)

    sd = dict(tiny_model.state_dict())
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd, "config": asdict(tiny_model.config)}, path)
    with pytest.raises(UserError, match=r'Missing key.*"head\.bias".*Unexpected key.*"extra\.weight"'):
        load_model(path)


class Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tiny_model, tmp_path):
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"model": tiny_model.state_dict(), "hook": Payload(victim)}, path)
    with pytest.raises(UserError, match="refused to load"):
        load_model(path)
    assert not victim.exists()
    # control: the payload is real -- what an unpickler would call does write the file
    control = tmp_path / "control.txt"
    function, args = Payload(control).__reduce__()
    function(*args)
    assert control.read_text() == "pwned"


def test_hub_folder_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="lacks model.safetensors"):
        load_model(tmp_path)


def test_corrupt_safetensors(tiny_model, tmp_path):
    folder = tmp_path / "export"
    tiny_model.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable model.safetensors"):
        load_model(folder)


def test_push_to_hub_uploads_the_hub_layout(tiny_model, tmp_path, monkeypatch):
    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            seen["create"] = (repo_id, exist_ok)
            return type("Repo", (), {"repo_id": repo_id})

        def upload_folder(self, repo_id, folder_path, **kwargs):
            seen["upload"] = (repo_id, sorted(os.listdir(folder_path)))
            seen["loads"] = torch.equal(scores(load_model(folder_path), torch.zeros(1, 3, 32, 32)),
                                        scores(tiny_model, torch.zeros(1, 3, 32, 32)))
            return "ok"

    import huggingface_hub.hub_mixin
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    assert tiny_model.push_to_hub("me/detector", token="t") == "ok"
    assert seen["token"] == "t" and seen["create"] == ("me/detector", True)
    assert seen["upload"] == ("me/detector", ["README.md", "config.json", "model.safetensors"]) and seen["loads"]


def test_config_json_matches_dataclass_defaults(tmp_path):
    on_disk = json.loads((ROOT / "config.json").read_text())
    assert AutoencoderConfig.from_dict(on_disk) == AutoencoderConfig()
    ResidualAutoencoder().save_pretrained(tmp_path)  # what the hub layout holds: the same
    assert json.loads((tmp_path / "config.json").read_text()) == on_disk


@pytest.mark.parametrize("config, fragment", [
    ({"channels": []}, "1 to 8 channel stages"),
    ({"latent_dim": -1}, "positive integers"),
    ({"latent_dim": 10 ** 12}, "too large"),
    ({"channels": [64, 2 ** 20, 8, 8, 8]}, "too large"),
    ({"image_size": "128"}, "positive integers"),
    ({"image_size": 100}, "not divisible"),
    ({"blocks": 2}, "expected a JSON object with keys"),
])
def test_hostile_config_is_refused_before_any_layer_is_built(tiny_model, tmp_path, config, fragment):
    path = tmp_path / "hostile.ckpt"
    torch.save({"model": tiny_model.state_dict(), "config": {**asdict(tiny_model.config), **config}}, path)
    with pytest.raises(UserError, match="bad model config") as err:
        load_model(path)
    assert fragment in str(err.value)


def test_non_tensor_values_in_a_state_dict_are_named(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd["head.bias"] = [0.0, 0.0, 0.0]
    path = tmp_path / "odd.ckpt"
    torch.save({"model": sd, "config": asdict(tiny_model.config)}, path)
    with pytest.raises(UserError, match=r'weights do not fit.*"head.bias", expected torch.Tensor'):
        load_model(path)


def test_integer_weights_are_named_not_cast(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    sd["head.weight"] = sd["head.weight"].to(torch.int8)  # a quantized or damaged file: every weight would be 0 or +-1
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(asdict(tiny_model.config)))
    with pytest.raises(UserError, match=r"weights do not fit the architecture: head\.weight holds torch\.int8"):
        load_model(tmp_path)


def test_model_py_cli_prints_summary_and_writes_config(tmp_path):
    out = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "parameters: 34,757,507" in out
    assert "down5        [1, 512, 4, 4]" in out and "6,491,136" in out and "head         [1, 3, 128, 128]" in out
    assert "forward GFLOPs per image: 6.885" in out  # the figure the README states
    target = tmp_path / "config.json"
    subprocess.run([sys.executable, "model.py", "--write-config", str(target)], cwd=ROOT, check=True,
                   capture_output=True)
    assert json.loads(target.read_text()) == json.loads((ROOT / "config.json").read_text())
