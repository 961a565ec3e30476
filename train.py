"""Trains the autoencoder (the card's recipe) or, with --preset artifact, the detector of generator traces.

    python train.py                                          # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --batch-size 128 --sync-bn   # DDP, global batch 1024
    python train.py --resume --epochs 150 --out-dir runs/cifar10   # continue or extend a run
    python train.py --preset smoke --dataset synthetic --out-dir runs/smoke   # CPU, about a minute
    python train.py --dataset folder --data-dir ~/photos --init-from runs/cifar10/model_best_checkpoint.ckpt
    python train.py --preset artifact --data-dir generated/pairs/train --out-dir runs/artifact

Writes to --out-dir: model_best_checkpoint.ckpt, last_checkpoint.ckpt (to resume), metrics.jsonl,
loss_curve.png, results.json and release/ (hub layout)."""

import argparse
import copy
import fcntl
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import (BEST_NAME, LAST_NAME, RESUME_KEYS, load_checkpoint_dict, restore, resume_state,
                         save_checkpoints, saved_settings, weights_fingerprint, write_metrics, write_results)
from data import batches, epoch_shard, load_cifar10, load_datasets
from model import NETWORKS, AutoencoderConfig, count_parameters, load_model, model_from_weights, prepare_model
from utils import (SEED, ArgumentParser, UserError, all_reduce_sum, autocast, fast_math, gather, main_exit,
                   number, on_every_rank, parallel, peak_memory_gb, precision_name, run_cli,
                   setup_distributed)


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
    sync_bn: bool = setting(False, "under torchrun, BatchNorm over the global batch (CUDA only)")
    checkpoint_every: int = setting(1, f"write {LAST_NAME} every K epochs, at the last one and on Ctrl-C",
                                    type=number(int, 1), metavar="K")
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
RESUMABLE = ("epochs", "lr", "weight_decay", "lr_factor", "lr_patience", "progress", "out_dir", "device",
             "compile", "checkpoint_every")


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
        f"optimizer, LR schedule, RNG, settings, global batch); other flags may repeat the run's settings, "
        f"and only {flags(RESUMABLE)} may change them")
    add("--overwrite", action="store_true", help="start afresh even if --out-dir holds a previous run")
    if preset:  # a string default goes through `type` as a typed value does, and prints as one is typed
        defaults = {**asdict(TrainConfig()), **PRESETS[preset], "preset": preset}
        p.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, tuple) else v
                          for k, v in defaults.items()})
    return p


def parse_args(argv=None):
    """(cfg, resume, overwrite, given): flags over the preset's defaults; `given`: the settings they set."""
    typed = vars(build_parser().parse_known_args(argv)[0])  # unknown flags and --help: the next parser's
    args = build_parser(typed.get("preset", "card")).parse_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it: give one")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out-dir {cfg.out_dir} is a file, not a folder")
    return cfg, args.resume, args.overwrite, {*typed, *PRESETS[args.preset]}


def run_settings(cfg, resume, overwrite, given):
    """(cfg, resume checkpoint or None). With --resume, the saved run's settings: a setting `given` may equal
    the saved one, or differ if RESUMABLE (the architecture follows --init-from's weights, as when fresh)."""
    last = Path(cfg.out_dir) / LAST_NAME
    if not resume and last.exists() and not overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({LAST_NAME}); pass --resume to continue it, "
                        f"--overwrite to replace it, or another --out-dir")
    if not resume:
        return cfg, None
    if not last.exists():
        raise UserError(f"--resume: no {LAST_NAME} in {cfg.out_dir} (nothing to resume; drop --resume "
                        f"to start fresh)")
    if missing := RESUME_KEYS - set(ckpt := load_checkpoint_dict(last)):
        raise UserError(f"{last}: not a resume checkpoint (missing {sorted(missing)})")
    saved = saved_settings(TrainConfig, ckpt["train_config"], last)
    from_weights = ("model", *ARCHITECTURE) if saved.init_from else ()
    changed = [k for k in asdict(cfg) if k in given and k not in from_weights
               and getattr(cfg, k) != getattr(saved, k)]
    if refused := [k for k in changed if k not in RESUMABLE]:
        was = ", ".join(f"{flags([k])} {getattr(saved, k)}" for k in refused)
        raise UserError(f"{flags(refused)}: cannot change with --resume (the run has {was}), which continues "
                        f"the saved run as it was; only {flags(RESUMABLE)} can")
    # out_dir is where the checkpoint is now, even if the run was moved there
    return replace(saved, **{k: getattr(cfg, k) for k in [*changed, "out_dir"]}), ckpt


def lock_folder(folder):
    """--out-dir's lock, held while the returned file is open: two runs in a folder would mix checkpoints."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"{folder} is in use by another training run (pid {f.read().strip() or '?'}); "
                        f"wait for it or choose another --out-dir") from None
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)
    return f


@torch.no_grad()
def evaluate(model, images, cfg, device, rank=0, world=1):
    """Mean per-image loss (MSE, or BCE for the artifact detector) over `images`, sharded across ranks."""
    model.eval()
    shard = torch.arange(rank, images.shape[0], world, device=images.device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    for x, target in batches(images, cfg.batch_size, cfg.image_size, device, shard):
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
    for steps, (x, target) in enumerate(batches(images, cfg.batch_size, cfg.image_size, device, shard), 1):
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
    net, config = NETWORKS[cfg.model]
    try:
        return net(config(**{k: getattr(cfg, k) for k in ARCHITECTURE if hasattr(config, k)}))
    except ValueError as e:
        raise UserError(f"bad architecture flags: {e}") from None


def build(cfg, ckpt, device, world):
    """(cfg, model, opt, sched, first epoch, best val, history): fresh, or from `ckpt` at its global batch."""
    torch.manual_seed(cfg.seed)
    last = Path(cfg.out_dir) / LAST_NAME
    if ckpt:  # existing weights (the run's, or --init-from's) decide the architecture
        model = model_from_weights(ckpt["model"], ckpt["config"], last)
    else:
        model = load_model(cfg.init_from) if cfg.init_from else new_model(cfg)
    cfg = replace(cfg, model=getattr(model.config, "kind", "autoencoder"),
                  **{k: getattr(model.config, k) for k in ARCHITECTURE if hasattr(model.config, k)})
    model = model.to(device, memory_format=torch.channels_last)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.lr_factor, patience=cfg.lr_patience)
    if not ckpt:
        return cfg, model, opt, sched, 1, math.inf, []
    start, best_val, history, saved_world = restore(ckpt, opt, sched, cfg, device, last)
    batch = cfg.batch_size * saved_world  # global: the learning rate was set for it
    if batch % world:
        raise UserError(f"{last}: its global batch of {batch} ({cfg.batch_size} x {saved_world} processes) "
                        f"does not split evenly over {world}; resume on a number of processes dividing it")
    return replace(cfg, batch_size=batch // world), model, opt, sched, start, best_val, history


def fit(cfg, ckpt, rank, world, device):
    """Trains as `cfg` says (from `ckpt` if resumed), tests the best model; only rank 0 logs and writes."""
    log = partial(print, flush=True) if rank == 0 else lambda *msg: None
    fast_math(device)
    # what checkpoints record: the run's own per-process batch and process count, whatever they are now
    run_batch, run_world = cfg.batch_size, ckpt.get("world_size", 1) if ckpt else world
    cfg, model, opt, sched, start, best_val, history = on_every_rank(lambda: build(cfg, ckpt, device, world))
    out_dir = Path(cfg.out_dir)
    train_u8, val_u8, test_u8, source = on_every_rank(lambda: load_datasets(cfg, device))
    if len(train_u8) // world < cfg.batch_size:
        raise UserError(f"{len(train_u8)} training images make no full batch of {cfg.batch_size} per "
                        f"process; lower --batch-size")
    log(f"data: {source}; train {len(train_u8):,} / val {len(val_u8):,} / test {len(test_u8):,} images "
        f"at {tuple(train_u8.shape[2:])} -> {cfg.image_size}x{cfg.image_size}")
    if ckpt:
        log(f"resumed from {out_dir / LAST_NAME} after epoch {start - 1} (best val {best_val:.6f})")
    elif cfg.init_from:
        log(f"fine-tuning from {cfg.init_from}")
    net = on_every_rank(lambda: parallel(model, device, world, cfg.sync_bn, cfg.compile))
    log(f"model: {count_parameters(model):,} parameters, {model.config}; device {device} x {world}, batch "
        f"{cfg.batch_size} per process ({cfg.batch_size * world} in all), {precision_name(device)}")
    pending = None  # rank 0: the resume state of the last epoch while it is not on disk
    try:
        for epoch in range(start, cfg.epochs + 1):
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
                log(f"error: non-finite loss at epoch {epoch} (train {train_loss}, val {val_loss}); "
                    f"stopping. The checkpoints in {out_dir} hold the last good epoch; try a lower --lr.")
                raise SystemExit(1)
            sched.step(val_loss)
            row = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"],
                       epoch_time_s=round(seconds, 3), images_per_s=round(seen / seconds, 1),
                       peak_memory_gb=round(peak_memory_gb(device), 3))
            if device.type == "cuda":  # what the allocator held: what other work on the GPU could not use
                row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 3)
            history.append(row)
            improved, best_val = val_loss < best_val, min(best_val, val_loss)
            # the first epoch too: after it no older run's resume state (--overwrite) sits beside this run's
            due = epoch % cfg.checkpoint_every == 0 or epoch in (start, cfg.epochs)
            row["epoch_wall_s"] = round(time.perf_counter() - t0, 3)  # the checkpoint's: all but its writes
            state = resume_state(model, opt, sched, replace(cfg, batch_size=run_batch), history, best_val,
                                 run_world)
            if rank == 0 and not due:  # held until written: training goes on changing the live tensors
                pending = copy.deepcopy(state)
            on_every_rank(lambda: rank == 0 and save_checkpoints(out_dir, state, improved, due))
            pending = None if due else pending  # an interrupted write leaves the held epochs to be written
            row["epoch_wall_s"] = round(time.perf_counter() - t0, 3)  # with validation and the writes
            if rank == 0:
                write_metrics(out_dir, history)
            reserved = f" ({row['peak_reserved_gb']:.2f} reserved)" if "peak_reserved_gb" in row else ""
            log(f"epoch {epoch:3d} | train {train_loss:.6f} | val {val_loss:.6f}{' *' if improved else '  '} "
                f"| lr {row['lr']:.2e} | {seconds:6.1f}s train, {row['epoch_wall_s']:6.1f}s in all | "
                f"{row['images_per_s']:8.1f} img/s | peak {row['peak_memory_gb']:.2f} GB{reserved}")
    except BaseException:  # Ctrl-C, SIGTERM, a non-finite loss, a failed rank or collective
        if pending is not None:  # keeps the epochs finished since the last write
            save_checkpoints(out_dir, pending, best=False)
        raise
    best = on_every_rank(lambda: prepare_model(load_model(out_dir / BEST_NAME), device))  # as it trained
    test_loss = evaluate(best, test_u8, cfg, device, rank, world)
    fingerprints = gather(weights_fingerprint(model))  # one per rank: equal if DDP kept them in step
    on_every_rank(lambda: rank == 0 and write_results(out_dir, cfg, history, best, test_loss, fingerprints,
                                                      world, device, log))


def train(cfg, resume=False, overwrite=False, given=()):
    """Runs `cfg`, fresh or as --resume continues it. Errors before the process group are the same on every
    rank; after it, under torchrun, each rank's one-line error names it."""
    cfg, ckpt = run_settings(cfg, resume, overwrite, given)
    if cfg.dataset == "cifar10" and "LOCAL_RANK" in os.environ:  # before the process group: a download
        load_cifar10(cfg.data_dir)  # waits for another rank's under a lock, which has no timeout
    rank, world, device = setup_distributed(cfg.device)
    try:
        with on_every_rank(lambda: lock_folder(cfg.out_dir) if rank == 0 else nullcontext()):
            fit(cfg, ckpt, rank, world, device)
    except UserError as e:
        raise UserError(f"rank {rank}: {e}" if world > 1 else str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    run_cli(lambda argv: train(*parse_args(argv)), argv)


if __name__ == "__main__":
    main_exit(main)
