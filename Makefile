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

# Every benchmark, one after another (about 45 min on 2 cores); each writes benchmarks/results/*.json.
# export_comparison needs a finished demo run (make demo) in runs/demo.
bench: $(STAMP)
	$(PY) benchmarks/block_bench.py
	$(PY) benchmarks/family_bench.py
	$(PY) benchmarks/model_step_bench.py
	$(PY) benchmarks/ep_bench.py
	$(PY) benchmarks/export_comparison.py --run runs/demo

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

clean-demo:
	rm -rf runs/demo data/demo
