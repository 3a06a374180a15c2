"""Two processes on localhost (jax.distributed over gloo, 4 CPU devices each) match one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from stts_jax.train.trainer import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    import tiny_train

    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=3, log_every=1, ckpt_every=100)
    single = [r["loss"] for r in train(cfg, str(tmp_path / "single"))]

    port = free_port()
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(tmp_path / "multi"),
                               str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
    assert results[0]["devices"] == 8 and results[0]["local"] == 4
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0)
    np.testing.assert_allclose(results[0]["losses"], single, rtol=2e-5)
