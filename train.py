"""
Trains the autoencoder. The defaults are the card's recipe: CIFAR-10 at 128x128,
batch 1024, AdamW (lr 1e-3, wd 1e-5), MSE, ReduceLROnPlateau (0.5, patience 5),
100 epochs.

    python train.py                                          # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --batch-size 128    # DDP, global batch 1024
    python train.py --resume --out-dir runs/cifar10          # continue an interrupted run
    python train.py --preset smoke --dataset synthetic --out-dir runs/smoke   # CPU, < 2 min
    python train.py --dataset folder --data-dir ~/photos --init-from runs/cifar10/model_best_checkpoint.ckpt

Writes to --out-dir: model_best_checkpoint.ckpt (best validation loss),
last_checkpoint.ckpt (everything to resume), metrics.jsonl, loss_curve.png,
results.json (test MSE) and release/ (safetensors + config.json, ready to push).
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DataError, batches, dead_leaves, load_cifar10, load_image_folder, split_indices
from model import (AutoencoderConfig, CheckpointError, ResidualAutoencoder, atomic_write, autocast, clean_state_dict,
                   count_parameters, load_checkpoint_dict, load_model, precision_name, save_pretrained, unwrap, weights_fingerprint,
                   write_json)

BEST_NAME = "model_best_checkpoint.ckpt"  # the card's file name
LAST_NAME = "last_checkpoint.ckpt"


@dataclass
class TrainConfig:
    dataset: str = "cifar10"  # cifar10 | folder | synthetic
    data_dir: str = "./data"
    out_dir: str = "runs/cifar10"
    epochs: int = 100
    batch_size: int = 1024  # per process
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_factor: float = 0.5
    lr_patience: int = 5
    val_fraction: float = 0.1  # CIFAR-10: 5,000 of the 50,000 training images
    test_fraction: float = 0.1  # folder / synthetic only: CIFAR-10 has its own test set
    max_images: int = 0  # 0 = all; caps the training pool (quick runs)
    synthetic_images: int = 12000
    synthetic_size: int = 32  # native size of the synthetic images, as CIFAR's 32x32
    seed: int = 0
    compile: bool = False
    image_size: int = 128
    channels: tuple = AutoencoderConfig.channels
    blocks_per_stage: int = 1
    latent_dim: int = 512
    init_from: str = ""
    progress: bool = True

    def model_config(self):
        return AutoencoderConfig(image_size=self.image_size, channels=self.channels,
                                 blocks_per_stage=self.blocks_per_stage, latent_dim=self.latent_dim)


# A 3-stage network at 32x32 and ~500 steps: trains end to end on a 2-core CPU in under a minute.
# (Fewer stages learn much faster in a few hundred steps; the full 5-stage model needs thousands.)
PRESETS = {
    "card": {},
    "smoke": dict(epochs=12, batch_size=32, image_size=32, channels=(32, 64, 128), latent_dim=256,
                  synthetic_images=2400, max_images=2400, lr=1e-3, lr_patience=2),
}


def parse_args(argv=None):
    d = TrainConfig()
    # no abbreviations: --resume must know exactly which flags were typed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add = p.add_argument
    add("--preset", choices=sorted(PRESETS), default="card", help="defaults to start from (default: card)")
    add("--dataset", choices=["cifar10", "folder", "synthetic"], default=d.dataset, help=f"default: {d.dataset}")
    add("--data-dir", default=d.data_dir, help=f"CIFAR-10 download folder, or the image tree for --dataset folder (default: {d.data_dir})")
    add("--out-dir", default=d.out_dir, help=f"default: {d.out_dir}")
    add("--epochs", type=int, default=d.epochs, help=f"default: {d.epochs}")
    add("--batch-size", type=int, default=d.batch_size, help=f"per process (default: {d.batch_size})")
    add("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default: {d.lr})")
    add("--weight-decay", type=float, default=d.weight_decay, help=f"default: {d.weight_decay}")
    add("--lr-factor", type=float, default=d.lr_factor, help=f"ReduceLROnPlateau factor (default: {d.lr_factor})")
    add("--lr-patience", type=int, default=d.lr_patience, help=f"ReduceLROnPlateau patience (default: {d.lr_patience})")
    add("--val-fraction", type=float, default=d.val_fraction, help=f"held out of the training images, seeded (default: {d.val_fraction})")
    add("--test-fraction", type=float, default=d.test_fraction, help=f"test split for folder / synthetic data (default: {d.test_fraction})")
    add("--max-images", type=int, default=d.max_images, help="use at most this many training images, 0 = all (default: 0)")
    add("--synthetic-images", type=int, default=d.synthetic_images, help=f"dead-leaves images for --dataset synthetic (default: {d.synthetic_images})")
    add("--synthetic-size", type=int, default=d.synthetic_size, help=f"their native size (default: {d.synthetic_size})")
    add("--seed", type=int, default=d.seed, help=f"default: {d.seed}")
    add("--compile", action=argparse.BooleanOptionalAction, default=d.compile, help="torch.compile the model (default: off)")
    add("--image-size", type=int, default=d.image_size, help=f"model input size (default: {d.image_size})")
    add("--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=d.channels,
        help=f"channels per stage, comma-separated (default: {','.join(map(str, d.channels))})")
    add("--blocks-per-stage", type=int, default=d.blocks_per_stage, help=f"default: {d.blocks_per_stage}")
    add("--latent-dim", type=int, default=d.latent_dim, help=f"default: {d.latent_dim}")
    add("--init-from", default=d.init_from, help="fine-tune from these weights (any load_model source; sets the architecture)")
    add("--resume", action="store_true",
        help=f"continue from --out-dir/{LAST_NAME} (model, optimizer, LR schedule, RNG; the architecture is the "
             f"checkpoint's); other flags typed now override the saved run's, e.g. --epochs to extend it or --lr")
    add("--overwrite", action="store_true", help="start afresh even if --out-dir holds a previous run's checkpoints")
    add("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="tqdm progress bars (default: on)")

    argv = sys.argv[1:] if argv is None else argv
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    # which flags the user typed, so that --resume can restore the rest from the checkpoint
    explicit = set()
    for action in p._actions:
        if any(opt in argv or any(a.startswith(opt + "=") for a in argv) for opt in action.option_strings):
            explicit.add(action.dest)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    return cfg, args.resume, args.overwrite, explicit


# ----------------------------------------------------------------------------
# distributed helpers: the same code runs as one process or under torchrun

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.set_device(device)
    return rank, world, device


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------
# data

def load_datasets(cfg):
    """Returns uint8 tensors (train, val, test), each [N, 3, H, W], plus a description."""
    if cfg.dataset == "cifar10":
        pool = load_cifar10(cfg.data_dir, train=True)
        test = load_cifar10(cfg.data_dir, train=False)
        source = f"CIFAR-10 in {cfg.data_dir}"
    elif cfg.dataset == "synthetic":
        pool = dead_leaves(cfg.synthetic_images, cfg.synthetic_size, seed=cfg.seed)
        test = None
        source = f"{cfg.synthetic_images:,} dead-leaves images at {cfg.synthetic_size}x{cfg.synthetic_size}"
    else:
        skipped = []
        pool, _, n_skipped = load_image_folder(cfg.data_dir, cfg.image_size, on_error=lambda p, r: skipped.append((p, r)))
        for path, reason in skipped[:5]:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        source = f"{pool.shape[0]:,} images from {cfg.data_dir} ({n_skipped} unreadable skipped)"
        test = None
    if test is None:  # carve a fixed test split out of the pool
        rest, test_idx = split_indices(pool.shape[0], cfg.test_fraction, cfg.seed + 1)
        pool, test = pool[rest], pool[test_idx]
    train_idx, val_idx = split_indices(pool.shape[0], cfg.val_fraction, cfg.seed)
    train, val = pool[train_idx], pool[val_idx]
    if cfg.max_images:
        train = train[:cfg.max_images]
        val, test = val[:max(cfg.max_images // 8, 1)], test[:max(cfg.max_images // 8, 1)]
    return train, val, test, source


# ----------------------------------------------------------------------------
# training

@torch.no_grad()
def evaluate(model, images, cfg, device, rank=0, world=1):
    """Mean per-image MSE over `images`, sharded across ranks."""
    model.eval()
    shard = torch.arange(rank, images.shape[0], world, device=images.device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of errors, count]
    for x in batches(images, cfg.batch_size, cfg.image_size, device, perm=shard):
        with autocast(device):
            err = unwrap(model).reconstruction_error(x.contiguous(memory_format=torch.channels_last), "none")
        total[0] += err.double().sum()
        total[1] += err.numel()  # a Python scalar: no host-to-device copy
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def epoch_shard(n, batch_size, seed, epoch, rank, world, device):
    """Indices rank `rank` trains on in `epoch`: a fresh seeded permutation (identical on every
    rank, reproducible on resume), dealt round-robin and cut to the same whole number of
    batches on every rank -- DDP deadlocks if one rank takes a step the others do not."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen, device=device)
    steps = n // world // batch_size
    return perm[rank::world][:steps * batch_size]


def train_one_epoch(net, opt, train_images, cfg, device, epoch, rank, world, bar):
    net.train()
    shard = epoch_shard(train_images.shape[0], cfg.batch_size, cfg.seed, epoch, rank, world, train_images.device)
    total = torch.zeros((), device=device)
    steps = 0
    for x in batches(train_images, cfg.batch_size, cfg.image_size, device, perm=shard):
        x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, S, S]
        with autocast(device):
            recon = net(x)
        loss = (recon.float() - x).pow(2).mean()  # MSE, the card's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()  # stays on the device: no sync per step
        steps += 1
        if bar is not None:
            bar.update(1)
            if steps % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}")  # the only sync, for the progress bar
    if steps == 0:
        raise DataError(f"{train_images.shape[0]} training images make no full batch of {cfg.batch_size} per process; lower --batch-size")
    return (all_reduce_sum(total) / (steps * world)).item(), steps * cfg.batch_size * world


def sync_buffers(model):
    """DDP broadcasts BatchNorm statistics before each forward, so after the last step each
    rank holds its own; take rank 0's so every rank evaluates and ends with the same model."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB


def save_checkpoint(path, payload):
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_losses(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (inputs in [-1, 1])")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def with_architecture(cfg, model_config):
    """cfg with the architecture of an existing model: it decides the input size too."""
    return replace(cfg, image_size=model_config.image_size, channels=model_config.channels,
                   blocks_per_stage=model_config.blocks_per_stage, latent_dim=model_config.latent_dim)


def override_hyperparameters(opt, sched, cfg, explicit):
    """On --resume the optimizer and schedule come back as saved; flags typed now win."""
    for group in opt.param_groups:
        if "lr" in explicit:
            group["lr"] = cfg.lr
        if "weight_decay" in explicit:
            group["weight_decay"] = cfg.weight_decay
    if "lr_factor" in explicit:
        sched.factor = cfg.lr_factor
    if "lr_patience" in explicit:
        sched.patience = cfg.lr_patience


def restore_config(cfg, explicit, out_dir):
    """For --resume: the saved run's config, with the flags typed now taking precedence."""
    path = Path(out_dir) / LAST_NAME
    if not path.exists():
        raise CheckpointError(f"--resume: no {LAST_NAME} in {out_dir} (nothing to resume; drop --resume to start fresh)")
    ckpt = load_checkpoint_dict(path)
    missing = {"model", "optimizer", "scheduler", "epoch", "train_config"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path}: not a resume checkpoint (missing {sorted(missing)})")
    saved = ckpt["train_config"]
    merged = {f.name: getattr(cfg, f.name) if f.name in explicit else saved.get(f.name, getattr(cfg, f.name))
              for f in fields(TrainConfig)}
    merged["channels"] = tuple(merged["channels"])
    return TrainConfig(**merged), ckpt


def train(cfg, resume=False, overwrite=False, explicit=()):
    rank, world, dist_device = setup_distributed()
    ckpt = None
    if resume:
        cfg, ckpt = restore_config(cfg, explicit, cfg.out_dir)
    elif (Path(cfg.out_dir) / LAST_NAME).exists() and not overwrite:
        raise CheckpointError(f"{cfg.out_dir} already holds a run ({LAST_NAME}); pass --resume to continue it, "
                              f"--overwrite to replace it, or another --out-dir")
    device = dist_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients late in training otherwise slow CPU math many-fold
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    init = None
    if ckpt is not None:
        cfg = with_architecture(cfg, AutoencoderConfig.from_dict(ckpt["config"]))
    elif cfg.init_from:
        init = load_model(cfg.init_from, "cpu").train()
        cfg = with_architecture(cfg, init.config)  # the architecture also sets the input size
    train_u8, val_u8, test_u8, source = load_datasets(cfg)
    # the whole data set lives on the device as uint8 at native size; batches are cut there
    train_u8, val_u8, test_u8 = (t.to(device) for t in (train_u8, val_u8, test_u8))
    log(rank, f"data: {source}; train {len(train_u8):,} / val {len(val_u8):,} / test {len(test_u8):,} images "
              f"at {tuple(train_u8.shape[2:])} -> {cfg.image_size}x{cfg.image_size}")

    if init is not None:
        model = init
        log(rank, f"fine-tuning from {cfg.init_from}")
    else:
        model = ResidualAutoencoder(cfg.model_config())
    model_config = model.config
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    start_epoch, best_val, history = 1, math.inf, []
    if ckpt is not None:
        model.load_state_dict(clean_state_dict(ckpt["model"]), strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        override_hyperparameters(opt, sched, cfg, explicit)
        start_epoch, best_val, history = ckpt["epoch"] + 1, ckpt["best_val_loss"], list(ckpt.get("history", []))
        log(rank, f"resumed from {out_dir / LAST_NAME} after epoch {ckpt['epoch']} (best val {best_val:.6f})")
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay clean
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    log(rank, f"model: {count_parameters(model):,} parameters, {model_config}; device {device} x {world}, "
              f"{precision_name(device)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps = train_u8.shape[0] // world // cfg.batch_size
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not cfg.progress or rank != 0)
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(net, opt, train_u8, cfg, device, epoch, rank, world, None if bar.disable else bar)
        epoch_time = time.perf_counter() - t0
        bar.close()
        sync_buffers(model)
        val_loss = evaluate(model, val_u8, cfg, device, rank, world)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            log(rank, f"error: non-finite loss at epoch {epoch} (train {train_loss}, val {val_loss}); stopping. "
                      f"The checkpoints in {out_dir} hold the last good epoch; try a lower --lr.")
            raise SystemExit(1)
        sched.step(val_loss)
        row = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"],
                   epoch_time_s=round(epoch_time, 3), images_per_s=round(seen / epoch_time, 1),
                   peak_memory_gb=round(peak_memory_gb(device), 3))
        history.append(row)
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        if rank == 0:
            state = clean_state_dict(model.state_dict())
            if improved:
                save_checkpoint(out_dir / BEST_NAME, {"model": state, "config": model_config.to_dict(), "epoch": epoch,
                                                      "val_loss": val_loss, "train_config": asdict(cfg)})
            save_checkpoint(out_dir / LAST_NAME, {
                "model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                "best_val_loss": best_val, "rng": rng_state(), "config": model_config.to_dict(),
                "train_config": asdict(cfg), "history": history})
            metrics = "".join(json.dumps(h) + "\n" for h in history)
            atomic_write(out_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(metrics, encoding="utf-8"))
        log(rank, f"epoch {epoch:3d} | train {train_loss:.6f} | val {val_loss:.6f}{' *' if improved else '  '} | "
                  f"lr {row['lr']:.2e} | {epoch_time:6.1f}s | {row['images_per_s']:8.1f} img/s | "
                  f"peak {row['peak_memory_gb']:.2f} GB")

    finish(model, cfg, history, test_u8, device, rank, world, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(model, cfg, history, test_u8, device, rank, world, out_dir):
    """Test MSE of the best model, release export, plot and results.json."""
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the best checkpoint
    best = load_model(out_dir / BEST_NAME, device)
    test_mse = evaluate(best, test_u8, cfg, device, rank, world)
    fingerprints = [weights_fingerprint(model)]
    if dist.is_initialized():
        mine, fingerprints = fingerprints[0], [None] * world
        dist.all_gather_object(fingerprints, mine)
    if rank != 0:
        return
    save_pretrained(best, out_dir / "release")
    plot_losses(history, out_dir / "loss_curve.png")
    best_row = min(history, key=lambda h: h["val_loss"])
    results = dict(test_mse=test_mse, best_val_loss=best_row["val_loss"], best_epoch=best_row["epoch"],
                   first_val_loss=history[0]["val_loss"], epochs=len(history),
                   train_time_min=round(sum(h["epoch_time_s"] for h in history) / 60, 3),
                   world_size=world, device=str(device), final_weights_per_rank=fingerprints,
                   best_weights=weights_fingerprint(best), config=asdict(cfg))
    write_json(out_dir / "results.json", results)
    print(f"test MSE {test_mse:.6f} (best val {best_row['val_loss']:.6f} at epoch {best_row['epoch']}); "
          f"wrote {out_dir / BEST_NAME}, {out_dir / LAST_NAME}, {out_dir / 'release'}/, metrics.jsonl, "
          f"loss_curve.png, results.json", flush=True)


def main(argv=None):
    cfg, resume, overwrite, explicit = parse_args(argv)
    try:
        train(cfg, resume, overwrite, explicit)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
