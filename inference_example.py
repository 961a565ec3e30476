"""Classifies images as REAL or FAKE: a line per image and a summary; optionally a .csv, .json or .jsonl file.

    python inference_example.py photos/ --score artifact    # the shipped detector of generator traces
    python inference_example.py photos/ img.jpg "scans/**/*.png" --checkpoint CKPT   # CKPT: train.py's best
    python inference_example.py photos/ --checkpoint CKPT --threshold strict --output results.csv

Which thresholds apply: docs/method.md#which-thresholds-file-applies. Exit status: 0 every input scored;
1 some inputs unreadable (the rest are scored and written); 2 a usage or configuration error (one line).
One process: decoding, the bottleneck, already spreads over the cores in its --workers decode processes.
"""

import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

import metrics
from detector import SCORES, Detector
from utils import (ArgumentParser, UserError, add_model_flags, check_output, csv_cell, main_exit, number,
                   printable, run_cli)

DOMAIN_ALARM = 1e-3  # a KS p-value this small over a folder: its images are not like the calibration images


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    add_model_flags(p, "the autoencoder: train.py checkpoint, hub folder or hub repo id "
                    "(every score but artifact needs it)")
    add("--threshold", default="balanced",
        help="strict | balanced | sensitive | optimal | a number")
    add("--score", choices=list(SCORES), default="mse", help="which score decides")
    add("--output", default=None, help="also write the rows to this .csv, .json or .jsonl file")
    add("--batch-size", type=number(int, 1), help="images per forward pass (default: 32 on CPU, 256 on CUDA)")
    add("--workers", type=number(int, 0),
        help="decode processes (default: every core on a GPU; at most 4 on a CPU)")
    return p.parse_args(argv)


def detect(args):
    # all that can fail on a bad flag or file, before any image
    det = Detector(args.checkpoint, args.thresholds or "find", args.device, args.score, args.threshold,
                   args.batch_size, args.workers, args.artifact_model)
    if args.output:
        check_output(args.output, [args.checkpoint, det.thresholds_source, args.artifact_model, *args.paths],
                     probe=False)
    counts, p_values, writer, complete = Counter(), [], None, False
    try:
        writer = ResultWriter(args.output) if args.output else None
        for w in det.warnings:  # once, before any result line
            print(f"warning: {w}", file=sys.stderr, flush=True)
        for row in det.score_paths(args.paths):
            if writer:  # first: a line on screen means its row is on disk
                writer.write(det.record(row))
            print(result_line(row, det.score_name) + "\n", end="", flush=True)  # one write: whole lines
            counts["unreadable" if "error" in row else row["verdict"]] += 1
            if row.get("p_value") is not None:
                p_values.append(row["p_value"])
        complete = True
    except OSError as e:  # a full disk, say: one line, not a traceback
        raise UserError(f"cannot write {e.filename or args.output}: {e.strerror or e}") from None
    finally:
        if writer:
            writer.close(complete)  # even on Ctrl-C: a .json file keeps its closing bracket
            if not complete:
                print(f"the rows so far are in {writer.partial}", file=sys.stderr)
    if not (total := counts.total()):
        raise UserError(f"no image files found in {' '.join(args.paths)}")
    summary(args, det, counts, total, p_values)
    return 1 if counts["unreadable"] else 0


def summary(args, det, counts, total, p_values):
    name = det.score_name
    rule = f"FAKE when {name} > threshold"
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


def result_line(row, score_name):
    """One image's line on screen: path, score, p-value and verdict (or why it is unreadable)."""
    path = printable(row["path"])
    if "error" in row:
        return f"{path}\tUNREADABLE: {row['error']}"
    p = f"\tp={row['p_value']:.6g}" if row.get("p_value") is not None else ""
    return f"{path}\t{score_name}={row['score']:.6g}{p}\t{row['verdict']}"


class ResultWriter:
    """Streams rows to `path`.partial (.csv, .json or .jsonl), flushed each; renamed to `path` when whole."""

    COLUMNS = ["path", "score_name", "score", "p_value", "verdict", "threshold", "error", *SCORES]

    def __init__(self, path):
        self.path, self.partial, self.fmt, self.n = str(path), f"{path}.partial", Path(path).suffix.lower(), 0
        if self.fmt not in (".csv", ".json", ".jsonl"):
            raise UserError(f"--output {path}: the extension must be one of .csv, .json, .jsonl")
        Path(self.partial).parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace only touches file names that are not valid UTF-8 (surrogate escapes)
        self.f = open(self.partial, "w", encoding="utf-8", errors="backslashreplace", newline="")
        if self.fmt == ".csv":
            self.csv = csv.DictWriter(self.f, fieldnames=self.COLUMNS)
            self.csv.writeheader()
        elif self.fmt == ".json":
            self.f.write("[")

    def write(self, row):
        if self.fmt == ".csv":
            self.csv.writerow({k: csv_cell(v) for k, v in row.items()})
        else:
            line = json.dumps(row, ensure_ascii=False)
            self.f.write(("," if self.n else "") + "\n  " + line if self.fmt == ".json" else line + "\n")
        self.n += 1
        self.f.flush()

    def close(self, complete=True):
        """complete=False (a failed run) leaves the rows so far in the .partial file, valid."""
        try:
            if self.fmt == ".json":
                self.f.write("\n]\n" if self.n else "]\n")
            self.f.close()
        except OSError:  # the full disk that failed the run fails this last flush too: the run says so
            if complete:
                raise
        if complete:
            os.replace(self.partial, self.path)


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # never crash printing a file name that is not valid UTF-8
        stream.reconfigure(errors="backslashreplace")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # N copies would each score every file
        raise UserError("inference_example.py runs as one process: start it with python, not torchrun")
    return detect(args)


if __name__ == "__main__":
    main_exit(lambda: run_cli(main))
