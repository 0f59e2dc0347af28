#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the lent GPU machines lack, for Python 3.12 x86-64 (their image: torch 2.11,
# triton 3.6, no deepspeed / fla / pydantic): fla and fla-core (the operator benchmark's peer), and DeepSpeed with
# its dependencies (the trainer harness). DeepSpeed is an sdist: built here as a pure-Python wheel against this
# venv's torch (no CUDA ops are compiled; the GPU JIT-builds what it needs). Run from the repository root:
#   bash bench/gpu/wheels.sh      then carry ".whl" and run bench/gpu/sweep_and_confirm.sh there
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=$ROOT/.whl
PY=${PY:-$ROOT/.venv/bin/python}
mkdir -p "$DEST/ds"
get() {  # dest, packages...
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$@"
}
get "$DEST" flash-linear-attention==0.6.0 fla-core==0.6.0
get "$DEST/ds" hjson msgpack ninja py-cpuinfo pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection
if ! ls "$DEST"/ds/deepspeed-*.whl >/dev/null 2>&1; then
  (cd "$DEST/ds" && "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8)
fi
du -sh "$DEST"
