#!/usr/bin/env bash
# A two-node job simulated on one machine: two torchrun agents (--nnodes 2, --node-rank 0 and 1,
# one process each) meet at 127.0.0.1, so ranks come from different agents as on a cluster.
# Extra arguments go to train.py:
#   bash launch/two_nodes_local.sh --sample-budget 2000
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${MASTER_PORT:-$(python -c "$free_port")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
for node_rank in 0 1; do
    torchrun --nnodes 2 --node-rank "$node_rank" --nproc-per-node 1 \
        --master-addr 127.0.0.1 --master-port "$port" "$here/train.py" "$@" &
    pids+=("$!")
done
# A failed agent would leave the other waiting in a collective: stop both on the first failure
# (and on Ctrl-C).
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for _ in "${pids[@]}"; do
    rc=0
    wait -n || rc=$?
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        kill "${pids[@]}" 2>/dev/null || true
    fi
done
exit "$status"
