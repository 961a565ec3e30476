#!/usr/bin/env bash
# GPU check: run on a CUDA machine with only this repo and no network (under 8 minutes on one H100).
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. bench.py for the card-size model at batch 1024 (eager, channels_last, bf16, compile);
# 2. a 2-epoch synthetic training run at batch 1024 (50,000 dead-leaves images at 32x32, as
#    CIFAR-10's training set) without and with --compile;
# 3. the whole test suite (it must pass unchanged on a CUDA machine);
# 4. resume on CUDA: 2 epochs straight vs 1 epoch + --resume, and how far apart the weights end;
# then prints one JSON summary (also written to OUT_DIR/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python bench.py --device cuda --batch-size 1024 --repeats 5 --json "$out/bench.json" | tee "$out/bench.txt"

for mode in no-compile compile; do
  python train.py --dataset synthetic --synthetic-images 50000 --epochs 2 --batch-size 1024 \
    --out-dir "$out/train_$mode" --overwrite --no-progress --$mode | tee "$out/train_$mode.txt"
done

python -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/pytest.txt" | tail -3 || true  # reported below
tiny=(--dataset synthetic --synthetic-images 4096 --batch-size 256 --no-progress --device cuda --overwrite)
python train.py "${tiny[@]}" --epochs 2 --out-dir "$out/resume_straight" > /dev/null
python train.py "${tiny[@]}" --epochs 1 --out-dir "$out/resume_interrupted" > /dev/null
python train.py --resume --epochs 2 --out-dir "$out/resume_interrupted" --no-progress > /dev/null

python - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
from data import dead_leaves, preprocess
from detector import prepare_model, score_batch
from model import load_model
out = Path(sys.argv[1])
# bf16 + channels_last (what inference uses on CUDA) against the fp32 eager path, per image
ckpt = out / "train_no-compile" / "model_best_checkpoint.ckpt"
torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
torch.backends.cuda.matmul.allow_tf32 = False
eager = load_model(ckpt, "cuda")
x = preprocess(dead_leaves(512, 32, seed=7).cuda(), eager.config.image_size)
with torch.no_grad():
    reference = eager.reconstruction_error(x, reduction="none").double().cpu().numpy()
fast = score_batch(prepare_model(load_model(ckpt, "cuda"), torch.device("cuda")), x)["mse"]
bf16_rel = float(abs(fast / reference - 1).max())
bench = json.loads((out / "bench.json").read_text())
summary = {"gpu": (out / "gpu.txt").read_text().strip(), "bench": bench, "train": {},
           "bf16_vs_fp32_max_relative_score_difference": bf16_rel}
for mode in ("no-compile", "compile"):
    rows = [json.loads(l) for l in (out / f"train_{mode}" / "metrics.jsonl").read_text().splitlines()]
    summary["train"][mode] = {"epoch_time_s": [r["epoch_time_s"] for r in rows],
                              "images_per_s": [r["images_per_s"] for r in rows],
                              "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
                              "val_loss": [r["val_loss"] for r in rows]}
# exact resume is a CPU guarantee; on CUDA, cuDNN autotuning and atomic adds reorder sums
a, b = (torch.load(out / f"resume_{r}" / "last_checkpoint.ckpt", weights_only=True)["model"]
        for r in ("straight", "interrupted"))
summary["cuda_resume_max_abs_weight_difference"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
summary["pytest"] = (out / "pytest.txt").read_text().strip().splitlines()[-1]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
