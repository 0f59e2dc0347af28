#!/usr/bin/env bash
# One lent-GPU call: training-step rows through our trainer, one process each, in the order given, each only while
# the call's time allows (the device tool stops a command at 600 s). Rows of one kind alternating with another on
# one machine are the A/B this repository's step-time figures come from.
# Env: ROWS, a ';'-separated list of NAME=JSON (the JSON is --train-overrides for that row), e.g.
#   ROWS='base={"compile_memory_budget": 0.9};swiglu={"compile_memory_budget": 0.9, "compile_save": ["swiglu"]}'
# PRESET (1.3b), SEQLEN (2048), DEADLINE (seconds, 585), TAG; METALA_TRITON_CONFIG passes through. A row's JSON may
# end in '|' and more arguments of bench.train_throughput for that row, e.g.
#   'acc4={...}|--tokens-per-step 131072 --micro-batch 16'
# and may start with environment settings for that row alone (Inductor's, the operator's), e.g.
#   'cd={...}|TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 --micro-batch 16'
# Results go to $OUT (the device tool's output folder; bench/results when unset). Needs .whl/ (bench/gpu/wheels.sh)
# carried. Example (device tool): ROWS='...' bash bench/gpu/train_rows.sh, carry [".whl"]
set -u
TAG=${TAG:-rows}
source bench/gpu/env.sh
i=0
IFS=';' read -ra rows <<< "${ROWS:?give ROWS}"
for row in "${rows[@]}"; do
  name=${row%%=*}; spec=${row#*=}; overrides=${spec%%|*}; extra=""
  [ "$spec" != "$overrides" ] && extra=${spec#*|}
  row_env=()
  read -ra words <<< "$extra"
  while [ ${#words[@]} -gt 0 ] && [[ ${words[0]} =~ ^[A-Z_][A-Z0-9_]*= ]]; do
    row_env+=("${words[0]}"); words=("${words[@]:1}")
  done
  extra="${words[*]}"
  i=$((i + 1))
  l=$(left); [ "$l" -lt 70 ] && { echo "row $i $name skipped: $l s left"; continue; }
  [ "$l" -gt 240 ] && l=240
  # ${a[@]+...}: an empty array under `set -u` (bash < 4.4 calls it unbound)
  timeout "$l" env ${row_env[@]+"${row_env[@]}"} python -m bench.train_throughput --presets "${PRESET:-1.3b}" \
    --seqlens "${SEQLEN:-2048}" --compile --no-eager --peers "" --harness trainer --train-overrides "$overrides" \
    $extra --out "$OUT" --tag "${TAG}_${i}_$name" \
    > "$OUT/row_${i}_$name.log" 2>&1
  last=$(grep -E "tok/s|out of memory|OutOfMemory|failed|Error" "$OUT/row_${i}_$name.log" | tail -1)
  echo "$i $name: $last  ($(( $(date +%s) - T0 )) s)"
done
echo "done in $(( $(date +%s) - T0 )) s"
