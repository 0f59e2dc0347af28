#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with CPU PyTorch and every dependency. Idempotent: a stamp
# keyed on the requirement files skips the work when nothing changed.
#   VENV=path    where to put it (default: .venv in the repo)
#   PYTHON=exe   interpreter to build it from (default: python3.11, else python3)
#   TORCH_INDEX_URL=url  where CPU torch comes from when no local wheel is configured
#                        (default: https://download.pytorch.org/whl/cpu)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=2.13.0
DEEPSPEED_VERSION=0.19.8
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
key=$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
stamp="$VENV/.metala-setup-$key"
if [ -f "$stamp" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing CPU torch $TORCH_VERSION (before anything that could pull a CUDA build)"
  # a locally configured wheel (pip find-links) first, else the PyTorch CPU index
  if "${PIP[@]}" install --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
  fi
fi
echo "[setup] installing requirements"
"${PIP[@]}" install -r "$ROOT/requirements.txt"
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  echo "[setup] building DeepSpeed $DEEPSPEED_VERSION against the installed torch"
  DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import torch; print('[setup] torch', torch.__version__, 'cuda', torch.version.cuda)"
rm -f "$VENV"/.metala-setup-*
touch "$stamp"
echo "[setup] environment ready: $VENV"
