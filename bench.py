"""How fast is the detector, and how far from the hardware limit?

    python bench.py --device cpu --json bench_cpu.json     # card-size model, CPU (about 3 minutes on 2 cores)
    python bench.py --device cuda --batch-size 1024 --json bench_gpu.json
    python bench.py --preset smoke --device cpu              # a smaller model: train.py's smoke preset

Prints and (with --json) saves: GFLOPs per image; the peak FLOP/s measured with a large matmul and 3x3
convolutions beside the theoretical peak (CPU: threads x clock x FMA lanes; CUDA: the
datasheet); per variant (eager, channels_last, bf16 on CUDA, torch.compile) inference and training images/s,
peak memory and utilisation. Medians over --repeats, after warm-ups. Whole-script timings: docs/speed.md."""

import platform
import statistics
import time
from dataclasses import asdict

import torch

from model import AutoencoderConfig, ResidualAutoencoder, count_parameters, pixel_error, summarize
from train import ARCHITECTURE, PRESETS
from utils import (ArgumentParser, check_output, fast_math, number, peak_memory_gb, pick_device, run_cli,
                   write_json)

# dense bf16 datasheet peaks, TFLOP/s; the first name match wins (PCIe / NVL boards clock below SXM ones)
DATASHEET_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L4": 121.0}
VARIANTS = ("eager", "channels_last", "bf16", "compile")


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


def peak_tflops(device, args):
    """The best TFLOP/s of the kernels that run closest to the hardware limit (fp32 on CPU, bf16 on CUDA): a
    large matmul (BLAS) and 3x3 convolutions in channels_last (oneDNN / cuDNN), which on some CPUs beat it."""
    dtype, n, batch = (torch.bfloat16, 8192, 64) if device.type == "cuda" else (torch.float32, 4096, 8)
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    best = rate(2 * n ** 3, lambda: a @ b, device, args.repeats, 2)
    layout = torch.channels_last
    for channels, size in ((256, 64), (512, 32)):
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).to(memory_format=layout)
        weight = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype).to(memory_format=layout)
        flops = 2 * batch * channels ** 2 * 9 * size ** 2
        best = max(best, rate(flops, lambda: torch.conv2d(x, weight, padding=1), device, args.repeats, 2))
    return best / 1e12


def theoretical_tflops(cuda_name, threads, fma_units):
    """(TFLOP/s or None, its basis): on CUDA the datasheet; on a CPU threads x clock x FLOP per cycle (2 per
    FMA lane: 16 fp32 lanes with AVX-512, 8 with AVX2) x FMA units per core, from /proc/cpuinfo."""
    if cuda_name:
        return next((v for k, v in DATASHEET_TFLOPS.items() if k in cuda_name), None), "dense bf16 datasheet"
    basis = f"{threads} threads x clock x fp32 FMA lanes x {fma_units} FMA units"
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None, basis
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    lanes = 16 if " avx512f" in info else 8 if " avx2" in info else 4
    return (threads * max(mhz) * 1e6 * 2 * lanes * fma_units / 1e12 if mhz else None), basis


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
        if device.type == "cuda":  # what the allocator holds: what nvidia-smi shows, less the context
            row[f"{mode}_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return row


def print_report(r):
    print(f"device: {r['device_name']} | torch {r['torch']} | threads {r['threads']} | "
          f"batch {r['batch_size']} | {r['params']:,} params | {r['gflops_per_image']:.3f} GFLOPs/image")
    theory = r["theoretical_tflops"]
    theory = f", theoretical {theory * 1e3:.1f} GFLOP/s ({r['theoretical_basis']})" if theory else ""
    print(f"peak ({r['peak_precision']}, measured): {r['peak_tflops'] * 1e3:.1f} GFLOP/s{theory}")
    print(f"{'variant':<14}{'infer img/s':>13}{'util':>7}{'mem GB':>8}"
          f"{'train img/s':>13}{'util':>7}{'mem GB':>8}")
    for v in r["variants"]:
        cells = [f"{v[m + '_images_per_s']:>13.1f}{v[m + '_utilisation']:>7.1%}"
                 f"{v[m + '_peak_memory_gb']:>8.2f}" for m in ("infer", "train") if m + "_images_per_s" in v]
        print(f"{v['variant']:<14}" + ("".join(cells) or f" failed: {v['error']}"))
    if r["device"] == "cpu":
        print("(on CPU the memory columns are the process's peak RSS so far, not a per-variant figure)")
    print(f"best inference variant: {r['best_inference_variant']}")


def main(argv=None):
    p = ArgumentParser(__doc__)
    add = p.add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    add("--preset", choices=sorted(p for p in PRESETS if "model" not in PRESETS[p]), default="card",
        help="autoencoder config of train.py's preset")
    add("--batch-size", type=number(int, 1), default=None, help="32 on CPU, 1024 on CUDA if not given")
    add("--repeats", type=number(int, 1), default=5, help="timed repeats per figure; the median is reported")
    add("--warmup", type=number(int, 0), default=2, help="untimed runs first")
    add("--variants", default="eager,channels_last,bf16,compile",
        help=f"comma-separated, of {','.join(VARIANTS)} (bf16: CUDA only)")
    add("--skip-train", action="store_true", help="inference only")
    add("--fma-units", type=number(int, 1), default=2, help="FMA units per core, for the CPU's theoretical "
        "peak (2 on recent x86 server cores; the CPU does not report it)")
    add("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {','.join(VARIANTS)}")
    if args.json:
        check_output(args.json)  # now, not after minutes of timing
    device = pick_device(args.device)
    fast_math(device)
    args.batch_size = args.batch_size or (1024 if device.type == "cuda" else 32)
    config = AutoencoderConfig(**{k: v for k, v in PRESETS[args.preset].items() if k in ARCHITECTURE})
    model, _, gflops = summarize(config)
    # the peak is read again after each variant and the best kept: one reading on a busy machine can come
    # out far too low, and every utilisation would then read above 100%
    peaks = [peak_tflops(device, args)]
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    threads = torch.get_num_threads()
    theory, basis = theoretical_tflops(cuda_name, threads, args.fma_units)
    result = {"device": str(device), "device_name": cuda_name or platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": threads, "batch_size": args.batch_size,
              "config": asdict(config), "params": count_parameters(model), "gflops_per_image": gflops,
              "peak_precision": "bf16" if cuda_name else "fp32", "theoretical_tflops": theory,
              "theoretical_basis": basis, "variants": []}
    for variant in [v for v in variants if not (v == "bf16" and device.type == "cpu")]:  # no fast CPU bf16
        try:
            result["variants"].append(bench_variant(config, device, variant, args, gflops))
        except Exception as e:  # e.g. compile without a compiler: reported, not fatal
            first_line = str(e).partition("\n")[0][:160]  # an empty message too
            error = f"{type(e).__name__}: {first_line}"
            result["variants"].append({"variant": variant, "error": error})
        torch.cuda.empty_cache()  # the variant's model is gone; a no-op without CUDA
        peaks.append(peak_tflops(device, args))
    result["peak_tflops"] = max(peaks)
    ok = [r for r in result["variants"] if "error" not in r]
    for row in ok:
        row.update({f"{m}_utilisation": row[f"{m}_tflops"] / result["peak_tflops"] for m in ("infer", "train")
                    if f"{m}_tflops" in row})
    result["best_inference_variant"] = max(ok, key=lambda r: r["infer_images_per_s"],
                                           default={"variant": None})["variant"]
    print_report(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
