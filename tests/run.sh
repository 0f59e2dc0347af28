#!/usr/bin/env bash
# The test suite: sets up .venv (CPU torch, deps) if needed, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
VENV_DIR=${VENV:-$ROOT/.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# DeepSpeed JIT-builds its CPU shared-memory comm op in the first process that initialises it. Build it once here,
# with no time limit and in this checkout's own cache: a test that times out mid-build would otherwise leave a lock
# behind that hangs every later DeepSpeed process (and another checkout's venv would force a rebuild).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV_DIR/torch_extensions}
"$VENV_DIR/bin/python" - <<'PY'
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load(verbose=False)
    print("[setup] DeepSpeed shared-memory comm op ready")
PY
exec "$VENV_DIR/bin/python" -m pytest tests -q --durations=15 "$@"
