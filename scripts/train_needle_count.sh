#!/usr/bin/env bash
# Rebuild builtin:needle-count-qwen2vl (docs/needle.md, "K7n"): four --init-from stages of
# scripts/train_digits.py on top of builtin:needle-qwen2vl, the commands its tlq_tiny.json records under
# "lineage". Each stage stops at its --steps (the wall-clock limits are set far above the ~30-40 min
# each took on one core); together they took 128 CPU-minutes (171 with the base model's 43).
#
#   bash scripts/train_needle_count.sh [WORK_DIR] [OUT_DIR]
set -euo pipefail
work=${1:-/tmp/needle-count}
out=${2:-$work/needle-count-qwen2vl}
export OMP_NUM_THREADS=1
train() { python scripts/train_digits.py --task needle --family qwen2_vl "$@"; }
# the count task: how many 7s the page holds, 3 overprinted cells, a generated 3-6 sentence preamble
count=(--needle-option "question='count'" --needle-option "count_digits=(7,)" --needle-option "preamble='generated'"
       --needle-option "preamble_range=(3,6)" --needle-option "target_blend=(0.5,1.0)" --needle-option blend_cells=3
       --lm-weight 0.3 --vision-steps 0 --warmup 50 --max-minutes 600)

# 1. K7f: the 4-layer reading model learns to count (first 600 steps without clutter or overprints)
train --init-from src/tlq/builtin/needle-qwen2vl "${count[@]}" --lr 1e-3 --steps 3000 --curriculum-steps 600 \
  --curriculum-option num_plain=2 --curriculum-option num_fragments=0 --curriculum-option "target_blend=(1.0,1.0)" \
  --out "$work/k7f"
# 2. K7f12: grown to 12 layers (identity copies), trained on
train --init-from "$work/k7f" --grow-layers 12 "${count[@]}" --lr 1e-3 --steps 1500 --out "$work/k7f12"
# 3. K7h: less pixel noise
train --init-from "$work/k7f12" "${count[@]}" --needle-option noise_std=0.15 --lr 5e-4 --steps 800 --out "$work/k7h"
# 4. K7n: near-tie overprints (own weight < 0.55) are labelled by a draw, so the model learns to doubt them
train --init-from "$work/k7h" "${count[@]}" --needle-option noise_std=0.15 --needle-option "blend_label='sampled'" \
  --needle-option sampled_below=0.55 --lr 2e-4 --steps 1000 --no-measure --out "$out"
