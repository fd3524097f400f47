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
data=data/demo
run=runs/demo

python -c "from mtmoe.model.base import ensure_smollm2; print('[demo] base model:', ensure_smollm2())"
[ -f $data/jsonl/translate.jsonl ] || python data_prep/build_demo_tasks.py --out $data/jsonl
[ -f $data/tokenized/manifest.json ] || python data_prep/tokenize_tasks.py \
    --task codegen=$data/jsonl/codegen.jsonl --task docstring=$data/jsonl/docstring.jsonl \
    --task translate=$data/jsonl/translate.jsonl --tokenizer smollm2-135m-instruct \
    --max-len 320 --overflow truncate --eval-fraction 0.1 --max-eval 24 --out $data/tokenized

rm -rf $run  # the demo always starts fresh; use `launch/train.py --resume` to continue a run
deepspeed --num_gpus "$nproc" launch/train.py --config launch/recipes/demo.yaml train.output_dir=$run "$@"
python launch/export.py --run $run --out $run/dense
python launch/report.py --run $run --export $run/dense
echo "[demo] report: $run/report.md"
