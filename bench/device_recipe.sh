#!/usr/bin/env bash
# Issue 28: the paper recipe as shipped (configs/paper.yaml's train_grpo_lora: LoRA on every non-vision
# nn.Linear, lm_head included, built by the training stage's own repic.train.grpo.lora_model; RePIC's grouping,
# 16 completions an optimizer step as 8 a micro-step x accumulation 2; rollouts with LoRA dropout; log-probs through
# the adapted head, repic.train.grpo.lora_head_trainer) on one GPU, in one call of at most 9.5 minutes
# (bench/device_perf.sh with these settings; no captioning). Paths, most important first, each started only before
# DEADLINE seconds into perf.py, perf.py stopped at LIMIT (the JSON is saved after every path):
#   ours+pp          the training stage's path (the headline)
#   hf@2             TRL's default path (its generate rollouts and loop; the head's adapter scored as the stage
#                    scores it, since TRL 1.16 refuses an adapter on lm_head), 2 steps
#   ours+pp+lm       LoRA on the language model's projections only (params.yaml's default): the lm_head cost,
#                    TRL's own chunked log-prob head
#   ours+pp+compile  compiled decoder layers (repic.train.speed.compile_language_layers), never measured before
#   ours+pp@1        the headline path again: one warm-up step, then one profiled step (kernel time by class,
#                    PROFILE; its tokens/s is the warm-up step's)
#   ours+pp+vc       compiled vision tower in training (+4.7 % on top of pp in call 2: re-measured if time is left)
# Run from the repo root with the pinned wheels in .whl/ (results, log and summary in $OUT):
#   bash bench/device_recipe.sh
# CPU rehearsal (tiny model, the same paths; no wheels):
#   CPU_REHEARSAL=1 OUT=/tmp/recipe PYTHON=.venv/bin/python bash bench/device_recipe.sh
set -uo pipefail
RECIPE_PATHS="ours+pp hf@2 ours+pp+lm ours+pp+compile ours+pp@1 ours+pp+vc"
export SECTIONS=${SECTIONS:-"peak grpo"}
export RECIPE=${RECIPE:-configs/paper.yaml}
export PATHS=${PATHS:-$RECIPE_PATHS}
export CPU_PATHS=${CPU_PATHS:-$RECIPE_PATHS}
export PROFILE=${PROFILE-"ours+pp@1"}
export PER_DEVICE=${PER_DEVICE:-8} ACCUM=${ACCUM:-2} GROUPING=${GROUPING:-repic} STEPS=${STEPS:-3}
export DEADLINE=${DEADLINE:-410} LIMIT=${LIMIT:-510}
exec bash "$(dirname "$0")/device_perf.sh"
