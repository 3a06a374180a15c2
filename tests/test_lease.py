"""The exclusive workdir lease: a second job on a live workdir is refused naming the holder; a dead or silent
holder's lease is taken over; the heartbeat moves; the trainer holds it for the run and gives it back."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from stts_jax.train.lease import LEASE_FILE, Lease, WorkdirBusy

ROOT = os.path.join(os.path.dirname(__file__), "..")
HOLD = ("import sys, time\nfrom stts_jax.train.lease import Lease\nLease(sys.argv[1], heartbeat_s=0.2, stale_s=60)"
        ".acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def hold_in_another_process(workdir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path):
    proc = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(WorkdirBusy, match=rf"host '{socket.gethostname()}', pid {proc.pid}.*another --workdir"):
            Lease(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.load(open(tmp_path / LEASE_FILE))["pid"] == proc.pid  # a killed job leaves its lease behind
    with Lease(str(tmp_path)) as lease:  # its pid is gone on this host: taken over
        assert json.load(open(tmp_path / LEASE_FILE))["pid"] == os.getpid() == lease.me["pid"]
    assert not os.path.exists(tmp_path / LEASE_FILE)  # released


@pytest.mark.parametrize("age, taken", [(5.0, False), (120.0, True)])
def test_another_hosts_lease_is_stale_only_once_its_heartbeat_is_old(tmp_path, age, taken):
    now = time.time()
    other = dict(host="another-host-xyz", pid=1234, started=now - 3600, heartbeat=now - age)
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    lease = Lease(str(tmp_path), heartbeat_s=1.0, stale_s=60.0)
    if taken:
        lease.acquire()
        assert json.load(open(tmp_path / LEASE_FILE))["host"] == socket.gethostname()
        lease.release()
    else:
        with pytest.raises(WorkdirBusy, match="another-host-xyz.*pid 1234"):
            lease.acquire()
        assert json.load(open(tmp_path / LEASE_FILE)) == other  # untouched


def test_heartbeat_refreshes_while_held(tmp_path):
    lease = Lease(str(tmp_path), heartbeat_s=0.1, stale_s=1.0).acquire()
    try:
        first = json.load(open(tmp_path / LEASE_FILE))["heartbeat"]
        deadline = time.time() + 30
        while json.load(open(tmp_path / LEASE_FILE))["heartbeat"] < first + 0.3 and time.time() < deadline:
            time.sleep(0.05)
        assert json.load(open(tmp_path / LEASE_FILE))["heartbeat"] >= first + 0.3
    finally:
        lease.release()
    with pytest.raises(ValueError, match="stale_s"):
        Lease(str(tmp_path), heartbeat_s=10, stale_s=5)


def test_trainer_refuses_a_second_job_on_a_live_workdir_and_resumes_after_a_kill(tmp_path):
    """launch/train.py runs; a second launch/train.py on its workdir exits 1 naming the holder, before it writes
    anything; the first is SIGKILLed (no chance to release), and the next run takes the lease over and finishes."""
    from stts_jax.train.trainer import train

    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config=configs/tiny_train.py", f"--workdir={workdir}",
           "--config.train.steps=100000", "--config.train.ckpt_every=2", "--config.train.log_every=1"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 3/"):
                break
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert f"in use by another job: host '{socket.gethostname()}', pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert os.path.exists(workdir / LEASE_FILE)
    from configs import tiny_train

    saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    cfg = tiny_train.get_config()
    cfg.train.update(steps=saved + 2, ckpt_every=2, log_every=1)
    records = train(cfg, str(workdir))  # resumes from the killed run's checkpoint under a taken-over lease
    assert [r["step"] for r in records] == [saved + 1, saved + 2]
    assert not os.path.exists(workdir / LEASE_FILE)


def test_a_live_lease_with_a_longer_timeout_is_not_taken_over_by_a_shorter_one(tmp_path):
    """The holder's own stale_s counts: a newcomer with a short timeout may not take a lease whose heartbeat is
    within the holder's (longer) timeout; two holders are told apart by token, not pid."""
    now = time.time()
    other = dict(host="another-host-xyz", pid=os.getpid(), token="someone-else", started=now - 60,
                 heartbeat=now - 20, stale_s=300.0)
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(WorkdirBusy, match="stale after|taken over once its heartbeat is 300 s old"):
        Lease(str(tmp_path), heartbeat_s=1.0, stale_s=10.0).acquire()
    first = Lease(str(tmp_path), heartbeat_s=1.0, stale_s=10.0)
    os.remove(tmp_path / LEASE_FILE)
    first.acquire()
    try:
        with pytest.raises(WorkdirBusy):  # same host, same pid, another Lease: still refused (token differs)
            Lease(str(tmp_path), heartbeat_s=1.0, stale_s=10.0).acquire()
    finally:
        first.release()
    assert not os.path.exists(tmp_path / LEASE_FILE)
