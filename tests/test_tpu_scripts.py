"""launch/tpu/*.sh: argument handling and the exact gcloud command lines (--dry_run; nothing reaches GCP).

The remote command train.sh builds is also executed here, with a stub interpreter under a temporary $HOME, to
check that every train flag arrives as one argument however it is quoted.
"""

import os
import shlex
import stat
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TPU = os.path.join(ROOT, "launch", "tpu")
SLICE = ["--name=stts-4b", "--zone=us-east5-a", "--project=my-project"]
LOCATION = ["--zone=us-east5-a", "--project=my-project"]


# Every script runs with a `gcloud` first on PATH that refuses, so no test can reach a real gcloud.
_NO_GCLOUD = tempfile.mkdtemp(prefix="no_gcloud_")
with open(os.path.join(_NO_GCLOUD, "gcloud"), "w") as _f:
    _f.write('#!/usr/bin/env bash\necho "test called the real gcloud: $*" >&2\nexit 97\n')
os.chmod(os.path.join(_NO_GCLOUD, "gcloud"), 0o755)
SAFE_ENV = dict(os.environ, PATH=f"{_NO_GCLOUD}:{os.environ['PATH']}")


def script(name, *args, env=None):
    return subprocess.run(["bash", os.path.join(TPU, name), *args], capture_output=True, text=True, timeout=30,
                          env=env or SAFE_ENV, cwd=ROOT)


def dry_run(name, *args) -> list[list[str]]:
    """Returns the command lines a script prints with --dry_run, each split into argv."""
    out = script(name, "--dry_run", *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), out.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_command(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


def test_create_builds_the_gcloud_line():
    (argv,) = dry_run("create.sh", *SLICE, "--tpu=v5p", "--chips=64", "--spot")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "stts-4b", *LOCATION,
                    "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"]
    (argv,) = dry_run("create.sh", "--name", "pod", "--zone", "us-west4-a", "--accelerator", "v5litepod-64")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-west4-a",
                    "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]
    (argv,) = dry_run("create.sh", *SLICE, "--tpu=v6e", "--chips=256", "--version=custom-runtime")
    assert argv[-2:] == ["--accelerator-type=v6e-256", "--version=custom-runtime"]


@pytest.mark.parametrize("args, message", [
    (["--zone=us-east5-a", "--tpu=v5p", "--chips=8"], "--name is required"),
    (["--name=pod", "--tpu=v5p", "--chips=8"], "--zone is required"),
    (["--name=Pod_1", "--zone=us-east5-a", "--tpu=v5p", "--chips=8"], "--name='Pod_1'"),
    (["--name=pod", "--zone=useast", "--tpu=v5p", "--chips=8"], "--zone='useast'"),
    (["--name=pod", "--zone=us-east5-a", "--tpu=v5p"], "--chips is required"),
    (["--name=pod", "--zone=us-east5-a", "--tpu=v7", "--chips=8"], "--tpu='v7'"),
    (["--name=pod", "--zone=us-east5-a", "--tpu=v5p", "--chips=eight"], "--chips='eight'"),
    (["--name=pod", "--zone=us-east5-a", "--accelerator=v5p-8", "--chips=4"], "not both"),
    (["--name=pod", "--zone=us-east5-a", "--accelerator=a100-8"], "--accelerator='a100-8'"),
    (["--name=pod", "--zone=us-east5-a", "--accelerator=v5p-8", "--colour=red"], "unknown flag --colour"),
    (["--name=pod", "--zone=us-east5-a", "--accelerator"], "--accelerator needs a value"),
    (["--name=pod", "--zone=us-east5-a", "--accelerator=v5p-8", "--spot=maybe"], "--spot takes true or false"),
    (["pod"], "unexpected argument 'pod'"),
])
def test_create_refuses_bad_arguments_with_usage(args, message):
    out = script("create.sh", "--dry_run", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and "usage: launch/tpu/create.sh" in out.stderr, out.stderr


def test_help_and_delete():
    out = script("delete.sh", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: launch/tpu/delete.sh")
    (argv,) = dry_run("delete.sh", *SLICE, "--yes")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "stts-4b", *LOCATION, "--quiet"]
    (argv,) = dry_run("delete.sh", "--name=stts-4b", "--zone=us-east5-a")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "stts-4b", "--zone=us-east5-a"]
    out = script("delete.sh", "--name=stts-4b", "--dry_run")
    assert out.returncode == 2 and "--zone is required" in out.stderr


def test_install_ships_the_checkout_or_clones_a_repo(tmp_path):
    archive, scp, ssh = dry_run("install.sh", *SLICE, f"--source={ROOT}")
    tarball = archive[archive.index("-o") + 1]
    assert archive[:3] == ["git", "-C", ROOT] and archive[-1] == "HEAD" and "--prefix=stts-jax/" in archive
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "stts-4b:stts-jax.tar.gz", "--worker=all",
                   *LOCATION]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "stts-4b", "--worker=all"]
    remote = remote_command(ssh)
    for step in ['tar -xzf "$HOME/stts-jax.tar.gz"', 'python3.11 -m venv "$HOME/stts-venv"',
                 'pip" install -q -c "$HOME/stts-jax/constraints.txt" -e "$HOME/stts-jax[tpu]"']:
        assert step in remote, remote
    (ssh,) = dry_run("install.sh", *SLICE, "--repo=https://example.org/stts-jax.git", "--ref=v1.2")
    assert 'git clone -q https://example.org/stts-jax.git "$HOME/stts-jax"' in remote_command(ssh)
    assert "checkout -q v1.2" in remote_command(ssh)
    assert "gcsfuse" not in remote_command(ssh)
    (ssh,) = dry_run("install.sh", *SLICE, "--repo=https://example.org/stts-jax.git", "--gcsfuse_bucket=my-data")
    remote = remote_command(ssh)
    assert remote.index("stts-venv/bin/pip") < remote.index("apt-get install -y -qq gcsfuse")
    assert "mountpoint -q /gcs/my-data || gcsfuse --implicit-dirs -o ro my-data /gcs/my-data" in remote, remote
    for args, message in [([], "give --repo=URL or --source=DIR"),
                          (["--repo=x", "--gcsfuse_bucket=gs://my-data"], "is not a bucket name"),
                          (["--repo=x", "--gcsfuse_bucket=a;rm"], "is not a bucket name"),
                          (["--repo=x", f"--source={ROOT}"], "not both"),
                          ([f"--source={tmp_path}"], "not a git checkout"),
                          (["--repo=x", "--ref=a;rm"], "--ref='a;rm'")]:
        out = script("install.sh", "--dry_run", *SLICE, *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def fake_home(tmp_path):
    """A $HOME with stts-jax/ and a stub stts-venv/bin/python that records its arguments, one per line."""
    home = tmp_path / "home"
    (home / "stts-jax").mkdir(parents=True)
    python = home / "stts-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$HOME/argv.tmp"\n'
                      'mv "$HOME/argv.tmp" "$HOME/argv"\necho training\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return home


TRAIN = [*SLICE, "--config=configs/molmo2_4b_stts.py:scorer", "--workdir=gs://my-bucket/runs/stts-4b"]
EXTRA = ["--config.data.path=/data/video qa", "--config.train.init_from=/data/Molmo2-4B", "--config.optim.lr_llm=2e-5",
         "--config.train.steps=it's"]


def test_train_starts_the_trainer_on_every_worker_with_exact_arguments(tmp_path):
    home = fake_home(tmp_path)
    want = [str(home / "stts-jax"), "launch/train.py", "--config=configs/molmo2_4b_stts.py:scorer",
            "--workdir=gs://my-bucket/runs/stts-4b", "--multihost", *EXTRA]
    env = dict(SAFE_ENV, HOME=str(home))
    # attached: the remote command runs the trainer in the foreground
    (ssh,) = dry_run("train.sh", *TRAIN, "--foreground", "--", *EXTRA)
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "stts-4b", "--worker=all"]
    assert ssh[7:9] == LOCATION
    out = subprocess.run(["bash", "-c", remote_command(ssh)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "training\n", out.stderr
    assert (home / "argv").read_text().splitlines() == want
    # detached (default): setsid nohup in the background, output to the log, the ssh returns at once
    (home / "argv").unlink()
    (ssh,) = dry_run("train.sh", *TRAIN, "--log=/tmp/x y/train.log", "--", *EXTRA)
    assert "setsid nohup" in remote_command(ssh) and "> '/tmp/x y/train.log'" in remote_command(ssh)
    (ssh,) = dry_run("train.sh", *TRAIN, "--", *EXTRA)
    out = subprocess.run(["bash", "-c", remote_command(ssh)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("started on "), out.stderr
    deadline = time.time() + 20
    while not (home / "argv").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (home / "argv").read_text().splitlines() == want
    deadline = time.time() + 20
    while "training" not in (home / "stts-train.log").read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert (home / "stts-train.log").read_text() == "training\n"


@pytest.mark.parametrize("args, message", [
    (SLICE + ["--workdir=gs://my-bucket/x"], "--config is required"),
    (SLICE + ["--config=configs/tiny_train.py"], "--workdir is required"),
    (SLICE + ["--config=configs/tiny_train.py", "--workdir=/local/dir"], "must be a bucket path"),
    (SLICE + ["--config=configs/nope.py:x", "--workdir=gs://my-bucket/x"], "configs/nope.py is not a config file"),
    (TRAIN + ["--", "--workdir=gs://other/x"], "is set by train.sh"),
    (TRAIN + ["--", "--multihost=false"], "is set by train.sh"),
    (TRAIN + ["--", "steps=3"], "must look like --name=value"),
])
def test_train_refuses_bad_arguments(args, message):
    out = script("train.sh", "--dry_run", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_without_dry_run_the_same_commands_run(tmp_path):
    """A stub `gcloud` first on PATH records what the scripts really execute."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$GCLOUD_LOG"\nprintf "\\n" >> "$GCLOUD_LOG"\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    env = dict(SAFE_ENV, PATH=f"{bin_dir}:{SAFE_ENV['PATH']}", GCLOUD_LOG=str(log))
    for name, args in [("create.sh", [*SLICE, "--tpu=v5p", "--chips=8"]), ("train.sh", TRAIN + ["--", *EXTRA]),
                       ("delete.sh", [*SLICE, "--yes"])]:
        log.write_text("")
        out = script(name, *args, env=env)
        assert out.returncode == 0, out.stderr
        ran = [line.split("\0")[:-1] for line in log.read_text().splitlines()]
        assert ran == [argv[1:] for argv in dry_run(name, *args)], name


def test_queued_resources_spot_and_multi_slice():
    (argv,) = dry_run("create.sh", *SLICE, "--tpu=v5p", "--chips=64", "--queued", "--spot")
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "stts-4b", "--node-id=stts-4b",
                    *LOCATION, "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"]
    (argv,) = dry_run("create.sh", *SLICE, "--tpu=v5p", "--chips=32", "--slices=2", "--valid_until=6h")
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "stts-4b", "--node-count=2",
                    "--node-prefix=stts-4b", *LOCATION, "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
                    "--valid-until-duration=6h"]
    (argv,) = dry_run("delete.sh", *SLICE, "--queued", "--yes")
    assert argv == ["gcloud", "compute", "tpus", "queued-resources", "delete", "stts-4b", *LOCATION, "--force",
                    "--quiet"]
    # every slice's workers get the code and the trainer, which learns the slice count
    _, scp0, scp1, ssh0, ssh1 = dry_run("install.sh", *SLICE, "--slices=2", f"--source={ROOT}")
    assert [scp0[4], scp0[6], scp1[6]] == ["scp", "stts-4b-0:stts-jax.tar.gz", "stts-4b-1:stts-jax.tar.gz"]
    assert [ssh0[4:6], ssh1[4:6]] == [["ssh", "stts-4b-0"], ["ssh", "stts-4b-1"]]
    assert remote_command(ssh0) == remote_command(ssh1)
    ssh0, ssh1 = dry_run("train.sh", *TRAIN, "--slices=2", "--", *EXTRA)
    assert ssh0[5] == "stts-4b-0" and ssh1[5] == "stts-4b-1" and remote_command(ssh0) == remote_command(ssh1)
    assert "--multihost --config.mesh.slices=2 " in remote_command(ssh0)
    for name, args, message in [
            ("create.sh", ["--tpu=v5p", "--chips=8", "--valid_until=6h"], "--valid_until applies to a queued"),
            ("create.sh", ["--tpu=v5p", "--chips=8", "--queued", "--valid_until=soon"], "a duration like 6h"),
            ("create.sh", ["--tpu=v5p", "--chips=8", "--slices=0"], "--slices='0' must be a positive integer"),
            ("train.sh", TRAIN[3:] + ["--", "--config.mesh.slices=4"], "is set by train.sh"),
            ("create.sh", ["--tpu=v5p", "--chips=48"], "--chips=48: TPU slices are powers of two"),
            ("create.sh", ["--tpu=v5p", "--chips=2"], "the smallest v5p slice has 4 chips"),
            ("create.sh", ["--name=" + "a" * 62, "--tpu=v5p", "--chips=8", "--slices=2"], "is too long for 2 slices")]:
        out = script(name, "--dry_run", *SLICE, *args)
        assert out.returncode == 2 and message in out.stderr, (name, args, out.stderr)


def test_multi_slice_foreground_attaches_every_slice_at_once(tmp_path):
    """--foreground on 2 slices: both ssh sessions run concurrently (a stub gcloud that waits for the other's
    start marker would hang if they ran one after the other), and a failing slice fails the command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nnode=$5\ntouch "$MARKS/$node"\n'
                      'for i in $(seq 100); do [[ -e $MARKS/stts-4b-0 && -e $MARKS/stts-4b-1 ]] && break; sleep 0.1; done\n'
                      '[[ -e $MARKS/stts-4b-0 && -e $MARKS/stts-4b-1 ]] || exit 3\n[[ $node != "$FAIL" ]]\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    for fail, status in [("none", 0), ("stts-4b-1", 1)]:
        marks = tmp_path / f"marks-{fail}"
        marks.mkdir()
        env = dict(SAFE_ENV, PATH=f"{bin_dir}:{SAFE_ENV['PATH']}", MARKS=str(marks), FAIL=fail)
        out = script("train.sh", *TRAIN, "--slices=2", "--foreground", env=env)
        assert out.returncode == status, (fail, out.stderr)
        assert sorted(os.listdir(marks)) == ["stts-4b-0", "stts-4b-1"]


def test_detached_multi_slice_start_that_fails_names_the_started_slices(tmp_path):
    """Detached, slices start one after another; when slice 1's ssh fails, the command fails and tells how to stop
    the trainer already started on slice 0 (it would wait for its peers)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\n[[ $5 != stts-4b-1 ]] || exit 255\n')
    (bin_dir / "gcloud").chmod(0o755)
    out = script("train.sh", *TRAIN, "--slices=2", env=dict(SAFE_ENV, PATH=f"{bin_dir}:{SAFE_ENV['PATH']}"))
    assert out.returncode == 255, out.stderr
    assert "starting on stts-4b-1 failed (exit 255); already started on: stts-4b-0" in out.stderr, out.stderr
    (stop,) = [line.strip() for line in out.stderr.splitlines() if line.startswith("  gcloud")]
    assert shlex.split(stop) == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "stts-4b-0", "--worker=all", *LOCATION,
                                 "--command=pkill -f launch/train.py"]


JOBSET = [os.path.join(TPU, "jobset.py"), "--name=stts-4b", "--tpu=v5p", "--chips=64",
          "--image=us-docker.pkg.dev/my-project/stts/stts-jax:1", "--config=configs/molmo2_4b_stts.py:scorer",
          "--workdir=gs://my-bucket/runs/stts-4b"]


def jobset(*args, env=None):
    return subprocess.run([sys.executable, *JOBSET, *args], capture_output=True, text=True, timeout=60,
                          env=env or SAFE_ENV, cwd=ROOT)


def test_jobset_manifest_for_one_and_two_slices(tmp_path):
    import yaml

    want_cmd = ["python", "launch/train.py", "--config=configs/molmo2_4b_stts.py:scorer",
                "--workdir=gs://my-bucket/runs/stts-4b", "--multihost"]
    for slices in (1, 2):
        out_file = tmp_path / f"s{slices}.yaml"
        out = jobset(f"--slices={slices}", f"--out={out_file}", "--spot", "--dry_run", "--", *EXTRA)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"+ kubectl apply -f {out_file}\n"
        js = yaml.safe_load(out_file.read_text())
        assert (js["apiVersion"], js["kind"], js["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet",
                                                                           "stts-4b")
        (rjob,) = js["spec"]["replicatedJobs"]
        job = rjob["template"]["spec"]
        pod = job["template"]["spec"]
        (container,) = pod["containers"]
        assert rjob["replicas"] == slices and job["parallelism"] == job["completions"] == 16  # v5p-128: 16 hosts
        assert job["completionMode"] == "Indexed" and pod["restartPolicy"] == "Never"
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                       "cloud.google.com/gke-tpu-topology": "4x4x4", "cloud.google.com/gke-spot": "true"}
        assert container["resources"]["limits"] == {"google.com/tpu": 4}
        assert pod["terminationGracePeriodSeconds"] == 300 and js["spec"]["failurePolicy"]["maxRestarts"] == 10
        assert container["workingDir"] == "/stts-jax"
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        if slices == 1:
            assert container["command"] == want_cmd + EXTRA  # quoting survives: one argv entry per flag
            assert not any(k.startswith("MEGASCALE") for k in env)
        else:
            assert container["command"] == want_cmd + ["--config.mesh.slices=2"] + EXTRA
            assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_PORT"] == "8080"
            assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {
                "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
            assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
    # the same job through xpk, and both commands really executed when not a dry run
    out = jobset("--slices=2", "--xpk_cluster=my-cluster", "--dry_run", "--", *EXTRA)
    (line,) = out.stdout.splitlines()
    argv = shlex.split(line[2:])
    assert argv[:7] == ["xpk", "workload", "create", "--cluster=my-cluster", "--workload=stts-4b",
                        "--tpu-type=v5p-128", "--num-slices=2"]
    command = argv[-1][len("--command="):]
    assert shlex.split(command) == ["cd", "/stts-jax", "&&", *want_cmd, "--config.mesh.slices=2", *EXTRA]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kubectl", "xpk"):
        (bin_dir / tool).write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$0" "$@" > "$LOG"\n')
        (bin_dir / tool).chmod(0o755)
    env = dict(SAFE_ENV, PATH=f"{bin_dir}:{SAFE_ENV['PATH']}", LOG=str(tmp_path / "ran"))
    for args, want in [([f"--out={tmp_path / 'r.yaml'}"], ["kubectl", "apply", "-f", str(tmp_path / "r.yaml")]),
                       (["--xpk_cluster=my-cluster", "--slices=2", "--", *EXTRA], argv)]:
        out = jobset(*args, env=env)
        assert out.returncode == 0, out.stderr
        ran = (tmp_path / "ran").read_text().split("\0")[:-1]
        assert [os.path.basename(ran[0])] + ran[1:] == want


@pytest.mark.parametrize("args, message", [
    (["--chips=48"], "--chips=48: 48 chips: TPU slices here are powers of two"),
    (["--slices=0"], "--slices=0: must be >= 1"),
    (["--workdir=/local/run"], "must be a bucket path"),
    (["--name=Stts_4b"], "--name='Stts_4b'"),
    (["--config=configs/nope.py"], "configs/nope.py is not a config file"),
    (["--", "--config.mesh.slices=2"], "is set by jobset.py"),
    (["--", "steps=3"], "must look like --name=value"),
    (["--chips=2"], "the smallest v5p slice has 4 chips"),
    (["--xpk_cluster=c", "--spot"], "--spot applies to the kubectl manifest"),
    (["--xpk_cluster=c", "--grace_s=600"], "--grace_s applies to the kubectl manifest"),
])
def test_jobset_refuses_bad_arguments(args, message, tmp_path):
    out = jobset(*args, f"--out={tmp_path / 'x.yaml'}", "--dry_run")
    assert out.returncode == 2 and message in out.stderr and "usage: launch/tpu/jobset.py" in out.stderr, out.stderr
    assert not (tmp_path / "x.yaml").exists()
