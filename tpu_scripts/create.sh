#!/usr/bin/env bash
# Create a TPU VM or pod slice.  Usage: create.sh NAME [ACCELERATOR] [ZONE]   (DRY_RUN=1: print)
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: create.sh NAME [ACCELERATOR] [ZONE]}
ACCEL=${2:-v5litepod-8}
ZONE=${3:-$ZONE}
tpu create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$TPU_VERSION" --spot
