# Quickstart: `make demo` runs the demo job, `make test` runs the tests.
# Both set up .venv first if it is missing or stale (idempotent: a second run skips the install).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.mtmoe-installed
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml launch/setup_env.sh
	bash launch/setup_env.sh .venv
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} bash launch/demo.sh

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q --durations=15 tests

# Every benchmark, one after another (about 2 h on 2 cores, memory_bench alone about 55 min); each writes
# benchmarks/results/*.json, then the README's tables are regenerated from the JSON. export_comparison needs a finished demo run
# (make demo) in runs/demo; the balancing study (40 min) runs on its own: see the README.
BENCHES := block_bench family_bench model_step_bench loss_bench packing_bench memory_bench inference_bench \
	mfu_bench profile_step ep_bench
bench: $(STAMP)
	set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) benchmarks/$$b.py; done
	$(PY) benchmarks/export_comparison.py --run runs/demo
	$(PY) benchmarks/render_docs.py

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

clean-demo:
	rm -rf runs/demo data/demo
