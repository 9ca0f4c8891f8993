#!/usr/bin/env bash
# The main job under DeepSpeed's own launcher (--engine deepspeed); extra arguments go to
# train.py. The job runs on CPUs (gloo), so DS_ACCELERATOR=cpu and --num_gpus counts processes.
# One node, NPROC_PER_NODE processes:
#   bash launch/deepspeed_launcher.sh --zero-stage 2
# Several nodes: list them in a hostfile ("<host> slots=<processes>", see launch/hostfile) and
# run this on the first node; DeepSpeed reaches the others over passwordless ssh (pdsh) and
# starts the same command there, so the repository must sit at the same path on every node:
#   HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 bash launch/deepspeed_launcher.sh
# pdsh passes on only a few environment variables: put others the remote processes need
# (OMP_NUM_THREADS, GLOO_SOCKET_IFNAME, DS_ACCELERATOR) as NAME=value lines in a .deepspeed_env
# file in the directory you launch from or in your home directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
if [[ -n "${HOSTFILE:-}" ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR, the address of the first host in $HOSTFILE}"
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
        --master_port "${MASTER_PORT:-29500}" "$here/train.py" --engine deepspeed "$@"
fi
exec deepspeed --num_gpus "${NPROC_PER_NODE:-2}" --master_port "${MASTER_PORT:-29500}" \
    "$here/train.py" --engine deepspeed "$@"
