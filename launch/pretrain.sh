#!/usr/bin/env bash
# Launch MetaLA pretraining with the deepspeed launcher.
#
#   launch/pretrain.sh RECIPE [section.key=value ...]
#
# RECIPE is a YAML path or a name in launch/configs (tiny-cpu, 125m, 360m, 1.3b, 1.4b, 3b).
# Environment:
#   NUM_GPUS     processes per node (default: the node's GPUs; 1 without a GPU; set 2 for two CPU ranks)
#   NUM_NODES    nodes (default 1)
#   HOSTFILE     MPI-style hostfile ("node-0 slots=8" per line) for multi-node launches over ssh (pdsh)
#   NODE_RANK    with NUM_NODES > 1 and no HOSTFILE: this node's index; run the script once per node
#                (e.g. from srun) and deepspeed starts the local ranks without ssh
#   MASTER_ADDR  address of node 0 (default 127.0.0.1 on one node)
#   MASTER_PORT  rendezvous port (default 29500)
#   DRY_RUN=1    validate the recipe and print the resolved plan (world size, layout, tokens/step, steps,
#                checkpoint dir) without starting any process group
#   PYTHON       interpreter (default: the repo's .venv if present, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 1 ]; then
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
RECIPE=$1
shift
if [ ! -f "$RECIPE" ]; then
  if [ -f "$ROOT/launch/configs/$RECIPE.yaml" ]; then
    RECIPE="$ROOT/launch/configs/$RECIPE.yaml"
  else
    echo "recipe not found: $RECIPE (known: $(cd "$ROOT/launch/configs" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' '))" >&2
    exit 2
  fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NUM_GPUS" -ge 1 ] || NUM_GPUS=1
fi
NUM_NODES=${NUM_NODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
WORLD=$((NUM_NODES * NUM_GPUS))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$PYTHON" -m pretrain.train --config "$RECIPE" --dry-run --world-size "$WORLD" "$@"
fi

DS=("$PYTHON" -m deepspeed.launcher.runner)
ARGS=(--num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
if [ "$NUM_NODES" -gt 1 ]; then
  if [ -n "${HOSTFILE:-}" ]; then
    ARGS+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
  elif [ -n "${NODE_RANK:-}" ]; then
    ARGS+=(--no_ssh --num_nodes "$NUM_NODES" --node_rank "$NODE_RANK")
  else
    echo "NUM_NODES=$NUM_NODES needs HOSTFILE (ssh launch) or NODE_RANK (one launch per node)" >&2
    exit 2
  fi
  [ -n "${MASTER_ADDR:-}" ] || { echo "multi-node launches need MASTER_ADDR (node 0's address)" >&2; exit 2; }
fi
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
echo "[pretrain.sh] $WORLD ranks ($NUM_NODES node(s) x $NUM_GPUS) : $RECIPE $*" >&2
exec "${DS[@]}" "${ARGS[@]}" --module pretrain.train --config "$RECIPE" "$@"
