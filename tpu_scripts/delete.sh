#!/usr/bin/env bash
# Delete a TPU VM.  Usage: delete.sh NAME [ZONE]
source "$(dirname "$0")/_common.sh"
NAME=${1:?usage: delete.sh NAME [ZONE]}
ZONE=${2:-$ZONE}
tpu delete "$NAME" --zone "$ZONE" --quiet
