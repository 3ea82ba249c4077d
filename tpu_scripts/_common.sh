# Shared settings for the TPU scripts (sourced, not run).
#
# DRY_RUN=1: print every gcloud (and git) command instead of running it, one per line, prefixed
# by "+ " and shell-quoted (paste-able); nothing is created, copied or written. The number of
# hosts of the VM / pod slice then comes from NUM_WORKERS (required: the describe call that
# would ask for it is printed, not run).
set -euo pipefail
ZONE=${ZONE:-us-west4-a}
TPU_VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}
DRY_RUN=${DRY_RUN:-0}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_ROOT=${LOG_ROOT:-$REPO_ROOT/logs}

dry_run() { [[ "$DRY_RUN" == 1 ]]; }
# Print a command as one shell-quoted line.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
# Run a command, or under DRY_RUN=1 print it.
run_or_show() { if dry_run; then show "$@"; else "$@"; fi; }
tpu() { run_or_show gcloud compute tpus tpu-vm "$@" "${PROJECT_FLAG[@]}"; }

# Number of hosts (workers) of TPU VM $1 in zone $2: $NUM_WORKERS, else one per network
# endpoint of `gcloud ... describe`.
num_workers() {
  local name=$1 zone=$2
  if [[ -n "${NUM_WORKERS:-}" ]]; then
    if ! [[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]]; then
      echo "NUM_WORKERS: expected a positive integer, got '$NUM_WORKERS'" >&2; return 2
    fi
    echo "$NUM_WORKERS"; return 0
  fi
  if dry_run; then
    show gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format=json \
      "${PROJECT_FLAG[@]}" >&2
    echo "DRY_RUN=1 needs NUM_WORKERS, the number of hosts of $name (1 for a single-host VM" \
         "such as v5litepod-8, 4 for v5litepod-16)" >&2
    return 2
  fi
  gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format=json \
    "${PROJECT_FLAG[@]}" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}
