#!/usr/bin/env bash
# GPU check: the card's headline figures first, then compile, resume and the suite. Run it on a CUDA machine
# with only this repo and no network (about 8 minutes on one H100):
#   bash scripts/gpu_check.sh [OUT_DIR]
#   DRY_RUN=1 bash scripts/gpu_check.sh /tmp/gpu_check   # the same steps on the CPU, small sizes (~3.5 minutes)
# Each step runs under its own time limit and writes OUT_DIR/<step>.json as it ends, so that a run cut short
# still reports the steps it finished; a failing step is recorded and the next one runs.
#  1. train_bench: training images/s and ms/step at batch 1024 (bf16 autocast, channels_last), allocated and
#                  reserved peak memory, with nvidia-smi sampled meanwhile (the card's ~40 GB is what it shows);
#  2. infer_bench: inference images/s at batch 256 and 1024;
#  3. bf16:        a short synthetic training run (seconds per epoch with validation and checkpoints), then the
#                  trained model's bf16 + channels_last scores against its fp32 eager scores, per image;
#  4. compile:     bench.py's torch.compile variant;
#  5. resume:      1 epoch + --resume against 2 epochs straight, beside two straight runs; torchrun with more
#                  processes than GPUs must stop in one line;
#  6. suite:       the whole test suite, last (it must pass unchanged on a CUDA machine).
# Then one JSON summary of every step's file (also OUT_DIR/gpu_check.json).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
rm -f "$out"/*.json  # a step that fails must not leave an older run's figures standing
: > "$out/gpu.txt"
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu; preset=(--preset smoke); big=64; small=16; images=2048; size=(--image-size 32 --channels 32,64,128
    --latent-dim 256); limit=120
else
  device=cuda; preset=(); big=1024; small=256; images=20480; size=(); limit=240
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit; a failure is written to NAME.json
  local name=$1 seconds=$2
  shift 2
  echo "== $name"
  timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
  local status=$?
  tail -n 3 "$out/$name.txt"
  [ $status = 0 ] || [ -s "$out/$name.json" ] || echo "{\"failed\": \"exit $status\"}" > "$out/$name.json"
}

# 1. training throughput and memory at batch 1024, nvidia-smi sampled every 200 ms meanwhile
if [ $device = cuda ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/nvidia_smi_mib.txt" &
  smi=$!
fi
step train_bench $limit python bench.py --device $device "${preset[@]}" --batch-size $big --variants bf16,channels_last \
  --repeats 10 --json "$out/train_bench.json"
[ $device = cuda ] && kill $smi && python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
mib = [int(v) for v in (out / "nvidia_smi_mib.txt").read_text().split() if v.isdigit()]
result = json.loads((out / "train_bench.json").read_text())
result["nvidia_smi_peak_used_gb"] = max(mib) * 2**20 / 1e9 if mib else None
(out / "train_bench.json").write_text(json.dumps(result))
PY

# 2. inference throughput at batch 256 and 1024 (1024: step 1's figures)
step infer_bench $limit python bench.py --device $device "${preset[@]}" --batch-size $small --variants bf16,channels_last \
  --skip-train --repeats 10 --json "$out/infer_bench.json"

# 3. a short training run, then bf16 against fp32 on its weights
step bf16 $((2 * limit)) bash -c "python train.py --dataset synthetic --synthetic-images $images --epochs 2 \
  --batch-size $big ${size[*]} --device $device --out-dir $out/train --overwrite --no-progress && python - $out $device $images" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import torch
from data import dead_leaves, preprocess
from detector import score_batch
from model import load_model, prepare_model
out, device = Path(sys.argv[1]), torch.device(sys.argv[2])
ckpt = out / "train" / "model_best_checkpoint.ckpt"
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
eager = load_model(ckpt, device)
x = preprocess(dead_leaves(512, 32, seed=7).to(device), eager.config.image_size)
with torch.no_grad():
    reference = eager.reconstruction_error(x, reduction="none").double().cpu().numpy()
fast = score_batch(prepare_model(load_model(ckpt, device), device), x)["mse"]
relative = abs(fast / reference - 1)
epochs = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
(out / "bf16.json").write_text(json.dumps({
    "bf16_vs_fp32_relative_score_difference": {"max": float(relative.max()), "median": float(np.median(relative)),
                                               "images": len(relative)},
    "epochs": epochs, "synthetic_images": int(sys.argv[3])}))
PY

# 4. torch.compile (compiling takes most of it)
step compile $((2 * limit)) python bench.py --device $device "${preset[@]}" --batch-size $big --variants compile \
  --repeats 5 --json "$out/compile.json"

# 5. resume against two straight runs (CUDA training is not bitwise reproducible: the gap between two straight
#    runs is the yardstick)
tiny=(--dataset synthetic --synthetic-images 4096 --batch-size 256 "${size[@]}" --no-progress --device $device --overwrite)
step resume $((2 * limit)) bash -c "
  python train.py ${tiny[*]} --epochs 2 --out-dir $out/resume_straight > /dev/null &&
  python train.py ${tiny[*]} --epochs 2 --out-dir $out/resume_straight_again > /dev/null &&
  python train.py ${tiny[*]} --epochs 1 --out-dir $out/resume_interrupted > /dev/null &&
  python train.py --resume --epochs 2 --out-dir $out/resume_interrupted --no-progress > /dev/null &&
  python - $out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
val = {r: [json.loads(l)["val_loss"] for l in (out / f"resume_{r}" / "metrics.jsonl").read_text().splitlines()]
       for r in ("straight", "straight_again", "interrupted")}
gap = lambda a, b: abs(val[a][-1] / val[b][-1] - 1)
(out / "resume.json").write_text(json.dumps({"val_loss": val, "resumed_vs_straight": gap("interrupted", "straight"),
                                             "straight_vs_straight": gap("straight_again", "straight")}))
PY

# torchrun with more processes than GPUs must stop in one line
if [ $device = cuda ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  line=$( (timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=$((gpus + 1)) train.py \
    "${tiny[@]}" --epochs 1 --out-dir "$out/too_many" 2>&1 || true) | grep -m1 "error: torchrun" || echo "none")
  python -c 'import json, sys; print(json.dumps({"one_line_error": sys.argv[1]}))' "$line" > "$out/too_many.json"
else
  echo '{"skipped": "DRY_RUN: it needs GPUs"}' > "$out/too_many.json"
fi

# 6. the suite, last
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo '{"skipped": "DRY_RUN: the suite runs in CI"}' > "$out/suite.json"
else
  step suite 600 python -m pytest -q -p no:cacheprovider
  python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = (out / "suite.txt").read_text().splitlines() or ["(no output)"]
(out / "suite.json").write_text(json.dumps({"pytest": lines[-1], "failed": [l for l in lines if l.startswith("FAILED")]}))
PY
fi

python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"device": (out / "gpu.txt").read_text().strip()}
for step in ("train_bench", "infer_bench", "bf16", "compile", "resume", "too_many", "suite"):
    file = out / f"{step}.json"
    summary[step] = json.loads(file.read_text()) if file.exists() else {"failed": "no output"}
# the card's epoch: CIFAR-10's 45,000 training images (5,000 held out), training steps alone
rows = {r["variant"]: r for r in summary["train_bench"].get("variants", []) if "train_images_per_s" in r}
summary["card_epoch_s_training_only"] = {v: 45_000 / r["train_images_per_s"] for v, r in rows.items()}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
