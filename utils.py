"""Helpers every script shares: the command line (UserError, ArgumentParser, the model flags, run_cli), the
output guards (check_output, atomic_write), and the device, precision and torchrun setup."""

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class UserError(Exception):
    """A problem the user can fix, said in one line: run_cli prints it as `error: ...` and exits 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help prints the docstring as written and each flag's default, unless None, False or empty."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d in ([], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, where a bad or empty flag value is one `error: ...` line and exit 2."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        for action in self._actions:  # `--output ""` would otherwise mean "no output" without a word
            value = getattr(parsed, action.dest, None)
            if action.option_strings and ("" in value if isinstance(value, list) else value == ""):
                self.error(f"{action.option_strings[0]}: an empty value (give one, or leave the flag out)")
        return parsed, extra


def number(kind=int, low=-math.inf, high=math.inf):
    """An argparse type: a finite `kind` in [low, high] (unbounded by default)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]")
        return value
    return parse


SEED = number(int, 0, 2**63 - 1)  # what torch.manual_seed and numpy both take


def run_cli(main, argv=None):
    """Calls main(argv): a UserError becomes one line on stderr and exit status 2, Ctrl-C exit 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # every output is whole (atomic writes) or untouched
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main_exit(main):
    """A script's __main__: runs main(), SIGTERM raising SystemExit (a scheduler's preemption: training writes
    what it holds), and exits with its status, under torchrun without C++ destructors: a gloo process group's
    threads can abort a finished process ('terminate called', exit -6), which torchrun reports as failed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        status = main()
    except SystemExit as stop:
        status = stop.code
    if isinstance(status, str):  # SystemExit's message
        print(status, file=sys.stderr)
        status = 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status)


def printable(text):
    """text with control characters escaped, so that a file name cannot forge or split a printed line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode()
                   for c in str(text))


def add_model_flags(parser, checkpoint_help="the autoencoder: train.py checkpoint, hub folder or hub repo id",
                    artifact_help="an artifact detector (train.py --preset artifact; --score artifact alone "
                                  "defaults to the shipped artifact_detector/)", thresholds=True):
    """The flags every script that scores declares alike: the models, the thresholds file, the device."""
    add = parser.add_argument
    add("--checkpoint", default=None, help=checkpoint_help)
    add("--artifact-model", default=None, help=artifact_help)
    if thresholds:
        add("--thresholds", help="thresholds JSON (default: docs/method.md#which-thresholds-file-applies)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")


def csv_cell(value):
    """None -> empty; text that starts like a formula gets a leading ' so spreadsheets show it as text."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return "" if value is None else value


def atomic_write(path, write_fn):
    """write_fn(tmp) writes a temp file that then replaces `path`: it is old or new, never half-written."""
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


def check_output(path, reads=(), probe=True):
    """Fails early: UserError if `path` is one of `reads` or (probe) its folder cannot take a 1 MiB file."""
    for read in reads:
        if read and os.path.isfile(read) and os.path.isfile(path) and os.path.samefile(read, path):
            raise UserError(f"cannot write {path}: it is {read}, which this run reads; "
                            f"choose another output path")
    if not probe:
        return
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: is a directory")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=Path(path).parent) as f:  # real bytes: a full disk fails here
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, obj):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast(device):
    """The precision policy: bf16 autocast on CUDA, fp32 on CPU (no fast bf16); errors and losses in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fast_math(device):
    """Training's and bench.py's settings, process-wide: on a CPU denormals flushed (tiny gradients late in
    training otherwise slow CPU math many-fold); on CUDA TF32 for fp32 matmuls and cuDNN autotuning."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run: autotuning pays off


def precision_name(device, autoencoder=True):
    """What scores run in: autocast() for the autoencoder; the artifact detector's tiles always in fp32."""
    return "bf16 autocast, scores in fp32" if device.type == "cuda" and autoencoder else "fp32"


def setup_distributed(device_name="auto"):
    """(rank, world, device): one process unless torchrun set RANK; then NCCL on cuda:LOCAL_RANK, or gloo."""
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


def on_every_rank(step):
    """step() where all ranks meet: if it failed on any rank, every rank stops (that one with its error, the
    others with exit status 1 and a line naming it) rather than wait for it at the next collective."""
    try:
        result, error = step(), None
    except Exception as e:
        result, error = None, e
    failed = [rank for rank, bad in enumerate(gather(error is not None)) if bad]
    if error is not None:
        raise error
    if failed:
        raise SystemExit(f"error: rank {dist.get_rank()}: stopping, as rank {failed[0]} failed")
    return result


def parallel(model, device, world, sync_bn=False, compile=False):
    """What trains: `model` (which checkpoints save) in DDP under torchrun, its BatchNorm synchronised with
    sync_bn, compiled with compile (after DDP, as PyTorch advises)."""
    if world > 1 and sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA only; drop it on the CPU")
    if world > 1 and sync_bn:  # in place: `model` keeps its state_dict keys
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    return torch.compile(net) if compile else net


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # here: POSIX only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB
