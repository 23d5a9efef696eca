#!/usr/bin/env bash
# The embedded default, offline on CPU: a small T5 base pre-trained on
# spelled-out numbers, then FLix on the multitask x multilingual numbers
# mixture, evaluated on the pairs it was trained on and on held-out
# (zero-shot) pairs; then that FLix run grown with a new language (Dutch),
# old and new pairs evaluated together. Ends with a summary.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default /tmp/flix_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/flix_demo}"
pip install -q -e '.[test]'
python -m flix.train --gin_file=configs/demo_base.gin \
  --gin.MODEL_DIR="\"$OUT/base\""
python -m flix.train --gin_file=configs/demo.gin \
  --gin.MODEL_DIR="\"$OUT/flix\"" \
  --gin.INITIAL_CHECKPOINT_PATH="\"$OUT/base\""
python -m flix.train --gin_file=configs/demo_grow.gin \
  --gin.MODEL_DIR="\"$OUT/grow_nl\"" \
  --gin.GROW_FROM="\"$OUT/flix\""
python scripts/demo_summary.py "$OUT/flix/eval"
echo "Grown with Dutch: $OUT/grow_nl/eval/results-validation-150.{json,txt,png}"
