#!/usr/bin/env bash
# The README's main command: installs bbm, then trains the tiny preset on the embedded Python standard
# library corpus (2 CPU cores, about three minutes). Extra key=value arguments override the preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec python3 train.py --config configs/tiny_cpu.yaml checkpoint.resume=none "$@"
