# Sourced by the lent-GPU scripts here: the call's clock (`left`: seconds until DEADLINE), the carried wheels
# (.whl/, bench/gpu/wheels.sh) installed beside the image's packages, caches kept in the (ignored) checkout between
# calls on one warm machine, and the card's name in the log. Callers may set DEADLINE and OUT before sourcing it.
T0=$(date +%s)
OUT=${OUT:-bench/results}
DEADLINE=${DEADLINE:-585}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/ds/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p .gpucache
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 TORCHINDUCTOR_CACHE_DIR=$PWD/.gpucache/inductor \
  TRITON_CACHE_DIR=$PWD/.gpucache/triton
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
