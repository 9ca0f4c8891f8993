#!/usr/bin/env bash
# One machine, NPROC_PER_NODE processes (default 2); extra arguments go to train.py:
#   bash launch/torchrun_single_node.sh --optimizer adamw --batch-mode constant
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Ranks share the machine's cores; torchrun sets this only when it starts several processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-2}" "$here/train.py" "$@"
