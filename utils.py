"""Helpers every script shares: the one user-error class, atomic writes, safe checkpoint loading,
weight fingerprints, the precision policy, device choice and the torchrun setup."""

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, unusable checkpoint); the
    message says what and how in one line. Each script prints it as `error: ...` and exits 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help prints the script's docstring as written, and every flag's default (a None default is
    described in the flag's own help)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if quiet or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script here uses it: --help shows the docstring and the defaults, and a bad
    flag is one `error: ...` line and exit 2, like every other user error."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        for action in self._actions:  # `--output ""` would otherwise mean "no output" without a word
            value = getattr(parsed, action.dest, None)
            if action.option_strings and ("" in value if isinstance(value, list) else value == ""):
                self.error(f"{action.option_strings[0]}: an empty value (give one, or leave the flag out)")
        return parsed, extra


def number(kind=int, low=None, high=None):
    """An argparse type: a finite `kind` in [low, high], checked when the flag is read."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low if low is not None else '-inf'}, "
                                             f"{high if high is not None else 'inf'}]")
        return value
    return parse


SEED = number(int, 0, 2**63 - 1)  # what torch.manual_seed and numpy both take


def printable(text):
    """text with control characters escaped: a file name must not be able to forge or split a printed line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in str(text))


def csv_cell(value):
    """None -> empty; text that starts like a formula gets a leading ' so spreadsheets show it as text (OWASP)."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return "" if value is None else value


def run_cli(main, argv=None):
    """Calls main(argv): a UserError becomes one line on stderr and exit status 2, Ctrl-C exit 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C: every output is whole (atomic writes) or untouched
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def atomic_write(path, write_fn):
    """write_fn(tmp) writes a temp file beside `path`, which is then renamed over it: a crash
    at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_not_an_input(path, reads):
    """A one-line UserError if the output `path` is one of the files the run reads (its weights, say)."""
    for read in reads:
        if read and os.path.isfile(read) and os.path.isfile(path) and os.path.samefile(read, path):
            raise UserError(f"cannot write {path}: it is {read}, which this run reads; choose another output path")


def check_writable(path):
    """A one-line UserError now, not after an hour of work, if `path`'s folder cannot take a file."""
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: is a directory")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=Path(path).parent) as f:  # real bytes: a full disk must fail here
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, obj):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def clean_state_dict(state_dict):
    """Strips the prefixes DDP ('module.') and torch.compile ('_orig_mod.') add to keys."""
    prefix = re.compile(r"^((module|_orig_mod)\.)+")
    return {prefix.sub("", k): v for k, v in state_dict.items()}


def weights_fingerprint(model_or_state_dict):
    """sha256 over parameter names, dtypes, shapes and bytes: the same for the same weights
    whatever file they came from, so a thresholds file can be bound to them. An exported model (export.py)
    carries the fingerprint of the weights it was exported from."""
    if hasattr(model_or_state_dict, "fingerprint"):
        return model_or_state_dict.fingerprint
    sd = model_or_state_dict
    sd = sd.state_dict() if isinstance(sd, torch.nn.Module) else sd  # prefixes of DDP / compile are cleaned below
    h = hashlib.sha256()
    for name, t in sorted(clean_state_dict(sd).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint_dict(path):
    """torch.load with weights_only=True: tensors and plain data only, never code."""
    try:
        # torch.save writes a zip with a CRC32 per tensor, which torch.load never checks: a flipped bit would
        # otherwise be trained on as if it were a weight
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
            raise UserError(f"{path}: refused to load: it pickles {', '.join(unsafe[:3])}, objects other than "
                            f"tensors and plain data, which could run code") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a checkpoint of this repo (holds a {type(ckpt).__name__}, expected a dict)")
    return ckpt


LOCKS = {}  # folder -> its open lock file, for the folders this process holds


def lock_folder(folder):
    """An exclusive lock on `folder` for this process, or a UserError naming the pid that holds it. The kernel
    drops it when the process ends, however it ends; re-entrant within a process."""
    key = os.path.realpath(folder)
    if key in LOCKS:
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


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast(device):
    """The precision policy everywhere: bf16 autocast on CUDA; fp32 on CPU (the CPUs we
    target have no fast bf16). Errors and losses are always taken in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision_name(device):
    return "bf16 autocast, scores in fp32" if device.type == "cuda" else "fp32"


def setup_distributed(device_name="auto"):
    """(rank, world, device). One process unless torchrun set RANK; then NCCL on
    cuda:LOCAL_RANK, or gloo on the CPU."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= gpus:
            raise UserError(f"torchrun started local rank {local} but {gpus} GPU(s) are visible: use "
                            f"--nproc_per_node={gpus} (or --device cpu)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj):
    """Every rank's obj in rank order (a list of one without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # here: POSIX only, and only training and bench.py ask
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB
