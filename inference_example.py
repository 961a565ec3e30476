"""
Scores images as REAL or FAKE by their reconstruction error: one line per image, then
a summary; optionally a CSV / JSON / JSON Lines file and per-image heatmaps.

    python inference_example.py photos/ img.jpg "scans/**/*.png" --checkpoint runs/cifar10/model_best_checkpoint.ckpt
    python inference_example.py photos/ --checkpoint CKPT --threshold strict --output results.csv
    python inference_example.py photos/ --checkpoint CKPT --score combined --heatmaps heatmaps/
    torchrun --nproc_per_node=8 inference_example.py photos/ --checkpoint CKPT --output results.jsonl

Thresholds: --thresholds, else thresholds_calibrated.json next to the checkpoint
(written by calibrate.py for those weights), else the repo's top-level one (the card's
published values, bound to no weights: a warning says so).

Exit status: 0 every input scored; 1 some inputs unreadable (the rest are still scored
and written); 2 usage or configuration error (one line on stderr).
"""

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from data import describe_count
from detector import BASE_SCORES, SCORES, ConfigError, Detector, pick_device
from model import CheckpointError

THRESHOLDS_NAME = "thresholds_calibrated.json"
REPO_THRESHOLDS = Path(__file__).resolve().parent / THRESHOLDS_NAME
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    add("--checkpoint", required=True, help="train.py checkpoint, hub-layout folder or hub repo id")
    add("--thresholds", default=None,
        help=f"thresholds JSON (default: {THRESHOLDS_NAME} next to the checkpoint, else the repo's)")
    add("--threshold", default="balanced",
        help="strict | balanced | sensitive | optimal | a number; for --score combined a p-value level "
             "(default: balanced)")
    add("--score", choices=SCORES, default="mse", help="which score decides (default: mse, the card's)")
    add("--output", default=None, help="also write the rows to this .csv, .json or .jsonl file (default: none)")
    add("--heatmaps", default=None, metavar="DIR",
        help="write one PNG per image: input, reconstruction, error map (default: none)")
    add("--batch-size", type=int, default=None, help="images per forward pass (default: 32 on CPU, 256 on CUDA)")
    add("--workers", type=int, default=None, help="decoding processes per rank (default: min(4, CPU count))")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto (cuda if available)")
    return p.parse_args(argv)


def default_thresholds(checkpoint):
    """The calibration of these very weights if it sits beside them, else the card's values."""
    ckpt = Path(checkpoint)
    beside = (ckpt if ckpt.is_dir() else ckpt.parent) / THRESHOLDS_NAME
    for candidate in (beside, REPO_THRESHOLDS):
        if candidate.is_file():
            return str(candidate)
    return None


def output_format(path):
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--output {path}: the extension must be one of {', '.join(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------
# distributed: the same script runs as one process or under torchrun

def setup_distributed(device_name):
    """Returns (rank, world, device); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    device = pick_device(device_name)  # ConfigError when cuda is asked for and absent
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj, world):
    """Every rank's obj, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------
# rows: stdout lines and streamed output files

def output_columns():
    """Fixed up front: a CSV header cannot grow. A score the detector did not compute stays empty."""
    return ["path", "score_name", "score", "p_value", "verdict", "threshold", "error", *BASE_SCORES]


def file_row(row, det):
    """A Detector row as written to files: plain values only (no tensors), None where absent."""
    return {"path": row["path"], "score_name": det.score_name, "score": row.get("score"),
            "p_value": row.get("p_value"), "verdict": "UNREADABLE" if "error" in row else row.get("verdict"),
            "threshold": det.threshold, "error": row.get("error"), **{s: row.get(s) for s in BASE_SCORES}}


def result_line(row, score_name):
    if "error" in row:
        return f"{row['path']}\tUNREADABLE: {row['error']}"
    if score_name == "combined":  # the score is itself a p-value
        return f"{row['path']}\tcombined p={row['score']:.6g}\t{row['verdict']}"
    p = f"\tp={row['p_value']:.6g}" if row.get("p_value") is not None else ""
    return f"{row['path']}\t{score_name}={row['score']:.6g}{p}\t{row['verdict']}"


class RowWriter:
    """Streams rows to CSV, a JSON list or JSON Lines, flushing each one: memory stays flat
    however many images, and an interrupted run leaves every row scored so far on disk."""

    def __init__(self, path, columns, fmt):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # utf-8 keeps Unicode names as they are; backslashreplace only touches file names
        # that are not valid UTF-8 (surrogate escapes), which would otherwise stop the run
        self.f = open(path, "w", encoding="utf-8", errors="backslashreplace", newline="")
        self.fmt, self.n = fmt, 0
        if fmt == "csv":
            self.csv = csv.DictWriter(self.f, fieldnames=columns)
            self.csv.writeheader()
        elif fmt == "json":
            self.f.write("[")

    def write(self, row):
        if self.fmt == "csv":
            self.csv.writerow({k: "" if v is None else v for k, v in row.items()})
        elif self.fmt == "json":
            self.f.write(("," if self.n else "") + "\n  " + json.dumps(row, ensure_ascii=False))
        else:
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.n += 1
        self.f.flush()

    def close(self):
        if self.fmt == "json":
            self.f.write("\n]\n" if self.n else "]\n")
        self.f.close()


def part_path(output, rank):
    return f"{output}.rank{rank}.part"


def merge_parts(output, columns, fmt, world):
    """Rank 0 concatenates every rank's JSON Lines part into the requested format."""
    writer = RowWriter(output, columns, fmt)
    for rank in range(world):
        part = part_path(output, rank)
        with open(part, encoding="utf-8") as f:
            for line in f:
                writer.write(json.loads(line))
        os.remove(part)
    writer.close()


# ----------------------------------------------------------------------------
# heatmaps

def heatmap_name(path):
    """<stem>-<8 hex of the path>.png: readable, and distinct for same-named files in
    different folders (and the same on every rank, unlike a running index)."""
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:8]
    # at most 120 bytes of the name (file systems cap names at 255); drops bytes that are not UTF-8
    stem = os.fsencode(Path(path).stem)[:120].decode("utf-8", "ignore") or "image"
    return f"{stem}-{digest}.png"


def save_heatmap(row, directory, score_name):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg by default

    from plots import to_image as rgb  # normalized [-1, 1] [3, S, S] -> [S, S, 3] in [0, 1]

    fig = Figure(figsize=(9.6, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb(row["input"]))
    axes[0].set_title("input (as the model sees it)")
    axes[1].imshow(rgb(row["recon"]))
    axes[1].set_title("reconstruction")
    im = axes[2].imshow(row["map"].numpy(), cmap="inferno")
    axes[2].set_title("squared error per pixel")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{row['verdict']}  ({score_name} {row['score']:.6g})")
    fig.savefig(Path(directory) / heatmap_name(row["path"]), dpi=100)


# ----------------------------------------------------------------------------

def setup(args):
    """Everything that can fail on a bad flag or file, before any image is scored."""
    fmt = output_format(args.output) if args.output else None
    rank, world, device = setup_distributed(args.device)
    thresholds = args.thresholds or default_thresholds(args.checkpoint)
    det = Detector(args.checkpoint, thresholds, device=str(device), score=args.score, threshold=args.threshold,
                   batch_size=args.batch_size, workers=args.workers)
    return det, thresholds, fmt, rank, world


def open_outputs(args, det, fmt, rank, world):
    """The row writer (or None); makes the heatmap folder. Before scoring, so that an
    unwritable path is a usage error rather than a crash after the first batch."""
    if args.heatmaps:
        maps = Path(args.heatmaps).resolve()
        for p in args.paths:
            if os.path.isdir(p) and maps.is_relative_to(Path(p).resolve()):
                # folders are listed lazily: the heatmaps written so far would be scored as inputs
                raise ConfigError(f"--heatmaps {args.heatmaps} lies inside the input folder {p}; choose one outside it")
        maps.mkdir(parents=True, exist_ok=True)
    if not args.output:
        return None
    if world == 1:
        return RowWriter(args.output, output_columns(), fmt)
    # under torchrun each rank streams its own part; rank 0 merges them at the end
    return RowWriter(part_path(args.output, rank), output_columns(), "jsonl")


def score_all(det, writer, args, thresholds, fmt, rank, world):
    counts = Counter()
    try:
        for row in det.score_paths(args.paths, rank=rank, world=world, keep_maps=bool(args.heatmaps)):
            sys.stdout.write(result_line(row, det.score_name) + "\n")  # one write: whole lines across ranks
            sys.stdout.flush()
            counts["unreadable" if "error" in row else row["verdict"]] += 1
            if writer:
                writer.write(file_row(row, det))
            if args.heatmaps and "error" not in row:
                save_heatmap(row, args.heatmaps, det.score_name)
    finally:
        if writer:
            writer.close()  # even on Ctrl-C: a .json file keeps its closing bracket
    counts = sum(gather(counts, world), Counter())  # also a barrier: every part is complete
    if rank == 0 and args.output and world > 1:
        merge_parts(args.output, output_columns(), fmt, world)
    return summarize(counts, det, args, thresholds, rank)


def summarize(counts, det, args, thresholds, rank):
    total = sum(counts.values())
    if total == 0:
        if rank == 0:
            print(f"error: no image files found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    if rank == 0:
        rule = "FAKE when p <= level" if det.score_name == "combined" else f"FAKE when {det.score_name} > threshold"
        print(f"{describe_count(total, 'input')}: {counts['REAL']} REAL, {counts['FAKE']} FAKE, {counts['unreadable']} unreadable")
        print(f"threshold: {det.threshold_label} (score {det.score_name}, {rule}; thresholds file: {thresholds or 'none'})")
        if args.output:
            print(f"wrote {args.output}")
        if args.heatmaps:
            print(f"wrote {total - counts['unreadable']} heatmaps to {args.heatmaps}")
    return 1 if counts["unreadable"] else 0


def detect(args):
    """Returns (rank, exit status)."""
    rank, world, error = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), None
    try:
        det, thresholds, fmt, rank, world = setup(args)
        writer = open_outputs(args, det, fmt, rank, world)
    except (CheckpointError, ConfigError) as e:
        error = str(e)
    except OSError as e:  # e.g. a thresholds path that is a folder, an unwritable --output
        error = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    if dist.is_initialized():
        # all ranks stop together on any rank's error, instead of waiting at a barrier forever
        error = next((e for e in gather(error, world) if e), None)
    if error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return rank, 2
    if rank == 0:
        for w in det.warnings:  # once, before any result line
            print(f"warning: {w}", file=sys.stderr, flush=True)
    if world > 1:
        dist.barrier()  # no rank prints a result before rank 0's warnings
    return rank, score_all(det, writer, args, thresholds, fmt, rank, world)


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # never crash printing a file name that is not valid UTF-8
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        rank, status = detect(args)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has merged and printed everything before any rank exits
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # torchrun stops every rank as soon as one exits non-zero, and rank 0 knows the status of
    # the whole run (counts are gathered): it alone reports it
    return status if rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
