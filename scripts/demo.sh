#!/usr/bin/env bash
# The embedded default, offline on CPU: a tiny base model, then FLix on the
# numbers mixture, evaluated supervised and zero-shot; then the FLix run grown
# with a new language (Dutch), old and new pairs evaluated together.
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
echo "Results: $OUT/flix/eval/results-validation-300.{json,txt,png}"
echo "Grown with Dutch: $OUT/grow_nl/eval/results-validation-150.{json,txt,png}"
