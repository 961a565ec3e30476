"""Scores images as REAL or FAKE by their reconstruction error: one line per image, then
a summary; optionally a CSV / JSON / JSON Lines file and per-image heatmaps.

    python inference_example.py photos/ --score artifact      # the shipped detector of generator traces, no flags
    python inference_example.py photos/ img.jpg "scans/**/*.png" --checkpoint runs/cifar10/model_best_checkpoint.ckpt
    python inference_example.py photos/ --checkpoint CKPT --threshold strict --output results.csv
    python inference_example.py photos/ --checkpoint CKPT --score combined --heatmaps heatmaps/
    python inference_example.py photos/ --checkpoint CKPT --coding-model runs/coding/model_best_checkpoint.ckpt --score coding
    python inference_example.py photos/ --checkpoint model.onnx --runtime openvino    # export.py's file (or: onnx)
    torchrun --nproc_per_node=8 inference_example.py photos/ --checkpoint CKPT --output results.jsonl

Thresholds: --thresholds, else thresholds_calibrated.json next to the checkpoint (written by calibrate.py for those
weights), else the repo's top-level one (the card's published values, bound to no weights: a warning says so).
With --runtime onnx / openvino: --thresholds, else the file beside the .onnx, else the thresholds exported inside it.
When the p-values of a whole folder (20 images or more) are far from uniform, a warning says that these images do
not look like the calibration images, so the promised false-positive rate does not hold for them.

Exit status: 0 every input scored; 1 some inputs unreadable (the rest are still scored
and written); 2 usage or configuration error (one line on stderr).
"""

import csv
import fnmatch
import glob
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

import metrics
import thresholds
from detector import BASE_SCORES, SCORES, Detector, add_device_flags, check_device_flags
from utils import (ArgumentParser, UserError, check_not_an_input, csv_cell, gather, number, printable, run_cli,
                   setup_distributed)


DOMAIN_ALARM = 1e-3  # a KS p-value this small over a folder: its images are not like the calibration images


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    add("--checkpoint", default=None, help="the autoencoder: train.py checkpoint, hub-layout folder or hub repo id "
        "(needed by every score but artifact)")
    add("--artifact-model", default=None, help="an artifact detector (train.py --preset artifact) for --score artifact "
        "(default: the shipped artifact_detector/)")
    add("--coding-model", default=None, help="a coding model (train.py --preset coding), for --score coding")
    add("--thresholds", default=None, help="thresholds JSON (default: the one next to the checkpoint, else the repo's)")
    add("--threshold", default="balanced", help="strict | balanced | sensitive | optimal | a number; for "
        "--score coding and combined a p-value level")
    add("--score", choices=SCORES, default="mse", help="which score decides")
    add("--output", default=None, help="also write the rows to this .csv, .json or .jsonl file")
    add("--heatmaps", default=None, metavar="DIR", help="write one PNG per image: input, reconstruction, error map")
    add("--batch-size", type=number(int, 1), default=None, help="images per forward pass (default: 32 on CPU, 256 on CUDA)")
    add("--workers", type=number(int, 0), default=None, help="decoding processes per rank (default: min(4, CPU count))")
    add_device_flags(add)
    return check_device_flags(p, p.parse_args(argv))


def result_line(row, score_name):
    path = printable(row["path"])
    if "error" in row:
        return f"{path}\tUNREADABLE: {row['error']}"
    if score_name == "combined":  # the score is itself a p-value
        return f"{path}\tcombined p={row['score']:.6g}\t{row['verdict']}"
    p = f"\tp={row['p_value']:.6g}" if row.get("p_value") is not None else ""
    return f"{path}\t{score_name}={row['score']:.6g}{p}\t{row['verdict']}"


class ResultWriter:
    """Streams result rows to .csv, .json (a list) or .jsonl, flushing each one: memory stays flat. The rows go
    to `path`.partial, renamed to `path` when the run completes: `path` is whole or absent, and an interrupted
    run leaves every row so far in the .partial file. Under torchrun each rank writes a JSON Lines part and
    rank 0 merges them into `path` on a complete close (a collective call)."""

    COLUMNS = ["path", "score_name", "score", "p_value", "verdict", "threshold", "error", *BASE_SCORES]

    def __init__(self, path, rank=0, world=1):
        if Path(path).suffix.lower() not in (".csv", ".json", ".jsonl"):
            raise UserError(f"--output {path}: the extension must be one of .csv, .json, .jsonl")
        self.path, self.rank, self.world, self.n = str(path), rank, world, 0
        self.partial, self.fmt = ((f"{path}.rank{rank}.part", ".jsonl") if world > 1 else
                                  (f"{path}.partial", Path(path).suffix.lower()))
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
        """complete=False (an interrupted or failed run): the rows so far stay in the .partial file(s), valid."""
        if self.fmt == ".json":
            self.f.write("\n]\n" if self.n else "]\n")
        self.f.close()
        if complete and self.world == 1:
            os.replace(self.partial, self.path)
        elif complete:
            gather(None)  # a barrier: every part is complete
            if self.rank == 0:
                merged = ResultWriter(self.path)
                for rank in range(self.world):
                    with open(f"{self.path}.rank{rank}.part", encoding="utf-8") as part:
                        for line in part:
                            merged.write(json.loads(line))
                    os.remove(part.name)
                merged.close()
            gather(None)  # no rank exits before the merged file exists


def lists_into(path, folder):
    """Would listing `path` (a folder, or a glob pattern) reach an image written into `folder`?"""
    if glob.has_magic(path) and not os.path.lexists(path):
        # the pattern against an image there and each folder above it (fnmatch's * also spans '/': errs on the safe side)
        probe = folder / "image.png"
        return any(fnmatch.fnmatch(str(q), os.path.abspath(path)) for q in [probe, *probe.parents])
    return os.path.isdir(path) and folder.is_relative_to(Path(path).resolve())


def detect(args, rank, world, device):
    error = None
    try:  # everything that can fail on a bad flag or file, before any image is scored
        path = args.thresholds or (thresholds.find(args.checkpoint) if args.runtime == "torch" and args.checkpoint else None)
        det = Detector(args.checkpoint, path, device=str(device), score=args.score, threshold=args.threshold,
                       batch_size=args.batch_size, workers=args.workers, coding_model=args.coding_model,
                       runtime=args.runtime, artifact_model=args.artifact_model)
        path = path or det.thresholds_source
        if args.heatmaps and det.model is None:
            raise UserError("--heatmaps draws the autoencoder's error maps: give --checkpoint")
        if args.heatmaps:
            maps = Path(args.heatmaps).resolve()
            for p in args.paths:
                if lists_into(p, maps):  # inputs are listed lazily: the heatmaps written so far would be scored
                    raise UserError(f"--heatmaps {args.heatmaps} lies inside the input {p}; choose a folder outside it")
            try:
                maps.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file of that name, say
                raise UserError(f"--heatmaps {args.heatmaps}: cannot make the folder ({e.strerror or e})") from None
        if args.output:  # the results file replaces its path at the end: never the weights, thresholds or an image
            check_not_an_input(args.output, [args.checkpoint, path, args.coding_model, args.artifact_model, *args.paths])
        try:
            writer = ResultWriter(args.output, rank, world) if args.output else None
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
    except UserError as e:
        error = str(e)
    if error := next((e for e in gather(error) if e), None):  # every rank stops on any rank's error
        raise UserError(error)
    if rank == 0:
        for w in det.warnings:  # once, before any result line
            print(f"warning: {w}", file=sys.stderr, flush=True)
    gather(None)  # no rank prints a result before rank 0's warnings
    counts, p_values, complete = Counter(), [], False
    try:
        for row in det.score_paths(args.paths, rank=rank, world=world, keep_maps=bool(args.heatmaps)):
            if writer:  # first: a line on screen means its row is on disk
                writer.write(det.record(row))
            print(result_line(row, det.score_name) + "\n", end="", flush=True)  # one write: whole lines across ranks
            counts["unreadable" if "error" in row else row["verdict"]] += 1
            if row.get("p_value") is not None:
                p_values.append(row["p_value"])
            if args.heatmaps and "error" not in row:
                import plots
                plots.save_heatmap(row, args.heatmaps, f"{row['verdict']}  ({det.score_name} {row['score']:.6g})")
        complete = True
    except OSError as e:  # a full disk, say: one line, not a traceback
        raise UserError(f"cannot write {e.filename or args.output or args.heatmaps}: {e.strerror or e}") from None
    finally:
        if writer:
            writer.close(complete)  # even on Ctrl-C: a .json file keeps its closing bracket
            if not complete:
                print(f"the rows so far are in {writer.partial}", file=sys.stderr)
    counts, p_values = sum(gather(counts), Counter()), sum(gather(p_values), [])
    if not (total := counts.total()):
        raise UserError(f"no image files found in {' '.join(args.paths)}")
    if rank == 0:
        by_p = det.score_name in thresholds.P_VALUE_SCORES
        rule = "FAKE when p <= level" if by_p else f"FAKE when {det.score_name} > threshold"
        print(f"{total} input{'s' * (total != 1)}: {counts['REAL']} REAL, {counts['FAKE']} FAKE, "
              f"{counts['unreadable']} unreadable")
        print(f"threshold: {det.threshold_label} (score {det.score_name}, {rule}; thresholds file: {path or 'none'})")
        if (uniform := metrics.uniformity_pvalue(p_values)) is not None and uniform < DOMAIN_ALARM:
            print(f"warning: these images do not look like the calibration images (their {len(p_values)} p-values are "
                  f"far from uniform: Kolmogorov-Smirnov p = {uniform:.2g}); the false-positive rate is not guaranteed; "
                  f"calibrate on images like these (calibrate.py --real-dir), unless most of them are indeed fake",
                  file=sys.stderr)
        if args.output:
            print(f"wrote {args.output}")
        if args.heatmaps:
            print(f"wrote {total - counts['unreadable']} heatmaps to {args.heatmaps}")
    return 1 if counts["unreadable"] else 0


def main(argv=None):
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # never crash printing a file name that is not valid UTF-8
        stream.reconfigure(errors="backslashreplace")
    rank = 0
    try:
        rank, world, device = setup_distributed(args.device)
        status = detect(args, rank, world, device)
    except UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        status = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # torchrun stops every rank as soon as one exits non-zero; rank 0 knows the whole run's status
    return status if rank == 0 else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
