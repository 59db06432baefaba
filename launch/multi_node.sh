#!/usr/bin/env bash
# Several machines with DeepSpeed's launcher: passwordless ssh from this machine to every host, the
# repository at the same path on each, and a hostfile of "hostname slots=<GPUs>" lines (see
# launch/hostfile.example; the first host is the rendezvous):
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/gpt_1b_64k.yaml [key=value ...]
# Runs and checkpoints must live on a filesystem that every host shares (run.dir, data.cache_dir).
#
# SIGTERM, SIGINT or SIGHUP to this script is sent as SIGTERM to the launcher's process group; DeepSpeed's
# launcher passes it on to every host's ranks, which save a checkpoint at the next step boundary and exit.
# DeepSpeed's per-host launcher kills ranks that are still running 30 s after it passed the signal on (a save
# cut short that way leaves the previous checkpoint intact). The script returns once this host's launcher
# processes and ranks are gone (other hosts' ranks may still be saving). Exit code: the launcher's, or after a
# forwarded signal 128 + its number (143 SIGTERM, 130 SIGINT).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/multi_node.sh CONFIG.yaml [key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}

set -m  # the launcher in its own process group, which the forwarded signal reaches as a whole
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    train.py --config "$CONFIG" "$@" &
launcher=$!
set +m

stopped_by=0
forward() {
    stopped_by=$1
    kill -s TERM -- "-$launcher" 2>/dev/null || true
}
trap 'forward 143' TERM HUP
trap 'forward 130' INT

while :; do
    status=0
    wait "$launcher" || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # else the wait was cut short by a forwarded signal
done
while kill -0 -- "-$launcher" 2>/dev/null; do  # this host's launcher processes and ranks, still saving
    sleep 0.5 & wait $! || true
done
if ((stopped_by)); then
    status=$stopped_by
fi
exit "$status"
