#!/usr/bin/env bash
# Issue 28, one device call: the training stage's own path (repic.train.grpo.train, configs/paper.yaml's recipe) at
# the 7B shape with RePIC-like image sizes, with the DataLoader's workers reading the images (dataloader_num_workers
# 4, repic.train.grpo.preloading) and without (0), from one saved random-weight model, in one process
# (bench/train_stage_cuda.py --workers 4 0 4: workers first and again last, to show the run's drift).
# From the repo root with the pinned wheels in .whl/; results in $OUT/train_stage_7b.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# shellcheck disable=SC2086  # WORKERS is a word list
timeout -k 10 "${LIMIT:-500}" python3 bench/train_stage_cuda.py --shape 7b --image-scale 1 --steps "${STEPS:-4}" \
  --max-new "${MAX_NEW:-64}" --workers ${WORKERS:-4 0 4} --out "$OUT/train_stage_7b.json" > "$OUT/train_stage_7b.log" 2>&1
echo "rc=$?"
grep -a '"step_s\|"gpu_peak\|dataloader_num_workers\|images_preprocessed\|"wall_s\|Error\|error' "$OUT/train_stage_7b.log" | head -40
tail -5 "$OUT/train_stage_7b.log"
