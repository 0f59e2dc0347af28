#!/usr/bin/env bash
# The test suite: sets up .venv (CPU torch, deps) if needed, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "${VENV:-$ROOT/.venv}/bin/python" -m pytest tests -q --durations=15 "$@"
