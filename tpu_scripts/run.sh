#!/usr/bin/env bash
# Run one command on every worker (host) at once: all hosts of a pod slice must run the same
# program, and JAX's multi-controller runtime joins them (JAXROB_DISTRIBUTED=1 makes every
# experiment call jaxrob.parallel.initialize_distributed first). One ssh per worker, started
# together; each host's output goes to its own log, logs/NAME/<time>/worker-<i>.log. Fails
# (naming the workers) when any host fails.
# Usage: run.sh NAME 'COMMAND' [ZONE]   e.g. run.sh dbp-1 'python experiments/train_diffusion.py ...'
# DRY_RUN=1 prints the ssh commands (and their log files) instead; NUM_WORKERS sets the number
# of hosts (default: asked from gcloud).
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: run.sh NAME COMMAND [ZONE]}
CMD=${2:?usage: run.sh NAME COMMAND [ZONE]}
ZONE=${3:-$ZONE}
WORKERS=$(num_workers "$NAME" "$ZONE")
LOG_DIR="$LOG_ROOT/$NAME/$(date +%Y%m%d-%H%M%S)-$$"
REMOTE="cd ~/jaxrob && export JAXROB_DATA_DIR=\${JAXROB_DATA_DIR:-~/data} JAXROB_DISTRIBUTED=1 && $CMD"
if dry_run; then
  echo "# $NAME: $WORKERS worker(s), the same command on each; logs in $LOG_DIR/"
  for ((i = 0; i < WORKERS; i++)); do
    tpu ssh "$NAME" --zone "$ZONE" --worker="$i" --command "$REMOTE"
    echo "#   > $LOG_DIR/worker-$i.log"
  done
  exit 0
fi
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < WORKERS; i++)); do
  tpu ssh "$NAME" --zone "$ZONE" --worker="$i" --command "$REMOTE" \
    >"$LOG_DIR/worker-$i.log" 2>&1 &
  pids+=($!)
done
echo "$NAME: started on $WORKERS worker(s); logs: $LOG_DIR/worker-<i>.log"
failed=()
for ((i = 0; i < WORKERS; i++)); do
  if ! wait "${pids[$i]}"; then failed+=("$i"); fi
done
if ((${#failed[@]})); then
  for i in "${failed[@]}"; do
    echo "--- worker $i failed; last lines of $LOG_DIR/worker-$i.log:" >&2
    tail -n 20 "$LOG_DIR/worker-$i.log" >&2 || true
  done
  echo "$NAME: failed on worker(s) ${failed[*]} of $WORKERS" >&2
  exit 1
fi
echo "$NAME: finished on all $WORKERS worker(s)"
