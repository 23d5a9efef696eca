#!/usr/bin/env bash
# Launches `python -m t5x.train` with a flix config on every worker of a TPU
# VM pod slice (from this checkout's root, so includes resolve as written).
# Usage: scripts/tpu_vm_train.sh TPU_NAME ZONE GIN_FILE [--gin.X=Y ...]
# e.g.   scripts/tpu_vm_train.sh my-v4-64 us-central2-b configs/flix_mt5_xl.gin \
#            --gin.MODEL_DIR=\"gs://bucket/flix_xl\" \
#            --gin.XTREME_UP_DIR=\"gs://bucket/xtreme_up_v1.1\"
# Ablations are gin files or overrides appended, e.g.
#            --gin_file=configs/ablations/no_feature_dropout.gin
# Each worker installs flix with T5X's dependencies and T5X from its source
# (as T5X documents), then all start at once; JAX joins the pod's hosts.
# DRIVER=flix runs `python -m flix.train --multiprocess` instead (no T5X).
set -euo pipefail
TPU_NAME="$1"; ZONE="$2"; GIN_FILE="$3"; shift 3
DRIVER="${DRIVER:-t5x}"
ARGS=""
for arg in "$@"; do ARGS+=" $(printf '%q' "$arg")"; done
case "$DRIVER" in
  t5x)
    INSTALL="pip install -q -e '.[t5x]' 'jax[tpu]==0.10.2' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
      pip install -q --no-deps git+https://github.com/google-research/t5x \
        git+https://github.com/google/airio \
        git+https://github.com/google-research/jestimator"
    RUN="python -m t5x.train --gin_file=$GIN_FILE $ARGS" ;;
  flix)
    INSTALL="pip install -q -e . 'jax[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    RUN="python -m flix.train --multiprocess --gin_file=$GIN_FILE $ARGS" ;;
  *) echo "DRIVER must be t5x or flix, got $DRIVER" >&2; exit 2 ;;
esac
# Copy this checkout to every worker, install, and start all at once.
gcloud compute tpus tpu-vm scp --recurse "$(dirname "$0")/.." \
  "$TPU_NAME":~/flix --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/flix && $INSTALL
  $RUN
"
