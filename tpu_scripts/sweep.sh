#!/usr/bin/env bash
# Cartesian sweep of config overrides, one workdir per point, each point run on every worker
# with run.sh. A finished point is recorded here, on the machine that launches the sweep
# (logs/NAME/sweep/CONFIG/POINT.done), and skipped when the sweep is run again, so rerunning
# resumes it; the point that was interrupted resumes from its own checkpoints and chunks.
# (The decision is not taken on the hosts: process 0 alone writes results.json, so on a pod the
# other hosts would not see it and would start a run that process 0 skips.)
# Usage: sweep.sh NAME CONFIG 'key=v1,v2' ['key2=a,b' ...]
# Set SCRIPT (default experiments/train_diffusion.py) and WORKDIR_ROOT (default runs/sweeps;
# on a pod slice use a directory every host shares, e.g. gs://BUCKET/runs, for the checkpoints).
# DRY_RUN=1 prints what would run (with NUM_WORKERS hosts) and records nothing.
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: sweep.sh NAME CONFIG key=v1,v2 ...}
CONFIG=${2:?usage: sweep.sh NAME CONFIG key=v1,v2 ...}
shift 2
SCRIPT=${SCRIPT:-experiments/train_diffusion.py}
WORKDIR_ROOT=${WORKDIR_ROOT:-runs/sweeps}
DONE_DIR="$LOG_ROOT/$NAME/sweep/$(basename "$CONFIG" .py)"
points=("")
for spec in "$@"; do
  if [[ "$spec" != *=* ]]; then echo "sweep.sh: expected key=v1,v2, got '$spec'" >&2; exit 2; fi
  key=${spec%%=*}; IFS=',' read -r -a vals <<< "${spec#*=}"
  next=()
  for p in "${points[@]}"; do for v in "${vals[@]}"; do next+=("$p --config.$key=$v"); done; done
  points=("${next[@]}")
done
for p in "${points[@]}"; do
  tag=$(echo "$p" | sed -e 's/--config\.//g' -e 's/[^A-Za-z0-9.=_-]/_/g' -e 's/^_*//')
  tag=${tag:-default}
  wd="$WORKDIR_ROOT/$(basename "$CONFIG" .py)/$tag"
  marker="$DONE_DIR/$tag.done"
  if [[ -f "$marker" ]]; then echo "== $wd: done already ($marker)"; continue; fi
  echo "== $wd"
  "$(dirname "$0")/run.sh" "$NAME" "python $SCRIPT --config $CONFIG$p --workdir $wd"
  if dry_run; then
    echo "#   then records $marker"
  else
    mkdir -p "$DONE_DIR" && date -u +%FT%TZ > "$marker"
  fi
done
