#!/usr/bin/env bash
# Scaling of the paper's GRPO recipe at Qwen2.5-VL-7B shape (issue 15), on a host with 2 GPUs, from the repo root:
#   OUT=bench/out BUDGET_S=480 bench/device_scaling.sh
# Every run is bench/grpo_recipe.py under accelerate + DeepSpeed ZeRO-2 (configs/accelerate/zero2.yaml), static
# rollouts, G=8, 256 new tokens. In order, each cut short when BUDGET_S seconds are spent:
#   1gpu_p1_a4: 1 GPU, 1 prompt/GPU, grad-accum 4      } same global batch: 4 prompts (32 completions) per
#   2gpu_p1_a2: 2 GPUs, 1 prompt/GPU, grad-accum 2     } optimizer step -> scaling efficiency
#   1gpu_p2_a1 (GPU 0) and 1gpu_p4_a1 (GPU 1) together: larger per-GPU batches, tokens/s per GPU
#   1gpu_p1_a1: 1 prompt/GPU, no accumulation (the per-GPU baseline for the batch-size table)
# Results: $OUT/<run>.json (bench/grpo_recipe.py's), $OUT/env.txt, $OUT/logs.tar.gz (each run's log).
set -uo pipefail
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-7b}
STEPS=${STEPS:-3}
EXTRA=${EXTRA:-}              # e.g. "--max-new-tokens 8" for a CPU rehearsal
LOGS=$(mktemp -d)
END=$((SECONDS + ${BUDGET_S:-480}))
mkdir -p "$OUT"

if [ -d .whl ]; then  # the device machine: the pinned libraries travel as wheels (DeepSpeed's pydantic and
  # hjson too, which that image lacks: pydantic, pydantic-core, annotated-types, typing-inspection,
  # typing-extensions, hjson, in .whl or whl-extra/)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $(ls whl-extra/*.whl 2>/dev/null)
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    .whl/deepspeed-*.tar.gz 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lender's rule: no multicast
BACKEND=static
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, trl, peft, accelerate; print(torch.__version__, transformers.__version__,
trl.__version__, peft.__version__, accelerate.__version__)"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1; } > "$OUT/env.txt"
cat "$OUT/env.txt"
LAUNCH=(-m accelerate.commands.launch --config_file configs/accelerate/zero2.yaml)

pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

# run NAME GPUS PORT PROMPTS ACCUM: one benchmark, in the background, stopped at the deadline
run() {
  local name=$1 gpus=$2 port=$3 prompts=$4 accum=$5 left=$((END - SECONDS))
  local n=$(( $(tr -cd , <<<"$gpus" | wc -c) + 1 ))
  if [ "$left" -lt 60 ]; then echo "$name: skipped, ${left}s left"; return; fi
  local launch=("${LAUNCH[@]}")
  # CPU_REHEARSAL=1: the same runs on a machine without GPUs (no DeepSpeed there; gloo DDP for 2 processes)
  [ "${CPU_REHEARSAL:-0}" = 1 ] && launch=(-m accelerate.commands.launch $([ "$n" -gt 1 ] && echo --multi_gpu))
  echo "$(date -u +%T) $name: GPUs $gpus, $prompts prompt(s)/GPU, accum $accum (${left}s left)"
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 "$left" $PY "${launch[@]}" --num_processes "$n" \
    --main_process_port "$port" bench/grpo_recipe.py --shape "$SHAPE" --steps "$STEPS" --rollout-backend "$BACKEND" \
    --prompts-per-device "$prompts" --grad-accum "$accum" $EXTRA --out "$OUT/$name.json" > "$LOGS/$name.log" 2>&1 &
}
report() {
  for f in "$@"; do
    [ -s "$OUT/$f.json" ] && $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2],
'wall', [round(x,2) for x in r['step_wall_s']], 'tok/s/gpu', [round(x) for x in r['tokens_per_s_per_gpu']],
'peak GiB', [round(x,1) for x in r['peak_memory_gib_per_gpu']])" "$OUT/$f.json" "$f" \
      || { echo "$f: no result; log tail:"; tail -n 15 "$LOGS/$f.log"; }
  done
}

run 1gpu_p1_a4 0 29501 1 4; wait; report 1gpu_p1_a4; pack
if [ ! -s "$OUT/1gpu_p1_a4.json" ]; then  # the static rollouts failed under DeepSpeed: measure TRL's instead
  echo "static rollouts failed; the remaining runs use TRL's (hf)"; BACKEND=hf
  mv "$LOGS/1gpu_p1_a4.log" "$LOGS/1gpu_p1_a4.static-failed.log"
  run 1gpu_p1_a4 0 29501 1 4; wait; report 1gpu_p1_a4; pack
fi
run 2gpu_p1_a2 0,1 29502 1 2; wait; report 2gpu_p1_a2; pack
run 1gpu_p2_a1 0 29503 2 1; run 1gpu_p4_a1 1 29504 4 1; wait; report 1gpu_p2_a1 1gpu_p4_a1; pack
run 1gpu_p1_a1 0 29505 1 1; wait; report 1gpu_p1_a1; pack
echo "done at $(date -u +%T), $((END - SECONDS))s of the budget left"
