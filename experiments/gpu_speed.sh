#!/usr/bin/env bash
# apply_policy's speed on the two GPU-sized pipelines of issue 20, one script for one device call:
# an SDXL-sized UNet (2.6B, batched CFG) and a Wan-2.1-1.3B-sized transformer (two calls per step),
# random weights, bf16, the denoising loop only (--latent), a cutoff policy with CFG on the first
# 60% of 30 steps (NFE ratio 1.25) against the plain call. About 6 minutes on an H200.
#
#   bash experiments/gpu_speed.sh            # writes results/pipeline_speed_{sdxl,wan_1_3b}_cuda.{md,json}
#   OUT=/some/dir bash experiments/gpu_speed.sh   # writes there instead (the device tool's $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-results}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python experiments/pipeline_speed.py --sdxl --device cuda --dtype bf16 --latent --batch 1 4 \
    --warmup 1 --repeats 2 --out "$dest/pipeline_speed_sdxl_cuda"
python experiments/pipeline_speed.py --wan-1.3b --device cuda --dtype bf16 --latent --batch 1 \
    --warmup 1 --repeats 2 --out "$dest/pipeline_speed_wan_1_3b_cuda"
