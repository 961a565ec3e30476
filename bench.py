"""How fast is the detector, and how far from the hardware limit?

    python bench.py --device cpu --json bench_cpu.json          # card-size model, CPU (a few minutes on 2 cores)
    python bench.py --device cuda --batch-size 1024 --json bench_gpu.json
    python bench.py --preset smoke --device cpu                   # a smaller model: train.py's smoke preset

Prints and (with --json) saves: forward GFLOPs per image; the peak FLOP/s of a large matmul
(fp32 on CPU, bf16 on CUDA; the datasheet's beside it); per variant (eager fp32, channels_last,
bf16 autocast on CUDA, torch.compile, export.py's graph run by ONNX Runtime and OpenVINO on CPU) inference and training images/s, peak memory and
utilisation = achieved / peak FLOP/s; the data path alone (CIFAR batches, reading per format, PNG
coding); folder inference (a mixed JPEG / PNG / WebP folder) against the card's recipe, and with the coding score (its cost per image and per
megapixel it scores, and its share of inference time). Medians over --repeats, after warm-up runs."""

from dataclasses import asdict, fields
import os
import platform
import statistics
import tempfile
import time

import torch
from PIL import Image

from coding import MAX_TILES_PER_SIDE, CodingConfig, CodingModel
from data import preprocess, read_image, to_uint8
from detector import score_files, tile_scores
from fakes import png_bits
from model import ArtifactDetector, AutoencoderConfig, ResidualAutoencoder, count_parameters, squared_error, summarize
from train import PRESETS
from utils import ArgumentParser, check_writable, number, peak_memory_gb, pick_device, run_cli, write_json

# dense (no sparsity) datasheet bf16 peaks, TFLOP/s, first match of the device name wins: the PCIe and NVL
# boards run at lower clocks and power than the SXM ones
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                         "A100": 312.0, "L4": 121.0}


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
    """The peak: a large square matmul, the best case for the hardware (fp32 on CPU, bf16 on CUDA)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    return rate(2 * n ** 3, lambda: a @ b, device, args.repeats, warmup=2) / 1e12


def bench_variant(config, device, variant, args, gflops):
    """Inference and (unless --skip-train) training images/s, utilisation and peak memory."""
    layout = torch.contiguous_format if variant == "eager" else torch.channels_last
    model = ResidualAutoencoder(config).to(device, memory_format=layout)
    size = config.image_size
    x = torch.empty(args.batch_size, 3, size, size, device=device, memory_format=layout).uniform_(-1, 1)
    if variant == "compile":
        model.compile()
    # compile runs in bf16 on CUDA too: it is the variant users would pick there
    bf16 = device.type == "cuda" and variant in ("bf16", "compile")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(train):
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            recon = model(x)
        if train:
            opt.zero_grad(set_to_none=True)
            squared_error(recon, x).mean().backward()  # the training loss, in fp32
            opt.step()
    row = {"variant": variant}
    for mode in ("infer",) if args.skip_train else ("infer", "train"):
        model.train(mode == "train")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = args.warmup + (2 if variant == "compile" else 0)  # compile's first calls compile the graph
        row[f"{mode}_images_per_s"] = rate(args.batch_size, lambda: step(mode == "train"), device, args.repeats, warmup)
        # a training step costs about 3 forwards (forward, and twice that for the backward)
        row[f"{mode}_tflops"] = row[f"{mode}_images_per_s"] * gflops * (3 if mode == "train" else 1) / 1e3
        row[f"{mode}_peak_memory_gb"] = peak_memory_gb(device)
    return row  # the model goes out of scope here; the caller empties the CUDA cache


def bench_exported(config, device, args, gflops, runtime, folder):
    """Inference images/s of export.py's graph (preprocessing, model and scores) run on the CPU by ONNX Runtime
    ('onnx') or OpenVINO ('openvino'), as --runtime runs it. The graph is exported into `folder` once for both."""
    from export import export_graph, onnxruntime_session, openvino_session

    path = f"{folder}/model.onnx"
    if not os.path.exists(path):
        export_graph(ResidualAutoencoder(config).eval(), path, opset=18)
    run = (onnxruntime_session if runtime == "onnx" else openvino_session)(path)[1]
    size = config.image_size
    x = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8).numpy()  # what the runtime is fed
    images_per_s = rate(args.batch_size, lambda: run(x), device, args.repeats, args.warmup)
    return {"variant": runtime, "infer_images_per_s": images_per_s, "infer_tflops": images_per_s * gflops / 1e3,
            "infer_peak_memory_gb": peak_memory_gb(device)}


FOLDER_FORMATS = ("JPEG", "PNG", "WEBP")  # a mixed folder, as users have: draft mode helps JPEG only


def bench_folder(config, device, args, folder):
    """Writes --folder-images 3000x2000 photos to `folder`, a third each JPEG, PNG and WebP (scikit-image's photos
    if installed, else smooth noise), then times the data path alone (CIFAR batches; per format, reading at full
    size or reduced, and how much reducing moves the model's input; PNG coding) and folder inference."""
    try:
        from skimage import data as skdata
        sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    except ImportError:
        sources = torch.randint(0, 256, (4, 64, 96, 3), dtype=torch.uint8).numpy()  # smooth noise once upscaled
    paths = []
    for i in range(args.folder_images):
        fmt = FOLDER_FORMATS[i % len(FOLDER_FORMATS)]
        paths.append(f"{folder}/photo_{i:03d}.{fmt.lower()}")
        Image.fromarray(sources[i % len(sources)]).resize((3000, 2000), Image.BICUBIC).save(paths[-1], fmt, quality=92)
    size = config.image_size
    cifar_like = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    index = torch.randint(0, len(cifar_like), (args.batch_size,), device=device)  # a random batch
    data_path = {"cifar_batch_images_per_s": rate(args.batch_size, lambda: preprocess(cifar_like[index], size), device,
                                                  args.repeats, args.warmup)}
    for fmt in FOLDER_FORMATS:
        some = [p for p in paths if p.endswith(fmt.lower())][:4]
        read = lambda min_size: [preprocess(read_image(p, min_size=min_size), size) for p in some]  # noqa: E731
        data_path[f"{fmt}_read_full_images_per_s"] = rate(len(some), lambda: read(None), device, 3, 1)
        data_path[f"{fmt}_read_reduced_images_per_s"] = rate(len(some), lambda: read(size), device, 3, 1)
        if some:
            moved = (torch.cat(read(size)) - torch.cat(read(None))).abs().mean().item() * 127.5
            data_path[f"{fmt}_reduced_input_change_grey_levels"] = moved  # mean |difference| of the model's input
    u8 = to_uint8(preprocess(read_image(paths[0], min_size=size), size)).repeat(32, 1, 1, 1)  # [32, 3, S, S]
    data_path["png_coding_images_per_s"] = rate(32, lambda: png_bits(u8), device, 3, 1)
    from scripts.card_recipe import card_recipe  # here: its torchvision import costs every start 2 s

    model = ResidualAutoencoder(config).to(device).eval()  # one timed pass each: the card's recipe, then score_files
    bs = min(args.batch_size, 32)
    [*card_recipe(model, paths[:bs], bs, device)]  # warm-up, untimed
    out = {"folder_images": len(paths), "folder_image_size": "3000x2000 JPEG / PNG / WebP",
           "card_recipe_images_per_s": rate(len(paths), lambda: [*card_recipe(model, paths, bs, device)], device)}
    model = model.to(memory_format=torch.channels_last)
    # the default score (mse) needs no PNG coding; complexity / combined do
    for key, complexity in (("repo_images_per_s", False), ("repo_with_complexity_images_per_s", True)):
        out[key] = rate(len(paths), lambda: [*score_files(model, paths, bs, with_complexity=complexity)], device)
    out["speedup_vs_card_recipe"] = out["repo_images_per_s"] / out["card_recipe_images_per_s"]
    # the coding score: at most MAX_TILES_PER_SIDE^2 tiles of original pixels per image, whatever its size
    shape = {f.name for f in fields(CodingConfig)}
    coding = CodingModel(CodingConfig(**{k: v for k, v in PRESETS["coding"].items() if k in shape})).to(device).eval()
    t, n_tiles = coding.config.image_size, MAX_TILES_PER_SIDE ** 2
    tiles = torch.randint(0, 256, (n_tiles, 3, t, t), dtype=torch.uint8, device=device)
    coding_ms = 1000 / rate(1, lambda: coding.tile_gaps(tiles), device, args.repeats, 1)
    out.update(coding_model_ms_per_image=coding_ms, coding_model_ms_per_scored_megapixel=coding_ms / (n_tiles * t * t / 1e6),
               repo_with_coding_images_per_s=rate(len(paths), lambda: [*score_files(model, paths, bs, coding=coding,
                                                                                    with_complexity=False)], device))
    out["coding_share_of_inference_time"] = 1 - out["repo_with_coding_images_per_s"] / out["repo_images_per_s"]
    # the artifact detector on the same tiles; alone (--score artifact) it needs no autoencoder input at all
    artifact = ArtifactDetector().to(device, memory_format=torch.channels_last).eval()
    out.update(artifact_model_ms_per_image=1000 / rate(1, lambda: tile_scores(artifact, tiles, [n_tiles]), device,
                                                       args.repeats, 1),
               repo_artifact_only_images_per_s=rate(
                   len(paths), lambda: [*score_files(None, paths, bs, artifact=artifact)], device))
    return data_path, out


def print_report(r):
    print(f"device: {r['device_name']} | torch {r['torch']} | threads {r['threads']} | "
          f"batch {r['batch_size']} | {r['params']:,} params | {r['gflops_per_image']:.3f} GFLOPs/image")
    sheet = f", datasheet {r['datasheet_tflops']:.0f} TFLOP/s" if r["datasheet_tflops"] else ""
    print(f"peak ({r['peak_precision']} matmul, measured): {r['peak_tflops'] * 1e3:.1f} GFLOP/s{sheet}")
    print(f"{'variant':<14}{'infer img/s':>13}{'util':>7}{'mem GB':>8}{'train img/s':>13}{'util':>7}{'mem GB':>8}")
    for v in r["variants"]:
        cells = [f"{v[m + '_images_per_s']:>13.1f}{v[m + '_utilisation']:>7.1%}{v[m + '_peak_memory_gb']:>8.2f}"
                 for m in ("infer", "train") if m + "_images_per_s" in v]
        print(f"{v['variant']:<14}" + ("".join(cells) or f" failed: {v['error']}"))
    if r["device"] == "cpu":
        print("(on CPU the memory columns are the process's peak RSS so far, not a per-variant figure)")
    print(f"best inference variant: {r['best_inference_variant']}" + "".join(
        f" | {k[:-len('_vs_channels_last')]} / channels_last: {r[k]:.2f}x" for k in r if k.endswith("_vs_channels_last")))
    for section in ("data_path", "folder"):
        for key, value in r.get(section, {}).items():
            print(f"{section:<10} {key:<40} {value if isinstance(value, str) else f'{value:10.2f}'}")


VARIANTS = ("eager", "channels_last", "bf16", "compile", "onnx", "openvino")


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    add("--preset", choices=sorted(p for p in PRESETS if "model" not in PRESETS[p]), default="card",
        help="autoencoder config of train.py's preset")
    add("--batch-size", type=number(int, 1), default=None, help="32 on CPU, 1024 on CUDA if not given")
    add("--repeats", type=number(int, 1), default=5, help="timed repeats per figure; the median is reported")
    add("--warmup", type=number(int, 0), default=2, help="untimed runs first")
    add("--variants", default=",".join(VARIANTS), help="comma-separated subset (bf16: "
        "CUDA only; onnx, openvino: CPU only, need requirements-export.txt)")
    add("--skip-train", action="store_true", help="inference only")
    add("--folder-images", type=number(int, 0), default=128, help="multi-megapixel JPEGs for the folder benchmarks, 0 = skip")
    add("--threads", type=number(int, 1), default=None, help="torch threads; torch's choice if not given")
    add("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {','.join(VARIANTS)}")
    if args.json:
        check_writable(args.json)  # now, not after minutes of timing
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = pick_device(args.device)
    torch.set_flush_denormal(True)  # denormals (tiny gradients) slow CPU math many-fold
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 outside autocast, on CUDA
    torch.backends.cudnn.benchmark = True  # one input shape: autotuning pays off
    args.batch_size = args.batch_size or (1024 if device.type == "cuda" else 32)
    shape = {f.name for f in fields(AutoencoderConfig)}  # the preset's model fields, not its training ones
    config = AutoencoderConfig(**{k: v for k, v in PRESETS[args.preset].items() if k in shape})
    model, _, gflops = summarize(config)
    # the peak is measured again after each variant and the best reading kept: one reading on a busy machine
    # can come out at a third of the truth, and every utilisation would then read well above 100%
    peaks = [matmul_tflops(device, args)]
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {"device": str(device), "device_name": cuda_name or platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "config": asdict(config), "params": count_parameters(model), "gflops_per_image": gflops,
              "peak_precision": "bf16" if cuda_name else "fp32",
              "datasheet_tflops": next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in (cuda_name or "")), None),
              "variants": []}
    # folders first: after torch.compile has run, the process's state (compile workers, a
    # larger heap to fork) distorts the multi-process decode timings
    if args.folder_images:
        with tempfile.TemporaryDirectory() as tmp:
            result["data_path"], result["folder"] = bench_folder(config, device, args, tmp)
    # no fast bf16 on our CPUs; the exported graph's runtimes are CPU runtimes here
    skip = ("bf16",) if device.type == "cpu" else ("onnx", "openvino")
    with tempfile.TemporaryDirectory() as export_folder:
        for variant in [v for v in variants if v not in skip]:
            try:
                exported = variant in ("onnx", "openvino")
                result["variants"].append(bench_exported(config, device, args, gflops, variant, export_folder) if exported
                                          else bench_variant(config, device, variant, args, gflops))
            except Exception as e:  # a variant that cannot run here (e.g. compile without a compiler) is reported, not fatal
                result["variants"].append({"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            torch.cuda.empty_cache()  # the variant's model is gone; a no-op without CUDA
            peaks.append(matmul_tflops(device, args))
    result["peak_tflops"] = max(peaks)  # the best of the readings: utilisation never rests on a slow one
    ok = [r for r in result["variants"] if "error" not in r]
    for row in ok:
        row.update({f"{m}_utilisation": row[f"{m}_tflops"] / result["peak_tflops"] for m in ("infer", "train")
                    if f"{m}_tflops" in row})
    result["best_inference_variant"] = max(ok, key=lambda r: r["infer_images_per_s"])["variant"] if ok else None
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
