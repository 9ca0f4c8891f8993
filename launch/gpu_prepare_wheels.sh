#!/usr/bin/env bash
# Wheels for launch/gpu_check.sh, fetched where pip reaches PyPI: what the GPU machine's image
# lacks (pydantic and its parts, hjson/DeepSpeed for the ZeRO-2 GPU test). Written to .whl/
# (ignored by git). The GPU image runs CPython 3.12 on x86_64 (set PYVER to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${PYVER:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
binary() {  # with their dependencies, resolved for the GPU machine's Python
  python3 -m pip download -q --only-binary=:all: --python-version "$pyver" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
binary "pydantic>=2.5" hjson
# DeepSpeed publishes a source distribution only: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl "deepspeed>=0.16"
ls -l .whl
