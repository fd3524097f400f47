#!/usr/bin/env bash
# Builds the demo's three real tasks and tokenizes them (skipped when already there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
data=data/demo
python -c "from mtmoe.model.base import ensure_smollm2; print('[data] base model:', ensure_smollm2())"
# (re)built when missing, or when older than the per-task metrics (codegen records carry their tests;
# docstring is scored by BLEU, the field's metric for code summarization, since 2026-12-06)
grep -qs '"entry_point"' $data/jsonl/codegen.jsonl || python data_prep/build_demo_tasks.py --out $data/jsonl
grep -qs '"bleu"' $data/tokenized/manifest.json || python data_prep/tokenize_tasks.py \
    --task codegen=$data/jsonl/codegen.jsonl --task docstring=$data/jsonl/docstring.jsonl \
    --task translate=$data/jsonl/translate.jsonl --tokenizer smollm2-135m-instruct \
    --max-len 320 --overflow truncate --eval-fraction 0.1 --max-eval 24 --out $data/tokenized \
    --metric codegen=pass@1 --metric docstring=bleu --metric translate=chrf
