#!/usr/bin/env bash
# Several machines with DeepSpeed's launcher: passwordless ssh from this machine to every host, the
# repository at the same path on each, and a hostfile of "hostname slots=<GPUs>" lines (see
# launch/hostfile.example; the first host is the rendezvous):
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/gpt_1b_64k.yaml [key=value ...]
# Runs and checkpoints must live on a filesystem that every host shares (run.dir, data.cache_dir).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/multi_node.sh CONFIG.yaml [key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    train.py --config "$CONFIG" "$@"
