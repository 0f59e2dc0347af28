#!/usr/bin/env bash
# The whole pipeline on the bundled demo corpus, on a CPU machine, from a bare checkout:
#   set-up (.venv with CPU torch) -> sentencepiece tokenizer -> tokenized Arrow shards -> MetaLA trained with
#   DeepSpeed on 2 CPU ranks, stopped half-way and resumed from its checkpoint -> sample text -> evaluation
#   (lm-eval on offline local tasks, needle in a haystack, report.md).
# Environment: DEMO_OUT (default runs/demo), DEMO_STEPS (default 240), DEMO_RANKS (default 2).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup_env.sh
PY="${VENV:-$ROOT/.venv}/bin/python"
OUT=${DEMO_OUT:-runs/demo}
STEPS=${DEMO_STEPS:-240}
RANKS=${DEMO_RANKS:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
t0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

stage "1/6 tokenizer: sentencepiece unigram 4k on data/demo"
if [ ! -f "$OUT/tokenizer/tokenizer.model" ]; then
  "$PY" -m data_prep.train_tokenizer --input data/demo/*.jsonl.zst --vocab-size 4096 --output "$OUT/tokenizer"
else
  echo "reusing $OUT/tokenizer/tokenizer.model"
fi

stage "2/6 prepare: tokenized Arrow shards + manifest (2% validation)"
"$PY" -m data_prep.prepare --input data/demo/*.jsonl.zst --tokenizer "$OUT/tokenizer/tokenizer.model" \
  --output "$OUT/data" --workers 2 --val-fraction 0.02

stage "3/6 train: $STEPS steps with DeepSpeed on $RANKS CPU ranks; stop at step $((STEPS / 2)) as a preempted job would"
rm -rf "$OUT/train"
COMMON=(data.dir="$OUT/data" data.tokenizer="$OUT/tokenizer/tokenizer.model" train.out_dir="$OUT/train" train.steps="$STEPS")
OMP_NUM_THREADS=1 NUM_GPUS=$RANKS PYTHON="$PY" launch/pretrain.sh tiny-cpu "${COMMON[@]}" train.stop_at_step=$((STEPS / 2))

stage "4/6 resume from the latest checkpoint and finish"
OMP_NUM_THREADS=1 NUM_GPUS=$RANKS PYTHON="$PY" launch/pretrain.sh tiny-cpu "${COMMON[@]}" train.resume=auto

stage "5/6 sample from the trained model (recurrent decoding)"
"$PY" -m eval.generate --checkpoint "$OUT/train" --prompt "HAMLET. To be, or not to be" --prompt ":hacker:" \
  --max-new-tokens 48

stage "6/6 evaluate: lm-eval (offline local tasks), needle in a haystack, report"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$PY" -m eval.run --checkpoint "$OUT/train" --tasks local \
  --niah-lengths 256,512,1024 --niah-depths 5 --niah-samples 3

stage "done in $(( $(date +%s) - t0 ))s"
echo "results: $OUT/train/eval/report.md (evaluation), $OUT/train/loss_curve.png, $OUT/train/metrics.jsonl,"
echo "         $OUT/train/tb/ (tensorboard), $OUT/train/checkpoints/ (python -m pretrain.inspect $OUT/train)"
