#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher.
#
#   With ssh (run once, on the first node; it starts every node listed in the hostfile):
#     HOSTFILE=launch/hostfile MASTER_ADDR=node0 bash launch/multinode_deepspeed.sh --config RECIPE [k=v ...]
#   Without ssh (run on every node, each with its own NODE_RANK):
#     NO_SSH=1 NODE_RANK=0 HOSTFILE=launch/hostfile MASTER_ADDR=node0 bash launch/multinode_deepspeed.sh ...
#
# train.output_dir must be on a filesystem every node sees: every rank writes its optimizer shard there.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
MASTER_PORT=${MASTER_PORT:-29500}
extra=()
if [ -n "${NO_SSH:-}" ]; then
    extra=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
fi
exec deepspeed --hostfile "$HOSTFILE" "${extra[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "$@"
