#!/usr/bin/env bash
# Issue 24: the merge stage's peak memory at Qwen2.5-VL-7B's shape, on one GPU machine (the device tool), from the
# repo root, in one call of at most 9 minutes (bench/merge7b.py says what it builds, where, and what it samples):
#   bash bench/device_merge7b.sh      # wheels of the pinned packages in $WHL (default .whl/), results in $OUT
# A random-weight 7B (bf16, bench/generation.py's build) and the paper's LoRA adapter (configs/paper.yaml, built by
# repic.train.grpo.lora_model, non-zero B) are saved, then the real `python -m stages.merge_lora` runs on them
# (base.device cuda) under /usr/bin/time -v; $OUT gets summary.json (rewritten after each phase: plan, build,
# stage), merge_report.json, time_v.txt, stage.log, build.log/json, timeline.jsonl (0.5 s samples), nvidia-smi.
# The stage validates params.yaml, so .whl/ needs, beside the training wheels, cp312 wheels of jsonschema,
# jsonschema-specifications, referencing, rpds-py, attrs, typing_extensions and ruamel.yaml (the device image has none
# of them): pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#   $(grep -E '^(jsonschema|jsonschema-specifications|referencing|rpds-py|attrs|typing_extensions|ruamel.yaml)==' requirements.txt)
# CPU rehearsal (no wheels, tiny shape, base.device cpu, checkpoints removed at the end):
#   CPU_REHEARSAL=1 OUT=/tmp/m7 PYTHON=.venv/bin/python bash bench/device_merge7b.sh
# (SHAPE=mid: a 0.7B model of the 7B's kind, whose loads show the stage's RSS pattern; minutes on one core)
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-540}   # seconds for the whole script, installs included; the stage is stopped before it
B_STD=${B_STD:-0.01}
if [ "${CPU_REHEARSAL:-0}" = 1 ]; then
  ARGS=(--shape "${SHAPE:-tiny_untied}" --device cpu --image-px 112 --cleanup)
else
  ARGS=(--shape 7b --device cuda --image-px 448)
  if [ -d "$WHL" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHL"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  free -g; df -h /tmp /dev/shm .; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "setup: $(( $(date +%s) - START )) s" | tee "$OUT/setup_seconds.txt"
LEFT=$(( BUDGET - ($(date +%s) - START) ))
# BASE_ROOT / MERGE_ROOT: where the base (+ adapter, data) and the stage's output go (default: merge7b.py's plan,
# the base in RAM (/dev/shm) and the output on disk (/tmp) when they fit; summary.json's "plan" says what it chose)
timeout -k 10 "$LEFT" $PY bench/merge7b.py all "${ARGS[@]}" --b-std "$B_STD" --budget-s $(( LEFT - 15 )) \
  ${BASE_ROOT:+--base-root "$BASE_ROOT"} ${MERGE_ROOT:+--merge-root "$MERGE_ROOT"} --out "$OUT" > "$OUT/merge7b.log" 2>&1
rc=$?
echo "rc=$rc"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
tail -n 5 "$OUT/merge7b.log"
tail -n 3 "$OUT/stage.log" 2>/dev/null
$PY - "$OUT" <<'EOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
r = s.get("merge_report", {})
print(json.dumps({k: s.get(k) for k in ("stage_ok", "stage_rc", "seconds", "time_v", "peaks")}, indent=1))
print(json.dumps({k: r.get(k) for k in ("ok", "peak_memory_mb", "float32", "bfloat16", "bfloat16_repic")}, indent=1))
for item in s.get("phases", []) + s.get("gpu_spans", []):
    print(item)
EOF
echo "total: $(( $(date +%s) - START )) s"
# the device tool brings back a few files only: everything in one archive, beside the two JSON files read first
if [ "${CPU_REHEARSAL:-0}" != 1 ]; then
  (cd "$OUT" && tar czf merge7b_out.tgz --exclude merge7b_out.tgz . \
     && find . -maxdepth 1 -type f ! -name merge7b_out.tgz ! -name summary.json ! -name merge_report.json -delete)
fi
