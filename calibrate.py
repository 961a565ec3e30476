"""Scores real images against fakes, writes thresholds in the card's schema, and reports how well each score
separates real from each kind of fake (docs/method.md: the thresholds, p-values and metrics).

    python calibrate.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt  # the card's: CIFAR-10 vs noise
    python calibrate.py --checkpoint runs/smoke/model_best_checkpoint.ckpt --real-dir photos/ \\
        --fake-dir cifake=CIFAKE/test/FAKE --output out/thresholds_calibrated.json --plots-dir out/
    python calibrate.py --artifact-model runs/artifact/release --real-dir generated/pairs/calib/real \\
        --fake-dir generated/pairs/test/span_x4 --num-noise 0 --hard-fakes none  # the artifact detector alone

Real images are split, seeded, into a calibration part (split-conformal thresholds at 1% / 5% / 10% false
positives; the p-values' reference) and a held-out part that measures them, with benign edits of its photos.
"""

import argparse
import csv
import datetime
import hashlib
import io
import os
import sys
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fakes
import metrics
import plots
import thresholds
from checkpoints import weights_fingerprint
from data import PREPROCESSING, load_cifar10, load_image_folder, preprocess, to_uint8
from detector import SCORES, score_batch, score_files, score_images
from images import ImageReadError, read_image
from metrics import FPR_LEVELS, evaluation_table, threshold_table
from model import load_models
from utils import (SEED, ArgumentParser, UserError, add_model_flags, atomic_write, check_output,
                   csv_cell, number, pick_device, precision_name, printable, run_cli)

CONVENTION = ("fake = positive class, real = negative; higher score = more fake; AUROC / AUPR computed on "
              "held-out real images vs each fake set; AUPR-In takes real as positive; FPR@95TPR = fraction "
              "of held-out real images flagged at the threshold that catches 95% of the fakes")


def parse_args(argv=None):
    p, natural = ArgumentParser(__doc__), number(int, 0)
    add = p.add_argument
    add_model_flags(p, "the autoencoder, anything load_model accepts (default: "
                    "runs/cifar10/model_best_checkpoint.ckpt, unless --artifact-model is given alone)",
                    "an artifact detector (train.py --preset artifact): adds its score", thresholds=False)
    add("--data-dir", default="./data", help="CIFAR-10 folder, used when no --real-dir")
    add("--real-dir", action="append", default=[],
        help="real images (files, folders, globs; repeatable) instead of CIFAR-10 test")
    add("--max-real", type=natural, default=0, help="use at most this many real images, 0 = all")
    add("--num-noise", type=natural, default=10000, help="uniform-noise fakes, the card's set")
    add("--fake-dir", action="append", default=[], metavar="[NAME=]DIR",
        help="a folder of known fakes, scored and reported as NAME (repeatable)")
    add("--hard-fakes", default="flat,gradient,blur,jpeg,splice",
        help="built-in hard sets (see fakes.py), or 'none'")
    add("--num-hard", type=natural, default=1000, help="images per built-in hard set")
    add("--num-benign", type=natural, default=100, help="held-out real photos benignly processed (JPEG, "
        "halved, sharpened, up-scaled: fakes.benign_versions) to measure false positives; 0 = off")
    add("--optimal-against", help="fake set that the 'optimal' threshold separates (default: noise, if made)")
    add("--holdout-fraction", type=number(float, 0, 1), default=0.5,
        help="real images held out to measure FPR")
    add("--seed", type=SEED, default=0, help="seed of the real split and the built-in fakes")
    add("--output",
        help="thresholds JSON to write (default: thresholds_calibrated.json beside the checkpoint)")
    add("--plots-dir", help="where the three PNGs go (default: the --output folder)")
    add("--scores-out", help="CSV of every scored image (set, index or path, split, scores)")
    add("--batch-size", type=number(int, 1), default=128, help="images per forward pass")
    add("--workers", type=natural, default=None,
        help="decode processes (default: a GPU rank's share of the cores; at most 4 on a CPU)")
    add("--bootstrap", type=natural, default=200, help="bootstrap resamples for AUROC intervals, 0 = off")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    args = p.parse_args(argv)
    # a set's name is its key in the report and in --scores-out: two sets of one name would merge silently
    args.hard = [n.strip() for n in args.hard_fakes.split(",") if n.strip() not in ("", "none")]
    args.fake_dirs, names = [], ["real", *(["noise"] if args.num_noise else []), *args.hard]
    for spec in args.fake_dir:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec.rstrip("/")).name or "fakes", spec)
        if name in names:
            p.error(f"--fake-dir {spec}: the set name {name!r} is taken (the real set, a built-in set or "
                    f"another --fake-dir); name it with NAME=DIR")
        names.append(name)
        args.fake_dirs.append((name, folder))
    if args.optimal_against not in (None, *names[1:]):
        p.error(f"--optimal-against {args.optimal_against!r} is not one of the fake sets: "
                f"{', '.join(names[1:])}")
    args.optimal_against = args.optimal_against or "noise"
    if not (args.checkpoint or args.artifact_model):
        args.checkpoint = "runs/cifar10/model_best_checkpoint.ckpt"
    return args


# ---- scoring every set
def progress(args, label, **tqdm_kwargs):
    return tqdm(desc=f"scoring {label}", disable=not args.progress, leave=False, **tqdm_kwargs)


def columns(rows, names):
    """[{score: value}] -> {score: [N] array}, for each score in names."""
    return {s: np.asarray([r[s] for r in rows]) for s in names}


def score_folder(model, artifact, paths, args, label):
    """Scores image files exactly as inference does -> ({score: [N]}, the N paths, unreadable files)."""
    rows, skipped = [], []
    with progress(args, label, unit="img") as bar:
        for row in score_files(model, paths, args.batch_size, args.workers, artifact=artifact):
            if "error" in row:
                skipped.append(f"{row['path']}: {row['error']}")
                continue
            rows.append(row)
            bar.update(1)
            if args.max_real and label == "real" and len(rows) >= args.max_real:
                break
    if not rows:
        raise UserError(f"no readable images for {label} in {', '.join(map(str, paths))}"
                        + (f" ({len(skipped)} unreadable)" if skipped else ""))
    return columns(rows, [s for s in SCORES if s in rows[0]]), [r["path"] for r in rows], skipped


def score_set(model, artifact, images, args, label):
    with progress(args, label, total=len(images), unit="img") as bar:
        return score_images(model, images, batch_size=args.batch_size, progress=bar, artifact=artifact)


def score_benign(model, artifact, paths, args):
    """{name: {score: [N]}} of benignly processed copies (fakes.benign_versions) of real photos, at full
    resolution; a copy too small for the artifact score's tiles is left out of every score."""
    out = {name: [] for name in fakes.BENIGN}
    for i, path in enumerate(progress(args, "benign", iterable=paths)):
        try:
            versions = fakes.benign_versions(read_image(path), seed=args.seed + i)
            scores = score_images(model, list(versions.values()), batch_size=len(versions), artifact=artifact)
        except (ImageReadError, ValueError):  # vanished since, or its half-size copy is too small to tile
            continue
        for j, name in enumerate(versions):
            out[name].append({s: v[j] for s, v in scores.items()})
    return {name: columns(rows, rows[0]) for name, rows in out.items() if rows}


def collect(model, artifact, args):
    """Real scores, paths and source, fake sets {name: scores} and sources, unreadable files skipped per set,
    and a few uint8 sample images per set for the pictures."""
    # the artifact score tiles the built-in fakes too: make them at least one tile large
    size = max(m.config.image_size for m in (model, artifact) if m is not None)
    skipped, sets, sources = {}, {}, {}
    if args.real_dir:
        real, real_paths, skipped["real"] = score_folder(model, artifact, args.real_dir, args, "real")
        # the derived fakes (blur, jpeg, splice) are edits of these images
        real_u8 = load_image_folder(real_paths[:args.num_hard], size)[0] if args.num_hard else None
        real_source = f"{len(real_paths):,} images from {', '.join(args.real_dir)}"
    elif artifact is not None:
        raise UserError("the artifact score reads original pixels, and CIFAR-10's are 32x32 thumbnails: "
                        "give real photos with --real-dir")
    else:
        real_u8 = load_cifar10(args.data_dir, train=False)[:args.max_real or None]
        real, real_paths = score_set(model, None, real_u8, args, "real (CIFAR-10 test)"), None
        real_source = f"CIFAR-10 test set, {real_u8.shape[0]:,} images"
    samples = {"real": real_u8[:4]} if real_u8 is not None else {}  # for reconstruction_comparison.png
    for name in (["noise"] if args.num_noise else []) + args.hard:
        n = args.num_noise if name == "noise" else args.num_hard
        try:
            images = fakes.make_fake_sets([name], real=real_u8, n=n, size=size, seed=args.seed)[name]
        except ValueError as e:
            raise UserError(f"--hard-fakes: {e}") from None
        sets[name] = score_set(model, artifact, images, args, name)  # batches go to the device whole
        sources[name] = f"{images.shape[0]:,} images: {fakes.DESCRIPTIONS[name]}"
        samples[name] = images[:1]
    for name, folder in args.fake_dirs:
        sets[name], paths, skipped[name] = score_folder(model, artifact, [folder], args, name)
        sources[name] = f"{len(paths):,} images from {folder}"
    if not sets:
        raise UserError("no fake sets: give --num-noise > 0, --hard-fakes or --fake-dir")
    return real, real_paths, real_source, sets, sources, skipped, samples


# ---- thresholds and evaluation
def split_real(n, holdout_fraction, seed):
    """Seeded (calibration, held-out) indices of the n real images."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held, alpha = int(round(n * holdout_fraction)), min(FPR_LEVELS.values())
    need = round(1 / alpha) - 1  # k = ceil((n + 1)(1 - a)) <= n needs n >= 1/a - 1
    if n_held < 1 or n - n_held < need:
        raise UserError(f"{n} real images, {n_held} of them held out, leave {n - n_held} to calibrate: need "
                        f"at least {need} for a {alpha:.0%} false-positive threshold, and at least 1 held "
                        f"out (give more real images or change --holdout-fraction)")
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def analyse(real, sets, benign, split, args):
    """Thresholds from the calibration part, what they flag (held-out reals, benign sets, fakes), AUROCs."""
    (cal_idx, held_idx), names = split, list(real)
    cal = {s: np.sort(real[s][cal_idx]) for s in names}
    held = {s: real[s][held_idx] for s in names}
    by_score = lambda groups: {s: {n: v[s] for n, v in groups.items()} for s in names}  # noqa: E731
    fake, good = by_score(sets), by_score(benign)
    tables = {s: threshold_table(cal[s], held[s], fake[s], good[s], args.optimal_against) for s in names}
    roc = {s: (held[s], fake[s]) for s in names}  # what each score's ROC compares: held-out real vs fakes
    evaluation = {s: evaluation_table(r, f, args.bootstrap, args.seed) for s, (r, f) in roc.items()}
    return dict(cal_idx=cal_idx, held_idx=held_idx, cal=cal, tables=tables, evaluation=evaluation, roc=roc)


# ---- report
def build_report(model, artifact, args, device, real, real_source, sets, sources, skipped, result):
    stats = {s: {n: metrics.summary_stats(v[s]) for n, v in {"real": real, **sets}.items()} for s in real}
    ckpt = Path(args.checkpoint or args.artifact_model)
    weights_file = ckpt / "model.safetensors" if ckpt.is_dir() else ckpt
    sha256 = hashlib.sha256(weights_file.read_bytes()).hexdigest() if weights_file.is_file() else None
    artifact_binding = {} if artifact is None else dict(
        artifact_model=args.artifact_model, artifact_fingerprint=weights_fingerprint(artifact),
        artifact_config=asdict(artifact.config))
    mse = stats.get("mse", {})  # the card's sections, with an autoencoder only
    card = dict(statistics=mse, mean_error_ratio={n: s["mean"] / mse["real"]["mean"] for n, s in mse.items()
                                                  if n != "real"}) if model else {}
    return thresholds.build(
        result["tables"], result["cal"], **card,
        score_statistics={s: stats[s] for s in real if s != "mse"},
        evaluation={"convention": CONVENTION, "scores": result["evaluation"]},
        binding={
            "checkpoint": args.checkpoint and str(args.checkpoint), "checkpoint_sha256": sha256,
            "weights_fingerprint": model and weights_fingerprint(model),
            "model_config": model and asdict(model.config),
            **artifact_binding,
            "preprocessing": PREPROCESSING, "device": str(device),
            "precision": precision_name(device, model is not None),
            "real": real_source,
            "real_split": {"seed": args.seed, "holdout_fraction": args.holdout_fraction,
                           "n_calibration": len(result["cal_idx"]), "n_heldout": len(result["held_idx"])},
            "fake_sets": sources, "benign_sets": {n: fakes.BENIGN_DESCRIPTION for n in fakes.BENIGN},
            "unreadable_skipped": {n: len(v) for n, v in skipped.items()}, "seed": args.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {m: version(m) for m in ("torch", "torchvision", "numpy", "pillow",
                                                 "huggingface_hub")}})


def print_summary(report, output):
    ev = report["evaluation"]["scores"]
    sets = list(next(iter(ev.values())))
    print("\nAUROC (fake = positive; held-out real vs each set)")
    print(f"{'score':<11}" + "".join(f"{n:>10}" for n in sets))
    for score, rows in ev.items():
        print(f"{score:<11}" + "".join(f"{rows[n]['auroc']:>10.3f}" for n in sets))
    print("\nthresholds (FAKE when score > value) and the share of real images flagged: held-out [95% "
          "interval], benignly processed")
    tables = [("mse", report["reconstruction_thresholds"]["thresholds"])] if "mse" in ev else []
    tables += [(s, t["thresholds"]) for s, t in report["score_thresholds"].items()]
    for kind, table in tables:
        for name, t in table.items():
            lo, hi = t["heldout_fpr_ci95"]
            benign = "".join(f", {n} {b['fpr']:.1%}" for n, b in t["benign_fpr"].items())
            tpr = ", ".join(f"{n} {v:.1%}" for n, v in t["tpr"].items())
            print(f"  {kind + ' ' + name:<20} {t['value']:<10.6g} real {t['heldout_fpr']:.2%} "
                  f"[{lo:.2%}, {hi:.2%}]{benign}  TPR {tpr}")
    print(f"\nwrote {output}")


def count(scores):
    """N of a {score: [N] array} dict."""
    return len(next(iter(scores.values())))


def write_scores_csv(path, real, real_paths, result, sets):
    split = np.where(np.isin(np.arange(count(real)), result["cal_idx"]), "calibration", "heldout")
    rows = [[csv_cell(name), i, csv_cell(real_paths[i]) if name == "real" and real_paths else "",
             split[i] if name == "real" else "fake", *(repr(float(values[s][i])) for s in real)]
            for name, values in {"real": real, **sets}.items() for i in range(count(values))]
    text = io.StringIO()  # csv's own \r\n line ends, written as bytes: no newline translation
    csv.writer(text).writerows([["set", "index", "path", "split", *real], *rows])
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.getvalue().encode("utf-8")))


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # N copies would race for the same files
        raise UserError("calibrate.py runs as one process: start it with python, not torchrun")
    output = Path(args.output) if args.output else thresholds.beside(args.checkpoint or args.artifact_model)
    plots_dir = Path(args.plots_dir) if args.plots_dir else output.parent
    for path in [output, plots_dir / "roc_curve.png"] + ([Path(args.scores_out)] if args.scores_out else []):
        check_output(path, [args.checkpoint, args.artifact_model, *args.real_dir])
    device = pick_device(args.device)
    model, artifact = load_models(args.checkpoint, device, args.artifact_model)
    real, real_paths, real_source, sets, sources, skipped, samples = collect(model, artifact, args)
    for name, items in skipped.items():
        if items:
            print(f"skipped {len(items)} unreadable {printable(name)} file(s), e.g. {printable(items[0])}",
                  file=sys.stderr)
    split = split_real(count(real), args.holdout_fraction, args.seed)
    # benign copies of held-out photos only: the calibration part must not see them
    benign = (score_benign(model, artifact, [real_paths[i] for i in split[1][:args.num_benign]], args)
              if real_paths else {})
    result = analyse(real, sets, benign, split, args)
    report = build_report(model, artifact, args, device, real, real_source, sets, sources, skipped, result)
    try:  # thresholds last: if a write fails (a full disk), no new thresholds without their evidence
        if args.scores_out:
            write_scores_csv(args.scores_out, real, real_paths, result, sets)
        shown = None
        if samples and model is not None:  # a few images per set, reconstructed as the model sees them
            x = torch.cat([to_uint8(preprocess(b.cpu(), model.config.image_size)) for b in samples.values()])
            shown = ([name for name, b in samples.items() for _ in b], score_batch(model, x, keep_maps=True))
        plots.calibration_plots(report, real, sets, result, model is not None, shown, plots_dir)
        thresholds.write(output, report)
    except OSError as e:
        raise UserError(f"cannot write {e.filename or output}: {e.strerror or e}") from None
    print_summary(report, output)
    print(f"plots in {plots_dir}/" + (f"; scores: {args.scores_out}" if args.scores_out else ""))


if __name__ == "__main__":
    run_cli(main)
