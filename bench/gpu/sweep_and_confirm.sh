#!/usr/bin/env bash
# One lent-GPU call: time operator launch variants, combine the winners, then confirm them where it counts, each
# step only while the call's time allows (the device tool stops a command at 600 s):
#   1. bench.kernel_tune --aug over VARIANTS at the 1.3B and 360M training shapes (skipped when CONFIG is given);
#      its "combined" configuration (bench/kernel_tune.py combine_winners)
#   2. training-step rows through our trainer, alternating the combined configuration and the defaults (ROWS)
#   3. bench.ops at T = 2k with the combined configuration (its gate checks it against the fp32 reference)
# Results go to $OUT (the device tool's output folder; bench/results when unset). Needs .whl/ (bench/gpu/wheels.sh)
# carried. Env: VARIANTS (JSON list for --variants), CONFIG (skip step 1), PRESET (1.3b), ROWS
# ("new old new"), BUDGET (compile_memory_budget, 0.9), DEADLINE (seconds, 585), TAG.
# Example (device tool): bash bench/gpu/sweep_and_confirm.sh, carry [".whl"]
set -u
TAG=${TAG:-sweep}
source bench/gpu/env.sh
if [ -z "${CONFIG:-}" ]; then
  [ -n "${VARIANTS:-}" ] || { echo "give VARIANTS (a JSON list of {kernel: changes}) or CONFIG"; exit 2; }
  timeout $(( $(left) - 60 )) python -m bench.kernel_tune --aug --shapes 16x2048x16,16x2048x8 --segs "" \
    --tag "$TAG" --out "$OUT" --variants "$VARIANTS" 2>&1 | tee "$OUT/kernel_tune_$TAG.log" | grep -v "^   [0-9]"
  CONFIG=$(python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['combined']))" \
    "$(ls -t "$OUT"/*kernel_tune*"$TAG".json | head -1)") || exit 1
fi
echo "CONFIG=$CONFIG  ($(( $(date +%s) - T0 )) s)"
[ "$CONFIG" = "{}" ] && { echo "no variant beat the defaults at every shape"; exit 0; }
i=0
for which in ${ROWS:-new old new}; do
  l=$(left); [ "$l" -lt 70 ] && { echo "row $which skipped: $l s left"; continue; }
  [ "$l" -gt 220 ] && l=220
  cfg=""; [ "$which" = new ] && cfg=$CONFIG
  i=$((i + 1))
  METALA_TRITON_CONFIG="$cfg" timeout "$l" python -m bench.train_throughput --presets "${PRESET:-1.3b}" \
    --seqlens 2048 --compile --no-eager --peers "" --harness trainer \
    --train-overrides "{\"compile_memory_budget\": ${BUDGET:-0.9}}" --out "$OUT" --tag "${TAG}_${i}_$which" \
    > "$OUT/row_${i}_$which.log" 2>&1
  echo "$which: $(grep -E "tok/s|out of memory|failed|skipped" "$OUT/row_${i}_$which.log" | tail -1)"
done
l=$(left)
if [ "$l" -gt 100 ]; then
  METALA_TRITON_CONFIG="$CONFIG" timeout "$l" python -m bench.ops --seqlens 2048 --out "$OUT" > "$OUT/ops_$TAG.log" 2>&1
  tail -10 "$OUT/ops_$TAG.log"
else
  echo "bench.ops skipped: $l s left"
fi
echo "done in $(( $(date +%s) - T0 )) s"
