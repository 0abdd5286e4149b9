# Bootstraps .venv from the pins, then runs the pipeline and the tests. Everything else goes through dvc.yaml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK := 1

.PHONY: venv repro test paper paper-released paper-rehearsal real-eval bench profiles lint lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone: on a CPU machine this takes the 2.13.0 CPU wheel; pulled in later as a
	# dependency it would bring a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $$(grep '^torch==' requirements.txt)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

# Runs the whole DAG (dvc.yaml) on the embedded default; a second call runs nothing.
repro: venv
	@[ -d .git ] || { echo "error: dvc needs a git checkout (clone the repository)"; exit 2; }
	dvc repro

# The paper run: overlay configs/paper.yaml onto params.yaml (only the values it sets change, comments kept:
# `git diff params.yaml` shows them, git checkout params.yaml undoes it), then the DAG. PAPER_OVERLAYS: further
# overlays applied after it, e.g. configs/paper_yolo_world.yaml. EXP=name: run it as the DVC experiment `name`
# (`dvc exp run -n name`, compared with `dvc exp show`; README "Comparing runs"). fetch_data downloads, so the hub
# client is online here.
PAPER_OVERLAYS ?=
EXP ?=
paper: venv
	python -m repic.core.params apply configs/paper.yaml
	$(foreach o,$(PAPER_OVERLAYS),python -m repic.core.params apply $(o) &&) true
	HF_HUB_OFFLINE=0 WANDB_MODE=$${WANDB_MODE:-offline} $(if $(EXP),dvc exp run -n $(EXP),dvc repro)

# The paper's evaluation of the released checkpoints alone (zero-shot, RAP-Qwen, RePIC's LoRA and merged model):
# configs/paper.yaml without the model rows our training makes, and only what the tables and the judge need (no
# train_grpo_lora). A later `make paper` puts our rows back and computes only those: the released rows' caption
# stages are unchanged, so DVC keeps their results.
paper-released: venv
	python -m repic.core.params apply configs/paper.yaml --released-only
	$(foreach o,$(PAPER_OVERLAYS),python -m repic.core.params apply $(o) &&) true
	HF_HUB_OFFLINE=0 dvc repro score judge_llm

# `make paper` rehearsed offline in a scratch copy (.rehearsal/): loopback hub/GitHub/Drive/OpenAI serving tiny
# stand-ins, configs/rehearsal.yaml for sizes and hardware; report in results/rehearsal.json.
paper-rehearsal: venv
	python -m repic.rehearsal --work .rehearsal --report results/rehearsal.json

# The benchmarks of BENCHMARKS.md into bench/out/ (generation: HF generate vs the static backend, GRPO step;
# the paper's GRPO recipe at 7B shape). Without a GPU: a short CPU rehearsal of the same code paths.
bench: venv
	mkdir -p bench/out
	@if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  python bench/generation.py --out bench/out/generation.json && \
	  python bench/grpo_recipe.py --shape 7b --steps 3 --out bench/out/grpo_7b_1gpu.json; \
	else \
	  echo "no GPU: CPU rehearsal of the benchmark code paths (figures meaningless)"; \
	  python bench/generation.py --model tiny --batches 1 2 --new-tokens 8 --image-px 112 --grpo-steps 2 \
	    --grpo-new-tokens 8 --grpo-generations 2 --out bench/out/generation-cpu.json && \
	  python bench/grpo_recipe.py --shape tiny --steps 2 --max-new-tokens 8 --out bench/out/grpo-cpu.json; \
	fi

# Real RePIC evaluation data (configs/real_eval_local.yaml: a local copy in RePIC's layout), tiny stand-in model:
# fetch + validate, retrieval database, 4-concept captioning (skip and retrieval) into results/real_eval/.
REAL := results/real_eval
real-eval: venv
	mkdir -p $(REAL) && cp params.yaml $(REAL)/params.yaml
	python -m repic.core.params apply configs/real_eval_local.yaml --params $(REAL)/params.yaml
	python -m stages.fetch_data --params $(REAL)/params.yaml --out-data $(REAL)/data --out-model $(REAL)/model
	python -m stages.build_db --params $(REAL)/params.yaml --out $(REAL)/db --root $(REAL)/data
	python -m stages.retrieve --params $(REAL)/params.yaml --setting multi4 --root $(REAL)/data --index $(REAL)/db \
	  --out $(REAL)/retrieval/multi4
	python -m stages.caption --params $(REAL)/params.yaml --setting multi4 --root $(REAL)/data \
	  --retrieval $(REAL)/retrieval/multi4 --row base --model $(REAL)/model --out $(REAL)/captions/multi4
	@python -c "import json; v = json.load(open('$(REAL)/data/validation.json')); \
	  print('unlisted images:', [w for d in v['databases'].values() for w in d.get('unlisted_images', [])]); \
	  print('indexes:', json.load(open('$(REAL)/db/manifest.json'))); \
	  print('recall@k:', json.load(open('$(REAL)/retrieval/multi4/4_concepts/retrieval.json'))['recall_at_k'])"

test: venv
	pytest -q --durations=25

# `snakemake --profile slurm|local` by name from the repository root (links into ~/.config/snakemake/).
profiles:
	sh workflow/profiles/install.sh

lint: venv
	ruff check repic stages tests workflow bench tools

# Regenerate the full lock from requirements.in in a scratch venv.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install -q $$(grep '^torch==' requirements.in) && .lockenv/bin/pip install -q -r requirements.in
	{ echo "# Full lock: generated by 'make lock' from requirements.in. torch is installed first by the Makefile."; \
	  echo "$$(grep '^torch==' requirements.in)"; .lockenv/bin/pip freeze | grep -v '^torch=='; } > requirements.txt
	rm -rf .lockenv
	$(PYTHON) tools/environment_yml.py

clean:
	rm -rf data results .dvc/cache .dvc/tmp
