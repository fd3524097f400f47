#!/usr/bin/env bash
# Multi-node training with torchrun. Run on every node:
#   NNODES=2 NODE_RANK=<0..NNODES-1> NPROC_PER_NODE=8 MASTER_ADDR=node0 \
#       bash launch/multinode_torchrun.sh --config RECIPE [k=v ...]
# train.output_dir must be on a filesystem every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${NPROC_PER_NODE:-1}" \
    --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" launch/train.py "$@"
