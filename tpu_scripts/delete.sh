#!/usr/bin/env bash
# Delete a TPU VM.  Usage: delete.sh NAME [ZONE]   (DRY_RUN=1: print the command)
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: delete.sh NAME [ZONE]}
ZONE=${2:-$ZONE}
tpu delete "$NAME" --zone "$ZONE" --quiet
