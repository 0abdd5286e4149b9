#!/usr/bin/env bash
# On the GPU machine (the device tool), from the repo root: bench/repic_shapes.py in two calls (BENCHMARKS.md,
# "RePIC's real shapes"). Usage: bash bench/device_shapes.sh 1|2   (wheels of the pinned packages in .whl/)
set -uo pipefail
OUT=${OUT:-/tmp/out}
part=${1:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/smi_$part.txt"
if [ "$part" = 1 ]; then
  # the vision tower and captioning at the 4-concept shape, all paths; compiled vision blocks last
  timeout 470 python3 bench/repic_shapes.py --sections peak vision caption vision_compiled --ks 4 \
    --batches 8 1 32 --hf-static-batches 32 --deadline-s 330 --out "$OUT/shapes_1.json" > "$OUT/log_1.txt" 2>&1
else
  # the GRPO step at RePIC's training-sample shape; the vision tower again (bf16 against an fp32 copy);
  # captioning with compiled vision blocks at the 4-concept shape, and at k = 2, 1
  timeout 400 python3 bench/repic_shapes.py --sections peak grpo vision noise caption --ks 4 --grpo-steps 4 \
    --plan 4:32:ours,ours_c 2:8:ours,hf 1:8:ours,hf 2:32:ours,hf --deadline-s 270 \
    --out "$OUT/shapes_2.json" > "$OUT/log_2.txt" 2>&1
fi
echo "rc=$?"
grep -a '^\[' "$OUT/log_$part.txt" | cut -c1-1500
grep -a -i 'error\|Traceback' "$OUT/log_$part.txt" | grep -v -i warn | tail -5
