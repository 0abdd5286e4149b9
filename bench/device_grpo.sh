#!/usr/bin/env bash
# On a GPU machine (the device tool), from the repo root: the GRPO recipe benchmarks of BENCHMARKS.md.
# 1) one GRPO step at Qwen2.5-VL-7B shape on GPU 0; 2) a 2-GPU DeepSpeed ZeRO-2 run of a smaller model.
# Wheels for packages the machine lacks travel in .whl/ (see /work/.library/device/README.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
  .whl/deepspeed-*.tar.gz 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, trl, peft, deepspeed; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, deepspeed.__version__)" | tee -a "$OUT/gpus.txt"
CUDA_VISIBLE_DEVICES=0 python3 bench/grpo_recipe.py --shape 7b --steps 3 --out "$OUT/grpo_7b_1gpu.json" \
  > "$OUT/grpo_7b_1gpu.log" 2>&1; echo "7b rc=$?"; tail -5 "$OUT/grpo_7b_1gpu.log"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 -m accelerate.commands.launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \
    bench/grpo_recipe.py --shape small --steps 4 --out "$OUT/grpo_small_zero2_2gpu.json" \
    > "$OUT/grpo_small_zero2_2gpu.log" 2>&1; echo "zero2 rc=$?"; tail -5 "$OUT/grpo_small_zero2_2gpu.log"
  CUDA_VISIBLE_DEVICES=0 python3 bench/grpo_recipe.py --shape small --steps 4 \
    --out "$OUT/grpo_small_1gpu.json" > "$OUT/grpo_small_1gpu.log" 2>&1; echo "small1 rc=$?"
fi
