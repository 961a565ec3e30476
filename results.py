"""inference_example.py's output: screen lines, and result rows streamed to .csv, .json or .jsonl files."""

import csv
import fnmatch
import glob
import heapq
import json
import os
from pathlib import Path

from detector import BASE_SCORES
from utils import UserError, check_output, csv_cell, gather, printable


def result_line(row, score_name):
    """One image's line on screen: path, score, p-value and verdict (or why it is unreadable)."""
    path = printable(row["path"])
    if "error" in row:
        return f"{path}\tUNREADABLE: {row['error']}"
    if score_name == "combined":  # the score is itself a p-value
        return f"{path}\tcombined p={row['score']:.6g}\t{row['verdict']}"
    p = f"\tp={row['p_value']:.6g}" if row.get("p_value") is not None else ""
    return f"{path}\t{score_name}={row['score']:.6g}{p}\t{row['verdict']}"


def open_results(path, reads, rank=0, world=1):
    """A ResultWriter for --output `path`; UserError if it is one of `reads` or cannot be written."""
    check_output(path, reads, probe=False)
    try:
        return ResultWriter(path, rank, world)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def lists_into(path, folder):
    """Would listing `path` (a folder, or a glob pattern) reach an image written into `folder`?"""
    if glob.has_magic(path) and not os.path.lexists(path):
        # an image there or any folder above it; fnmatch's * also spans '/', which errs on the safe side
        probe = folder / "image.png"
        return any(fnmatch.fnmatch(str(q), os.path.abspath(path)) for q in [probe, *probe.parents])
    return os.path.isdir(path) and folder.is_relative_to(Path(path).resolve())


def heatmaps_folder(folder, inputs):
    """Makes --heatmaps `folder`; UserError if the inputs would list it (its heatmaps would be scored)."""
    maps = Path(folder).resolve()
    if inside := next((p for p in inputs if lists_into(p, maps)), None):
        raise UserError(f"--heatmaps {folder} lies inside the input {inside}; choose a folder outside it")
    try:
        maps.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, say
        raise UserError(f"--heatmaps {folder}: cannot make the folder ({e.strerror or e})") from None


class ResultWriter:
    """Streams rows to `path`.partial (.csv, .json list or .jsonl), flushing each, renamed to `path` on a
    complete close. Under torchrun rank 0 merges every rank's JSON Lines part, its rows in listing order
    (close is collective)."""

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

    def write(self, row, index=None):
        """Under torchrun `index`, the row's place in the listing, goes into the part to order the merge."""
        if self.fmt == ".csv":
            self.csv.writerow({k: csv_cell(v) for k, v in row.items()})
        else:
            line = json.dumps({"index": index, **row} if self.world > 1 else row, ensure_ascii=False)
            self.f.write(("," if self.n else "") + "\n  " + line if self.fmt == ".json" else line + "\n")
        self.n += 1
        self.f.flush()

    def close(self, complete=True):
        """complete=False (a failed run) leaves the rows so far in the .partial file(s), valid."""
        try:
            if self.fmt == ".json":
                self.f.write("\n]\n" if self.n else "]\n")
            self.f.close()
        except OSError:  # the full disk that failed the run fails this last flush too: the run says so
            if complete:
                raise
        if complete and self.world == 1:
            os.replace(self.partial, self.path)
        elif complete:
            gather(None)  # a barrier: every part is complete
            if self.rank == 0:
                merged = ResultWriter(self.path)
                parts = [open(f"{self.path}.rank{rank}.part", encoding="utf-8") for rank in range(self.world)]
                # each part is in listing order already: merging the streams keeps the memory flat
                for row in heapq.merge(*(map(json.loads, part) for part in parts), key=lambda r: r["index"]):
                    merged.write({k: v for k, v in row.items() if k != "index"})
                for part in parts:
                    part.close()
                    os.remove(part.name)
                merged.close()
            gather(None)  # no rank exits before the merged file exists
