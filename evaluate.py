"""Evaluates calibrated scores on matched sets of real generated images: each SET folder holds real/ and fake/
(a generated image beside the real image it is paired with: a super-resolved crop and the crop it came from).
Prints, per set and score, AUROC (fake = positive) with a bootstrap 95% interval, and the share of the set's real
images flagged at the balanced level (they are held out from calibration: a false-positive rate).

    python evaluate.py generated/sr_* --checkpoint CKPT --coding-model runs/coding/model_best_checkpoint.ckpt \\
        --thresholds runs/eval/thresholds_calibrated.json --output runs/eval/generated.json

Scores decided by a p-value (coding, combined) are ranked by it (1 - p); mse by its value. With
--fake-jpeg-quality Q, each set is scored a second time with its fakes re-saved as JPEG at quality Q: real photos
carry JPEG traces and generators' PNG outputs do not, and a score must not merely detect that.

With --leave-one-photo-out, the p-value scores are also ranked against the set's own real images, leaving out those
of the image's source photo (pairs.csv): calibration on images like these, which tells a score that cannot see
the fakes from one that sees them but was calibrated on other photos. A fake whose source photo has no real image is
ranked against all of them; the set's real images must come from at least two source photos.

Exit status: 0 every image scored; 1 some images unreadable (each set's are counted on stderr and in the JSON's
n_unreadable, and left out; the rest are still scored and written); 2 usage or configuration error (one line on
stderr).
"""

import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import metrics
import thresholds
from data import ImageReadError, iter_image_files, read_image
from detector import Detector
from utils import ArgumentParser, UserError, check_not_an_input, check_writable, number, printable, run_cli, write_json

LEVEL = "balanced"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("sets", nargs="+", metavar="SET", help="folders, each with real/ and fake/ image folders")
    add("--checkpoint", required=True, help="the autoencoder (anything load_model accepts)")
    add("--coding-model", default=None, help="the coding model; without it, mse and combined only")
    add("--thresholds", required=True, help="written by calibrate.py for these models")
    add("--scores", default="mse,coding,combined", help="comma-separated scores to report")
    add("--fake-jpeg-quality", type=number(int, 1, 95), default=None,
        help="also score every set with its fakes re-saved as JPEG at this quality")
    add("--leave-one-photo-out", action="store_true", help="also calibrate the p-value scores on the set's real "
        "images of its other source photos (needs SET/pairs.csv)")
    add("--bootstrap", type=number(int, 1), default=1000, help="resamples for the AUROC intervals")
    add("--output", default=None, help="also write every figure to this JSON file")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    return p.parse_args(argv)


def jpeg_copies(folder, quality):
    """(paths, PIL images, error rows): the image files under folder, listed and read as the detector lists and reads
    them (data.read_image: a FIFO never blocks), each re-saved as JPEG at `quality`; an unreadable one is an error
    row like those the detector gives, so that the JPEG run skips the very files the plain run skips."""
    paths, images, errors = [], [], []
    for path in iter_image_files(str(folder), on_error=lambda p, reason: errors.append({"path": p, "error": reason})):
        try:
            pixels = read_image(path)
        except ImageReadError as e:
            errors.append({"path": path, "error": str(e)})
            continue
        buf = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        paths.append(path)
        images.append(Image.open(buf))
    return paths, images, errors


def set_scores(det, folder, fake_quality=None):
    """({"real": rows, "fake": rows}, number unreadable): the readable images of the set, every calibrated score in
    each row; the unreadable ones are counted and left out."""
    rows = {part: det.score([str(Path(folder) / part)]) for part in ("real", "fake")[:2 if fake_quality is None else 1]}
    if fake_quality is not None:
        paths, images, errors = jpeg_copies(Path(folder) / "fake", fake_quality)
        rows["fake"] = errors + [{**r, "path": p} for r, p in zip(det.score(images), paths)]  # not "<image i>"
    unreadable = 0
    for part, got in rows.items():
        if bad := [r for r in got if "error" in r]:
            unreadable += len(bad)
            print(f"skipped {len(bad)} unreadable {printable(folder)}/{part} file(s), e.g. {printable(bad[0]['path'])}: "
                  f"{bad[0]['error']}", file=sys.stderr)  # printable: a file name must not forge a line
        rows[part] = [r for r in got if "error" not in r]
        if not rows[part]:
            raise UserError(f"{printable(folder)}/{part}: no readable images")
    return rows, unreadable


def read_pairs(folder):
    """stem -> source photo, from SET/pairs.csv, checked before any scoring to name every image in the set."""
    path = Path(folder) / "pairs.csv"
    if path.exists() and not path.is_file():  # a FIFO would block the open forever
        raise UserError(f"{path}: not a regular file; --leave-one-photo-out needs a CSV file there with "
                        f"stem and source_photo columns")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            photo_of = {row["stem"]: row["source_photo"] for row in csv.DictReader(f)}
    except (OSError, UnicodeDecodeError, KeyError, csv.Error) as e:
        raise UserError(f"--leave-one-photo-out needs {path} with stem and source_photo columns ({e})") from None
    stems = {part: {Path(p).stem for p in iter_image_files(str(Path(folder) / part))} for part in ("real", "fake")}
    if missing := sorted((stems["real"] | stems["fake"]) - photo_of.keys()):
        raise UserError(f"{path} names no source photo for {printable(missing[0])} ({len(missing)} image(s) in all)")
    # a real image of the only photo would have nothing to be ranked against (no real image at all: set_scores says so)
    if len(photos := {photo_of[s] for s in stems["real"]}) == 1:
        raise UserError(f"{folder}: --leave-one-photo-out needs real images of at least two source photos; all of "
                        f"real/ come from {printable(photos.pop())}")
    return photo_of


def leave_one_photo_out(cal, rows, photo_of, score):
    """{"real": p, "fake": p}: each image's p-value against the real images of the set's other source photos (all of
    them for a fake whose photo has no real image)."""
    photos = {part: np.array([photo_of[Path(r["path"]).stem] for r in got]) for part, got in rows.items()}
    values = {part: {k: np.array([r[k] for r in got]) for k in cal} for part, got in rows.items()}
    if len(set(photos["real"])) < 2:  # read_pairs checked the listing; unreadable real images can still leave one
        raise UserError(f"--leave-one-photo-out needs readable real images of at least two source photos; those of "
                        f"{printable(Path(rows['real'][0]['path']).parent)} all come from {printable(photos['real'][0])}")
    p = {part: np.full(len(got), np.nan) for part, got in rows.items()}
    for photo in set(photos["real"]) | set(photos["fake"]):  # every image's photo: each p is set below
        others = {k: np.sort(v[photos["real"] != photo]) for k, v in values["real"].items()}
        for part in rows:
            if (mine := photos[part] == photo).any():
                p[part][mine] = thresholds.score_pvalues(others, {k: v[mine] for k, v in values[part].items()}, score)
    return p


def evaluate(args):
    cfg = thresholds.read(args.thresholds)
    cal, names = thresholds.calibration(cfg), [s.strip() for s in args.scores.split(",") if s.strip()]
    if not args.coding_model:
        names = [s for s in names if s != "coding"]
    # the table and the JSON name a set by its folder name, which is what the tables in the docs are read by: a
    # second set of that name would silently replace the first, so it is refused rather than renamed
    if clash := next((name for name, n in Counter(Path(f).name for f in args.sets).items() if n > 1), None):
        raise UserError(f"two SETs have the same name {printable(clash)} "
                        f"({', '.join(printable(f) for f in args.sets if Path(f).name == clash)}): "
                        f"the results are named by folder name; rename or link one")
    pairs = {folder: read_pairs(folder) for folder in args.sets} if args.leave_one_photo_out else {}
    det = Detector(args.checkpoint, args.thresholds, device=args.device, score="combined", coding_model=args.coding_model)
    for w in det.warnings:
        print(f"warning: {w}", file=sys.stderr)
    levels = {s: thresholds.threshold(cfg, s, LEVEL)[0] for s in names}
    results = {}
    runs = [(folder, Path(folder).name, None) for folder in args.sets]
    if args.fake_jpeg_quality:
        runs += [(folder, f"{Path(folder).name} (fakes JPEG q{args.fake_jpeg_quality})", args.fake_jpeg_quality)
                 for folder in args.sets]
    for folder, name, quality in runs:
        rows, unreadable = set_scores(det, folder, quality)
        results[name] = row = {"n_real": len(rows["real"]), "n_fake": len(rows["fake"]), "n_unreadable": unreadable}
        for s in names:
            if s in thresholds.P_VALUE_SCORES:  # ranked by p-value, flagged at p <= level
                p = {part: thresholds.score_pvalues(cal, {k: [r[k] for r in got] for k in cal}, s)
                     for part, got in rows.items()}
                ranked, flagged = {k: 1 - v for k, v in p.items()}, {k: v <= levels[s] for k, v in p.items()}
            else:
                ranked = {part: np.array([r[s] for r in got]) for part, got in rows.items()}
                flagged = {k: v > levels[s] for k, v in ranked.items()}
            ci = metrics.bootstrap_ci(metrics.auroc, ranked["real"], ranked["fake"], n_boot=args.bootstrap)
            row[s] = {"auroc": metrics.auroc(ranked["real"], ranked["fake"]), "auroc_ci95": list(ci),
                      "real_flagged": float(flagged["real"].mean()), "fake_flagged": float(flagged["fake"].mean())}
            if args.leave_one_photo_out and quality is None and s in thresholds.P_VALUE_SCORES:
                p = leave_one_photo_out(cal, rows, pairs[folder], s)
                row[s].update(auroc_leave_one_photo_out=metrics.auroc(1 - p["real"], 1 - p["fake"]),
                              real_flagged_leave_one_photo_out=float((p["real"] <= levels[s]).mean()))
    return results, names


def print_table(results, names):
    print(f"| set | pairs | {' | '.join(f'{s} AUROC [95% CI]' for s in names)} | "
          f"{' | '.join(f'real flagged ({s}, {LEVEL})' for s in names)} |")
    print("|---" * (2 + 2 * len(names)) + "|")
    for name, row in results.items():
        aurocs = " | ".join(f"{row[s]['auroc']:.3f} [{row[s]['auroc_ci95'][0]:.2f}, {row[s]['auroc_ci95'][1]:.2f}]"
                            for s in names)
        flagged = " | ".join(f"{row[s]['real_flagged']:.0%}" for s in names)
        print(f"| {printable(name)} | {row['n_fake']} | {aurocs} | {flagged} |")
    loo = [s for s in names if any("auroc_leave_one_photo_out" in row[s] for row in results.values())]
    if loo:
        print("\nCalibrated on the real images of the set's other source photos (--leave-one-photo-out):")
        print(f"| set | {' | '.join(f'{s} AUROC | real flagged ({s}, {LEVEL})' for s in loo)} |")
        print("|---" * (1 + 2 * len(loo)) + "|")
        for name, row in results.items():
            if "auroc_leave_one_photo_out" in row[loo[0]]:
                print(f"| {printable(name)} | " + " | ".join(f"{row[s]['auroc_leave_one_photo_out']:.3f} | "
                                                f"{row[s]['real_flagged_leave_one_photo_out']:.0%}" for s in loo) + " |")


def main(argv=None):
    args = parse_args(argv)
    if args.output:  # fail before any scoring, not after; and never replace a file this run reads
        check_writable(args.output)
        check_not_an_input(args.output, [args.checkpoint, args.thresholds, args.coding_model,
                                         *(Path(folder) / "pairs.csv" for folder in args.sets)])
    results, names = evaluate(args)
    print_table(results, names)
    if args.output:
        try:
            write_json(args.output, {"thresholds": args.thresholds, "level": LEVEL, "sets": results})
        except OSError as e:  # a full disk, say
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
        print(f"wrote {args.output}")
    return 1 if any(row["n_unreadable"] for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
