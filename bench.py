"""How fast is the detector, and how far from the hardware limit?

    python bench.py --device cpu --json bench_cpu.json     # card-size model, CPU (a few minutes on 2 cores)
    python bench.py --device cuda --batch-size 1024 --json bench_gpu.json
    python bench.py --preset smoke --device cpu              # a smaller model: train.py's smoke preset
    python bench.py --device cpu --variants channels_last,onnx,openvino --folder-images 128   # longer parts

Prints and (with --json) saves: GFLOPs per image; the peak FLOP/s of a large matmul (and the datasheet's);
per variant (eager, channels_last, bf16 on CUDA, torch.compile; on request export.py's graph in ONNX Runtime
and OpenVINO on CPU) inference and training images/s, peak memory and utilisation; with --folder-images, the
data path alone and folder inference against the card's recipe. Medians over --repeats, after warm-ups."""

import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, fields

import torch
from PIL import Image

from data import MAX_TILES_PER_SIDE, preprocess, to_uint8
from detector import png_bits, score_files, tile_scores
from export import export_graph
from images import read_image
from model import (ArtifactDetector, AutoencoderConfig, ResidualAutoencoder, count_parameters, pixel_error,
                   summarize)
from runtimes import onnxruntime_session, openvino_session
from train import PRESETS
from utils import ArgumentParser, check_output, number, peak_memory_gb, pick_device, run_cli, write_json

# dense bf16 datasheet peaks, TFLOP/s; the first name match wins (PCIe / NVL boards clock below SXM ones)
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0,
                         "H200": 989.0, "A100": 312.0, "L4": 121.0}
VARIANTS = ("eager", "channels_last", "bf16", "compile", "onnx", "openvino")
FOLDER_FORMATS = ("JPEG", "PNG", "WEBP")  # a mixed folder, as users have: draft mode helps JPEG only


def rate(n, fn, device, repeats=1, warmup=0):
    """n / the median seconds per call of fn() over `repeats` timed calls after `warmup` untimed ones."""
    times = []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[warmup:])


def matmul_tflops(device, args):
    """The peak TFLOP/s of a large square matmul (fp32 on CPU, bf16 on CUDA)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    return rate(2 * n ** 3, lambda: a @ b, device, args.repeats, warmup=2) / 1e12


def bench_variant(config, device, variant, args, gflops):
    """A row of inference and (unless --skip-train) training images/s, TFLOP/s and peak memory."""
    layout = torch.contiguous_format if variant == "eager" else torch.channels_last
    model = ResidualAutoencoder(config).to(device, memory_format=layout)
    size = config.image_size
    x = torch.empty(args.batch_size, 3, size, size, device=device, memory_format=layout).uniform_(-1, 1)
    if variant == "compile":
        model.compile()
    bf16 = device.type == "cuda" and variant in ("bf16", "compile")  # compile as users would run it on CUDA
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(train):
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            recon = model(x)
        if train:
            opt.zero_grad(set_to_none=True)
            pixel_error(recon, x).mean().backward()
            opt.step()
    row = {"variant": variant}
    for mode in ("infer",) if args.skip_train else ("infer", "train"):
        model.train(mode == "train")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = args.warmup + (2 if variant == "compile" else 0)  # compile's first calls compile the graph
        images_per_s = rate(args.batch_size, lambda: step(mode == "train"), device, args.repeats, warmup)
        row[f"{mode}_images_per_s"] = images_per_s
        # a training step costs about 3 forwards (the backward twice one)
        row[f"{mode}_tflops"] = images_per_s * gflops * (3 if mode == "train" else 1) / 1e3
        row[f"{mode}_peak_memory_gb"] = peak_memory_gb(device)
    return row


def bench_exported(config, device, args, gflops, runtime, folder):
    """A row of inference images/s of export.py's graph on the CPU by ONNX Runtime ('onnx') or OpenVINO,
    as --runtime runs it. The graph is exported into `folder` once for both."""
    path = f"{folder}/model.onnx"
    if not os.path.exists(path):
        export_graph(ResidualAutoencoder(config).eval(), path, opset=18)
    run = (onnxruntime_session if runtime == "onnx" else openvino_session)(path)[1]
    size = config.image_size
    x = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8).numpy()
    images_per_s = rate(args.batch_size, lambda: run(x), device, args.repeats, args.warmup)
    return {"variant": runtime, "infer_images_per_s": images_per_s,
            "infer_tflops": images_per_s * gflops / 1e3, "infer_peak_memory_gb": peak_memory_gb(device)}


def bench_folder(config, device, args, folder):
    """(data path figures, folder figures) on --folder-images 3000x2000 photos written to `folder`, a third
    each JPEG, PNG and WebP (scikit-image's photos if installed, else smooth noise)."""
    try:
        from skimage import data as skdata
        sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    except ImportError:
        sources = torch.randint(0, 256, (4, 64, 96, 3), dtype=torch.uint8).numpy()  # smooth once upscaled
    paths = []
    for i in range(args.folder_images):
        fmt = FOLDER_FORMATS[i % len(FOLDER_FORMATS)]
        paths.append(f"{folder}/photo_{i:03d}.{fmt.lower()}")
        image = Image.fromarray(sources[i % len(sources)]).resize((3000, 2000), Image.BICUBIC)
        image.save(paths[-1], fmt, quality=92)
    size = config.image_size
    cifar_like = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    idx = torch.randint(0, len(cifar_like), (args.batch_size,), device=device)
    data_path = {"cifar_batch_images_per_s": rate(args.batch_size, lambda: preprocess(cifar_like[idx], size),
                                                  device, args.repeats, args.warmup)}
    for fmt in FOLDER_FORMATS:
        some = [p for p in paths if p.endswith(fmt.lower())][:4]
        def read(min_size):
            return [preprocess(read_image(p, min_size=min_size), size) for p in some]
        data_path[f"{fmt}_read_full_images_per_s"] = rate(len(some), lambda: read(None), device, 3, 1)
        data_path[f"{fmt}_read_reduced_images_per_s"] = rate(len(some), lambda: read(size), device, 3, 1)
        if some:  # how much reduced reading moves the model's input: mean |difference| in grey levels
            moved = (torch.cat(read(size)) - torch.cat(read(None))).abs().mean().item() * 127.5
            data_path[f"{fmt}_reduced_input_change_grey_levels"] = moved
    u8 = to_uint8(preprocess(read_image(paths[0], min_size=size), size)).repeat(32, 1, 1, 1)
    data_path["png_coding_images_per_s"] = rate(32, lambda: png_bits(u8), device, 3, 1)
    from scripts.card_recipe import card_recipe # here: its torchvision import costs every start 2 s

    model = ResidualAutoencoder(config).to(device).eval()  # one timed pass each
    n, bs = len(paths), min(args.batch_size, 32)
    [*card_recipe(model, paths[:bs], bs, device)]  # warm-up
    out = {"folder_images": n, "folder_image_size": "3000x2000 JPEG / PNG / WebP",
           "card_recipe_images_per_s": rate(n, lambda: [*card_recipe(model, paths, bs, device)], device)}
    model = model.to(memory_format=torch.channels_last)
    for key, complexity in (("repo_images_per_s", False), ("repo_with_complexity_images_per_s", True)):
        out[key] = rate(n, lambda: [*score_files(model, paths, bs, with_complexity=complexity)], device)
    out["speedup_vs_card_recipe"] = out["repo_images_per_s"] / out["card_recipe_images_per_s"]
    # the artifact detector: at most MAX_TILES_PER_SIDE^2 tiles per image; alone it needs no autoencoder input
    artifact = ArtifactDetector().to(device, memory_format=torch.channels_last).eval()
    t, n_tiles = artifact.config.image_size, MAX_TILES_PER_SIDE ** 2
    tiles = torch.randint(0, 256, (n_tiles, 3, t, t), dtype=torch.uint8, device=device)
    images_per_s = rate(1, lambda: tile_scores(artifact, tiles, [n_tiles]), device, args.repeats, 1)
    out["artifact_model_ms_per_image"] = 1000 / images_per_s
    out["repo_artifact_only_images_per_s"] = rate(
        n, lambda: [*score_files(None, paths, bs, artifact=artifact)], device)
    return data_path, out


def print_report(r):
    print(f"device: {r['device_name']} | torch {r['torch']} | threads {r['threads']} | "
          f"batch {r['batch_size']} | {r['params']:,} params | {r['gflops_per_image']:.3f} GFLOPs/image")
    sheet = f", datasheet {r['datasheet_tflops']:.0f} TFLOP/s" if r["datasheet_tflops"] else ""
    print(f"peak ({r['peak_precision']} matmul, measured): {r['peak_tflops'] * 1e3:.1f} GFLOP/s{sheet}")
    print(f"{'variant':<14}{'infer img/s':>13}{'util':>7}{'mem GB':>8}"
          f"{'train img/s':>13}{'util':>7}{'mem GB':>8}")
    for v in r["variants"]:
        cells = [f"{v[m + '_images_per_s']:>13.1f}{v[m + '_utilisation']:>7.1%}"
                 f"{v[m + '_peak_memory_gb']:>8.2f}" for m in ("infer", "train") if m + "_images_per_s" in v]
        print(f"{v['variant']:<14}" + ("".join(cells) or f" failed: {v['error']}"))
    if r["device"] == "cpu":
        print("(on CPU the memory columns are the process's peak RSS so far, not a per-variant figure)")
    print(f"best inference variant: {r['best_inference_variant']}" + "".join(
        f" | {k[:-len('_vs_channels_last')]} / channels_last: {r[k]:.2f}x"
        for k in r if k.endswith("_vs_channels_last")))
    for section in ("data_path", "folder"):
        for key, value in r.get(section, {}).items():
            print(f"{section:<10} {key:<40} {value if isinstance(value, str) else f'{value:10.2f}'}")


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    add("--preset", choices=sorted(p for p in PRESETS if "model" not in PRESETS[p]), default="card",
        help="autoencoder config of train.py's preset")
    add("--batch-size", type=number(int, 1), default=None, help="32 on CPU, 1024 on CUDA if not given")
    add("--repeats", type=number(int, 1), default=5, help="timed repeats per figure; the median is reported")
    add("--warmup", type=number(int, 0), default=2, help="untimed runs first")
    add("--variants", default="eager,channels_last,bf16,compile", help=f"comma-separated, of "
        f"{','.join(VARIANTS)} (bf16: CUDA only; onnx, openvino: CPU only, need requirements-export.txt)")
    add("--skip-train", action="store_true", help="inference only")
    add("--folder-images", type=number(int, 0), default=0,
        help="multi-megapixel photos for the data path and folder benchmarks (0: skip them)")
    add("--threads", type=number(int, 1), default=None, help="torch threads; torch's choice if not given")
    add("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {','.join(VARIANTS)}")
    if args.json:
        check_output(args.json)  # now, not after minutes of timing
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = pick_device(args.device)
    torch.set_flush_denormal(True)  # denormals (tiny gradients) slow CPU math many-fold
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 outside autocast
    torch.backends.cudnn.benchmark = True  # one input shape: autotuning pays off
    args.batch_size = args.batch_size or (1024 if device.type == "cuda" else 32)
    shape = {f.name for f in fields(AutoencoderConfig)}  # the preset's model fields, not its training ones
    config = AutoencoderConfig(**{k: v for k, v in PRESETS[args.preset].items() if k in shape})
    model, _, gflops = summarize(config)
    # the peak is read again after each variant and the best kept: one reading on a busy machine can come
    # out far too low, and every utilisation would then read above 100%
    peaks = [matmul_tflops(device, args)]
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in (cuda_name or "")), None)
    result = {"device": str(device), "device_name": cuda_name or platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "config": asdict(config), "params": count_parameters(model), "gflops_per_image": gflops,
              "peak_precision": "bf16" if cuda_name else "fp32",
              "datasheet_tflops": datasheet, "variants": []}
    # folders first: after torch.compile the process's state (compile workers, a larger heap to fork)
    # distorts the multi-process decode timings
    if args.folder_images:
        with tempfile.TemporaryDirectory() as tmp:
            result["data_path"], result["folder"] = bench_folder(config, device, args, tmp)
    skip = ("bf16",) if device.type == "cpu" else ("onnx", "openvino")  # no fast CPU bf16; runtimes: CPU
    with tempfile.TemporaryDirectory() as export_folder:
        for variant in [v for v in variants if v not in skip]:
            try:
                exported = variant in ("onnx", "openvino")
                row = (bench_exported(config, device, args, gflops, variant, export_folder) if exported
                       else bench_variant(config, device, variant, args, gflops))
                result["variants"].append(row)
            except Exception as e:  # e.g. compile without a compiler: reported, not fatal
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                result["variants"].append({"variant": variant, "error": error})
            torch.cuda.empty_cache()  # the variant's model is gone; a no-op without CUDA
            peaks.append(matmul_tflops(device, args))
    result["peak_tflops"] = max(peaks)
    ok = [r for r in result["variants"] if "error" not in r]
    for row in ok:
        row.update({f"{m}_utilisation": row[f"{m}_tflops"] / result["peak_tflops"] for m in ("infer", "train")
                    if f"{m}_tflops" in row})
    best = max(ok, key=lambda r: r["infer_images_per_s"], default={"variant": None})
    result["best_inference_variant"] = best["variant"]
    speed = {r["variant"]: r["infer_images_per_s"] for r in ok}
    for runtime in ("onnx", "openvino"):
        if runtime in speed and "channels_last" in speed:
            result[f"{runtime}_vs_channels_last"] = speed[runtime] / speed["channels_last"]
    print_report(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
