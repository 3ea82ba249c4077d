# Shared settings for the TPU scripts (sourced, not run).
set -euo pipefail
ZONE=${ZONE:-us-west4-a}
TPU_VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu() { gcloud compute tpus tpu-vm "$@" "${PROJECT_FLAG[@]}"; }
