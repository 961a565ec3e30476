"""
How fast is the detector, and how far from the hardware limit?

    python bench.py --device cpu --json bench_cpu.json          # card-size model, CPU (a few minutes on 2 cores)
    python bench.py --device cuda --batch-size 1024 --json bench_gpu.json
    python bench.py --preset smoke --device cpu                   # any config: --channels / --image-size / ...

Prints and (with --json) saves: forward GFLOPs per image (counted); the device's
peak FLOP/s measured with a large matmul (fp32 on CPU, bf16 on CUDA, with the
datasheet figure beside it); for each variant (eager fp32, channels_last, bf16
autocast on CUDA, torch.compile) inference and training images/s, peak memory and
utilisation = achieved FLOP/s / measured peak; the data path alone (CIFAR batch
indexing + resize on the device; folder decode + resize per image); folder inference
against the card's recipe; and the cost of the complexity score's PNG coding.
Warm-up runs are excluded; figures are medians over --repeats.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data import preprocess, read_image
from detector import pick_device
from fakes import png_bits
from model import AutoencoderConfig, ResidualAutoencoder, forward_gflops, write_json
from train import PRESETS, peak_memory_gb

# dense (no sparsity) datasheet peaks, TFLOP/s, by precision
DATASHEET_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    add("--preset", choices=sorted(PRESETS), default="card", help="model config of train.py's preset (default: card)")
    add("--batch-size", type=int, default=None, help="default: 32 on CPU, 1024 on CUDA")
    add("--repeats", type=int, default=5, help="timed repeats per figure; the median is reported (default: 5)")
    add("--warmup", type=int, default=2, help="untimed runs first (default: 2)")
    add("--variants", default="eager,channels_last,bf16,compile",
        help="comma-separated subset of eager,channels_last,bf16,compile (default: all that apply)")
    add("--skip-train", action="store_true", help="inference only")
    add("--folder-images", type=int, default=128, help="multi-megapixel JPEGs for the folder benchmarks, 0 = skip (default: 128)")
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add("--json", default=None, help="also write every figure to this file")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup):
    """Median seconds per call of fn() over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_peak_tflops(device, repeats):
    """A large square matmul, the best case for the hardware: fp32 on CPU, bf16 on CUDA."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n ** 3 / seconds / 1e12, "bf16" if dtype == torch.bfloat16 else "fp32"


def datasheet_tflops(device, precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v[precision] for k, v in DATASHEET_TFLOPS.items() if k in name), None)


def build(config, device, variant):
    model = ResidualAutoencoder(config).to(device)
    if variant in ("channels_last", "bf16", "compile"):
        model = model.to(memory_format=torch.channels_last)
    if variant == "compile":
        model.compile()
    return model


def autocast(device, variant):
    # compile runs in bf16 on CUDA too: it is the variant users would pick there
    bf16 = device.type == "cuda" and variant in ("bf16", "compile")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def bench_variant(config, device, variant, batch_size, args, gflops, peak):
    x = torch.rand(batch_size, 3, config.image_size, config.image_size, device=device) * 2 - 1
    memory_format = torch.contiguous_format if variant == "eager" else torch.channels_last
    x = x.contiguous(memory_format=memory_format)
    row = {"variant": variant}
    model = build(config, device, variant).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def infer():
        with torch.no_grad(), autocast(device, variant):
            model(x)

    seconds = timed(infer, device, args.repeats, args.warmup + (2 if variant == "compile" else 0))
    row["infer_images_per_s"] = batch_size / seconds
    row["infer_utilisation"] = row["infer_images_per_s"] * gflops / 1e3 / peak
    row["infer_peak_memory_gb"] = peak_memory_gb(device)
    if not args.skip_train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            with autocast(device, variant):
                recon = model(x)
            loss = (recon.float() - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds = timed(step, device, args.repeats, args.warmup + (2 if variant == "compile" else 0))
        row["train_images_per_s"] = batch_size / seconds
        # a training step costs about 3 forwards (forward, and twice that for the backward)
        row["train_utilisation"] = row["train_images_per_s"] * 3 * gflops / 1e3 / peak
        row["train_peak_memory_gb"] = peak_memory_gb(device)
    return row  # the model goes out of scope here; the caller empties the CUDA cache


# ----------------------------------------------------------------------------
# data path and folder inference

def make_jpegs(folder, n, size=(3000, 2000)):
    """Multi-megapixel photographs: scikit-image's sample photos if installed, else smooth noise."""
    from PIL import Image
    try:
        from skimage import data as skdata
        sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    except ImportError:
        rng = np.random.default_rng(0)
        sources = [(rng.random((64, 96, 3)) * 255).astype(np.uint8) for _ in range(4)]
    paths = []
    for i in range(n):
        img = Image.fromarray(sources[i % len(sources)]).resize(size, Image.BICUBIC)
        path = Path(folder) / f"photo_{i:03d}.jpg"
        img.save(path, quality=92)
        paths.append(str(path))
    return paths


def card_recipe(model, paths, batch_size, device):
    """The card's inference code: PIL decode at full size, Resize + ToTensor + Normalize per
    image, stacked, fp32 eager forward."""
    from PIL import Image
    from torchvision import transforms

    size = model.config.image_size  # 128 for the card's model
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    for start in range(0, len(paths), batch_size):
        images = []
        for p in paths[start:start + batch_size]:
            with Image.open(p) as img:
                images.append(transform(img.convert("RGB")))
        batch = torch.stack(images)
        with torch.no_grad():
            model.reconstruction_error(batch.to(device), reduction="none")


def bench_data_path(config, device, args, paths):
    out = {}
    cifar_like = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    batch = args.batch_size

    def cifar_batch():
        idx = torch.randint(0, cifar_like.shape[0], (batch,), device=device)
        preprocess(cifar_like[idx], config.image_size)

    out["cifar_batch_images_per_s"] = batch / timed(cifar_batch, device, args.repeats, args.warmup)
    sample = paths[: min(8, len(paths))]
    full = timed(lambda: [preprocess(read_image(p), config.image_size) for p in sample], torch.device("cpu"), 3, 1)
    draft = timed(lambda: [preprocess(read_image(p, min_size=config.image_size), config.image_size) for p in sample],
                  torch.device("cpu"), 3, 1)
    out["folder_decode_full_images_per_s"] = len(sample) / full
    out["folder_decode_draft_images_per_s"] = len(sample) / draft
    x = preprocess(read_image(sample[0], min_size=config.image_size), config.image_size)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).repeat(32, 1, 1, 1)
    out["png_coding_images_per_s"] = 32 / timed(lambda: png_bits(u8), torch.device("cpu"), 3, 1)
    return out


def bench_folder(config, device, args, paths):
    from detector import score_files

    model = ResidualAutoencoder(config).to(device).eval()
    out = {"folder_images": len(paths), "folder_image_size": "3000x2000 JPEG"}
    bs = min(args.batch_size, 32)
    card_recipe(model, paths[:bs], bs, device)  # warm-up, untimed
    t0 = time.perf_counter()
    card_recipe(model, paths, bs, device)
    sync(device)
    out["card_recipe_images_per_s"] = len(paths) / (time.perf_counter() - t0)
    model = model.to(memory_format=torch.channels_last)
    # the default score (mse) needs no PNG coding; complexity / combined do
    for label, with_complexity in (("repo_images_per_s", False), ("repo_with_complexity_images_per_s", True)):
        t0 = time.perf_counter()
        rows = list(score_files(model, paths, batch_size=bs, with_complexity=with_complexity))
        sync(device)
        out[label] = len(rows) / (time.perf_counter() - t0)
    out["speedup_vs_card_recipe"] = out["repo_images_per_s"] / out["card_recipe_images_per_s"]
    return out


# ----------------------------------------------------------------------------

def print_table(result):
    print(f"device: {result['device_name']} | torch {result['torch']} | threads {result['threads']} | "
          f"batch {result['batch_size']} | {result['params']:,} params | {result['gflops_per_image']:.3f} GFLOPs/image")
    sheet = f", datasheet {result['datasheet_tflops']:.0f}" if result["datasheet_tflops"] else ""
    print(f"peak ({result['peak_precision']} matmul, measured): {result['peak_tflops'] * 1e3:.1f} GFLOP/s{sheet and sheet + ' TFLOP/s'}")
    print(f"{'variant':<14}{'infer img/s':>12}{'util':>7}{'mem GB':>8}{'train img/s':>13}{'util':>7}{'mem GB':>8}")
    for r in result["variants"]:
        if "error" in r:
            print(f"{r['variant']:<14} failed: {r['error']}")
            continue
        train = (f"{r['train_images_per_s']:>13.1f}{r['train_utilisation']:>7.1%}{r['train_peak_memory_gb']:>8.2f}"
                 if "train_images_per_s" in r else "")
        print(f"{r['variant']:<14}{r['infer_images_per_s']:>12.1f}{r['infer_utilisation']:>7.1%}"
              f"{r['infer_peak_memory_gb']:>8.2f}{train}")
    if result["device"] == "cpu":
        print("(on CPU the memory columns are the process's peak RSS so far, not a per-variant figure)")
    print(f"best inference variant: {result['best_inference_variant']}")
    for key, value in result.get("data_path", {}).items():
        print(f"data path  {key:<40} {value:10.1f}")
    for key, value in result.get("folder", {}).items():
        print(f"folder     {key:<40} {value if isinstance(value, str) else f'{value:10.2f}'}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_flush_denormal(True)
    args.batch_size = args.batch_size or (1024 if device.type == "cuda" else 32)
    model_fields = {"image_size", "channels", "blocks_per_stage", "latent_dim"}
    config = AutoencoderConfig(**{k: v for k, v in PRESETS[args.preset].items() if k in model_fields})
    gflops = forward_gflops(config)
    peak, precision = measured_peak_tflops(device, args.repeats)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "config": config.to_dict(), "params": sum(p.numel() for p in ResidualAutoencoder(config).parameters()),
        "gflops_per_image": gflops, "peak_tflops": peak, "peak_precision": precision,
        "datasheet_tflops": datasheet_tflops(device, precision), "variants": [],
    }
    # folders first: after torch.compile has run, the process's state (compile workers, a
    # larger heap to fork) distorts the multi-process decode timings
    if args.folder_images:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_jpegs(tmp, args.folder_images)
            result["data_path"] = bench_data_path(config, device, args, paths)
            result["folder"] = bench_folder(config, device, args, paths)
    for variant in [v.strip() for v in args.variants.split(",")]:
        if variant == "bf16" and device.type != "cuda":
            continue  # no fast bf16 on the CPUs we target
        try:
            result["variants"].append(bench_variant(config, device, variant, args.batch_size, args, gflops, peak))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # a variant that cannot run here (e.g. compile without a compiler) is reported, not fatal
            result["variants"].append({"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    ok = [r for r in result["variants"] if "error" not in r]
    result["best_inference_variant"] = max(ok, key=lambda r: r["infer_images_per_s"])["variant"] if ok else None
    print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
