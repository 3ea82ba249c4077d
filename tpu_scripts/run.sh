#!/usr/bin/env bash
# Run a command on every worker (all hosts of a pod must run the same program).
# Usage: run.sh NAME 'COMMAND' [ZONE]   e.g. run.sh dbp-1 'python experiments/train_diffusion.py ...'
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: run.sh NAME COMMAND [ZONE]}
CMD=${2:?usage: run.sh NAME COMMAND [ZONE]}
ZONE=${3:-$ZONE}
mkdir -p "$REPO_ROOT/logs/$NAME"
LOG="$REPO_ROOT/logs/$NAME/$(date +%Y%m%d-%H%M%S).log"
# --distributed makes each experiment call jax.distributed.initialize() before using devices.
tpu ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/jaxrob && export JAXROB_DATA_DIR=\${JAXROB_DATA_DIR:-~/data} && $CMD --distributed" \
  2>&1 | tee "$LOG"
