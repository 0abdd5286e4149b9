#!/usr/bin/env bash
# Issue 28: the paper recipe as shipped (configs/paper.yaml's train_grpo_lora: LoRA on every non-vision
# nn.Linear, lm_head included, built by the training stage's own repic.train.grpo.lora_model; RePIC's grouping,
# 16 completions an optimizer step as 8 a micro-step x accumulation 2; rollouts with LoRA dropout; log-probs through
# the adapted head, repic.train.grpo.lora_head_trainer) on one GPU, in one call of at most 9.5 minutes
# (bench/device_perf.sh with these settings; no captioning). Paths, most important first, each started only before
# DEADLINE seconds into perf.py, perf.py stopped at LIMIT (the JSON is saved after every path):
#   ours+pp+ac+vc    the training stage's path (the headline: images preprocessed once, LoRA inputs left in bf16
#                    under autocast, compiled vision tower; BENCHMARKS.md calls 5-6)
#   hf@2             TRL's default path (its generate rollouts and loop; the head's adapter scored as the stage
#                    scores it, since TRL 1.16 refuses an adapter on lm_head), 2 steps
#   ours+pp          the stage's path before calls 5-6 (the same-run baseline of ac and vc)
#   ours+pp+ac+vc@1  the headline path again: one warm-up step, then one profiled step (kernel time by class and
#                    the host's stacks, PROFILE; its tokens/s is the warm-up step's)
#   ours+pp+ac+vc+nockpt  no gradient checkpointing on top (+2.9 % on top of ac in call 6: re-measured)
# Run from the repo root with the pinned wheels in .whl/ (results, log and summary in $OUT):
#   bash bench/device_recipe.sh
# CPU rehearsal (tiny model, the same paths; no wheels):
#   CPU_REHEARSAL=1 OUT=/tmp/recipe PYTHON=.venv/bin/python bash bench/device_recipe.sh
set -uo pipefail
RECIPE_PATHS="ours+pp+ac+vc hf@2 ours+pp ours+pp+ac+vc@1 ours+pp+ac+vc+nockpt"
export SECTIONS=${SECTIONS:-"peak grpo"}
export RECIPE=${RECIPE:-configs/paper.yaml}
export PATHS=${PATHS:-$RECIPE_PATHS}
export CPU_PATHS=${CPU_PATHS:-$RECIPE_PATHS}
export PROFILE=${PROFILE-"ours+pp+ac+vc@1"}
export PER_DEVICE=${PER_DEVICE:-8} ACCUM=${ACCUM:-2} GROUPING=${GROUPING:-repic} STEPS=${STEPS:-3}
export DEADLINE=${DEADLINE:-410} LIMIT=${LIMIT:-510}
exec bash "$(dirname "$0")/device_perf.sh"
