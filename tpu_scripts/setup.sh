#!/usr/bin/env bash
# Copy this checkout (its HEAD commit) to every worker and install jaxrob with TPU JAX.
# Usage: setup.sh NAME [ZONE]   (DRY_RUN=1: print the commands)
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: setup.sh NAME [ZONE]}
ZONE=${2:-$ZONE}
ARCHIVE=${TMPDIR:-/tmp}/jaxrob-$$.tar.gz
run_or_show git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
tpu scp "$ARCHIVE" "$NAME":~/jaxrob.tar.gz --zone "$ZONE" --worker=all
tpu ssh "$NAME" --zone "$ZONE" --worker=all --command \
  'mkdir -p ~/jaxrob && tar -xzf ~/jaxrob.tar.gz -C ~/jaxrob && cd ~/jaxrob &&
   python3 -m pip install -q -U "jax[tpu]" && python3 -m pip install -q -e . &&
   python3 -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)"'
if ! dry_run; then rm -f "$ARCHIVE"; fi
