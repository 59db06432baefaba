#!/usr/bin/env bash
# One machine, all its GPUs (NUM_GPUS=4 for fewer):
#   bash launch/single_node.sh configs/gpt_350m_32k.yaml [key=value ...]
# Without GPUs it runs NUM_GPUS (default 1) CPU ranks over gloo: NUM_GPUS=2 bash launch/single_node.sh configs/tiny_cpu.yaml
#
# Starts one train.py per rank (with the variables DeepSpeed's launcher would set), each in its own process group,
# so that SIGTERM or SIGINT to this script (SIGHUP is forwarded as SIGTERM) reaches every rank exactly once: the
# ranks save a checkpoint at the next step boundary and exit. Exit code: 0 when every rank finished; after a
# forwarded signal, 128 + its number (143 SIGTERM, 130 SIGINT) unless a rank failed; otherwise the first failing
# rank's code, and the other ranks are sent SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/single_node.sh CONFIG.yaml [key=value ...]}
shift
NUM_GPUS=${NUM_GPUS:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29500} WORLD_SIZE=$NUM_GPUS LOCAL_WORLD_SIZE=$NUM_GPUS

set -m  # ranks in their own process groups: a terminal's Ctrl-C reaches this script, which forwards it once
pids=()
for ((rank = 0; rank < NUM_GPUS; rank++)); do
    RANK=$rank LOCAL_RANK=$rank python3 train.py --config "$CONFIG" "$@" &
    pids+=($!)
done
set +m

stopped_by=0  # 128 + the number of the signal forwarded to the ranks
forward() {
    stopped_by=$1
    kill -s "$2" "${running[@]}" 2>/dev/null || true
}
running=("${pids[@]}")
trap 'forward 143 TERM' TERM HUP
trap 'forward 130 INT' INT

status=0
while ((${#running[@]})); do
    alive=()
    for pid in "${running[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            alive+=("$pid")
            continue
        fi
        rc=0
        wait "$pid" || rc=$?
        if ((rc != 0 && rc != stopped_by && status == 0)); then
            status=$rc
            echo "single_node.sh: rank process $pid exited with code $rc; stopping the others" >&2
            for other in "${running[@]}"; do
                [[ $other != "$pid" ]] && kill -s TERM "$other" 2>/dev/null || true
            done
        fi
    done
    running=("${alive[@]+"${alive[@]}"}")
    ((${#running[@]})) && { sleep 0.5 & wait $! || true; }
done
if ((status == 0)); then
    status=$stopped_by
fi
exit "$status"
