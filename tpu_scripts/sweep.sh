#!/usr/bin/env bash
# Cartesian sweep of config overrides, one workdir per point; points whose results.json exists
# are skipped, so rerunning resumes the sweep (each point also resumes from its checkpoints).
# Usage: sweep.sh NAME CONFIG 'key=v1,v2' ['key2=a,b' ...]
# Set SCRIPT (default experiments/train_diffusion.py) and WORKDIR_ROOT (default runs/sweeps).
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: sweep.sh NAME CONFIG key=v1,v2 ...}
CONFIG=${2:?usage: sweep.sh NAME CONFIG key=v1,v2 ...}
shift 2
SCRIPT=${SCRIPT:-experiments/train_diffusion.py}
WORKDIR_ROOT=${WORKDIR_ROOT:-runs/sweeps}
points=("")
for spec in "$@"; do
  key=${spec%%=*}; IFS=',' read -r -a vals <<< "${spec#*=}"
  next=()
  for p in "${points[@]}"; do for v in "${vals[@]}"; do next+=("$p --config.$key=$v"); done; done
  points=("${next[@]}")
done
for p in "${points[@]}"; do
  tag=$(echo "$p" | sed -e 's/--config\.//g' -e 's/[^A-Za-z0-9.=_-]/_/g' -e 's/^_*//')
  wd="$WORKDIR_ROOT/$(basename "$CONFIG" .py)/${tag:-default}"
  echo "== $wd"
  "$(dirname "$0")/run.sh" "$NAME" \
    "if [ -f $wd/results.json ]; then echo done already; else python $SCRIPT --config $CONFIG $p --workdir $wd; fi"
done
