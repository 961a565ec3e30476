"""AUROC and flagged shares of calibrated scores on matched sets of real generated images: each SET folder
holds real/ and fake/ images. Per set and score: AUROC (fake = positive) with a bootstrap 95% interval, and
the shares of real (table and JSON) and fake (JSON) images flagged at the balanced level.
--fake-jpeg-quality Q scores the sets again with fakes re-saved as JPEG at Q.

    python scripts/generated/evaluate.py generated/sr_* --artifact-model artifact_detector \\
        --thresholds artifact_detector/thresholds_calibrated.json --output runs/eval/generated.json

Exit status: 0 every image scored; 1 some images unreadable (counted on stderr and in n_unreadable, left
out); 2 usage or configuration error (one line on stderr).
"""

import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repo's modules
import metrics  # noqa: E402
import thresholds  # noqa: E402
from data import jpeg_resave, to_pil  # noqa: E402
from images import ImageReadError, iter_image_files, read_image  # noqa: E402
from detector import SCORES, Detector  # noqa: E402
from utils import (ArgumentParser, UserError, check_output, number, printable, run_cli,  # noqa: E402
                   write_json)

LEVEL = "balanced"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("sets", nargs="+", metavar="SET", help="folders, each with real/ and fake/ image folders")
    add("--checkpoint", default=None, help="the autoencoder (anything load_model accepts)")
    add("--artifact-model", default=None, help="the artifact detector (train.py --preset artifact)")
    add("--thresholds", required=True, help="written by calibrate.py for these models")
    add("--scores", default="mse,artifact",
        help="comma-separated scores to report; those the models given cannot compute are left out")
    add("--fake-jpeg-quality", type=number(int, 1, 95), default=None,
        help="also score every set with its fakes re-saved as JPEG at this quality")
    add("--bootstrap", type=number(int, 1), default=1000, help="resamples for the AUROC intervals")
    add("--output", default=None, help="also write every figure to this JSON file")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    return p.parse_args(argv)


def jpeg_fakes(det, folder, quality):
    """Rows of the images under folder re-saved as JPEG, listed and read as the detector does (a FIFO never
    blocks); an unreadable file is an error row, so that this run skips the files the plain run skips."""
    paths, images, errors = [], [], []
    for path in iter_image_files(str(folder), on_error=lambda p, e: errors.append({"path": p, "error": e})):
        try:
            images.append(jpeg_resave(to_pil(read_image(path)), quality))
            paths.append(path)
        except ImageReadError as e:
            errors.append({"path": path, "error": str(e)})
    return errors + [{**r, "path": p} for r, p in zip(det.score(images), paths)]  # not "<image i>"


def merged(rows_per_detector):
    """One row per image with every detector's scores (the rows of each list in one order); an error wins."""
    return [{k: v for r in rows for k, v in r.items()} if not any("error" in r for r in rows)
            else next(r for r in rows if "error" in r) for rows in zip(*rows_per_detector)]


def set_scores(dets, folder, quality=None):
    """({"real": rows, "fake": rows}, number unreadable), each row with the scores of every detector in dets
    (workers=0: files in listing order); the unreadable images are counted and left out."""
    parts = ("real", "fake")[:1 if quality else 2]
    rows = {part: merged([det.score([str(Path(folder) / part)]) for det in dets]) for part in parts}
    if quality:
        rows["fake"] = merged([jpeg_fakes(det, Path(folder) / "fake", quality) for det in dets])
    unreadable = 0
    for part, got in rows.items():
        if bad := [r for r in got if "error" in r]:
            unreadable += len(bad)
            print(f"skipped {len(bad)} unreadable {printable(folder)}/{part} file(s), e.g. "
                  f"{printable(bad[0]['path'])}: {bad[0]['error']}", file=sys.stderr)
        rows[part] = [r for r in got if "error" not in r]
        if not rows[part]:
            raise UserError(f"{printable(folder)}/{part}: no readable images")
    return rows, unreadable


def evaluate(args):
    cfg = thresholds.read(args.thresholds)
    asked = [s.strip() for s in args.scores.split(",") if s.strip()]
    if unknown := [s for s in asked if s not in SCORES]:
        raise UserError(f"unknown score {unknown[0]!r} in --scores; choose from {', '.join(SCORES)}")
    given = {s for s, model in (("mse", args.checkpoint), ("artifact", args.artifact_model)) if model}
    names = [s for s in asked if s in given]
    if not names:
        raise UserError(f"none of --scores {args.scores} can be computed with the models given")
    # results are named by folder name: a second set of that name would silently replace the first
    if clash := next((name for name, n in Counter(Path(f).name for f in args.sets).items() if n > 1), None):
        both = ", ".join(printable(f) for f in args.sets if Path(f).name == clash)
        raise UserError(f"two SETs have the same name {printable(clash)} ({both}): the results are named by "
                        f"folder name; rename or link one")
    levels = {s: thresholds.threshold(cfg, s, LEVEL)[0] for s in names}
    # the Detectors' own verdicts are unused here (threshold 0.0: no table lookup)
    rule = "mse" if args.checkpoint else "artifact"
    det = Detector(args.checkpoint, args.thresholds, args.device, rule, 0.0, workers=0,
                   artifact_model=args.artifact_model)
    dets = [det, det.with_rule("artifact", 0.0)] if args.checkpoint and args.artifact_model else [det]
    for w in det.warnings:
        print(f"warning: {w}", file=sys.stderr)
    results, q = {}, args.fake_jpeg_quality
    runs = [(f, Path(f).name, None) for f in args.sets] + [(f, f"{Path(f).name} (fakes JPEG q{q})", q)
                                                           for f in args.sets if q]
    for folder, name, quality in runs:
        rows, bad = set_scores(dets, folder, quality)
        results[name] = row = {"n_real": len(rows["real"]), "n_fake": len(rows["fake"]), "n_unreadable": bad}
        for s in names:
            ranked = {part: np.array([r[s] for r in got]) for part, got in rows.items()}
            flagged = {k: v > levels[s] for k, v in ranked.items()}
            ci = metrics.bootstrap_ci(metrics.auroc, ranked["real"], ranked["fake"], n_boot=args.bootstrap)
            row[s] = {"auroc": metrics.auroc(ranked["real"], ranked["fake"]), "auroc_ci95": list(ci),
                      **{f"{k}_flagged": float(v.mean()) for k, v in flagged.items()}}
    return results, names


def main(argv=None):
    args = parse_args(argv)
    if args.output:  # fail before any scoring, not after; and never replace a file this run reads
        model_files = Path(args.artifact_model).glob("*") if args.artifact_model else ()
        check_output(args.output, [args.checkpoint, args.thresholds, args.artifact_model, *model_files])
    results, names = evaluate(args)
    head = [f"{s} AUROC [95% CI]" for s in names] + [f"real flagged ({s}, {LEVEL})" for s in names]
    print(f"| set | pairs | {' | '.join(head)} |\n" + "|---" * (2 + len(head)) + "|")
    for name, row in results.items():
        cells = [f"{row[s]['auroc']:.3f} [{row[s]['auroc_ci95'][0]:.2f}, {row[s]['auroc_ci95'][1]:.2f}]"
                 for s in names] + [f"{row[s]['real_flagged']:.0%}" for s in names]
        print(f"| {printable(name)} | {row['n_fake']} | {' | '.join(cells)} |")
    if args.output:
        try:
            write_json(args.output, {"thresholds": args.thresholds, "level": LEVEL, "sets": results})
        except OSError as e:  # a full disk, say
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
        print(f"wrote {args.output}")
    return 1 if any(row["n_unreadable"] for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
