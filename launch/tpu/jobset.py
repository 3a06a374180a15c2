"""Runs training on GKE: writes a JobSet manifest (one Job per slice, one pod per TPU VM host) and applies it with
kubectl, or hands the same job to xpk.

  python launch/tpu/jobset.py --name=stts-4b --tpu=v5p --chips=64 --image=REGISTRY/stts-jax:TAG \\
      --config=configs/molmo2_4b_stts.py:scorer --workdir=gs://my-bucket/stts-4b \\
      -- --config.data.path=/gcs/my-data/video_qa --config.train.init_from=gs://my-bucket/Molmo2-4B-params
  python launch/tpu/jobset.py ... --slices=2          # multi-slice: 2 x v5p-128 over DCN (sets mesh.slices=2)
                                                       # (--chips counts one slice's chips)
  python launch/tpu/jobset.py ... --xpk_cluster=my-gke-cluster   # xpk workload create instead of kubectl
  python launch/tpu/jobset.py ... --dry_run           # write the manifest, print the kubectl / xpk line only

The image must hold this repository at --image_workdir (default /stts-jax) installed with its constraints
(`pip install -c constraints.txt -e '.[tpu]'`); the pod runs `python launch/train.py --multihost` there. On GKE,
jax.distributed finds its peers from what GKE's TPU webhook injects (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES); with
--slices > 1 the manifest also sets MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID (the Job's index) and
MEGASCALE_COORDINATOR_ADDRESS (slice 0's first pod), and passes --config.mesh.slices so the data axis spans the
slices. An evicted pod gets SIGTERM: the trainer saves a checkpoint (terminationGracePeriodSeconds leaves it
--grace_s seconds; a Spot preemption gives about 30 s whatever the setting, so a spot run may lose the steps since
its last periodic checkpoint) and the JobSet restarts (up to --max_restarts), resuming from --workdir. With
--xpk_cluster, xpk writes the JobSet: spot capacity and the grace period are then the xpk cluster's and xpk's
(`xpk cluster create --spot`), so --spot, --grace_s and --out are refused there.

Only the Python standard library is used, so it runs on a laptop without jax. The manifest is JSON-quoted YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from stts_jax import topology  # noqa: E402 (pure Python)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # a JobSet name leaves room for pod-name suffixes
BUCKET_PATH = re.compile(r"^gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9](/.*)?$")
MEGASCALE_PORT = 8080
SET_HERE = ("--config=", "--workdir=", "--multihost", "--config.mesh.slices")


def parse(argv: list[str]) -> argparse.Namespace:
    train_flags = []
    if "--" in argv:
        at = argv.index("--")
        argv, train_flags = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="launch/tpu/jobset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="JobSet / xpk workload name (lowercase letters, digits, hyphens)")
    p.add_argument("--tpu", choices=topology.GENERATIONS, help="TPU generation (with --chips)")
    p.add_argument("--chips", type=int, help="chips of ONE slice (with --tpu); e.g. --tpu=v5p --chips=64 is v5p-128")
    p.add_argument("--slices", type=int, default=1, help="slices joined over DCN (multi-slice); default 1")
    p.add_argument("--image", required=True, help="container image holding this repository, installed")
    p.add_argument("--image_workdir", default="/stts-jax", help="the repository's directory in the image")
    p.add_argument("--config", required=True, help="a config of this repository, path[:arg]")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH: checkpoints and logs; a run resumes from it")
    p.add_argument("--spot", action="store_true", help="schedule on Spot TPU node pools (cloud.google.com/gke-spot)")
    p.add_argument("--max_restarts", type=int, default=10, help="JobSet restarts after a failure or preemption")
    p.add_argument("--grace_s", type=int, default=None, help="seconds between SIGTERM and SIGKILL, for the "
                   "checkpoint (default 300; Spot preemption gives about 30 s)")
    p.add_argument("--out", help="where the manifest goes (default: ./NAME.jobset.yaml)")
    p.add_argument("--xpk_cluster", help="submit with `xpk workload create --cluster=...` instead of kubectl")
    p.add_argument("--dry_run", action="store_true", help="write the manifest, print the command instead of running it")
    args = p.parse_args(argv)
    args.train_flags = train_flags

    def refuse(message):
        p.error(message)  # usage + message on stderr, exit status 2

    if not NAME.match(args.name):
        refuse(f"--name={args.name!r}: lowercase letters, digits and hyphens, starting with a letter (max 40)")
    if args.tpu is None or args.chips is None:
        refuse("--tpu and --chips are required (the slice: generation and chips per slice)")
    try:
        topology.accelerator_type(args.tpu, args.chips)
    except ValueError as e:
        refuse(f"--chips={args.chips}: {e}")
    if args.slices < 1:
        refuse(f"--slices={args.slices}: must be >= 1")
    if args.chips < topology.CHIPS_PER_HOST and args.slices > 1:
        refuse(f"--slices={args.slices} needs multi-host slices (--chips >= {topology.CHIPS_PER_HOST})")
    if not BUCKET_PATH.match(args.workdir):
        refuse(f"--workdir={args.workdir!r} must be a bucket path gs://BUCKET/PATH (every pod writes there)")
    config_file = args.config.split(":")[0]
    if not (config_file.endswith(".py") and os.path.isfile(os.path.join(ROOT, config_file))):
        refuse(f"--config={args.config!r}: {config_file} is not a config file of this repository")
    if args.xpk_cluster:
        for flag, given in (("--spot", args.spot), ("--grace_s", args.grace_s is not None), ("--out", args.out)):
            if given:
                refuse(f"{flag} applies to the kubectl manifest; with --xpk_cluster, xpk writes the JobSet "
                       "(spot capacity is the xpk cluster's node pools: xpk cluster create --spot)")
    args.grace_s = 300 if args.grace_s is None else args.grace_s
    if args.max_restarts < 0 or args.grace_s < 0:
        refuse("--max_restarts and --grace_s must be >= 0")
    for flag in train_flags:
        if not flag.startswith("--"):
            refuse(f"train flag {flag!r} after -- must look like --name=value")
        if flag.startswith(SET_HERE):
            refuse(f"{flag!r} is set by jobset.py; use its own flags")
    return args


def train_command(args: argparse.Namespace) -> list[str]:
    """The trainer's argv in each pod."""
    cmd = ["python", "launch/train.py", f"--config={args.config}", f"--workdir={args.workdir}", "--multihost"]
    if args.slices > 1:
        cmd.append(f"--config.mesh.slices={args.slices}")
    return cmd + list(args.train_flags)


def manifest(args: argparse.Namespace) -> dict:
    """Returns the JobSet (jobset.x-k8s.io/v1alpha2): `slices` replicas of one indexed Job with a pod per host."""
    hosts = topology.hosts(args.chips)
    chips_per_pod = min(args.chips, topology.CHIPS_PER_HOST)
    node_selector = {"cloud.google.com/gke-tpu-accelerator": topology.GKE_ACCELERATOR[args.tpu],
                     "cloud.google.com/gke-tpu-topology": topology.topology_name(args.tpu, args.chips).split(":")[1]}
    if args.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
    env = [{"name": "JAX_PLATFORMS", "value": "tpu"}]
    if args.slices > 1:
        annotation = "metadata.annotations['jobset.sigs.k8s.io/{}']".format
        env += [{"name": "JOBSET_NAME", "valueFrom": {"fieldRef": {"fieldPath": annotation("jobset-name")}}},
                {"name": "REPLICATED_JOB_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": annotation("replicatedjob-name")}}},
                {"name": "MEGASCALE_NUM_SLICES", "value": str(args.slices)},
                {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {"fieldPath": annotation("job-index")}}},
                {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
                {"name": "MEGASCALE_COORDINATOR_ADDRESS",
                 "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"}]
    container = {"name": "train", "image": args.image, "workingDir": args.image_workdir,
                 "command": train_command(args), "env": env,
                 "ports": [{"containerPort": 8471}, {"containerPort": MEGASCALE_PORT}],
                 "resources": {"limits": {"google.com/tpu": chips_per_pod}}}
    pod = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
           "terminationGracePeriodSeconds": args.grace_s, "nodeSelector": node_selector, "containers": [container]}
    job = {"parallelism": hosts, "completions": hosts, "backoffLimit": 0, "completionMode": "Indexed",
           "template": {"spec": pod}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": args.name,
                         "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
            "spec": {"failurePolicy": {"maxRestarts": args.max_restarts},
                     "replicatedJobs": [{"name": "slice", "replicas": args.slices, "template": {"spec": job}}]}}


def to_yaml(value, indent: int = 0) -> str:
    """YAML block style for dicts / lists; plain keys bare, every scalar as JSON (valid YAML, strings quoted)."""
    pad = " " * indent

    def key_text(key):
        return key if re.match(r"^[A-Za-z][-A-Za-z0-9_./]*$", key) else json.dumps(key)

    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key_text(key)}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key_text(key)}: {json.dumps(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[indent + 2:]}")
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
        return "\n".join(lines)
    return pad + json.dumps(value)


def xpk_command(args: argparse.Namespace) -> list[str]:
    """The same job through xpk (it writes its own JobSet, MEGASCALE variables included)."""
    cmd = ["xpk", "workload", "create", f"--cluster={args.xpk_cluster}", f"--workload={args.name}",
           f"--tpu-type={topology.accelerator_type(args.tpu, args.chips)}", f"--num-slices={args.slices}",
           f"--docker-image={args.image}", f"--max-restarts={args.max_restarts}",
           f"--command=cd {shlex.quote(args.image_workdir)} && {shlex.join(train_command(args))}"]
    return cmd


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.xpk_cluster:
        cmd = xpk_command(args)
    else:
        out = args.out or f"{args.name}.jobset.yaml"
        with open(out, "w") as f:
            f.write(f"# launch/tpu/jobset.py: {args.slices} x {topology.accelerator_type(args.tpu, args.chips)}, "
                    f"{topology.hosts(args.chips)} pod(s) per slice\n" + to_yaml(manifest(args)) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        cmd = ["kubectl", "apply", "-f", out]
    if args.dry_run:
        print("+ " + shlex.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
