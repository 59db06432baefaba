#!/usr/bin/env bash
# Installs bbm and everything its tests and training need. Keeps an already installed torch (a GPU
# machine's CUDA build); only where none is present does it pin the CPU wheel torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[train,data,dev]"
