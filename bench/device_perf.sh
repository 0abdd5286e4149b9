#!/usr/bin/env bash
# Issue 28 on one GPU machine (the device tool), from the repo root, in one call of at most 9 minutes:
#   bash bench/device_perf.sh            # wheels of the pinned packages in $WHL (default .whl/), results in $OUT
# bench/perf.py: captioning at k = 4, B = 32 (today's default ours_cdmr, ours_cdmrv = its images in one tower call,
# RePIC's batch-1 loop) against the card's limit; with SECTIONS="... caption_set": RePIC's whole 4-concept evaluation
# (105 conversations, its recurring references; CAPTION_SET="B:paths"); then GRPO tokens/s per GPU, step split and training TFLOP/s of
# TRL's default path (hf), ours (today's) and ours + levers, at the corrected recipe's batch by default (16
# completions an optimizer step as 8 per micro-step x grad-accum 2, RePIC's grouping: G completions of G samples).
# Every setting can be changed through the environment, e.g. after the training-fidelity issue lands:
#   PER_DEVICE=16 ACCUM=1 GROUPING=repic PATHS="ours+pp ours+pp+nockpt~8" bash bench/device_perf.sh
# CPU rehearsal (no wheels, tiny model): CPU_REHEARSAL=1 OUT=/tmp/perf bash bench/device_perf.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
SECTIONS=${SECTIONS:-"peak caption grpo"}
RECIPE=${RECIPE:-configs/paper.yaml}  # the params overlay whose train_grpo_lora section is trained (its LoRA targets)
# PATHS: GRPO paths; unset, bench/perf.py's default: its STAGE (the training stage's path on CUDA, BENCHMARKS.md calls
# 27-29) twice, then TRL's
CAPTION_PLAN=${CAPTION_PLAN:-"4:32:ours_cdmr,ours_cdmrv,hf_b1"}
CAPTION_SET=${CAPTION_SET:-"32:ours_cdmr,ours_cdmrf,hf_b1"}  # section caption_set: RePIC's whole 4-concept evaluation
B1=${B1:-2}                 # captions timed in RePIC's batch-1 loop
PER_DEVICE=${PER_DEVICE:-8}
ACCUM=${ACCUM:-2}
GROUPING=${GROUPING:-repic}
STEPS=${STEPS:-3}
DEADLINE=${DEADLINE:-380}   # seconds into perf.py after which no new path or step starts
LIMIT=${LIMIT:-490}         # perf.py is stopped here (what it saved stays in $OUT/perf.json)
PROFILE=${PROFILE:-}
EXTRA=()
if [ "${CPU_REHEARSAL:-0}" = 1 ]; then  # the same command on a CPU: tiny model, short answers, small batches
  PATHS=${CPU_PATHS:-"ours+pp+ac+nw+ra ours hf@2"}  # the stage on a CPU: no vc, tp, pk, cd, pr
  CAPTION_PLAN=${CPU_CAPTION_PLAN:-"2:2:ours_cdmr,ours_cdmrv,hf_b1"}
  CAPTION_SET=${CPU_CAPTION_SET:-"32:ours_cdmr,ours_cdmrf,hf_b1"}
  PER_DEVICE=4 ACCUM=2 STEPS=2 DEADLINE=100000 LIMIT=100000
  EXTRA=(--model tiny --image-px 112 --grpo-max-new 8 --grpo-generations 4 --grpo-image-scale 0.25
         --grpo-max-pixels 50176)
elif [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
  $PY -c "import torch, transformers, trl, peft; print(torch.__version__, transformers.__version__, trl.__version__,
peft.__version__)"; } > "$OUT/env.txt"
cat "$OUT/env.txt"
# shellcheck disable=SC2086  # PATHS and CAPTION_PLAN are word lists
# shellcheck disable=SC2086  # SECTIONS is a word list
timeout -k 10 "$LIMIT" $PY bench/perf.py --sections $SECTIONS --caption-plan $CAPTION_PLAN --b1-captions "$B1" \
  --caption-set "$CAPTION_SET" \
  ${PATHS:+--grpo-paths $PATHS} --grpo-steps "$STEPS" --grpo-per-device "$PER_DEVICE" --grpo-grad-accum "$ACCUM" \
  --grpo-grouping "$GROUPING" --grpo-recipe "$RECIPE" ${PROFILE:+--grpo-profile $PROFILE} \
  --deadline-s "$DEADLINE" "${EXTRA[@]}" --out "$OUT/perf.json" > "$OUT/perf.log" 2>&1
rc=$?
echo "rc=$rc"
grep -a '^\[' "$OUT/perf.log" | cut -c1-1500
grep -a -i 'error\|Traceback' "$OUT/perf.log" | grep -v -i 'warn\|error None' | tail -5
echo "---- summary ($OUT/perf.json)"
[ -f "$OUT/perf.json" ] && $PY bench/perf.py --summarize "$OUT/perf.json" | tee "$OUT/summary.txt"
