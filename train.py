"""Trains the autoencoder (defaults: the card's recipe) or, with --preset artifact, the detector of generator traces.

    python train.py                                          # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --batch-size 128    # DDP, global batch 1024
    python train.py --resume --epochs 150 --out-dir runs/cifar10   # continue or extend a run
    python train.py --preset smoke --dataset synthetic --out-dir runs/smoke   # CPU, about a minute
    python train.py --dataset folder --data-dir ~/photos --init-from runs/cifar10/model_best_checkpoint.ckpt
    python train.py --preset artifact --data-dir generated/pairs/train --out-dir runs/artifact   # generator traces

Writes to --out-dir: model_best_checkpoint.ckpt, last_checkpoint.ckpt (to resume), metrics.jsonl, loss_curve.png,
results.json and release/ (hub layout).
"""

import argparse
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import batches, dead_leaves, load_cifar10, load_image_folder, load_pairs, split_indices
from model import (ArtifactConfig, ArtifactDetector, AutoencoderConfig, ResidualAutoencoder, count_parameters, load_model,
                   model_from_weights)
from utils import (SEED, ArgumentParser, UserError, all_reduce_sum, atomic_write, autocast, gather, load_checkpoint_dict,
                   number, peak_memory_gb, precision_name, run_cli, setup_distributed,
                   weights_fingerprint, write_json)

BEST_NAME = "model_best_checkpoint.ckpt"  # the card's file name
LAST_NAME = "last_checkpoint.ckpt"


def setting(default, help, **argparse_kwargs):
    """A TrainConfig field, and the help (and any other argparse keywords) of its flag."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class TrainConfig:
    model: str = setting("autoencoder", "the card's autoencoder, or the detector of generator traces "
                                        "(model.ArtifactDetector)", choices=["autoencoder", "artifact"])
    dataset: str = setting("cifar10", "training images (pairs: real/ and one folder per generator, make_pairs.py)",
                           choices=["cifar10", "folder", "synthetic", "pairs"])
    data_dir: str = setting("./data", "CIFAR-10 download folder, or the image tree for --dataset folder / pairs")
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
    max_images: int = setting(0, "use at most this many training images, 0 = all (quick runs)", type=number(int, 0))
    crops_per_image: int = setting(0, "--dataset folder: take this many random image_size crops of the original "
                                      "pixels per image; 0 = each whole image, resized",
                                   type=number(int, 0))
    synthetic_images: int = setting(12000, "dead-leaves images for --dataset synthetic", type=number(int, 1))
    synthetic_size: int = setting(32, "their native size, as CIFAR's 32x32", type=number(int, 1))
    seed: int = setting(0, "weights init, data split and batch order", type=SEED)
    compile: bool = setting(False, "torch.compile the model")
    image_size: int = setting(128, "model input size")
    channels: tuple = setting(AutoencoderConfig.channels, "channels per stage, comma-separated")
    blocks_per_stage: int = setting(1, "residual blocks per stage")
    latent_dim: int = setting(512, "bottleneck width")
    init_from: str = setting(None, "fine-tune from these weights (any load_model source; sets the architecture)")
    progress: bool = setting(True, "tqdm progress bars")
    device: str = setting("auto", "auto: cuda if available", choices=["auto", "cpu", "cuda"])


ARCHITECTURE = ("image_size", "channels", "blocks_per_stage", "latent_dim")  # the fields that shape the model
PRESETS = {"card": {},
           # 3 stages at 32x32 learn in a few hundred steps (5 need thousands): a minute on a 2-core CPU
           "smoke": dict(epochs=12, batch_size=32, image_size=32, channels=(32, 64, 128), latent_dim=256,
                         synthetic_images=2400, max_images=2400, lr=1e-3, lr_patience=2),
           # aligned real / generated pairs, 64x64 tiles of native pixels: minutes on a 2-core CPU
           "artifact": dict(model="artifact", dataset="pairs", image_size=64, channels=(32, 64, 128),
                            blocks_per_stage=1, batch_size=64, epochs=12, lr=2e-3, lr_patience=1, weight_decay=1e-4)}
# what --resume lets a user change: none alters the data, the architecture or what the saved optimizer state means
RESUMABLE = ("epochs", "lr", "weight_decay", "lr_factor", "lr_patience", "progress", "out_dir", "device")


def flag(name):
    return "--" + name.replace("_", "-")


def build_parser(preset=None):
    """The command line, generated from TrainConfig. With preset=None no flag has a default
    (SUPPRESS), so parsing gives exactly the flags typed; --help belongs to the other one."""
    p = ArgumentParser(__doc__, allow_abbrev=False, add_help=preset is not None,
                       argument_default=None if preset else argparse.SUPPRESS)
    kind = {bool: dict(action=argparse.BooleanOptionalAction),
            tuple: dict(type=lambda text: tuple(int(c) for c in text.split(",")))}
    for f in fields(TrainConfig):
        p.add_argument(flag(f.name), **{**kind.get(f.type, dict(type=f.type)), **f.metadata})
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults to start from; flags typed override them")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out-dir from its {LAST_NAME} (weights, optimizer, LR schedule, RNG "
                        f"and settings); only {', '.join(map(flag, RESUMABLE))} may be typed with it")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a previous run")
    if preset:
        defaults = {**asdict(TrainConfig()), **PRESETS[preset], "preset": preset}
        # a string default goes through `type` like a typed value, and prints as one is typed
        p.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in defaults.items()})
    return p


def parse_args(argv=None):
    """(cfg, resume, overwrite, typed): the settings (the preset's defaults, then the flags), and
    the safe fields the user typed, the only ones --resume takes from the command line."""
    typed = vars(build_parser().parse_known_args(argv)[0])  # unknown flags and --help: next line
    args = build_parser(typed.get("preset", "card")).parse_args(argv)
    if args.resume and (unsafe := [k for k in typed if k not in RESUMABLE and k != "resume"]):
        raise UserError(f"{', '.join(map(flag, unsafe))}: cannot change with --resume, which continues the saved "
                        f"run as it was; only {', '.join(map(flag, RESUMABLE))} can")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out-dir {cfg.out_dir} is a file, not a folder")
    return cfg, args.resume, args.overwrite, set(typed) & set(RESUMABLE)


def saved_settings(saved, path):
    """The TrainConfig a checkpoint saved, each value checked as its flag would be: the file may be edited or old."""
    try:
        cfg = TrainConfig(**saved)
    except TypeError as e:  # a setting this train.py does not have
        raise UserError(f"{path}: its saved settings are not ones train.py can resume ({e})") from None
    for f in fields(TrainConfig):
        value, check = getattr(cfg, f.name), f.metadata.get("type")
        try:
            if check and not isinstance(value, tuple):
                check(str(value))
            if value not in f.metadata.get("choices", [value]):
                raise ValueError(f"{value!r} is not one of {f.metadata['choices']}")
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{path}: its saved settings are not ones train.py can resume ({f.name}: {e})") from None
    return cfg


def load_datasets(cfg, device):
    """uint8 tensors (train, val, test) on `device`, each [N, 3, H, W], and where they came from."""
    if (cfg.model == "artifact") != (cfg.dataset == "pairs"):
        raise UserError("the artifact detector trains on labelled pairs and only it does: use --preset artifact "
                        "--data-dir PAIRS (real/ and one folder per generator, scripts/generated/make_pairs.py)")
    if cfg.dataset == "pairs":  # val and test hold whole source photos: no scene is on both sides of a split
        pool, photos, generators = load_pairs(cfg.data_dir, cfg.image_size, cfg.seed)
        rest, test = split_by_photo(photos, cfg.test_fraction, cfg.seed + 1)
        train, val = (rest[i] for i in split_by_photo([photos[i] for i in rest], cfg.val_fraction, cfg.seed))
        pool, source = pool.to(device), f"{len(set(photos))} photos' pairs in {cfg.data_dir}, generators {', '.join(generators)}"
        return pool[train], pool[val], pool[test], source
    if cfg.dataset == "cifar10":
        # one download per node: local rank 0 fetches and extracts, the other ranks wait, then read its files
        first = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if dist.is_initialized() and not first:
            dist.barrier()
        pool, test = load_cifar10(cfg.data_dir, train=True), load_cifar10(cfg.data_dir, train=False)
        if dist.is_initialized() and first:
            dist.barrier()
        source = f"CIFAR-10 in {cfg.data_dir}"
    elif cfg.dataset == "synthetic":
        pool = dead_leaves(cfg.synthetic_images, cfg.synthetic_size, seed=cfg.seed)
        source = f"{cfg.synthetic_images:,} dead-leaves images at {cfg.synthetic_size}x{cfg.synthetic_size}"
    else:
        skipped = []
        pool, _, n_skipped = load_image_folder(cfg.data_dir, cfg.image_size, lambda *e: skipped.append(e),
                                               cfg.crops_per_image, cfg.seed)
        for path, reason in skipped[:5]:  # enough to see what is wrong, without flooding the terminal
            print(f"skipped {path}: {reason}", file=sys.stderr)
        what = f"crops ({cfg.crops_per_image} per image, original pixels)" if cfg.crops_per_image else "images"
        source = f"{pool.shape[0]:,} {what} from {cfg.data_dir} ({n_skipped} unreadable skipped)"
    if cfg.dataset != "cifar10":  # a fixed test split, seeded apart from the validation split
        pool, test = (pool[i] for i in split_indices(pool.shape[0], cfg.test_fraction, cfg.seed + 1))
    train, val = (pool[i] for i in split_indices(pool.shape[0], cfg.val_fraction, cfg.seed))
    if cfg.max_images:
        n = max(cfg.max_images // 8, 1)
        train, val, test = train[:cfg.max_images], val[:n], test[:n]
    # the whole data set lives on the device as uint8 at native size; batches are cut there
    return train.to(device), val.to(device), test.to(device), source


LOCKS = {}  # folder -> its open lock file, for the folders this process holds


def lock_folder(folder):
    """An exclusive lock on --out-dir for this process (re-entrant), or a UserError naming the pid that holds it:
    two runs in one folder would mix their checkpoints. The kernel drops it when the process ends, however it ends."""
    if (key := os.path.realpath(folder)) in LOCKS:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"{folder} is in use by another training run (pid {f.read().strip() or '?'}); wait for it "
                        f"or choose another --out-dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    LOCKS[key] = f  # kept open: closing the file releases the lock


def unlock_folder(folder):
    if (f := LOCKS.pop(os.path.realpath(folder), None)) is not None:
        f.close()


def split_by_photo(photos, fraction, seed):
    """(kept, held) indices of samples: `fraction` of the distinct photos (seeded) are held out, all their samples."""
    names = sorted(set(photos))
    held = {names[i] for i in split_indices(len(names), fraction, seed)[1].tolist()}
    is_held = torch.tensor([p in held for p in photos])
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)


def epoch_shard(n, batch_size, seed, epoch, rank, world, device):
    """Indices rank `rank` trains on in `epoch`: a fresh seeded permutation (identical on every
    rank, reproducible on resume), dealt round-robin and cut to the same whole number of
    batches on every rank -- DDP deadlocks if one rank takes a step the others do not."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen, device=device)
    return perm[rank::world][:n // world // batch_size * batch_size]


@torch.no_grad()
def evaluate(model, images, cfg, device, rank=0, world=1):
    """Mean per-image loss (MSE, or BCE for the artifact detector) over `images`, sharded across ranks."""
    model.eval()
    shard = torch.arange(rank, images.shape[0], world, device=images.device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of errors, count]
    for x in batches(images, cfg.batch_size, cfg.image_size, device, perm=shard):
        x, target = x if isinstance(x, tuple) else (x, x)  # the artifact detector's target is its labels
        with autocast(device):
            x = x.contiguous(memory_format=torch.channels_last)
            err = model.image_loss(model(x), target)  # [B]
        total[0] += err.double().sum()
        total[1] += err.numel()  # a Python scalar: no host-to-device copy
    return (all_reduce_sum(total)[0] / total[1]).item()


def train_one_epoch(net, image_loss, opt, images, cfg, device, epoch, rank, world):
    """(mean loss over every rank's steps, images seen by all ranks)."""
    net.train()
    shard = epoch_shard(images.shape[0], cfg.batch_size, cfg.seed, epoch, rank, world, images.device)
    total = torch.zeros((), device=device)
    bar = tqdm(total=len(shard) // cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not cfg.progress or rank != 0)
    for steps, x in enumerate(batches(images, cfg.batch_size, cfg.image_size, device, perm=shard), 1):
        x, target = x if isinstance(x, tuple) else (x, x)  # the artifact detector's target is its labels
        x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, S, S]
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
    try:
        if cfg.model == "artifact":
            return ArtifactDetector(ArtifactConfig(image_size=cfg.image_size, channels=cfg.channels,
                                                   blocks_per_stage=cfg.blocks_per_stage))
        return ResidualAutoencoder(AutoencoderConfig(**{k: getattr(cfg, k) for k in ARCHITECTURE}))
    except ValueError as e:
        raise UserError(f"bad architecture flags: {e}") from None


def build(cfg, device, resume, overwrite, typed):
    """(cfg, model, opt, sched, first epoch to train, best validation loss, history): fresh, or with --resume as
    the run in --out-dir saved them (settings, weights, optimizer, schedule, RNG) but for the safe flags typed now."""
    last = Path(cfg.out_dir) / LAST_NAME
    if resume and not last.exists():
        raise UserError(f"--resume: no {LAST_NAME} in {cfg.out_dir} (nothing to resume; drop --resume to start fresh)")
    if resume:
        ckpt = load_checkpoint_dict(last)
        keys = {"model", "optimizer", "scheduler", "epoch", "best_val_loss", "rng", "config", "train_config"}
        if missing := keys - set(ckpt):
            raise UserError(f"{last}: not a resume checkpoint (missing {sorted(missing)})")
        # out_dir is where the checkpoint is now, even if the run was moved there
        cfg = replace(saved_settings(ckpt["train_config"], last), **{k: getattr(cfg, k) for k in {*typed, "out_dir"}})
    elif last.exists() and not overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({LAST_NAME}); pass --resume to continue it, "
                        f"--overwrite to replace it, or another --out-dir")
    if not dist.is_initialized() or dist.get_rank() == 0:
        lock_folder(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    # existing weights (the run's on --resume, or --init-from's) decide the architecture and input size
    if resume:  # the checkpoint read above: not a second read of a file that may be gigabytes
        model = model_from_weights(ckpt["model"], ckpt["config"], last)
    else:
        model = load_model(cfg.init_from) if cfg.init_from else new_model(cfg)
    cfg = replace(cfg, model=getattr(model.config, "kind", "autoencoder"),
                  **{k: getattr(model.config, k) for k in ARCHITECTURE if hasattr(model.config, k)})
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    if not resume:
        return cfg, model, opt, sched, 1, math.inf, []
    try:  # states that do not fit this model, optimizer or RNG: an edited file, or another run's
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        for group in opt.param_groups:  # lr only if typed: the schedule may have lowered it
            group.update({k: getattr(cfg, k) for k in ("lr", "weight_decay") if k in typed})
        sched.factor, sched.patience = cfg.lr_factor, cfg.lr_patience  # never changed by the schedule itself
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and device.type == "cuda":  # this process's GPU only: the GPU count may differ now
            state = ckpt["rng"]["cuda"]
            torch.cuda.set_rng_state(state if torch.is_tensor(state) else state[0], device)
        return cfg, model, opt, sched, ckpt["epoch"] + 1, float(ckpt["best_val_loss"]), list(ckpt.get("history", []))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise UserError(f"{last}: cannot resume from it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def save_checkpoints(out_dir, model, opt, sched, cfg, history, best_val, improved):
    """Rank 0, after each epoch, atomically; plain types only, for weights_only=True loading."""
    state = {"model": model.state_dict(), "config": asdict(model.config),
             "train_config": asdict(cfg), "epoch": history[-1]["epoch"]}
    if improved:
        atomic_write(out_dir / BEST_NAME, lambda tmp: torch.save({**state, "val_loss": best_val}, tmp))
    device = next(model.parameters()).device
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), best_val_loss=best_val,
                 rng={"torch": torch.get_rng_state(), **cuda}, history=history)
    atomic_write(out_dir / LAST_NAME, lambda tmp: torch.save(state, tmp))
    metrics = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(out_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(metrics, encoding="utf-8"))


def train(cfg, resume=False, overwrite=False, typed=()):
    rank, world, device = setup_distributed(cfg.device)
    log = partial(print, flush=True) if rank == 0 else lambda *msg: None  # only rank 0 speaks
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients late in training otherwise slow CPU math many-fold
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # for fp32 outside autocast
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run: autotuning pays off
    cfg, model, opt, sched, start_epoch, best_val, history = build(cfg, device, resume, overwrite, typed)
    out_dir = Path(cfg.out_dir)
    train_u8, val_u8, test_u8, source = load_datasets(cfg, device)
    log(f"data: {source}; train {len(train_u8):,} / val {len(val_u8):,} / test {len(test_u8):,} images "
        f"at {tuple(train_u8.shape[2:])} -> {cfg.image_size}x{cfg.image_size}")
    if len(train_u8) // world < cfg.batch_size:
        raise UserError(f"{len(train_u8)} training images make no full batch of {cfg.batch_size} per process; "
                        f"lower --batch-size")
    if resume:
        log(f"resumed from {out_dir / LAST_NAME} after epoch {start_epoch - 1} (best val {best_val:.6f})")
    elif cfg.init_from:
        log(f"fine-tuning from {cfg.init_from}")
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if cfg.compile:  # after DDP, as PyTorch advises (its graph then splits at DDP's buckets); saving uses `model`
        net = torch.compile(net)
    log(f"model: {count_parameters(model):,} parameters, {model.config}; device {device} x {world}, "
        f"{precision_name(device)}")
    for epoch in range(start_epoch, cfg.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(net, model.image_loss, opt, train_u8, cfg, device, epoch, rank, world)
        epoch_time = time.perf_counter() - t0
        # DDP syncs BatchNorm statistics before a forward, so each rank ends the epoch with its own: use rank 0's
        if dist.is_initialized():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        val_loss = evaluate(model, val_u8, cfg, device, rank, world)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # all-reduced: every rank stops here
            log(f"error: non-finite loss at epoch {epoch} (train {train_loss}, val {val_loss}); stopping. "
                f"The checkpoints in {out_dir} hold the last good epoch; try a lower --lr.")
            raise SystemExit(1)
        sched.step(val_loss)
        row = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"],
                   epoch_time_s=round(epoch_time, 3), images_per_s=round(seen / epoch_time, 1),
                   peak_memory_gb=round(peak_memory_gb(device), 3))
        history.append(row)
        improved, best_val = val_loss < best_val, min(best_val, val_loss)
        if rank == 0:
            save_checkpoints(out_dir, model, opt, sched, cfg, history, best_val, improved)
        log(f"epoch {epoch:3d} | train {train_loss:.6f} | val {val_loss:.6f}{' *' if improved else '  '} | "
            f"lr {row['lr']:.2e} | {epoch_time:6.1f}s | {row['images_per_s']:8.1f} img/s | "
            f"peak {row['peak_memory_gb']:.2f} GB")

    # the test MSE of the best model; rank 0 writes release/, the plot and results.json
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the best checkpoint
    best = load_model(out_dir / BEST_NAME, device)
    test_loss = evaluate(best, test_u8, cfg, device, rank, world)
    loss_name = "bce" if cfg.model == "artifact" else "mse"
    fingerprints = gather(weights_fingerprint(model))  # one per rank: equal if DDP kept them in step
    if rank == 0:
        best.save_pretrained(out_dir / "release")
        import plots  # here: matplotlib costs every start (--help, a bad flag) a second otherwise

        plots.loss_curve(history, out_dir / "loss_curve.png")
        top = min(history, key=lambda h: h["val_loss"])
        write_json(out_dir / "results.json", dict(
            **{f"test_{loss_name}": test_loss}, best_val_loss=top["val_loss"], best_epoch=top["epoch"],
            first_val_loss=history[0]["val_loss"], epochs=len(history),
            train_time_min=round(sum(h["epoch_time_s"] for h in history) / 60, 3), world_size=world, device=str(device),
            final_weights_per_rank=fingerprints, best_weights=weights_fingerprint(best), config=asdict(cfg)))
        log(f"test {loss_name.upper()} {test_loss:.6f} (best val {top['val_loss']:.6f} at epoch {top['epoch']}); "
            f"checkpoints, release/, metrics, loss curve and results.json are in {out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()
    unlock_folder(out_dir)


def main(argv=None):
    run_cli(lambda argv: train(*parse_args(argv)), argv)


if __name__ == "__main__":
    main()
