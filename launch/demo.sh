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

bash launch/prepare_demo_data.sh
rm -rf $run  # the demo always starts fresh; use `launch/train.py --resume` to continue a run
deepspeed --num_gpus "$nproc" launch/train.py --config launch/recipes/demo.yaml train.output_dir=$run "$@"
# one process from here on: it may use every core to generate and score the three models' answers
OMP_NUM_THREADS=$(nproc) python launch/export.py --run $run --out $run/dense
OMP_NUM_THREADS=$(nproc) python launch/report.py --run $run --export $run/dense
echo "[demo] report: $run/report.md"
