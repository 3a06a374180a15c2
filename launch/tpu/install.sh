#!/usr/bin/env bash
# Installs the project on every worker of a TPU VM slice: Python 3.11 venv, `pip install -e '.[tpu]'` (jax[tpu]: libtpu)
# with constraints.txt, the exact set CI tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu/install.sh --name=NAME --zone=ZONE (--repo=URL [--ref=REF] | --source=DIR) [options]

  --name, --zone, --project   the slice (as given to create.sh)
  --slices=S                  a multi-slice queued resource: install on every worker of NAME-0 .. NAME-(S-1)
  --repo=URL                  git repository every worker clones (needs network access to it)
  --ref=REF                   branch, tag or commit to check out (default: main)
  --source=DIR                instead of --repo: ship DIR's committed HEAD (git archive) to every worker with scp
  --gcsfuse_bucket=BUCKET     also install Cloud Storage FUSE and mount BUCKET read-only at /gcs/BUCKET on every
                              worker (the prepared ArrayRecord data: its reader opens local files only, so train
                              with --config.data.path=/gcs/BUCKET/...); workdirs stay gs:// URLs
  --dry_run                   print the gcloud command lines instead of running them

Each worker gets \$HOME/stts-jax (the code) and \$HOME/stts-venv (Python 3.11, the project with its tpu extra,
pinned by the checkout's constraints.txt).
Example:
  launch/tpu/install.sh --name=stts-4b --zone=us-east5-a --source=."
BOOL_FLAGS="dry_run"
parse_flags "name zone project repo ref source gcsfuse_bucket slices" "$@"
check_common
check_slices
((${#EXTRA_ARGS[@]} == 0)) || usage_error "install.sh takes no arguments after --"
[[ -n ${FLAG_repo:-} || -n ${FLAG_source:-} ]] || usage_error "give --repo=URL or --source=DIR"
[[ -n ${FLAG_repo:-} && -n ${FLAG_source:-} ]] && usage_error "give --repo or --source, not both"
location_args
ref=${FLAG_ref:-main}
bucket=${FLAG_gcsfuse_bucket:-}
[[ -z $bucket || $bucket =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] \
  || usage_error "--gcsfuse_bucket='$bucket' is not a bucket name (lowercase letters, digits, -, _ and .; no gs://)"
[[ $ref =~ ^[A-Za-z0-9._/-]+$ ]] || usage_error "--ref='$ref' is not a git ref"

if [[ -n ${FLAG_source:-} ]]; then
  [[ -d $FLAG_source ]] || usage_error "--source='$FLAG_source' is not a directory"
  git -C "$FLAG_source" rev-parse --verify -q HEAD >/dev/null || usage_error "--source='$FLAG_source' is not a git checkout with a commit"
  tarball=${TMPDIR:-/tmp}/stts-jax-$FLAG_name.tar.gz
  run git -C "$FLAG_source" archive --format=tar.gz --prefix=stts-jax/ -o "$tarball" HEAD
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm scp "$tarball" "$node:stts-jax.tar.gz" --worker=all "${LOCATION_ARGS[@]}"
  done
  fetch='rm -rf "$HOME/stts-jax" && tar -xzf "$HOME/stts-jax.tar.gz" -C "$HOME"'
else
  repo_q=$(quote "$FLAG_repo")
  ref_q=$(quote "$ref")
  fetch="rm -rf \"\$HOME/stts-jax\" && git clone -q $repo_q \"\$HOME/stts-jax\" && git -C \"\$HOME/stts-jax\" checkout -q $ref_q"
fi

# Runs on every worker (Ubuntu TPU VM images; Python 3.11 from the distribution's packages).
remote="set -euo pipefail; \
sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv git; \
$fetch; \
python3.11 -m venv \"\$HOME/stts-venv\"; \
\"\$HOME/stts-venv/bin/pip\" install -q -U pip; \
\"\$HOME/stts-venv/bin/pip\" install -q -c \"\$HOME/stts-jax/constraints.txt\" -e \"\$HOME/stts-jax[tpu]\"; \
\"\$HOME/stts-venv/bin/python\" -c 'import stts_jax, jax; print(\"installed jax\", jax.__version__)'"
if [[ -n $bucket ]]; then  # Google's gcsfuse apt repository, then a read-only mount (kept until the VM restarts)
  remote="$remote; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; \
sudo mkdir -p /gcs/$bucket && sudo chown \"\$USER\" /gcs/$bucket; \
mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs -o ro $bucket /gcs/$bucket; \
ls /gcs/$bucket >/dev/null && echo mounted gs://$bucket at /gcs/$bucket"
fi

for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${LOCATION_ARGS[@]}" "--command=$remote"
done
