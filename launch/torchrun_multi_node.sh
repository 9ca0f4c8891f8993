#!/usr/bin/env bash
# Run once on every node, with the same NNODES, MASTER_ADDR and MASTER_PORT and this node's
# NODE_RANK (0 on the node at MASTER_ADDR); extra arguments go to train.py:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multi_node.sh --max-batch 256
# gloo picks a network interface by the host name; if ranks cannot reach each other, export
# GLOO_SOCKET_IFNAME (e.g. eth0) on every node.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, 0 .. NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Static rendezvous: node ranks are fixed, node 0 hosts the store at MASTER_ADDR:MASTER_PORT.
exec torchrun \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "${NPROC_PER_NODE:-2}" \
    --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" \
    "$here/train.py" "$@"
