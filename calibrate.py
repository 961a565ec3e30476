"""
Scores real images against fakes, writes thresholds in the card's schema, and
reports how well each score separates real from each kind of fake.

    python calibrate.py --checkpoint runs/cifar10/model_best_checkpoint.ckpt      # the card: CIFAR-10 test vs noise
    python calibrate.py --checkpoint runs/smoke/model_best_checkpoint.ckpt --real-dir photos/ \\
        --fake-dir cifake=CIFAKE/test/FAKE --output out/thresholds_calibrated.json --plots-dir out/

Real images (CIFAR-10 test, or --real-dir) are split, seeded, into a calibration part
that sets the thresholds and a held-out part that measures them. Thresholds:
strict / balanced / sensitive are split-conformal at false-positive levels 1% / 5% / 10%
(the k-th smallest calibration score, k = ceil((n + 1)(1 - a))); optimal maximises
TPR - FPR against the --optimal-against fake set. Rule: FAKE when score > threshold.
"""

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fakes
import metrics
from data import PREPROCESSING, DataError, load_cifar10, load_image_folder
from detector import (BASE_SCORES, FPR_LEVELS, ConfigError, combined_pvalue, pick_device, prepare_model,
                      score_files, score_uint8)
from model import CheckpointError, atomic_write, file_sha256, load_model, precision_name, weights_fingerprint, write_json

CONVENTION = ("fake = positive class, real = negative; higher score = more fake (for combined, lower p-value); "
              "AUROC / AUPR computed on held-out real images vs each fake set; AUPR-In takes real as positive; "
              "FPR@95TPR = fraction of held-out real images flagged at the threshold that catches 95% of the fakes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", default="runs/cifar10/model_best_checkpoint.ckpt",
        help="anything load_model accepts (default: runs/cifar10/model_best_checkpoint.ckpt)")
    add("--data-dir", default="./data", help="CIFAR-10 folder, used when no --real-dir (default: ./data)")
    add("--real-dir", action="append", default=[], help="real images (files, folders, globs; repeatable) instead of CIFAR-10 test")
    add("--max-real", type=int, default=0, help="use at most this many real images, 0 = all (default: 0)")
    add("--num-noise", type=int, default=10000, help="uniform-noise fakes, the card's set (default: 10000)")
    add("--fake-dir", action="append", default=[], metavar="[NAME=]DIR",
        help="a folder of known fakes, scored and reported as NAME (repeatable)")
    add("--hard-fakes", default="flat,gradient,blur,jpeg,splice",
        help=f"built-in hard sets, comma-separated from {','.join(fakes.ALL_FAKES[1:])}, or 'none' "
             f"(default: flat,gradient,blur,jpeg,splice)")
    add("--num-hard", type=int, default=1000, help="images per built-in hard set (default: 1000)")
    add("--optimal-against", default="noise", help="fake set that the 'optimal' threshold separates (default: noise)")
    add("--holdout-fraction", type=float, default=0.5, help="real images held out to measure FPR (default: 0.5)")
    add("--seed", type=int, default=0, help="default: 0")
    add("--output", default=None, help="thresholds JSON (default: thresholds_calibrated.json beside the checkpoint)")
    add("--plots-dir", default=None, help="where the three PNGs go (default: the --output folder)")
    add("--scores-out", default=None, help="CSV of every scored image (set, index or path, split, scores)")
    add("--batch-size", type=int, default=128, help="default: 128")
    add("--workers", type=int, default=None, help="decode processes for folders (default: min(4, CPUs))")
    add("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    add("--bootstrap", type=int, default=200, help="bootstrap resamples for AUROC intervals, 0 = off (default: 200)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)")
    return p.parse_args(argv)


def default_output(checkpoint):
    """Beside the checkpoint, so the thresholds travel with it; for a hub id, a folder of its own
    (never the repo's top-level file, which holds the card's values)."""
    path = Path(checkpoint)
    if path.exists():
        return (path if path.is_dir() else path.parent) / "thresholds_calibrated.json"
    return Path("runs") / str(checkpoint).replace("/", "--").replace("@", "--") / "thresholds_calibrated.json"


def check_writable(path):
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------
# scoring every set

def score_folder(model, paths, args, label):
    """Scores image files exactly as inference does; returns (scores dict, paths, skipped list)."""
    scores, kept, skipped = {s: [] for s in BASE_SCORES}, [], []
    bar = tqdm(desc=f"scoring {label}", unit="img", disable=not args.progress, leave=False)
    for row in score_files(model, paths, args.batch_size, args.workers):
        if "error" in row:
            skipped.append((row["path"], row["error"]))
            continue
        kept.append(row["path"])
        for s in BASE_SCORES:
            scores[s].append(row[s])
        bar.update(1)
        if args.max_real and label == "real" and len(kept) >= args.max_real:
            break
    bar.close()
    if not kept:
        raise DataError(f"no readable images for {label} in {', '.join(map(str, paths))}"
                        + (f" ({len(skipped)} unreadable)" if skipped else ""))
    return {s: np.asarray(v) for s, v in scores.items()}, kept, skipped


def score_set(model, images, args, label):
    bar = tqdm(total=images.shape[0], desc=f"scoring {label}", unit="img", disable=not args.progress, leave=False)
    out = score_uint8(model, images, args.batch_size, progress=bar)
    bar.close()
    return out


def parse_fake_dir(spec):
    name, sep, folder = spec.partition("=")
    if not sep:
        name, folder = Path(spec.rstrip("/")).name or "fakes", spec
    return name, folder


def collect(model, args):
    """Returns real scores and paths, fake sets {name: scores}, their descriptions, the unreadable
files skipped per set, and a few uint8 sample images per set for the pictures."""
    size = model.config.image_size
    device = next(model.parameters()).device
    skipped = {}
    if args.real_dir:
        real, real_paths, skipped["real"] = score_folder(model, args.real_dir, args, "real")
        n_derive = min(args.num_hard, len(real_paths))
        real_u8 = load_image_folder(real_paths[:n_derive], size)[0] if n_derive else None
        real_source = f"{len(real_paths):,} images from {', '.join(args.real_dir)}"
    else:
        real_u8 = load_cifar10(args.data_dir, train=False)
        if args.max_real:
            real_u8 = real_u8[:args.max_real]
        real = score_set(model, real_u8.to(device), args, "real (CIFAR-10 test)")
        real_paths = None
        real_source = f"CIFAR-10 test set, {real_u8.shape[0]:,} images"

    sets, sources = {}, {}
    samples = {"real": real_u8[:4]} if real_u8 is not None else {}  # for reconstruction_comparison.png
    if args.num_noise:
        noise = fakes.uniform_noise(args.num_noise, size, args.seed)
        sets["noise"] = score_set(model, noise.to(device), args, "noise")
        sources["noise"] = f"{args.num_noise:,} uniform-noise images at {size}x{size}"
        samples["noise"] = noise[:1]
    names = [] if args.hard_fakes.strip() in ("", "none") else [n.strip() for n in args.hard_fakes.split(",")]
    try:
        hard = fakes.make_fake_sets(names, real=real_u8, n=args.num_hard, size=size, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"--hard-fakes: {e}") from None
    for name, images in hard.items():
        sets[name] = score_set(model, images.to(device), args, name)
        sources[name] = f"{images.shape[0]:,} images: {fakes.DESCRIPTIONS[name]}"
        samples[name] = images[:1]
    for spec in args.fake_dir:
        name, folder = parse_fake_dir(spec)
        sets[name], paths, skipped[name] = score_folder(model, [folder], args, name)
        sources[name] = f"{len(paths):,} images from {folder}"
    if not sets:
        raise ConfigError("no fake sets: give --num-noise > 0, --hard-fakes or --fake-dir")
    return real, real_paths, real_source, sets, sources, skipped, samples


# ----------------------------------------------------------------------------
# thresholds and evaluation

def split_real(n, holdout_fraction, seed):
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * holdout_fraction))
    if n_held < 1 or n - n_held < 1:
        raise DataError(f"{n} real images cannot be split into calibration and held-out parts "
                        f"(--holdout-fraction {holdout_fraction})")
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])  # calibration, held-out


def heldout_rate(flags):
    k, n = int(np.sum(flags)), len(flags)
    lo, hi = metrics.clopper_pearson(k, n)
    return {"heldout_fpr": k / n, "heldout_fpr_ci95": [lo, hi], "heldout_n": n}


def tpr_per_set(sets, threshold, score):
    return {name: float(np.mean(s[score] > threshold)) for name, s in sets.items()}


def check_calibration_size(n_cal):
    need = round(1 / min(FPR_LEVELS.values())) - 1  # k = ceil((n + 1)(1 - a)) <= n needs n >= 1/a - 1
    if n_cal < need:
        raise DataError(f"{n_cal} real calibration images cannot set a {min(FPR_LEVELS.values()):.0%} false-positive "
                        f"threshold: need at least {need} (give more real images or a lower --holdout-fraction)")


def threshold_table(cal, held, sets, score, optimal_against):
    table = {}
    for name, alpha in FPR_LEVELS.items():
        value = metrics.conformal_threshold(cal, alpha)
        table[name] = {"value": float(value), "target_fpr": alpha, "percentile": 100 * (1 - alpha),
                       "method": "split-conformal: k-th smallest calibration score",
                       "k": metrics.conformal_rank(len(cal), alpha), "n_calibration": len(cal),
                       **heldout_rate(held > value), "tpr": tpr_per_set(sets, value, score)}
    if optimal_against in sets:
        value, tpr, fpr = metrics.youden_threshold(cal, sets[optimal_against][score])
        table["optimal"] = {"value": float(value), "target_fpr": None,
                            "method": f"maximum TPR - FPR (Youden's J) against {optimal_against}, on the calibration part",
                            "calibration_fpr": fpr, **heldout_rate(held > value), "tpr": tpr_per_set(sets, value, score)}
    return table


def evaluation_table(held, sets, n_boot, seed):
    out = {}
    for name, fake in sets.items():
        row = {"auroc": metrics.auroc(held, fake), "aupr": metrics.aupr(held, fake),
               "aupr_in": metrics.aupr(held, fake, positive="real"), "fpr_at_95_tpr": metrics.fpr_at_tpr(held, fake)}
        if n_boot:
            row["auroc_ci95"] = list(metrics.bootstrap_ci(metrics.auroc, held, fake, n_boot=n_boot, seed=seed))
        out[name] = row
    return out


def combined_scores(cal, values):
    """Bonferroni-combined conformal p-value of each image in `values` (dict score -> array)."""
    return combined_pvalue([metrics.conformal_pvalues(np.sort(cal[s]), values[s]) for s in BASE_SCORES])


def analyse(real, sets, args):
    cal_idx, held_idx = split_real(len(real["mse"]), args.holdout_fraction, args.seed)
    check_calibration_size(len(cal_idx))
    cal = {s: real[s][cal_idx] for s in BASE_SCORES}
    held = {s: real[s][held_idx] for s in BASE_SCORES}
    thresholds, evaluation = {}, {}
    for s in BASE_SCORES:
        thresholds[s] = threshold_table(cal[s], held[s], sets, s, args.optimal_against)
        evaluation[s] = evaluation_table(held[s], {n: v[s] for n, v in sets.items()}, args.bootstrap, args.seed)
    # combined: a p-value, lower = more fake; evaluate on 1 - p so that higher = more fake
    held_p = combined_scores(cal, held)
    fake_p = {n: combined_scores(cal, v) for n, v in sets.items()}
    evaluation["combined"] = evaluation_table(1 - held_p, {n: 1 - p for n, p in fake_p.items()}, args.bootstrap, args.seed)
    levels = {name: {"value": alpha, "rule": "FAKE when combined p-value <= value", **heldout_rate(held_p <= alpha),
                     "tpr": {n: float(np.mean(p <= alpha)) for n, p in fake_p.items()}}
              for name, alpha in FPR_LEVELS.items()}
    return dict(cal_idx=cal_idx, held_idx=held_idx, cal=cal, thresholds=thresholds, evaluation=evaluation,
                combined_levels=levels, held_p=held_p, fake_p=fake_p)


# ----------------------------------------------------------------------------
# report

def versions():
    import PIL
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def build_report(model, args, device, real, real_source, sets, sources, skipped, result):
    stats = {"real": metrics.summary_stats(real["mse"]), **{n: metrics.summary_stats(v["mse"]) for n, v in sets.items()}}
    real_mean = stats["real"]["mean"]
    ckpt = Path(args.checkpoint)
    weights_file = ckpt / "model.safetensors" if ckpt.is_dir() else ckpt
    return {
        "reconstruction_thresholds": {
            "score": "mse: per-image mean squared reconstruction error on inputs normalized to [-1, 1]",
            "rule": "FAKE when error > value",
            "thresholds": result["thresholds"]["mse"],
        },
        "statistics": stats,
        "mean_error_ratio": {n: s["mean"] / real_mean for n, s in stats.items() if n != "real"},
        "score_thresholds": {
            **{s: {"rule": "FAKE when score > value", "thresholds": result["thresholds"][s]} for s in BASE_SCORES if s != "mse"},
            "combined": {"rule": "FAKE when combined p-value <= value", "levels": result["combined_levels"]},
        },
        "score_statistics": {s: {"real": metrics.summary_stats(real[s]), **{n: metrics.summary_stats(v[s]) for n, v in sets.items()}}
                             for s in BASE_SCORES if s != "mse"},
        "evaluation": {"convention": CONVENTION, "scores": result["evaluation"]},
        "calibration_scores": {
            "note": "sorted real calibration scores; p-value of a new score s = (1 + #{scores >= s}) / (n + 1)",
            "n": len(result["cal_idx"]),
            "scores": {s: np.sort(result["cal"][s]).tolist() for s in BASE_SCORES},
        },
        "binding": {
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": file_sha256(weights_file) if weights_file.is_file() else None,
            "weights_fingerprint": weights_fingerprint(model),
            "model_config": model.config.to_dict(),
            "preprocessing": PREPROCESSING,
            "precision": precision_name(device),
            "device": str(device),
            "real": real_source,
            "real_split": {"seed": args.seed, "holdout_fraction": args.holdout_fraction,
                           "n_calibration": len(result["cal_idx"]), "n_heldout": len(result["held_idx"])},
            "fake_sets": sources,
            "unreadable_skipped": {n: len(v) for n, v in skipped.items()},
            "seed": args.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        },
    }


def print_summary(report, output):
    ev = report["evaluation"]["scores"]
    sets = list(next(iter(ev.values())))
    print("\nAUROC (fake = positive; held-out real vs each set)")
    print(f"{'score':<11}" + "".join(f"{n:>10}" for n in sets))
    for score, rows in ev.items():
        print(f"{score:<11}" + "".join(f"{rows[n]['auroc']:>10.3f}" for n in sets))
    print("\nmse thresholds (FAKE when error > value)")
    for name, t in report["reconstruction_thresholds"]["thresholds"].items():
        lo, hi = t["heldout_fpr_ci95"]
        print(f"  {name:<10} {t['value']:.6f}  held-out FPR {t['heldout_fpr']:.2%} [{lo:.2%}, {hi:.2%}]  "
              f"TPR {', '.join(f'{n} {v:.1%}' for n, v in t['tpr'].items())}")
    for name, t in report["score_thresholds"]["combined"]["levels"].items():
        lo, hi = t["heldout_fpr_ci95"]
        print(f"  combined p <= {t['value']:<5} held-out FPR {t['heldout_fpr']:.2%} [{lo:.2%}, {hi:.2%}]  "
              f"TPR {', '.join(f'{n} {v:.1%}' for n, v in t['tpr'].items())}")
    print(f"\nwrote {output}")


def write_scores_csv(path, real, real_paths, result, sets):
    atomic_write(path, lambda tmp: _write_scores_csv(tmp, real, real_paths, result, sets))


def _write_scores_csv(path, real, real_paths, result, sets):
    split = np.empty(len(real["mse"]), dtype=object)
    split[result["cal_idx"]], split[result["held_idx"]] = "calibration", "heldout"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["set", "index", "path", "split", *BASE_SCORES])
        for i in range(len(real["mse"])):
            w.writerow(["real", i, real_paths[i] if real_paths else "", split[i], *(repr(float(real[s][i])) for s in BASE_SCORES)])
        for name, values in sets.items():
            for i in range(len(values["mse"])):
                w.writerow([name, i, "", "fake", *(repr(float(values[s][i])) for s in BASE_SCORES)])


def main(argv=None):
    args = parse_args(argv)
    try:
        output = Path(args.output) if args.output else default_output(args.checkpoint)
        plots_dir = Path(args.plots_dir) if args.plots_dir else output.parent
        for path in [output, plots_dir / "roc_curve.png"] + ([Path(args.scores_out)] if args.scores_out else []):
            check_writable(path)  # fail before an hour of scoring, not after
        device = pick_device(args.device)
        model = prepare_model(load_model(args.checkpoint, device), device)
        real, real_paths, real_source, sets, sources, skipped, samples = collect(model, args)
        for name, items in skipped.items():
            if items:
                print(f"skipped {len(items)} unreadable {name} file(s), e.g. {items[0][0]}: {items[0][1]}", file=sys.stderr)
        result = analyse(real, sets, args)
        report = build_report(model, args, device, real, real_source, sets, sources, skipped, result)
        write_json(output, report)
        if args.scores_out:
            write_scores_csv(args.scores_out, real, real_paths, result, sets)
        import plots
        plots.calibration_plots(report, real, sets, result, model, samples, plots_dir)
        print_summary(report, output)
        print(f"plots: {plots_dir / 'threshold_calibration.png'}, {plots_dir / 'reconstruction_comparison.png'}, "
              f"{plots_dir / 'roc_curve.png'}" + (f"; scores: {args.scores_out}" if args.scores_out else ""))
    except (DataError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
