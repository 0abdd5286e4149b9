#!/usr/bin/env bash
# On the GPU machine (the device tool), from the repo root: bench/repic_shapes.py, one call per part (BENCHMARKS.md,
# "RePIC's real shapes"). Usage: bash bench/device_shapes.sh 1|2|3|4|5|6|7   (wheels of the pinned packages in $WHL,
# default .whl/)
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
part=${1:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/smi_$part.txt"
case "$part" in
1)  # the vision tower and captioning at the 4-concept shape, all paths; compiled vision blocks last
  timeout 470 python3 bench/repic_shapes.py --sections peak vision caption vision_compiled --ks 4 \
    --batches 8 1 32 --hf-static-batches 32 --deadline-s 330 --out "$OUT/shapes_1.json" > "$OUT/log_1.txt" 2>&1 ;;
2)  # the GRPO step at RePIC's training-sample shape; the vision tower again (bf16 against an fp32 copy);
    # captioning with compiled vision blocks at the 4-concept shape, and at k = 2, 1
  timeout 400 python3 bench/repic_shapes.py --sections peak grpo vision noise caption --ks 4 --grpo-steps 4 \
    --plan 4:32:ours,ours_c 2:8:ours,hf 1:8:ours,hf 2:32:ours,hf --deadline-s 270 \
    --out "$OUT/shapes_2.json" > "$OUT/log_2.txt" 2>&1 ;;
3)  # the decode step eager vs compiled (bench/generation.py's shape and the 4-concept shape, B = 32), the LM
    # prefill profile, captioning k = 2, B = 32 with every path
  timeout 560 python3 bench/repic_shapes.py --sections peak decode prefill_profile caption \
    --decode-shapes gen:32 cap4:32 --decode-variants eager compiled compiled_matmul --prefill-profile 4:8 \
    --plan 2:32:ours_cd,hf,hf_static,ours_c,ours --deadline-s 470 \
    --out "$OUT/shapes_3.json" > "$OUT/log_3.txt" 2>&1 ;;
4)  # the default path (compiled tower + compiled decode) at the 4-concept shape, RePIC's batch-1 loop over 3
    # captions, and the grid's other cells with every path
  timeout 550 python3 bench/repic_shapes.py --sections peak caption --b1-captions 3 \
    --plan 4:32:ours_cd,ours_c 4:3:hf_b1 1:32:ours_cd,hf,hf_static,ours_c,ours \
    2:1:ours_cd,hf_b1,hf_static,ours_c,ours 1:1:ours_cd,hf_b1,hf_static,ours_c,ours --deadline-s 460 \
    --out "$OUT/shapes_4.json" > "$OUT/log_4.txt" 2>&1 ;;
5)  # bf16 tolerance of the decode step; the default path against transformers' static + compile at the
    # 4-concept shape in one run; the GRPO step with the eager and the compiled decode step, against TRL's default
  timeout 560 python3 bench/repic_shapes.py --sections peak decode_noise caption grpo --decode-shapes gen:32 \
    --plan 4:32:ours_cdm,hf_static --grpo-paths ours_cd ours hf --grpo-steps 4 --deadline-s 480 \
    --out "$OUT/shapes_5.json" > "$OUT/log_5.txt" 2>&1 ;;
6)  # the grid's cells not yet run with the default path and hf_static: B = 8 at k = 4, 2, 1; k = 4, B = 1; k = 2, B = 32
  timeout 500 python3 bench/repic_shapes.py --sections peak caption --plan 4:8:ours_cdm,hf_static,hf \
    4:1:ours_cdm,hf_b1,hf_static 2:8:ours_cdm,hf_static,hf 1:8:ours_cdm,hf_static,hf 2:32:ours_cdm \
    --deadline-s 420 --out "$OUT/shapes_6.json" > "$OUT/log_6.txt" 2>&1 ;;
7)  # a padded batch prefilled one unpadded prompt at a time (ours_cdmr) vs batched (ours_cdm), with hf_static
  timeout 280 python3 bench/repic_shapes.py --sections peak caption --plan 4:32:ours_cdmr,ours_cdm \
    4:8:ours_cdmr,ours_cdm,hf_static 1:32:ours_cdmr,ours_cdm --deadline-s 200 \
    --out "$OUT/shapes_7.json" > "$OUT/log_7.txt" 2>&1 ;;
esac
echo "rc=$?"
grep -a '^\[' "$OUT/log_$part.txt" | cut -c1-1500
grep -a -i 'error\|Traceback' "$OUT/log_$part.txt" | grep -v -i warn | tail -5
