#!/usr/bin/env bash
# Starts launch/train.py --multihost on every worker of a TPU VM slice, or of every slice of a multi-slice queued
# resource (jax.distributed finds its peers itself: on multi-slice TPU VMs from the MEGASCALE_* values of their
# tpu-env metadata).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu/train.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/PATH [options] [-- TRAIN_FLAGS]

  --name, --zone, --project   the slice (as given to create.sh and install.sh)
  --slices=S                  multi-slice (create.sh --slices=S): start on NAME-0 .. NAME-(S-1) and pass
                              --config.mesh.slices=S (the data axis spans the slices over DCN)
  --config=CONFIG             a config of this repository, path[:arg] (e.g. configs/molmo2_4b_stts.py:scorer)
  --workdir=gs://BUCKET/PATH  checkpoints, metrics.jsonl, TensorBoard; a run resumes from it
  --log=PATH                  each worker's stdout/stderr (default: \$HOME/stts-train.log on the worker)
  --foreground                stay attached and stream every worker's output (default: start detached)
  --dry_run                   print the gcloud command line instead of running it
  -- TRAIN_FLAGS              passed on to launch/train.py, e.g. --config.data.path=... --config.train.init_from=...

Example:
  launch/tpu/train.sh --name=stts-4b --zone=us-east5-a --config=configs/molmo2_4b_stts.py:scorer \\
      --workdir=gs://my-bucket/stts-4b -- --config.data.path=/data/video_qa --config.train.init_from=/data/Molmo2-4B"
BOOL_FLAGS="foreground dry_run"
parse_flags "name zone project config workdir log slices" "$@"
check_common
check_slices
require config workdir
[[ $FLAG_workdir =~ ^gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9](/.*)?$ ]] ||
  usage_error "--workdir='$FLAG_workdir' must be a bucket path gs://BUCKET/PATH (every worker writes there)"
config_file=${FLAG_config%%:*}
[[ $config_file == *.py && -f $REPO_ROOT/$config_file ]] ||
  usage_error "--config='$FLAG_config': $config_file is not a config file of this repository"
for arg in "${EXTRA_ARGS[@]}"; do
  [[ $arg == --* ]] || usage_error "train flag '$arg' after -- must look like --name=value"
  case $arg in --config=* | --workdir=* | --multihost* | --config.mesh.slices*)
    usage_error "'$arg' is set by train.sh; use its own flags" ;;
  esac
done
location_args

# the interpreter path expands on the worker; every other word is quoted as given
train_args=(launch/train.py "--config=$FLAG_config" "--workdir=$FLAG_workdir" --multihost)
((SLICES > 1)) && train_args+=("--config.mesh.slices=$SLICES")
train_cmd="\"\$HOME/stts-venv/bin/python\" $(quote_all "${train_args[@]}" "${EXTRA_ARGS[@]}")"
if [[ ${FLAG_foreground:-false} == true ]]; then
  remote="cd \"\$HOME/stts-jax\" && $train_cmd 2>&1"
else
  if [[ -n ${FLAG_log:-} ]]; then log=$(quote "$FLAG_log"); else log='"$HOME/stts-train.log"'; fi
  remote="cd \"\$HOME/stts-jax\" && (setsid nohup $train_cmd > $log 2>&1 < /dev/null &) && echo started on \"\$(hostname)\", log $log"
fi
pids=()
started=()
for node in "${NODES[@]}"; do
  if [[ ${FLAG_foreground:-false} == true && ${FLAG_dry_run:-false} != true ]] && ((SLICES > 1)); then
    run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${LOCATION_ARGS[@]}" "--command=$remote" &
    pids+=($!)  # every slice attached at once (each waits for the others in jax.distributed)
  elif run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${LOCATION_ARGS[@]}" "--command=$remote"; then
    started+=("$node")
  else
    status=$?
    if ((${#started[@]})); then  # the started slices would wait for this one in jax.distributed: say so
      printf 'error: starting on %s failed (exit %s); already started on: %s. Stop them with:\n' \
        "$node" "$status" "${started[*]}" >&2
      for done_node in "${started[@]}"; do
        printf '  %s\n' "$(quote_all gcloud compute tpus tpu-vm ssh "$done_node" --worker=all "${LOCATION_ARGS[@]}" \
          "--command=pkill -f launch/train.py")" >&2
      done
    fi
    exit "$status"
  fi
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
exit $status
