#!/usr/bin/env bash
# Deletes a TPU VM slice (stops billing; the workdir on the bucket stays).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu/delete.sh --name=NAME --zone=ZONE [--project=ID] [--yes] [--dry_run]

  --yes      do not ask gcloud for confirmation (--quiet)
  --dry_run  print the gcloud command line instead of running it"
BOOL_FLAGS="yes dry_run"
parse_flags "name zone project" "$@"
check_common
((${#EXTRA_ARGS[@]} == 0)) || usage_error "delete.sh takes no arguments after --"

location_args
cmd=(gcloud compute tpus tpu-vm delete "$FLAG_name" "${LOCATION_ARGS[@]}")
[[ ${FLAG_yes:-false} == true ]] && cmd+=(--quiet)
run "${cmd[@]}"
