"""gs:// everywhere, against a Cloud Storage API served locally (gcp-storage-emulator, conftest's `gcs_emulator`):
a training run with its workdir in a bucket (checkpoints, metrics, TensorBoard, lease, profile), preempted and
resumed to the same losses as a run on local disk; parameters read back from the bucket; export to and import
from a bucket; params checkpoints; tokenizers; evaluation results. Data is the exception: ArrayRecord's reader
opens local files only (it cannot be pointed at the emulator), so a gs:// data path is refused naming the fix."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from stts_jax import paths


def run_train(workdir, env, *extra, wait=True):
    cmd = [sys.executable, "launch/train.py", "--config=configs/tiny_train.py", f"--workdir={workdir}",
           "--config.train.steps=10", "--config.train.ckpt_every=4", "--config.train.log_every=1", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def losses(workdir) -> dict[int, float]:
    recs = [json.loads(line) for line in paths.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in recs}) == len(recs), [r["step"] for r in recs]  # each step logged once
    return {r["step"]: r["loss"] for r in recs}


def flat_params(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_training_in_a_bucket_is_preempted_resumed_and_read_back(tmp_path, bucket, gcs_emulator):
    """A tiny run with --workdir=gs://..., SIGTERM at step 5, resumed: its losses equal an uninterrupted run on
    local disk, bit for bit; checkpoints, metrics.jsonl (whole across the resume), TensorBoard events and the
    profile trace are in the bucket, the lease is gone; the parameters read back from the bucket equal the local
    run's."""
    from stts_jax.interop import params_io

    straight = run_train(tmp_path / "straight", gcs_emulator)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    workdir = f"{bucket}/run"
    proc = run_train(workdir, gcs_emulator, "--config.train.profile_steps=2,3", wait=False)
    for line in proc.stdout:  # preempt once step 5 is logged
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert not (paths.as_path(".") / "gs:").exists()  # nothing went to <cwd>/gs:/... (os.path on a URL)
    saved = sorted(int(p.name) for p in paths.as_path(f"{workdir}/checkpoints").iterdir() if p.name.isdigit())
    assert saved and 5 <= saved[-1] < 10, saved
    assert set(losses(workdir)) == set(range(1, saved[-1] + 1))
    resumed = run_train(workdir, gcs_emulator)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = losses(tmp_path / "straight"), losses(workdir)
    assert set(a) == set(range(1, 11)) and set(b) == set(a)
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    root = paths.as_path(workdir)
    assert not (root / "LEASE").exists()
    assert list((root / "tensorboard").glob("events.out.tfevents*"))
    assert list((root / "profile").glob("plugins/profile/*/*.xplane.pb"))
    here, there = params_io.load_checkpoint(str(tmp_path / "straight")), params_io.load_checkpoint(workdir)
    assert there.kind == "train" and there.step == 10 and there.train_config["train"]["steps"] == 10
    mine, theirs = flat_params(here.model), flat_params(there.model)
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    # a fine-tune starting from the bucket: init_from=gs://... passes the config check and loads those weights
    from configs import tiny_train

    from stts_jax.config import validate_train_config
    from stts_jax.train.trainer import load_own_init

    cfg = tiny_train.get_config()
    cfg.train.init_from = workdir
    validate_train_config(cfg)
    tuned = flat_params(load_own_init(cfg))
    assert all(np.array_equal(tuned[k], theirs[k]) for k in theirs if k[0] != "scorer")


def test_lease_in_a_bucket_refuses_a_second_job_and_takes_over_a_stale_one(bucket):
    from stts_jax.train.lease import Lease, WorkdirBusy

    first = Lease(bucket, heartbeat_s=30, stale_s=60).acquire()
    try:
        with pytest.raises(WorkdirBusy, match=r"in use by another job: host .* pid \d+"):
            Lease(bucket, heartbeat_s=30, stale_s=60).acquire()
    finally:
        first.release()
    assert not paths.as_path(f"{bucket}/LEASE").exists()
    # a holder whose heartbeat is older than stale_s (a preempted VM) is taken over
    record = dict(host="elsewhere", pid=1, pidns="x", token="old", started=0.0, stale_s=60, heartbeat=time.time() - 600)
    paths.write_text(f"{bucket}/LEASE", json.dumps(record))
    second = Lease(bucket, heartbeat_s=30, stale_s=60).acquire()
    assert second.holder()["token"] == second.me["token"]
    second.release()


def test_lease_in_a_bucket_goes_to_the_last_writer(bucket):
    """No lock on an object store: a job that finds, once its write settled, another job's lease refuses."""
    import threading

    from stts_jax.train import lease as lease_lib

    mine = lease_lib.Lease(bucket, heartbeat_s=30, stale_s=60)
    outcome = {}

    def take():
        try:
            outcome["lease"] = mine.acquire()
        except lease_lib.WorkdirBusy as e:
            outcome["busy"] = str(e)

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(lease_lib.REMOTE_SETTLE_S / 4)  # another job writes inside the settle window
    other = dict(host="other-vm", pid=7, pidns="y", token="theirs", started=time.time(), stale_s=60,
                 heartbeat=time.time())
    paths.write_text(f"{bucket}/LEASE", json.dumps(other))
    thread.join()
    assert "lease" not in outcome and "host 'other-vm', pid 7" in outcome["busy"], outcome


def test_export_import_and_params_checkpoints_in_a_bucket(bucket, tmp_path):
    """export_hf to gs:// (sharded safetensors + configs + the scorer) and back through the importer, and a params
    checkpoint written to and loaded from gs://: every parameter equal; the tokenizer and evaluation results read
    and written through the same paths."""
    from stts_jax.config import data_config, tiny_model_config
    from stts_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
    from stts_jax.eval.scoring import write_results
    from stts_jax.interop import hf_export, params_io
    from stts_jax.model.vlm import Molmo2VLM

    cfg = tiny_model_config()
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(3))
    want = flat_params(model)
    report = hf_export.export_hf(model, cfg, f"{bucket}/export", max_shard_bytes="200KB")
    assert len(report.shards) > 1
    names = {p.name for p in paths.as_path(f"{bucket}/export").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "stts_config.json", *report.shards} <= names
    with pytest.raises(hf_export.ExportError, match="is not empty"):
        hf_export.export_hf(model, cfg, f"{bucket}/export")
    back = params_io.load_checkpoint(f"{bucket}/export")
    assert back.kind == "hf"
    got = flat_params(back.model)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    params_io.save_model(f"{bucket}/params", model)
    loaded = params_io.load_checkpoint(f"{bucket}/params", mesh=None)
    assert loaded.kind == "params"
    got = flat_params(loaded.model)
    assert all(np.array_equal(got[k], want[k]) for k in want)

    tok = build_word_tokenizer(["red", "blue"], cfg.tokens, vocab_size=cfg.llm.vocab_size)
    paths.write_text(f"{bucket}/data/tokenizer.json", tok.to_str())
    assert load_tokenizer(f"{bucket}/data").encode("red blue").ids == tok.encode("red blue").ids
    write_results(f"{bucket}/results.json", {"accuracy": 0.5})
    assert json.loads(paths.as_path(f"{bucket}/results.json").read_text())["accuracy"] == 0.5

    from stts_jax.config import ConfigError, validate_data_config

    with pytest.raises(ConfigError, match="data.path.*opens local files only.*Cloud Storage FUSE"):
        validate_data_config(data_config(kind="video", path=f"{bucket}/data"))
    from stts_jax.data.pipeline import open_source

    with pytest.raises(ValueError, match="opens local files only"):  # evaluation's reader too (it would hang)
        open_source(f"{bucket}/data", "validation")


def test_append_log_keeps_what_the_object_held(bucket):
    """metrics.jsonl / eval.jsonl on gs://: objects cannot be appended to, so the log rewrites them whole, starting
    from what a previous run wrote."""
    with paths.AppendLog(f"{bucket}/log.jsonl") as log:
        log.write("1\n")
        log.flush()
        assert paths.as_path(f"{bucket}/log.jsonl").read_text() == "1\n"
        log.write("2\n")
    paths.append_line(f"{bucket}/log.jsonl", "3")
    assert paths.as_path(f"{bucket}/log.jsonl").read_text() == "1\n2\n3\n"
