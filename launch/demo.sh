#!/usr/bin/env bash
# The demo job (`make demo`): real data → tokenize → 2-process DeepSpeed training → dense export → report.
# Extra arguments are recipe overrides, e.g. `bash launch/demo.sh train.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=${WANDB_MODE:-offline}
nproc=${DEMO_NPROC:-2}
run=runs/demo

phase() { echo "[demo] $1 took $((SECONDS - start)) s"; start=$SECONDS; }
start=$SECONDS
bash launch/prepare_demo_data.sh
phase "data"
rm -rf $run  # the demo always starts fresh; use `launch/train.py --resume` to continue a run
deepspeed --num_gpus "$nproc" launch/train.py --config launch/recipes/demo.yaml train.output_dir=$run "$@"
phase "training (evaluation included)"
# one process from here on: it may use every core to generate and score the three models' answers
# (`nproc` itself obeys OMP_NUM_THREADS, hence `env -u`)
cores=$(env -u OMP_NUM_THREADS nproc)
OMP_NUM_THREADS=$cores python launch/export.py --run $run --out $run/dense
phase "export and scoring"
OMP_NUM_THREADS=$cores python launch/report.py --run $run --export $run/dense
phase "report"
echo "[demo] report: $run/report.md (all in $SECONDS s)"
