#!/usr/bin/env bash
# GPU check: run on a CUDA machine with only this repo and no network.
#   bash scripts/gpu_check.sh [OUT_DIR]
#   PYTEST_ADDOPTS="-n 8" OMP_NUM_THREADS=2 bash scripts/gpu_check.sh   # pytest-xdist: the suite on 8 processes
# Steps, most important first, each writing its figures to OUT_DIR/<step>.json as soon as it ends,
# so that a run cut short still reports the steps it finished:
# 1. suite:  the whole test suite (it must pass unchanged on a CUDA machine);
# 2. resume: 1 epoch + --resume against 2 epochs straight on CUDA, beside two straight runs against each
#            other (CUDA training is not bitwise reproducible); and torchrun with more processes than GPUs,
#            which must be one line;
# 3. train:  a 2-epoch synthetic training run at batch 1024 (50,000 dead-leaves images at 32x32, as
#            CIFAR-10's training set), without and with --compile;
# 4. bf16:   the trained model's bf16 + channels_last scores against its fp32 eager scores, per image;
# 5. bench:  bench.py for the card-size model at batch 1024 (eager, channels_last, bf16, compile).
# Then prints one JSON summary of every step's file (also written to OUT_DIR/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"

# 1. suite: a failing suite is reported, and the check goes on
python -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/pytest.txt" | tail -3 || true
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = (out / "pytest.txt").read_text().splitlines()
(out / "suite.json").write_text(json.dumps({"pytest": lines[-1], "failed": [l for l in lines if l.startswith("FAILED")]}))
PY

# 2. resume, and a launch with more processes than GPUs
tiny=(--dataset synthetic --synthetic-images 4096 --batch-size 256 --no-progress --device cuda --overwrite)
for run in straight straight_again; do
  python train.py "${tiny[@]}" --epochs 2 --out-dir "$out/resume_$run" > /dev/null
done
python train.py "${tiny[@]}" --epochs 1 --out-dir "$out/resume_interrupted" > /dev/null
python train.py --resume --epochs 2 --out-dir "$out/resume_interrupted" --no-progress > /dev/null
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
too_many=$( (timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=$((gpus + 1)) train.py \
  "${tiny[@]}" --epochs 1 --out-dir "$out/too_many" 2>&1 || true) | grep -m1 "error: torchrun" || echo "no one-line error")
python - "$out" "$too_many" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
# exact resume is a CPU guarantee; on CUDA, cuDNN autotuning and atomic adds reorder sums, so a resumed
# run is held to the gap between two straight runs (relative gaps of the final validation loss)
val = {r: [json.loads(l)["val_loss"] for l in (out / f"resume_{r}" / "metrics.jsonl").read_text().splitlines()]
       for r in ("straight", "straight_again", "interrupted")}
gap = lambda a, b: abs(val[a][-1] / val[b][-1] - 1)
(out / "resume.json").write_text(json.dumps({"val_loss": val, "resumed_vs_straight": gap("interrupted", "straight"),
                                             "straight_vs_straight": gap("straight_again", "straight"),
                                             "torchrun_more_processes_than_gpus": sys.argv[2]}))
PY

# 3. train
for mode in no-compile compile; do
  python train.py --dataset synthetic --synthetic-images 50000 --epochs 2 --batch-size 1024 \
    --out-dir "$out/train_$mode" --overwrite --no-progress --$mode | tee "$out/train_$mode.txt"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
train = {}
for mode in ("no-compile", "compile"):
    rows = [json.loads(l) for l in (out / f"train_{mode}" / "metrics.jsonl").read_text().splitlines()]
    train[mode] = {k: [r[k] for r in rows] for k in ("epoch_time_s", "images_per_s", "peak_memory_gb", "val_loss")}
(out / "train.json").write_text(json.dumps(train))
PY

# 4. bf16 against fp32 on the trained model
python - "$out" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import torch
from data import dead_leaves, preprocess
from detector import prepare_model, score_batch
from model import load_model
out = Path(sys.argv[1])
ckpt = out / "train_no-compile" / "model_best_checkpoint.ckpt"
torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
torch.backends.cuda.matmul.allow_tf32 = False
eager = load_model(ckpt, "cuda")
x = preprocess(dead_leaves(512, 32, seed=7).cuda(), eager.config.image_size)
with torch.no_grad():
    reference = eager.reconstruction_error(x, reduction="none").double().cpu().numpy()
fast = score_batch(prepare_model(load_model(ckpt, "cuda"), torch.device("cuda")), x)["mse"]
relative = abs(fast / reference - 1)
(out / "bf16.json").write_text(json.dumps({"bf16_vs_fp32_relative_score_difference": {
    "max": float(relative.max()), "median": float(np.median(relative)), "images": len(relative)}}))
PY

# 5. bench
python bench.py --device cuda --batch-size 1024 --repeats 5 --json "$out/bench.json" | tee "$out/bench.txt"

python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"gpu": (out / "gpu.txt").read_text().strip()}
for step in ("suite", "resume", "train", "bf16", "bench"):
    summary[step] = json.loads((out / f"{step}.json").read_text())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
