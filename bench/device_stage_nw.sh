#!/usr/bin/env bash
# Issue 28, one device call (at most 9.5 minutes), from the repo root with the pinned wheels in .whl/:
#   1. bench/train_stage_cuda.py --shape tiny: the training stage's own path on the card (its image processor's
#      backend must be "pil" and the memo must see the images: load_processor's fix, 35d3698);
#   2. bench/device_recipe.sh's GRPO at 7B shape (configs/paper.yaml's recipe) for the stage's path, the `nw` lever
#      (DataLoader workers decode the step's images ahead of it) and the stage's path again (levers in another
#      order: the same path, to show the run's noise).
# Results in $OUT (train_stage.json, perf.json, summary.txt).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout -k 10 150 python3 bench/train_stage_cuda.py --shape tiny --steps 3 --out "$OUT/train_stage.json" \
  > "$OUT/train_stage.log" 2>&1
echo "train_stage rc=$?"
grep -a -v -i warn "$OUT/train_stage.log" | tail -30
WHL=/nonexistent PATHS=${PATHS:-"ours+pp+ac+vc ours+pp+ac+vc+nw ours+ac+vc+pp"} PROFILE="" DEADLINE=${DEADLINE:-270} \
  LIMIT=${LIMIT:-370} OUT="$OUT" bash "$(dirname "$0")/device_recipe.sh"
