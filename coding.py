"""The coding-cost score: a model of real photos at native resolution, and the gap between what an
image actually costs to code under it and what the model expected it to cost (after ZED, Cozzolino
et al., ECCV 2024). It needs no fakes: trained on real photos only, it has no blind spot for an unseen
generator, and it looks at the finest scale, where generators leave their traces.

    python train.py --preset coding --data-dir ~/photos --out-dir runs/coding      # CPU, under 15 minutes
    gaps = load_model("runs/coding/model_best_checkpoint.ckpt").tile_gaps(tiles)   # [T] bits/dim

The model codes a tile of original pixels as a pyramid: level L (the coarsest, 2^L times smaller) is
given; each finer level k is predicted from level k + 1 by its own small residual network, which gives
every sub-pixel a discretized logistic (a mean and a scale, on the integers). Per sub-pixel:
    actual cost   = -log2 P(pixel)                  (what coding it takes)
    expected cost = entropy of P, in bits           (what the model expected it to take)
The image's score is the mean gap (actual - expected, bits per sub-pixel of the finest level) over its
tiles: near 0 for a real photo like the training ones, below 0 for content smoother / more predictable
than real photos, above 0 for content more surprising than the model's own uncertainty. Both directions
are evidence, so its p-value is two-sided (metrics.conformal_pvalues).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from model import ResidualBlock, TileConfig, save_safetensors

MAX_TILES_PER_SIDE = 4  # at most 4 x 4 = 16 tiles per image, whatever its size
MODEL_CARD = """---
{{ card_data }}
---
# Coding-cost model of real photos
Predicts each level of an image pyramid from the next coarser one (a discretized logistic per sub-pixel).
The gap between an image's actual and expected coding cost is a zero-shot score for generated images:
see the repository's README. Load it with `load_model`.
"""


@dataclass
class CodingConfig(TileConfig):
    kind: str = "coding"
    channels: tuple = (32, 32, 32)  # one predictor per coded level, finest first
    blocks_per_stage: int = 2  # residual blocks per predictor


def pyramid(x, levels):
    """x: float [B, 3, S, S] of integer pixel values 0..255 -> [x, x1, ..., x_levels], each the 2x2 mean of
    the one before, rounded: every level holds integers, so each has an exact discrete cost."""
    out = [x]
    for _ in range(levels):
        out.append(F.avg_pool2d(out[-1], 2).round())
    return out


def logistic_log_prob(k, mean, log_scale):
    """log P(k) of integers k under a logistic discretized to unit bins on all of Z (every tensor [..]):
    log(sigmoid(u) - sigmoid(l)) with u - l = 1/s, in a form that neither underflows nor cancels."""
    inv_scale = torch.exp(-log_scale)
    centered = k - mean
    upper, lower = (centered + 0.5) * inv_scale, (centered - 0.5) * inv_scale
    return F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-inv_scale))


@functools.lru_cache(maxsize=None)
def entropy_table(device):
    """Exact entropies (bits) for scales below 1, on a grid: log-scale in [-4, 0] (rows) x distance of the mean
    from its nearest integer in [0, 0.5] (columns), each summed over the 41 integers nearest the mean (the mass
    beyond is below 2 exp(-20)). [1, 1, 512, 513], computed once per device."""
    log_scale = torch.linspace(-4, 0, 512, dtype=torch.float64)[:, None, None]
    offset = torch.linspace(0, 0.5, 513, dtype=torch.float64)[None, :, None]
    logp = logistic_log_prob(torch.arange(-20, 21, dtype=torch.float64), offset, log_scale)  # [512, 513, 41]
    return (-(logp.exp() * logp).sum(dim=-1) / math.log(2)).float().to(device)[None, None]


def logistic_entropy_bits(mean, log_scale):
    """Entropy in bits of that discretized logistic (log_scale in [-4, 6], as LevelPredictor clamps it). For s >= 1:
    the continuous one, ln(s) + 2 nats, plus what unit bins add, J / 24 nats with J = 1 / (3 s^2) the logistic's
    Fisher information. Below 1, interpolated in entropy_table. Both are within 5e-4 bits of the exact sum."""
    entropy = (log_scale + 2 + torch.exp(-2 * log_scale) / 72) / math.log(2)
    small = log_scale < 0
    if small.any():
        ls, m = log_scale[small], mean[small]  # [n]
        grid = torch.stack([4 * (m - m.round()).abs() - 1, ls / 2 + 1], dim=-1)  # both mapped onto [-1, 1]
        table = entropy_table(ls.device)
        entropy[small] = F.grid_sample(table, grid.view(1, 1, -1, 2).to(table.dtype), align_corners=True).view(-1).to(entropy.dtype)
    return entropy


class LevelPredictor(nn.Module):
    """Level k + 1 (coarse, [B, 3, h, w]) -> the discretized logistic of every pixel of level k ([B, 3, 2h, 2w]).
    It runs at the coarse resolution and emits the 2x2 sub-pixels of each coarse pixel (pixel shuffle)."""

    def __init__(self, width, blocks):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
                                  *[ResidualBlock(width) for _ in range(blocks)])
        self.head = nn.Conv2d(width, 2 * 3 * 4, 3, padding=1)  # (mean, log-scale) x RGB x 2x2 sub-pixels
        nn.init.zeros_(self.head.weight)  # starts as "each sub-pixel is its coarse pixel, scale 1"
        nn.init.zeros_(self.head.bias)

    def forward(self, coarse):
        out = F.pixel_shuffle(self.head(self.body(coarse / 127.5 - 1)), 2).float()  # [B, 6, 2h, 2w], fp32 costs
        mean = F.interpolate(coarse.float(), scale_factor=2, mode="nearest") + 16 * out[:, :3]  # residual on the coarse value
        return mean, out[:, 3:].clamp(-4, 6)  # log-scale: s in [0.02, 400] levels


class CodingModel(nn.Module, PyTorchModelHubMixin, model_card_template=MODEL_CARD, library_name="pytorch",
                  license="mit", tags=["image-forensics", "zero-shot", "generated-image-detection"]):
    def __init__(self, config: CodingConfig = None):
        super().__init__()
        self.config = config = config or CodingConfig()
        self._hub_mixin_config = config
        self.levels = nn.ModuleList(LevelPredictor(c, config.blocks_per_stage) for c in config.channels)

    def level_cost(self, level, fine, coarse):
        """Level `level` given the next coarser one (float pixel values) -> (actual bits, mean, log-scale), each [B, 3, h, w]."""
        mean, log_scale = self.levels[level](coarse)
        return -logistic_log_prob(fine, mean, log_scale) / math.log(2), mean, log_scale

    def forward(self, x):
        """x: float [B, 3, S, S] from data.preprocess at native size -> [B] actual bits per coded sub-pixel over
        every level, the training loss (the code length of a lossless coder built on the model)."""
        pyr = pyramid(((x.float() + 1) * 127.5).round(), len(self.levels))  # exact inverse of preprocess on uint8
        costs = [self.level_cost(k, fine, coarse)[0].flatten(1) for k, (fine, coarse) in enumerate(zip(pyr, pyr[1:]))]
        return torch.cat(costs, dim=1).mean(dim=1)

    def image_loss(self, bits, x):
        return bits

    @torch.no_grad()
    def tile_gaps(self, tiles):
        """uint8 [T, 3, S, S] -> float64 [T]: mean (actual - expected) bits over the finest level's sub-pixels of each
        tile. The coarser levels complete the coder but are not scored: ZED found the finest level's gap the most
        telling (generators leave their traces at the finest scale), and coarse levels add content variance."""
        pixels = tiles.to(next(self.parameters()).device).float()
        bits, mean, log_scale = self.level_cost(0, pixels, F.avg_pool2d(pixels, 2).round())
        return (bits - logistic_entropy_bits(mean, log_scale)).flatten(1).double().mean(dim=1).cpu()

    def _save_pretrained(self, save_directory):
        save_safetensors(self, save_directory)


def tile_origins(length, tile, per_side=MAX_TILES_PER_SIDE):
    """Evenly spread starts of at most per_side tiles along one side, on multiples of 8 (the JPEG block
    grid, so every tile sees the same block phase): deterministic, and disjoint where the side allows."""
    n = min(per_side, length // tile)
    starts = torch.linspace(0, length - tile, n) if n > 1 else torch.zeros(1)
    return [int(s) // 8 * 8 for s in starts.tolist()]


def tiles_of(image, tile):
    """uint8 [3, H, W] at its original resolution -> uint8 [T, 3, tile, tile], T <= MAX_TILES_PER_SIDE^2.
    ValueError if the image is smaller than one tile."""
    h, w = image.shape[-2:]
    if h < tile or w < tile:
        raise ValueError(f"too small to tile for the coding and artifact scores: {w}x{h} pixels, it needs at least "
                         f"{tile}x{tile}")
    return torch.stack([image[:, y:y + tile, x:x + tile] for y in tile_origins(h, tile) for x in tile_origins(w, tile)])
