"""Classifies images as REAL or FAKE: one line per image, then a summary; optionally a CSV / JSON / JSON Lines
file and per-image heatmaps.

    python inference_example.py photos/ --score artifact    # the shipped detector of generator traces
    python inference_example.py photos/ img.jpg "scans/**/*.png" --checkpoint CKPT   # CKPT: train.py's best
    python inference_example.py photos/ --checkpoint CKPT --threshold strict --output results.csv
    python inference_example.py photos/ --checkpoint CKPT --score combined --heatmaps heatmaps/
    torchrun --nproc_per_node=8 inference_example.py photos/ --checkpoint CKPT --output results.jsonl

Which thresholds apply: docs/method.md#which-thresholds-file-applies. Exit status: 0 every input scored;
1 some inputs unreadable (the rest are scored and written); 2 a usage or configuration error (one line).
"""

import sys
from collections import Counter

import torch.distributed as dist

import metrics
import plots
from detector import SCORES, Detector
from results import heatmaps_folder, open_results, result_line
from utils import (ArgumentParser, UserError, add_model_flags, gather, main_exit, number, run_cli,
                   setup_distributed)

DOMAIN_ALARM = 1e-3  # a KS p-value this small over a folder: its images are not like the calibration images


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    add_model_flags(p, "the autoencoder: train.py checkpoint, hub folder or hub repo id "
                    "(every score but artifact needs it)")
    add("--threshold", default="balanced",
        help="strict | balanced | sensitive | optimal | a number; for --score combined a p-value level")
    add("--score", choices=list(SCORES), default="mse", help="which score decides")
    add("--output", default=None, help="also write the rows to this .csv, .json or .jsonl file")
    add("--heatmaps", metavar="DIR", help="write one PNG per image: input, reconstruction, error map")
    add("--batch-size", type=number(int, 1), help="images per forward pass (default: 32 on CPU, 256 on CUDA)")
    add("--workers", type=number(int, 0),
        help="decode processes (default: a GPU rank's share of the cores; at most 4 on a CPU)")
    return p.parse_args(argv)


def setup(args, rank, world, device):
    """(detector, results writer or None): all that can fail on a bad flag or file, before any image."""
    det = Detector(args.checkpoint, args.thresholds or "find", str(device), args.score, args.threshold,
                   args.batch_size, args.workers, args.artifact_model)
    if args.heatmaps and (det.model is None or det.score_name == "artifact"):
        raise UserError("--heatmaps draws the autoencoder's error maps: give --checkpoint and one of its "
                        "scores")
    if args.heatmaps:
        heatmaps_folder(args.heatmaps, args.paths)
    reads = [args.checkpoint, det.thresholds_source, args.artifact_model, *args.paths]
    return det, open_results(args.output, reads, rank, world) if args.output else None


class SharedError(UserError):
    """An error every rank has seen: rank 0 alone prints it."""


def detect(args, rank, world, device):
    error = None
    try:
        det, writer = setup(args, rank, world, device)
    except UserError as e:
        error = str(e)
    if error := next((e for e in gather(error) if e), None):  # every rank stops on any rank's error
        raise SharedError(error)
    if rank == 0:
        for w in det.warnings:  # once, before any result line
            print(f"warning: {w}", file=sys.stderr, flush=True)
    gather(None)  # no rank prints a result before rank 0's warnings
    counts, p_values, complete = Counter(), [], False
    try:
        for row in det.score_paths(args.paths, rank=rank, world=world, keep_maps=bool(args.heatmaps)):
            if writer:  # first: a line on screen means its row is on disk
                writer.write(det.record(row), row["index"])
            print(result_line(row, det.score_name) + "\n", end="", flush=True)  # one write: whole lines
            counts["unreadable" if "error" in row else row["verdict"]] += 1
            if row.get("p_value") is not None:
                p_values.append(row["p_value"])
            if args.heatmaps and "error" not in row:
                title = f"{row['verdict']}  ({det.score_name} {row['score']:.6g})"
                plots.save_heatmap(row, args.heatmaps, title)
        complete = True
    except OSError as e:  # a full disk, say: one line, not a traceback
        what = e.filename or args.output or args.heatmaps
        raise UserError(f"cannot write {what}: {e.strerror or e}") from None
    finally:
        if writer:
            writer.close(complete)  # even on Ctrl-C: a .json file keeps its closing bracket
            if not complete:
                print(f"the rows so far are in {writer.partial}", file=sys.stderr)
    counts, p_values = sum(gather(counts), Counter()), sum(gather(p_values), [])
    if not (total := counts.total()):
        raise UserError(f"no image files found in {' '.join(args.paths)}")
    if rank == 0:
        summary(args, det, counts, total, p_values)
    return 1 if counts["unreadable"] else 0


def summary(args, det, counts, total, p_values):
    name = det.score_name
    rule = "FAKE when p <= level" if name == "combined" else f"FAKE when {name} > threshold"
    print(f"{total} input{'s' * (total != 1)}: {counts['REAL']} REAL, {counts['FAKE']} FAKE, "
          f"{counts['unreadable']} unreadable")
    print(f"threshold: {det.threshold_label} (score {name}, {rule}; thresholds file: "
          f"{det.thresholds_source or 'none'})")
    if (uniform := metrics.uniformity_pvalue(p_values)) is not None and uniform < DOMAIN_ALARM:
        print(f"warning: these images do not look like the calibration images (their {len(p_values)} "
              f"p-values are smaller than real ones': one-sided Kolmogorov-Smirnov p = {uniform:.2g}); the "
              f"false-positive rate is not guaranteed; calibrate on images like these (calibrate.py "
              f"--real-dir), unless most of them are indeed fake", file=sys.stderr)
    if args.output:
        print(f"wrote {args.output}")
    if args.heatmaps:
        print(f"wrote {total - counts['unreadable']} heatmaps to {args.heatmaps}")


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # never crash printing a file name that is not valid UTF-8
        stream.reconfigure(errors="backslashreplace")
    rank, world = 0, 1
    try:
        rank, world, device = setup_distributed(args.device)
        status = detect(args, rank, world, device)
        gather(None)  # every rank returns together: torchrun stops the others when one exits non-zero
    except UserError as e:
        # an error of one rank is printed by that rank: its exit status makes torchrun stop the others
        if rank == 0 or not isinstance(e, SharedError):
            print(f"{f'rank {rank}: ' if world > 1 else ''}error: {e}", file=sys.stderr)
        status = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    main_exit(lambda: run_cli(main))
