#!/usr/bin/env bash
# Deletes a TPU VM slice, or a queued resource with its slices (stops billing; the workdir on the bucket stays).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu/delete.sh --name=NAME --zone=ZONE [--project=ID] [--queued] [--yes] [--dry_run]

  --queued   NAME is a queued resource (create.sh --queued or --slices): delete it and its TPU VMs (--force)
  --yes      do not ask gcloud for confirmation (--quiet)
  --dry_run  print the gcloud command line instead of running it"
BOOL_FLAGS="queued yes dry_run"
parse_flags "name zone project" "$@"
check_common
((${#EXTRA_ARGS[@]} == 0)) || usage_error "delete.sh takes no arguments after --"

location_args
if [[ ${FLAG_queued:-false} == true ]]; then
  cmd=(gcloud compute tpus queued-resources delete "$FLAG_name" "${LOCATION_ARGS[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$FLAG_name" "${LOCATION_ARGS[@]}")
fi
[[ ${FLAG_yes:-false} == true ]] && cmd+=(--quiet)
run "${cmd[@]}"
