"""The card's residual convolutional autoencoder, the artifact detector, and `load_model`.

    python model.py                      # summary: stage shapes, parameters, GFLOPs
    python model.py --write-config       # regenerate the top-level config.json
    model = load_model("runs/cifar10/model_best_checkpoint.ckpt", device)   # the card's quick start
    errors = model.reconstruction_error(x, reduction="none")               # [B]
    model.save_pretrained("release/"); model.push_to_hub("you/name")       # hub layout, via the mixin
"""

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from checkpoints import clean_state_dict, read_source, save_safetensors
from utils import ArgumentParser, UserError, write_json

MODEL_CARD = """---
{{ card_data }}
---
# Residual Convolutional Autoencoder for Deepfake Detection
Its per-image reconstruction error (MSE on inputs in [-1, 1]) is an anomaly score, not a trained
deepfake classifier: see the repository's README for what it misses. Load it with `load_model`.
"""


class Config:
    @classmethod
    def from_dict(cls, d):
        """cls from a file's dict; ValueError on keys not in its fields (an old "architecture" is ignored)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or set(d) - {*names, "architecture"}:
            raise ValueError(f"expected a JSON object with keys from {names}, got {d!r:.200}")
        return cls(**{k: v for k, v in d.items() if k != "architecture"})


def check_stages(config, max_stages, *counts):
    """config.channels, made a tuple; ValueError unless it holds 1 to max_stages positive integers, image_size
    and counts are positive integers, blocks_per_stage >= 0 and 2^stages divides image_size."""
    c = config.channels = tuple(config.channels) if isinstance(config.channels, (list, tuple)) else ()
    counts = (config.image_size, config.blocks_per_stage + 1, *counts, *c)
    if not 1 <= len(c) <= max_stages or not all(type(v) is int and v >= 1 for v in counts):
        raise ValueError(f"expected positive integers and 1 to {max_stages} channel stages, "
                         f"got {asdict(config)}")
    if config.image_size % 2 ** len(c):
        raise ValueError(f"image_size {config.image_size} is not divisible by 2^{len(c)}")
    return c


@dataclass
class AutoencoderConfig(Config):
    image_size: int = 128  # square input, H = W
    in_channels: int = 3
    channels: tuple = (64, 128, 256, 384, 512)  # one entry per down / up stage
    blocks_per_stage: int = 1  # residual blocks after each down / before each up
    latent_dim: int = 512

    def __post_init__(self):
        c = check_stages(self, 8, self.in_channels, self.latent_dim)
        # configs arrive from files: bound the size before any layer is allocated
        s, convs = self.image_size // 2 ** len(c), 2 * self.blocks_per_stage + 2  # 3x3 convs per stage
        params = 2 * c[-1] * s * s * self.latent_dim + 9 * convs * sum(x * x for x in c)
        if params + 9 * self.in_channels * c[0] > 1e9:
            raise ValueError(f"config too large: about {params:.3g} parameters (this loader's limit is 1e9)")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv_bn_relu(conv):
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU (the basic ResNet block)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


def pixel_error(recon, x):
    """[B, C, H, W] twice -> [B, H, W] squared error, mean over channels, in fp32 (bf16 inputs too)."""
    return (recon.float() - x.float()).pow(2).mean(dim=1)


class HubModel(nn.Module, PyTorchModelHubMixin):
    """A network with a config dataclass, saved in the hub layout (config.json + model.safetensors)."""

    def __init__(self, config):
        super().__init__()
        self.config = self._hub_mixin_config = config  # what save_pretrained writes to config.json

    def _save_pretrained(self, save_directory):
        save_safetensors(self, save_directory)


class ResidualAutoencoder(HubModel, model_card_template=MODEL_CARD, library_name="pytorch", license="mit",
                          pipeline_tag="image-feature-extraction",
                          tags=["autoencoder", "anomaly-detection", "deepfake-detection"]):
    """float [B, C, S, S] in [-1, 1] -> reconstruction of the same shape, through a latent_dim vector."""

    def __init__(self, config: AutoencoderConfig = None):
        super().__init__(config or AutoencoderConfig())
        config = self.config
        c, n, s = config.channels, config.blocks_per_stage, config.image_size // 2 ** len(config.channels)
        self.stem = conv_bn_relu(nn.Conv2d(config.in_channels, c[0], 3, padding=1, bias=False))
        c_in = (c[0],) + c[:-1]
        self.down = nn.Sequential(  # each stage halves the resolution
            *[nn.Sequential(conv_bn_relu(nn.Conv2d(ci, co, 3, stride=2, padding=1, bias=False)),
                            *[ResidualBlock(co) for _ in range(n)]) for ci, co in zip(c_in, c)])
        self.to_latent = nn.Linear(c[-1] * s * s, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, c[-1] * s * s)
        self.bottleneck = (c[-1], s, s)  # the encoder's last feature map, [C, S, S]
        self.up = nn.Sequential(  # mirrors the encoder
            *[nn.Sequential(*[ResidualBlock(ci) for _ in range(n)],
                            conv_bn_relu(nn.ConvTranspose2d(ci, co, 4, stride=2, padding=1, bias=False)))
              for ci, co in zip(reversed(c), reversed(c_in))])
        self.head = nn.Conv2d(c[0], config.in_channels, 3, padding=1)

    def encode(self, x):
        shape = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != shape or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a float batch [B, {', '.join(map(str, shape))}] in [-1, 1] "
                             f"(data.preprocess), got {got}")
        return self.to_latent(self.down(self.stem(x)).flatten(1))  # [B, latent_dim]

    def decode(self, z):
        h = F.relu(self.from_latent(z)).view(z.shape[0], *self.bottleneck)  # [B, C, S, S]
        if self.head.weight.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)  # .view() gave NCHW; keep the fast layout
        return torch.tanh(self.head(self.up(h)))

    def forward(self, x):
        return self.decode(self.encode(x))

    def reconstruction_error(self, x, reduction="none"):
        """fp32 per-image MSE [B] ('none': the card's score), its mean ('mean') or [B, H, W] ('pixel')."""
        if reduction not in ("none", "mean", "pixel"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'pixel', got {reduction!r}")
        pixel = pixel_error(self(x), x)  # [B, H, W]
        per_image = pixel.flatten(1).mean(dim=1)
        return {"none": per_image, "mean": per_image.mean(), "pixel": pixel}[reduction]

    def image_loss(self, recon, x):
        """[B] per-image MSE: the training loss."""
        return pixel_error(recon, x).flatten(1).mean(dim=1)


ARTIFACT_CARD = """---
{{ card_data }}
---
# Generator-trace detector
A small CNN on the high-frequency residual of native pixels, trained on aligned real / generated pairs: its
mean tile logit says whether a network made the image. See the repository's README for what it cannot see.
"""


@dataclass
class ArtifactConfig(Config):
    kind: str = "artifact"  # tells load_model which network a config describes
    image_size: int = 64  # training crop and scoring tile side, in original pixels
    channels: tuple = (32, 64, 128)  # one stage each, the first at half the tile's resolution
    blocks_per_stage: int = 1

    def __post_init__(self):
        c = check_stages(self, 6)
        if self.kind != "artifact" or max(c) > 1024 or self.blocks_per_stage > 64:  # bounds the size
            raise ValueError(f"expected kind 'artifact', channels <= 1024, blocks <= 64, got {asdict(self)}")


def neighbour_residual(x):
    """[B, 3, S, S] -> [B, 12, S/2, S/2]: each pixel minus the top-left one of its 2x2 block (NPR, Tan et
    al. CVPR 2024), the four positions as channels: up-sampling traces stay, the content mostly cancels."""
    return F.pixel_unshuffle(x - F.interpolate(x[:, :, ::2, ::2], scale_factor=2.0, mode="nearest"), 2)


class ArtifactDetector(HubModel, model_card_template=ARTIFACT_CARD, library_name="pytorch", license="mit",
                       tags=["image-forensics", "generated-image-detection"]):
    """float [B, 3, S, S] tiles of native pixels (data.preprocess at their own size, any even S)
    -> [B] logits, > 0: generated."""

    def __init__(self, config: ArtifactConfig = None):
        super().__init__(config or ArtifactConfig())
        c, n = self.config.channels, self.config.blocks_per_stage
        self.stem = conv_bn_relu(nn.Conv2d(12, c[0], 3, padding=1, bias=False))
        self.stages = nn.Sequential(*[nn.Sequential(  # each stage after the first halves the resolution
            *([conv_bn_relu(nn.Conv2d(c[i - 1], c[i], 3, stride=2, padding=1, bias=False))] if i else []),
            *[ResidualBlock(c[i]) for _ in range(n)]) for i in range(len(c))])
        self.head = nn.Linear(c[-1], 1)

    def forward(self, x):
        h = self.stages(self.stem(neighbour_residual(x.float() * 32)))  # x32: residuals of a few levels ~ 1
        return self.head(h.mean(dim=(2, 3))).squeeze(1).float()

    def image_loss(self, logits, labels):
        """[B] binary cross-entropy: the training loss (labels 1 = generated)."""
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")


NETWORKS = {"autoencoder": (ResidualAutoencoder, AutoencoderConfig),  # kind -> (network, config)
            "artifact": (ArtifactDetector, ArtifactConfig)}


def load_model(source, device="cpu", config=None):
    """The model in eval mode, autoencoder or artifact detector as its config's kind says, from a train.py
    checkpoint, hub folder, .safetensors file or hub id "user/name[@rev]". UserError on any bad source."""
    return model_from_weights(*read_source(source), source, config).to(device).eval()


def model_from_weights(state_dict, stored_config, source, config=None):
    """These weights in a model, strictly; the stored config gives the architecture (`config`: if none)."""
    kind = stored_config.get("kind") if isinstance(stored_config, dict) else None
    if kind not in (None, "artifact"):  # e.g. the coding model of earlier versions
        raise UserError(f"{source}: a model of kind {kind!r}, which this version does not have")
    net, net_config = NETWORKS[kind or "autoencoder"]
    try:  # no stored config: `config`, or the net's default
        config = net_config.from_dict(stored_config) if stored_config is not None else config
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: bad model config ({e})") from None
    model = net(config)
    state_dict, expected = clean_state_dict(state_dict), model.state_dict()
    # load_state_dict would silently cast integer (quantized or damaged) tensors into float weights
    if wrong := next((k for k, v in state_dict.items() if torch.is_tensor(v) and k in expected
                      and expected[k].is_floating_point() and not v.is_floating_point()), None):
        raise UserError(f"{source}: weights do not fit the architecture: {wrong} holds "
                        f"{state_dict[wrong].dtype} where floating-point weights belong")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # torch names every missing, unexpected, mis-shaped or non-tensor entry
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise UserError(f"{source}: weights do not fit the architecture: {details[:600]}") from None
    return model


def prepare_model(model, device):
    """channels_last on both devices: measured faster for this network on CPU and GPU (bench.py)."""
    return model.to(device, memory_format=torch.channels_last).eval()


def load_models(checkpoint, device, artifact_checkpoint=None):
    """(autoencoder or None, artifact detector or None), each checked to be the kind its flag asks for."""
    kinds = {ResidualAutoencoder: ("an autoencoder", "--checkpoint"),  # in the order of the arguments
             ArtifactDetector: ("an artifact detector", "--artifact-model")}
    models = []
    for source, kind in zip((checkpoint, artifact_checkpoint), kinds):
        model = load_model(source, device) if source else None
        if model is not None and not isinstance(model, kind):
            (got, flag), (want, _) = kinds[type(model)], kinds[kind]
            raise UserError(f"{source} holds {got}, not {want}: give it with {flag}")
        models.append(model if model is None else prepare_model(model, device))
    return tuple(models)


def summarize(config):
    """(model, rows of (stage, output shape, parameters), forward GFLOPs per image)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ResidualAutoencoder(config).eval()
    rows = []
    for name, m in model.named_children():
        for i, stage in enumerate(m, 1) if name in ("down", "up") else [("", m)]:  # down1, ...; stem
            stage.register_forward_hook(lambda m, _, out, label=f"{name}{i}": rows.append(
                (label, list(out.shape), count_parameters(m))))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, config.in_channels, config.image_size, config.image_size))
    return model, rows, counter.get_total_flops() / 1e9


def main(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument("--write-config", nargs="?", const="config.json", metavar="PATH",
                        help="write the default architecture to PATH (config.json if none given) and exit")
    args = parser.parse_args(argv)
    if args.write_config:
        write_json(args.write_config, asdict(AutoencoderConfig()))
        return print(f"wrote {args.write_config}")
    model, rows, gflops = summarize(AutoencoderConfig())
    print(f"{type(model).__name__}: {model.config}\n{'layer':<12} {'output shape':<22} parameters")
    for name, shape, params in rows:
        print(f"{name:<12} {str(shape):<22} {params:>10,}")
    print(f"parameters: {count_parameters(model):,} (card: 34,849,667)\n"
          f"forward GFLOPs per image: {gflops:.3f} (multiply-add = 2 FLOPs)")


if __name__ == "__main__":
    main()
