#!/usr/bin/env bash
# Sets everything up and runs the CPU test suite (Triton kernels run in the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TRITON_INTERPRET=1 WANDB_MODE=offline
exec python3 -m pytest tests "$@"
