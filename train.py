"""Trains the autoencoder (the card's recipe) or, with --preset artifact, the detector of generator traces.

    python train.py                                          # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --batch-size 128    # DDP, global batch 1024
    python train.py --resume --epochs 150 --out-dir runs/cifar10   # continue or extend a run
    python train.py --preset smoke --dataset synthetic --out-dir runs/smoke   # CPU, about a minute
    python train.py --dataset folder --data-dir ~/photos --init-from runs/cifar10/model_best_checkpoint.ckpt
    python train.py --preset artifact --data-dir generated/pairs/train --out-dir runs/artifact

Writes to --out-dir: model_best_checkpoint.ckpt, last_checkpoint.ckpt (to resume), metrics.jsonl,
loss_curve.png, results.json and release/ (hub layout).
"""

import argparse
import fcntl
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import (BEST_NAME, LAST_NAME, load_checkpoint_dict, save_checkpoints, weights_fingerprint,
                         write_results)
from data import batches, load_datasets
from model import (ArtifactConfig, ArtifactDetector, AutoencoderConfig, ResidualAutoencoder,
                   count_parameters, load_model, model_from_weights)
from utils import (SEED, ArgumentParser, UserError, all_reduce_sum, autocast, gather, number, peak_memory_gb,
                   precision_name, run_cli, setup_distributed)

RESUME_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_val_loss", "rng", "config", "train_config"}


def setting(default, help, **argparse_kwargs):
    """A TrainConfig field, and the help (and any other argparse keywords) of its flag."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class TrainConfig:
    model: str = setting("autoencoder", "the card's autoencoder, or the detector of generator traces "
                         "(model.ArtifactDetector)", choices=["autoencoder", "artifact"])
    dataset: str = setting("cifar10", "training images (pairs: real/ and one folder per generator, "
                           "make_pairs.py)", choices=["cifar10", "folder", "synthetic", "pairs"])
    data_dir: str = setting("./data", "CIFAR-10 download folder, or the images of --dataset folder / pairs")
    out_dir: str = setting("runs/cifar10", "checkpoints, metrics, plot, results and release/ go here")
    epochs: int = setting(100, "train up to this epoch", type=number(int, 1))
    batch_size: int = setting(1024, "per process", type=number(int, 1))
    lr: float = setting(1e-3, "AdamW learning rate", type=number(float, 0))
    weight_decay: float = setting(1e-5, "AdamW weight decay", type=number(float, 0))
    lr_factor: float = setting(0.5, "ReduceLROnPlateau factor", type=number(float, 0, 0.99))
    lr_patience: int = setting(5, "ReduceLROnPlateau patience, in epochs", type=number(int, 0))
    val_fraction: float = setting(0.1, "held out of the training images, seeded (CIFAR-10: 5,000 of 50,000)",
                                  type=number(float, 0, 1))
    test_fraction: float = setting(0.1, "test split of folder / synthetic data (CIFAR-10 has its own)",
                                   type=number(float, 0, 1))
    max_images: int = setting(0, "use at most this many training images, 0 = all", type=number(int, 0))
    synthetic_images: int = setting(12000, "dead-leaves images for --dataset synthetic", type=number(int, 1))
    synthetic_size: int = setting(32, "their native size, as CIFAR's 32x32", type=number(int, 1))
    seed: int = setting(0, "weights init, data split and batch order", type=SEED)
    compile: bool = setting(False, "torch.compile the model")
    image_size: int = setting(128, "model input size")
    channels: tuple = setting(AutoencoderConfig.channels, "channels per stage, comma-separated")
    blocks_per_stage: int = setting(1, "residual blocks per stage")
    latent_dim: int = setting(512, "bottleneck width")
    init_from: str = setting(None, "fine-tune these weights (a load_model source; sets the architecture)")
    progress: bool = setting(True, "tqdm progress bars")
    device: str = setting("auto", "auto: cuda if available", choices=["auto", "cpu", "cuda"])


ARCHITECTURE = ("image_size", "channels", "blocks_per_stage", "latent_dim")  # the fields that shape the model
PRESETS = {"card": {},
           # 3 stages at 32x32 learn in a few hundred steps (5 need thousands): a minute on a 2-core CPU
           "smoke": dict(epochs=12, batch_size=32, image_size=32, channels=(32, 64, 128), latent_dim=256,
                         synthetic_images=2400, max_images=2400, lr=1e-3, lr_patience=2,
                         out_dir="runs/smoke"),
           # aligned real / generated pairs, 64x64 tiles of native pixels: minutes on a 2-core CPU
           "artifact": dict(model="artifact", dataset="pairs", image_size=64, channels=(32, 64, 128),
                            blocks_per_stage=1, batch_size=64, epochs=12, lr=2e-3, lr_patience=1,
                            weight_decay=1e-4, out_dir="runs/artifact")}
# what --resume lets a user change: none alters the data, the architecture or the saved optimizer state
RESUMABLE = ("epochs", "lr", "weight_decay", "lr_factor", "lr_patience", "progress", "out_dir", "device")


def flags(names):
    return ", ".join("--" + name.replace("_", "-") for name in names)


def build_parser(preset=None):
    """The command line, from TrainConfig; preset None: no defaults, so it parses only the flags typed."""
    p = ArgumentParser(__doc__, allow_abbrev=False, add_help=preset is not None,
                       argument_default=None if preset else argparse.SUPPRESS)
    kind = {bool: dict(action=argparse.BooleanOptionalAction),
            tuple: dict(type=lambda text: tuple(int(c) for c in text.split(",")))}
    add = p.add_argument
    for f in fields(TrainConfig):
        add(flags([f.name]), **{**kind.get(f.type, dict(type=f.type)), **f.metadata})
    add("--preset", choices=sorted(PRESETS), help="defaults to start from; flags typed override them")
    add("--resume", action="store_true", help=f"continue the run in --out-dir from its {LAST_NAME} (weights, "
        f"optimizer, LR schedule, RNG and settings); only {flags(RESUMABLE)} may be typed with it")
    add("--overwrite", action="store_true", help="start afresh even if --out-dir holds a previous run")
    if preset:  # a string default goes through `type` as a typed value does, and prints as one is typed
        defaults = {**asdict(TrainConfig()), **PRESETS[preset], "preset": preset}
        p.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, tuple) else v
                          for k, v in defaults.items()})
    return p


def parse_args(argv=None):
    """(cfg, resume, overwrite, typed): the preset's defaults overridden by the flags; the RESUMABLE typed."""
    typed = vars(build_parser().parse_known_args(argv)[0])  # unknown flags and --help: the next parser's
    args = build_parser(typed.get("preset", "card")).parse_args(argv)
    if args.resume and (unsafe := [k for k in typed if k not in RESUMABLE and k != "resume"]):
        raise UserError(f"{flags(unsafe)}: cannot change with --resume, which continues the saved run as it "
                        f"was; only {flags(RESUMABLE)} can")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out-dir {cfg.out_dir} is a file, not a folder")
    return cfg, args.resume, args.overwrite, set(typed) & set(RESUMABLE)


def saved_settings(saved, path):
    """The TrainConfig a checkpoint saved, each value checked as its flag would be: the file may be edited."""
    where = ""
    try:
        cfg = TrainConfig(**saved)  # TypeError: a setting this train.py does not have
        for f in fields(cfg):
            value, where = getattr(cfg, f.name), f"{f.name}: "
            if "type" in f.metadata and not isinstance(value, tuple):
                f.metadata["type"](str(value))
            if value not in f.metadata.get("choices", [value]):
                raise ValueError(f"{value!r} is not one of {f.metadata['choices']}")
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{path}: its saved settings are not ones train.py can resume ({where}{e})") from None
    return cfg


LOCKS = {}  # folder -> its open lock file, for the folders this process holds


def lock_folder(folder):
    """Locks --out-dir for this process (re-entrant): two runs in one folder would mix their checkpoints."""
    if (key := os.path.realpath(folder)) in LOCKS:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"{folder} is in use by another training run (pid {f.read().strip() or '?'}); "
                        f"wait for it or choose another --out-dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    LOCKS[key] = f  # kept open: the lock lasts until the file is closed or the process ends


def unlock_folder(folder):
    if (f := LOCKS.pop(os.path.realpath(folder), None)) is not None:
        f.close()


def epoch_shard(n, batch_size, seed, epoch, rank, world, device):
    """Indices rank `rank` trains on in `epoch`: a seeded permutation (the same on every rank, and on
    resume), dealt round-robin and cut to equal whole batches -- DDP deadlocks if one rank steps alone."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen, device=device)
    return perm[rank::world][:n // world // batch_size * batch_size]


def model_batches(images, cfg, device, perm):
    """Yields (x [B, 3, S, S] channels_last, target): x itself, or the artifact detector's labels [B]."""
    for x in batches(images, cfg.batch_size, cfg.image_size, device, perm=perm):
        x, target = x if isinstance(x, tuple) else (x, x)
        yield x.contiguous(memory_format=torch.channels_last), target


@torch.no_grad()
def evaluate(model, images, cfg, device, rank=0, world=1):
    """Mean per-image loss (MSE, or BCE for the artifact detector) over `images`, sharded across ranks."""
    model.eval()
    shard = torch.arange(rank, images.shape[0], world, device=images.device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    for x, target in model_batches(images, cfg, device, shard):
        with autocast(device):
            loss = model.image_loss(model(x), target)  # [B]
        total[0] += loss.double().sum()
        total[1] += loss.numel()  # a Python scalar: no host-to-device copy
    return (all_reduce_sum(total)[0] / total[1]).item()


def train_one_epoch(net, image_loss, opt, images, cfg, device, epoch, rank, world):
    """(mean loss over every rank's steps, images seen by all ranks)."""
    net.train()
    shard = epoch_shard(images.shape[0], cfg.batch_size, cfg.seed, epoch, rank, world, images.device)
    total = torch.zeros((), device=device)
    bar = tqdm(total=len(shard) // cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not cfg.progress or rank != 0)
    for steps, (x, target) in enumerate(model_batches(images, cfg, device, shard), 1):
        with autocast(device):
            out = net(x)  # the reconstruction [B, 3, S, S] (bf16 on CUDA), or logits [B]
        loss = image_loss(out, target).mean()  # in fp32: MSE, the card's loss, or BCE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()  # stays on the device: no sync per step
        bar.update(1)
        if steps % 25 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.5f}")  # the only sync, for the progress bar
    bar.close()
    return (all_reduce_sum(total) / (steps * world)).item(), steps * cfg.batch_size * world


def new_model(cfg):
    net, config = ((ArtifactDetector, ArtifactConfig) if cfg.model == "artifact"
                   else (ResidualAutoencoder, AutoencoderConfig))
    try:
        return net(config(**{k: getattr(cfg, k) for k in ARCHITECTURE if hasattr(config, k)}))
    except ValueError as e:
        raise UserError(f"bad architecture flags: {e}") from None


def build(cfg, device, resume, overwrite, typed):
    """(cfg, model, opt, sched, first epoch, best val loss, history): fresh, or as --resume restores them."""
    last = Path(cfg.out_dir) / LAST_NAME
    if resume:
        if not last.exists():
            raise UserError(f"--resume: no {LAST_NAME} in {cfg.out_dir} (nothing to resume; drop --resume "
                            f"to start fresh)")
        if missing := RESUME_KEYS - set(ckpt := load_checkpoint_dict(last)):
            raise UserError(f"{last}: not a resume checkpoint (missing {sorted(missing)})")
        # out_dir is where the checkpoint is now, even if the run was moved there
        typed_now = {k: getattr(cfg, k) for k in {*typed, "out_dir"}}
        cfg = replace(saved_settings(ckpt["train_config"], last), **typed_now)
    elif last.exists() and not overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({LAST_NAME}); pass --resume to continue it, "
                        f"--overwrite to replace it, or another --out-dir")
    if not dist.is_initialized() or dist.get_rank() == 0:
        lock_folder(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    # existing weights (the run's, or --init-from's) decide the architecture; a resume reads the file once
    if resume:
        model = model_from_weights(ckpt["model"], ckpt["config"], last)
    else:
        model = load_model(cfg.init_from) if cfg.init_from else new_model(cfg)
    cfg = replace(cfg, model=getattr(model.config, "kind", "autoencoder"),
                  **{k: getattr(model.config, k) for k in ARCHITECTURE if hasattr(model.config, k)})
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    if not resume:
        return cfg, model, opt, sched, 1, math.inf, []
    try:  # states that do not fit this model, optimizer or RNG: an edited file, or another run's
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        for group in opt.param_groups:  # lr only if typed: the schedule may have lowered it
            group.update({k: getattr(cfg, k) for k in ("lr", "weight_decay") if k in typed})
        sched.factor, sched.patience = cfg.lr_factor, cfg.lr_patience  # never changed by the schedule itself
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and device.type == "cuda":  # this GPU only: the GPU count may differ now
            state = ckpt["rng"]["cuda"]
            torch.cuda.set_rng_state(state if torch.is_tensor(state) else state[0], device)
        start, best_val = ckpt["epoch"] + 1, float(ckpt["best_val_loss"])
        return cfg, model, opt, sched, start, best_val, list(ckpt.get("history", []))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{last}: cannot resume from it: {why}") from None


def train(cfg, resume=False, overwrite=False, typed=()):
    rank, world, device = setup_distributed(cfg.device)
    log = partial(print, flush=True) if rank == 0 else lambda *msg: None  # only rank 0 speaks
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients late in training otherwise slow CPU math many-fold
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run: autotuning pays off
    cfg, model, opt, sched, start_epoch, best_val, history = build(cfg, device, resume, overwrite, typed)
    out_dir = Path(cfg.out_dir)
    train_u8, val_u8, test_u8, source = load_datasets(cfg, device)
    log(f"data: {source}; train {len(train_u8):,} / val {len(val_u8):,} / test {len(test_u8):,} images "
        f"at {tuple(train_u8.shape[2:])} -> {cfg.image_size}x{cfg.image_size}")
    if len(train_u8) // world < cfg.batch_size:
        raise UserError(f"{len(train_u8)} training images make no full batch of {cfg.batch_size} per "
                        f"process; lower --batch-size")
    if resume:
        log(f"resumed from {out_dir / LAST_NAME} after epoch {start_epoch - 1} (best val {best_val:.6f})")
    elif cfg.init_from:
        log(f"fine-tuning from {cfg.init_from}")
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if cfg.compile:  # after DDP, as PyTorch advises; saving uses `model`
        net = torch.compile(net)
    log(f"model: {count_parameters(model):,} parameters, {model.config}; device {device} x {world}, "
        f"{precision_name(device)}")
    for epoch in range(start_epoch, cfg.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(net, model.image_loss, opt, train_u8, cfg, device, epoch, rank,
                                           world)
        seconds = time.perf_counter() - t0
        if dist.is_initialized():  # DDP leaves each rank its own BatchNorm statistics: keep rank 0's
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        val_loss = evaluate(model, val_u8, cfg, device, rank, world)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # all-reduced: every rank stops
            log(f"error: non-finite loss at epoch {epoch} (train {train_loss}, val {val_loss}); stopping. "
                f"The checkpoints in {out_dir} hold the last good epoch; try a lower --lr.")
            raise SystemExit(1)
        sched.step(val_loss)
        row = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"],
                   epoch_time_s=round(seconds, 3), images_per_s=round(seen / seconds, 1),
                   peak_memory_gb=round(peak_memory_gb(device), 3))
        history.append(row)
        improved, best_val = val_loss < best_val, min(best_val, val_loss)
        if rank == 0:
            save_checkpoints(out_dir, model, opt, sched, cfg, history, best_val, improved)
        log(f"epoch {epoch:3d} | train {train_loss:.6f} | val {val_loss:.6f}{' *' if improved else '  '} | "
            f"lr {row['lr']:.2e} | {seconds:6.1f}s | {row['images_per_s']:8.1f} img/s | "
            f"peak {row['peak_memory_gb']:.2f} GB")
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the best checkpoint
    best = load_model(out_dir / BEST_NAME, device)
    test_loss = evaluate(best, test_u8, cfg, device, rank, world)
    fingerprints = gather(weights_fingerprint(model))  # one per rank: equal if DDP kept them in step
    if rank == 0:
        write_results(out_dir, cfg, history, best, test_loss, fingerprints, world, device, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    unlock_folder(out_dir)


def main(argv=None):
    run_cli(lambda argv: train(*parse_args(argv)), argv)


if __name__ == "__main__":
    main()
