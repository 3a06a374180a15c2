#!/usr/bin/env bash
# Creates a TPU VM slice (all its workers) with gcloud, directly or as a queued resource (one or several slices).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu/create.sh --name=NAME --zone=ZONE (--accelerator=TYPE | --tpu=GEN --chips=N) [options]

  --name=NAME           TPU VM name (lowercase letters, digits, hyphens)
  --zone=ZONE           e.g. us-east5-a (where the accelerator type is offered)
  --project=ID          GCP project (default: gcloud's configured project)
  --accelerator=TYPE    e.g. v5p-128, v5litepod-64, v6e-256, v4-32 (gcloud's accelerator type)
  --tpu=GEN --chips=N   the same by chip count: v5p|v5e|v6e|v4 and N chips (v5p/v4 types count 2 cores per chip)
  --version=RUNTIME     TPU VM runtime (default by generation: v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                        v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
  --spot                spot capacity (preemptible; the trainer checkpoints on SIGTERM)
  --queued              request it as a queued resource NAME (waits in Cloud TPU's queue for capacity; the
                        recommended way for spot and large slices); its TPU VM is NAME
  --slices=S            multi-slice: S slices of that type joined over DCN, a queued resource NAME whose TPU VMs
                        are NAME-0 .. NAME-(S-1) (implies --queued; train with train.sh --slices=S)
  --valid_until=DUR     queued only: give up if not provisioned within DUR (e.g. 6h, 2d)
  --dry_run             print the gcloud command line instead of running it

Examples (64 v5p chips = v5p-128; two v5p-64 slices on spot capacity):
  launch/tpu/create.sh --name=stts-4b --zone=us-east5-a --project=my-proj --tpu=v5p --chips=64
  launch/tpu/create.sh --name=stts-ms --zone=us-east5-a --tpu=v5p --chips=32 --slices=2 --spot"
BOOL_FLAGS="spot queued dry_run"
parse_flags "name zone project accelerator tpu chips version slices valid_until" "$@"
check_common
check_slices
((${#EXTRA_ARGS[@]} == 0)) || usage_error "create.sh takes no arguments after --"

if [[ -n ${FLAG_accelerator:-} ]]; then
  [[ -z ${FLAG_tpu:-}${FLAG_chips:-} ]] || usage_error "give --accelerator or --tpu/--chips, not both"
  accelerator=$FLAG_accelerator
else
  require tpu chips
  [[ $FLAG_chips =~ ^[1-9][0-9]*$ ]] || usage_error "--chips='$FLAG_chips' must be a positive integer"
  ((FLAG_chips & (FLAG_chips - 1))) && usage_error "--chips=$FLAG_chips: TPU slices are powers of two"
  [[ $FLAG_tpu == v5p || $FLAG_tpu == v4 ]] && ((FLAG_chips < 4)) &&
    usage_error "--chips=$FLAG_chips: the smallest $FLAG_tpu slice has 4 chips"
  # (stts_jax/topology.py accelerator_type is the same mapping in Python, for launch/tpu/jobset.py)
  case $FLAG_tpu in
    v5p) accelerator="v5p-$((FLAG_chips * 2))" ;;
    v4) accelerator="v4-$((FLAG_chips * 2))" ;;
    v5e) accelerator="v5litepod-$FLAG_chips" ;;
    v6e) accelerator="v6e-$FLAG_chips" ;;
    *) usage_error "--tpu='$FLAG_tpu': choose v5p, v5e, v6e or v4" ;;
  esac
fi
[[ $accelerator =~ ^(v4|v5p|v5litepod|v6e)-[1-9][0-9]*$ ]] ||
  usage_error "--accelerator='$accelerator': expected v4-N, v5p-N, v5litepod-N or v6e-N"

if [[ -n ${FLAG_version:-} ]]; then
  version=$FLAG_version
else
  case ${accelerator%%-*} in
    v5p) version=v2-alpha-tpuv5 ;;
    v5litepod) version=v2-alpha-tpuv5-lite ;;
    v6e) version=v2-alpha-tpuv6e ;;
    v4) version=tpu-ubuntu2204-base ;;
  esac
fi

queued=${FLAG_queued:-false}
((SLICES > 1)) && queued=true
if [[ -n ${FLAG_valid_until:-} ]]; then
  [[ $queued == true ]] || usage_error "--valid_until applies to a queued resource (--queued or --slices)"
  [[ $FLAG_valid_until =~ ^[1-9][0-9]*[smhd]$ ]] || usage_error "--valid_until='$FLAG_valid_until': a duration like 6h or 2d"
fi

location_args
if [[ $queued == true ]]; then
  cmd=(gcloud compute tpus queued-resources create "$FLAG_name")
  if ((SLICES > 1)); then
    cmd+=("--node-count=$SLICES" "--node-prefix=$FLAG_name")
  else
    cmd+=("--node-id=$FLAG_name")
  fi
  cmd+=("${LOCATION_ARGS[@]}" "--accelerator-type=$accelerator" "--runtime-version=$version")
  [[ -n ${FLAG_valid_until:-} ]] && cmd+=("--valid-until-duration=$FLAG_valid_until")
else
  cmd=(gcloud compute tpus tpu-vm create "$FLAG_name" "${LOCATION_ARGS[@]}" "--accelerator-type=$accelerator"
    "--version=$version")
fi
[[ ${FLAG_spot:-false} == true ]] && cmd+=(--spot)
run "${cmd[@]}"
