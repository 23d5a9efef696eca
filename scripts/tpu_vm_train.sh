#!/usr/bin/env bash
# Launches a flix config on every worker of a TPU VM pod slice.
# Usage: scripts/tpu_vm_train.sh TPU_NAME ZONE GIN_FILE [--gin.X=Y ...]
# e.g.   scripts/tpu_vm_train.sh my-v4-64 us-central2-b configs/flix_mt5_xl.gin \
#            --gin.MODEL_DIR=\"gs://bucket/flix_xl\" \
#            --gin.XTREME_UP_DIR=\"gs://bucket/xtreme_up_v1.1\"
# Ablations are gin files or overrides appended, e.g.
#            --gin_file=configs/ablations/no_feature_dropout.gin
# Each worker runs `python -m flix.train --multiprocess ...`, which calls
# jax.distributed.initialize() before building the mesh.
set -euo pipefail
TPU_NAME="$1"; ZONE="$2"; GIN_FILE="$3"; shift 3
ARGS=""
for arg in "$@"; do ARGS+=" $(printf '%q' "$arg")"; done
# Copy this checkout to every worker, install, and start all at once.
gcloud compute tpus tpu-vm scp --recurse "$(dirname "$0")/.." \
  "$TPU_NAME":~/flix --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/flix && pip install -q -e . 'jax[tpu]'
  python -m flix.train --multiprocess --gin_file=$GIN_FILE $ARGS
"
