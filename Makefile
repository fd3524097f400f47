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

# The test files run on TEST_WORKERS processes (one file stays on one worker, so its module fixtures are
# built once); the slowest files start first (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=15 tests

# Every benchmark, one after another (about 2 h on 2 cores, memory alone about 55 min); each writes
# benchmarks/results/*.json, then the docs' tables are regenerated from the JSON. export_comparison needs a finished demo run
# (make demo) in runs/demo; the balancing study (40 min) runs on its own: see the README.
BENCHES := family "step compare" loss "step packing" memory inference "step mfu" ep tokenization
bench: $(STAMP)
	set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) -m benchmarks.$$b; done
	$(PY) -m experiments.export_comparison --run runs/demo
	$(PY) -m benchmarks.render_docs

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

clean-demo:
	rm -rf runs/demo data/demo
