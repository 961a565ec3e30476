"""Weights on disk: train.py's checkpoints and run files, hub folders (config.json + model.safetensors), hub
downloads, and the fingerprint that binds thresholds to weights. Checkpoints load with weights_only=True."""

import argparse
import hashlib
import json
import re
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils import UserError, atomic_write, write_json

BEST_NAME = "model_best_checkpoint.ckpt"  # the card's file name
LAST_NAME = "last_checkpoint.ckpt"  # everything train.py --resume needs


def clean_state_dict(state_dict):
    """Strips the prefixes DDP ('module.') and torch.compile ('_orig_mod.') add to keys."""
    return {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state_dict.items()}


def weights_fingerprint(model):
    """sha256 hex over parameter names, dtypes, shapes and bytes, whatever file the weights came from."""
    h = hashlib.sha256()
    for name, t in sorted(clean_state_dict(model.state_dict()).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint_dict(path):
    """torch.load with weights_only=True (tensors and plain data, never code) -> dict; UserError otherwise."""
    try:
        # torch.load never checks the CRC32 that torch.save's zip keeps per tensor: a flipped bit would load
        if zipfile.is_zipfile(path) and (bad := zipfile.ZipFile(path).testzip()):
            raise UserError(f"{path}: corrupt: its record {bad} fails its checksum (a damaged file)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except UserError:
        raise
    except Exception as e:  # garbage makes the unpickler fail in many ways
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not even a pickle: no globals to name
            unsafe = []
        if unsafe:
            raise UserError(f"{path}: refused to load: it pickles {', '.join(unsafe[:3])}, objects other "
                            f"than tensors and plain data, which could run code") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a checkpoint of this repo (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def save_safetensors(model, folder):
    # safetensors refuses non-contiguous (channels_last) tensors
    sd = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    atomic_write(Path(folder, "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


def read_hub_folder(folder, weights_name="model.safetensors"):
    weights, config = Path(folder) / weights_name, Path(folder) / "config.json"
    if missing := [p.name for p in (weights, config) if not p.is_file()]:
        raise UserError(f"{folder}: hub-layout folder lacks {missing[0]}")
    try:
        return load_file(str(weights)), json.loads(config.read_text(encoding="utf-8"))
    except Exception as e:  # safetensors' own error types, bad JSON, bad UTF-8
        raise UserError(f"{folder}: not a readable {weights.name} + config.json ({str(e)[:160]})") from None


def read_source(source):
    """(state_dict, config dict or None) from any source load_model accepts."""
    path = Path(source)
    if path.is_dir() or path.suffix == ".safetensors" and path.is_file():
        return read_hub_folder(path) if path.is_dir() else read_hub_folder(path.parent, path.name)
    if path.is_file():
        ckpt = load_checkpoint_dict(path)
        keys = ("model", "model_state_dict", "state_dict")
        weights = next((ckpt[k] for k in keys if isinstance(ckpt.get(k), dict)),
                       ckpt if ckpt and all(torch.is_tensor(v) for v in ckpt.values()) else None)  # or bare
        if weights is None:
            raise UserError(f"{path}: no model weights inside (keys: {sorted(map(str, ckpt))[:8]})")
        return weights, ckpt.get("config") if weights is not ckpt else None
    # "user/name[@rev]" goes to the hub, unless it looks local (runs/x with runs/ here is a missing path)
    looks_local = path.suffix in (".ckpt", ".pt", ".pth", ".safetensors") or Path(path.parts[0]).exists()
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")) and not looks_local:
        from huggingface_hub import snapshot_download  # looked up at call time (tests replace it)
        repo_id, _, revision = str(source).partition("@")
        try:
            folder = snapshot_download(repo_id, revision=revision or None,
                                       allow_patterns=["*.safetensors", "*.json"])
        except Exception as e:  # network, auth and not-found errors all end in the same advice
            detail = " ".join(str(e).split())[:200]
            raise UserError(f"could not fetch {str(source)!r} from the Hugging Face hub ({detail})") from None
        return read_hub_folder(folder)
    raise UserError(f"{source}: not a regular file" if path.exists() else f"checkpoint not found: {source}")


RESUME_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_val_loss", "rng", "config", "train_config"}


def resume_state(model, opt, sched, cfg, history, best_val, world):
    """What --resume needs after history's last epoch, in plain types for weights_only=True loading (live
    tensors: copy before training goes on)."""
    device = next(model.parameters()).device
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {"model": model.state_dict(), "config": asdict(model.config), "train_config": asdict(cfg),
            "epoch": history[-1]["epoch"], "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "best_val_loss": best_val, "rng": {"torch": torch.get_rng_state(), **cuda}, "history": history,
            "world_size": world}


def saved_settings(config_class, saved, path):
    """The config a checkpoint saved, each value checked as its flag would check it: it may be edited."""
    where = ""
    try:
        cfg = config_class(**saved)  # TypeError: a setting this version does not have
        for f in fields(cfg):
            value, where = getattr(cfg, f.name), f"{f.name}: "
            if "type" in f.metadata and not isinstance(value, tuple):
                f.metadata["type"](str(value))
            if value not in f.metadata.get("choices", [value]):
                raise ValueError(f"{value!r} is not one of {f.metadata['choices']}")
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{path}: its saved settings are not ones train.py can resume ({where}{e})") from None
    return cfg


def restore(ckpt, opt, sched, cfg, device, path):
    """Restores `ckpt`'s optimizer, schedule, RNG -> (first epoch, best val, history, world), or UserError."""
    try:  # states that do not fit this model, optimizer or RNG: an edited file, or another run's
        saved_world = ckpt.get("world_size", 1)  # 1: a run saved before it was
        if not isinstance(saved_world, int) or saved_world < 1:
            raise ValueError(f"world_size {saved_world!r}")
        # fused as this device wants it: a CPU run resumed on a GPU gets the fused AdamW
        groups = [{**group, "fused": device.type == "cuda"} for group in ckpt["optimizer"]["param_groups"]]
        opt.load_state_dict({**ckpt["optimizer"], "param_groups": groups})
        sched.load_state_dict(ckpt["scheduler"])
        for group in opt.param_groups:  # lr only if changed: the schedule may have lowered it
            group.update({k: getattr(cfg, k) for k in ("lr", "weight_decay")
                          if getattr(cfg, k) != ckpt["train_config"].get(k)})
        sched.factor, sched.patience = cfg.lr_factor, cfg.lr_patience  # never changed by the schedule itself
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and device.type == "cuda":  # this GPU only: the GPU count may differ now
            state = ckpt["rng"]["cuda"]
            torch.cuda.set_rng_state(state if torch.is_tensor(state) else state[0], device)
        # rows saved before epoch_wall_s count their train time
        history = [{"epoch_wall_s": h["epoch_time_s"], **h} for h in ckpt.get("history", [])]
        return ckpt["epoch"] + 1, float(ckpt["best_val_loss"]), history, saved_world
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot resume from it: {why}") from None


def save_checkpoints(out_dir, state, best, last=True):
    """Rank 0, atomically: the weights of `state` as the best checkpoint if `best`, all of it as the last."""
    if best:
        weights = {k: state[k] for k in ("model", "config", "train_config", "epoch")}
        weights["val_loss"] = state["best_val_loss"]
        atomic_write(out_dir / BEST_NAME, lambda tmp: torch.save(weights, tmp))
    if last:
        atomic_write(out_dir / LAST_NAME, lambda tmp: torch.save(state, tmp))


def write_metrics(out_dir, history):
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(out_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_results(out_dir, cfg, history, best, test_loss, fingerprints, world, device, log):
    """Rank 0, after training: release/, the loss curve and results.json of the best model."""
    best.save_pretrained(out_dir / "release")
    import plots  # here: matplotlib costs every start (--help, a bad flag) a second otherwise
    plots.loss_curve(history, out_dir / "loss_curve.png")
    top, loss_name = min(history, key=lambda h: h["val_loss"]), "bce" if cfg.model == "artifact" else "mse"
    write_json(out_dir / "results.json", {
        f"test_{loss_name}": test_loss, "best_val_loss": top["val_loss"], "best_epoch": top["epoch"],
        "first_val_loss": history[0]["val_loss"], "epochs": len(history),
        "train_time_min": round(sum(h["epoch_wall_s"] for h in history) / 60, 3), "world_size": world,
        "global_batch": cfg.batch_size * world, "device": str(device), "final_weights_per_rank": fingerprints,
        "best_weights": weights_fingerprint(best), "config": asdict(cfg)})
    log(f"test {loss_name.upper()} {test_loss:.6f} (best val {top['val_loss']:.6f} at epoch {top['epoch']}); "
        f"checkpoints, release/, metrics, loss curve and results.json are in {out_dir}")
