#!/usr/bin/env bash
# One machine, all its GPUs (NUM_GPUS=4 for fewer):
#   bash launch/single_node.sh configs/gpt_350m_32k.yaml [key=value ...]
# Without GPUs it runs NUM_GPUS (default 1) CPU ranks over gloo: NUM_GPUS=2 bash launch/single_node.sh configs/tiny_cpu.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/single_node.sh CONFIG.yaml [key=value ...]}
shift
NUM_GPUS=${NUM_GPUS:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" train.py --config "$CONFIG" "$@"
