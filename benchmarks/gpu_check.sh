#!/usr/bin/env bash
# Run whenever a GPU machine is available; put its figures in BENCHMARKS.md.
#
#     bash benchmarks/gpu_check.sh                 # CUDA: SD v1 sizes
#     bash benchmarks/gpu_check.sh --device cpu    # tiny sizes, ~1 CPU minute: CI runs it (.ci/run)
#
# 1-3: benchmarks/gpu_check.py (parity with diffusers in fp32 / fp16 / bf16, xformers when installed, a txt2img
# image's it/s against diffusers); 4: a few steps of train_unet.py with mixed_precision bf16 and fp16 on a tiny
# generated dataset. Stops at the first failure (set -e).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [[ "${1:-}" == "--device" ]]; then device=${2:?--device needs cuda or cpu}; fi
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
if [[ "$device" == cpu ]]; then export CUDA_VISIBLE_DEVICES=""; fi
python benchmarks/gpu_check.py --device "$device"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work/data" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1]); root.mkdir()
rng = np.random.default_rng(0)
rows = []
for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (40, 60, 220))] * 4):
    Image.fromarray(np.clip(np.array(rgb) + rng.integers(-25, 26, (16, 16, 3)), 0, 255).astype(np.uint8)).save(root / f"{i}.png")
    rows.append({"file_name": f"{i}.png", "text": f"a {name} square"})
(root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
PY
for precision in bf16 fp16; do
    SECONDS=0
    python train_unet.py --config configs/train-unet-tiny.yaml tracker=none "data.path=$work/data" max_steps=3 \
        batch_size=4 log_every=1 "mixed_precision=$precision" "output_dir=$work/run-$precision" > "$work/log" 2>&1 ||
        { tail -20 "$work/log"; exit 1; }
    echo "train_unet.py, 3 steps, mixed_precision=$precision on $device: ok (${SECONDS} s)"
done
# 5: one run on 2 processes under each sharding config of configs/accelerate/ (FSDP SHARD_GRAD_OP runs on the CPU
# too, over gloo; DeepSpeed only where it is installed: pip install deepspeed).
n=$([[ "$device" == cpu ]] && echo 2 || python -c "import torch; print(max(2, torch.cuda.device_count()))")
for config in fsdp-shard-grad-op deepspeed-zero2; do
    if [[ "$config" == deepspeed-zero2 ]] && ! python -c "import deepspeed" 2> /dev/null; then
        echo "train_unet.py under $config: skipped (deepspeed is not installed)"
        continue
    fi
    SECONDS=0
    python -m accelerate.commands.launch --config_file "configs/accelerate/$config.yaml" --num_processes "$n" \
        --mixed_precision no train_unet.py --config configs/train-unet-tiny.yaml tracker=none "data.path=$work/data" \
        max_steps=2 batch_size=2 "output_dir=$work/run-$config" > "$work/log" 2>&1 || { tail -20 "$work/log"; exit 1; }
    echo "train_unet.py, 2 steps on $n processes under configs/accelerate/$config.yaml on $device: ok (${SECONDS} s)"
done
