#!/usr/bin/env bash
# The GPU checks, in one call that fits 9 minutes on one H100: the GPU test tier, the square-root
# traces (m = 1024, 4096), the cost of a measuring step at the paper's 160M shape (l1 and nuclear,
# ours vs the paper's scheme) and Muon's Newton-Schulz dtype. Every table goes, with the device
# and the torch version, to one directory (default: $OUT when set, else gpu_check_out/).
#
#   bash launch/gpu_prepare_wheels.sh          # where pip reaches PyPI: wheels into .whl/
#   bash launch/gpu_check.sh [DIR]             # on the GPU machine (offline is fine)
#
# Packages the GPU machine lacks (pydantic, DeepSpeed) come from .whl/ when it exists: they are
# installed into a scratch directory, never into the machine's Python. The repository is used in
# place (PYTHONPATH), nothing is built. Each step has its own time limit, a step that fails is
# reported and the next one runs; the exit code is non-zero when any step failed.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  "$py" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>&1 | tail -n 1
  git rev-parse HEAD 2>/dev/null
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: run it, its output to $out/NAME.txt and the console
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

step gpu_tests 240 "$py" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -rs
step sqrt_trace 90 "$py" launch/benchmarks/sqrt_trace.py --device cuda --sizes 1024 4096
step step_cost 150 "$py" launch/benchmarks/step_cost.py --device cuda --dim 768 --layers 12 \
  --heads 12 --seq 1024 --vocab 32000 --micro 8 --accumulation 2 --sqrt-trace newton_schulz \
  --norms l1 nuclear
step muon_ns_dtype 60 "$py" launch/benchmarks/muon_ns_dtype.py --device cuda

if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: failed: %s\n' "${failed[*]}" | tee "$out/summary.txt"
  exit 1
fi
echo "gpu_check: every step passed; tables in $out" | tee "$out/summary.txt"
