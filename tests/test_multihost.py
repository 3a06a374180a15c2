"""Two processes on localhost (jax.distributed over gloo, 4 CPU devices each) match one 8-device process."""

import gc
import json
import os
import socket
import subprocess
import sys

import numpy as np

from stts_jax.train.trainer import train



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(worker: str, args_of, outputs: list, timeout: int = 600) -> list[dict]:
    """Starts `worker` (a file beside this one) as processes 0 and 1 of a jax.distributed job on a free port with
    argv [port, i, *args_of(i)], without this process's XLA_FLAGS; asserts both exit 0 and returns the JSON files
    `outputs` they wrote. Drops this process's compiled programs first: each worker needs several GB while
    compiling, and a 24 GiB CI machine has no memory to spare for the suite's own caches beside them."""
    import jax

    jax.clear_caches()
    gc.collect()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), worker), str(port), str(i),
                               *map(str, args_of(i))], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.load(open(path)) for path in outputs]


def run_two_processes(tmp_path, variant=""):
    """Returns the two workers' results (losses, device counts) of multihost_worker.py. Runs before this process
    trains its single-process reference (see run_pair)."""
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    results = run_pair("multihost_worker.py", lambda i: [tmp_path / "multi", outs[i], variant], outs)
    assert results[0]["devices"] == 8 and results[0]["local"] == 4
    return results


def test_two_processes_match_single_process(tmp_path):
    from configs import tiny_train

    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=3, log_every=1, ckpt_every=100)
    results = run_two_processes(tmp_path)
    single = [r["loss"] for r in train(cfg, str(tmp_path / "single"))]
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0)
    np.testing.assert_allclose(results[0]["losses"], single, rtol=2e-5)


def test_two_processes_both_holding_dummy_videos_match_single_process(tmp_path):
    """Empty video slots (dummies) on BOTH hosts, anywhere in their rows: the same losses as one process."""
    from configs import tiny_train

    from stts_jax.train.inputs import random_micro_batch

    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=3, log_every=1, ckpt_every=100)
    cfg.data.update(tiny_train.EMPTY_SLOTS_DATA)
    for step in range(3):  # the data really put dummies on both hosts (rows 0-3 and 4-7), not only at row ends
        mask = random_micro_batch(cfg, step)["frame_mask"]
        empty = mask.reshape(8, 2, -1)[:, :, 0] == 0  # [rows, slots]
        assert empty[:4].any() and empty[4:].any() and empty[:, 0].any() and empty.sum() < 16, empty
    results = run_two_processes(tmp_path, "empty_slots")
    single = [r["loss"] for r in train(cfg, str(tmp_path / "single"))]
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0)
    np.testing.assert_allclose(results[0]["losses"], single, rtol=2e-5)


def test_two_process_evaluation_equals_one_process(tmp_path):
    """9 validation examples over 2 hosts (5 and 4: host 1 runs out first and steps along with empty rows), rows
    over both hosts' 8 devices, parameters restored onto that mesh: both hosts end with every prediction, equal
    to one process's."""
    import tensorflow_datasets as tfds
    from flax import nnx

    from stts_jax.config import stts_config, tiny_model_config
    from stts_jax.data.synthetic import ClipSpec, write_benchmark
    from stts_jax.data.tfds_builders.video_qa import VideoQa
    from stts_jax.interop import params_io
    from stts_jax.model.vlm import Molmo2VLM
    from stts_jax.eval import evaluate as ev

    manual, data_dir, ckpt = str(tmp_path / "manual"), str(tmp_path / "tfds"), str(tmp_path / "ckpt")
    write_benchmark(manual, 2, ClipSpec(num_frames=32, event_frames=5, object_radius=12), validation_clips=9,
                    kinds=("flash_colour",))
    VideoQa(data_dir=data_dir).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    cfg = tiny_model_config()
    cfg.stts = stts_config(method="scorer", prune_ratio=0.5, prune_at=0)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(3))
    params_io.save_model(ckpt, model)
    tok = os.path.join(manual, "tokenizer.json")
    outs = [tmp_path / f"eval{i}.json" for i in range(2)]
    results = run_pair("multihost_eval_worker.py", lambda i: [ckpt, data_dir, tok, outs[i]], outs)
    single = ev.evaluate(params_io.load_model(ckpt), data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=8,
                         rows=8, progress=False)
    want = sorted(map(list, single.predictions))
    assert len(want) == 9 and results[0]["devices"] == 8
    for r in results:
        assert sorted(r["predictions"]) == want and r["count"] == single.count


def test_two_hosts_with_diverging_data_resume_each_where_it_was(tmp_path):
    """Video data over 2 hosts, each packing its own slice, so their data-iterator states differ; 4 steps straight,
    and 4 steps stopped after 2 and resumed: the same losses step for step. Every host saved and restored its own
    state (one file per process): a host resumed with the other host's state would read the other's slice."""
    import tensorflow_datasets as tfds

    from stts_jax.data.synthetic import ClipSpec, write_benchmark
    from stts_jax.data.tfds_builders.video_qa import VideoQa

    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
    write_benchmark(manual, 12, ClipSpec(), validation_clips=1)
    VideoQa(data_dir=data_dir).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    results = run_pair("multihost_resume_worker.py", lambda i: [data_dir, os.path.join(manual, "tokenizer.json"),
                                                                tmp_path / "runs", outs[i]], outs, timeout=900)
    assert results[0] == results[1]
    straight, resumed = results[0]["straight"], results[0]["resumed"]
    assert sorted(straight) == sorted(resumed) == ["1", "2", "3", "4"]
    assert all(straight[s] == resumed[s] for s in straight), (straight, resumed)
    for run in ("straight", "resumed"):  # each host wrote its own data state, and the two differ
        data = tmp_path / "runs" / run / "checkpoints" / "2" / "data"
        states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
        assert states[0] != states[1], states


def test_sigterm_to_one_host_stops_both_at_the_same_step_and_they_resume(tmp_path):
    """SIGTERM to process 1 only, once process 0 logged step 3: both hosts agree on the step, both save it (each
    its own data-state file in that step) and exit 0; started again, both resume from it, and the run's losses
    (steps 1..8, each once) match one process's."""
    import signal

    from configs import tiny_train

    import jax

    jax.clear_caches()
    gc.collect()
    port = free_port()
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workdir = tmp_path / "multi"

    def start(i, log):
        return subprocess.Popen([sys.executable, worker, str(port), str(i), str(workdir), str(tmp_path / f"o{i}.json"),
                                 "preempt"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

    with open(tmp_path / "log1.txt", "w") as log1:
        procs = [start(0, subprocess.PIPE), start(1, log1)]
        for line in procs[0].stdout:
            if line.startswith("step 3/"):
                procs[1].send_signal(signal.SIGTERM)
                break
        out0 = procs[0].communicate(timeout=600)[0]
        procs[1].wait(timeout=600)
    assert [p.returncode for p in procs] == [0, 0], out0[-2000:] + (tmp_path / "log1.txt").read_text()[-2000:]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert 3 <= steps[-1] < 8, steps  # (Orbax also keeps its first save, step 1)
    data = workdir / "checkpoints" / str(steps[-1]) / "data"
    assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == ["process_0-of-2.json",
                                                                               "process_1-of-2.json"]
    port = free_port()
    with open(tmp_path / "log1b.txt", "w") as log1:
        procs = [start(0, subprocess.PIPE), start(1, log1)]
        out0 = procs[0].communicate(timeout=600)[0]
        procs[1].wait(timeout=600)
    assert [p.returncode for p in procs] == [0, 0], out0[-2000:]
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == list(range(1, 9))
    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=8, log_every=1, ckpt_every=100)
    single = [r["loss"] for r in train(cfg, str(tmp_path / "single"))]
    np.testing.assert_allclose([r["loss"] for r in logged], single, rtol=2e-5)


def test_two_slices_over_dcn_match_single_process(tmp_path):
    """mesh.slices=2 with each process as a slice (CPU devices carry no slice_index): the data axis spans the two
    processes (hybrid mesh: process 0 holds data rows 0-1, process 1 rows 2-3; fsdp=2 inside each), and the
    losses equal one 8-device process's. (On CPU a plain mesh would place the devices alike: the worker records
    the grids the trainer built through `sharding.hybrid_grid`; test_hybrid_grid_groups_each_slice checks the
    grouping itself.)"""
    from configs import tiny_train

    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=3, log_every=1, ckpt_every=100)
    results = run_two_processes(tmp_path, "slices")
    # the trainer built its mesh once from a hybrid grid: [data][fsdp][tensor] -> process
    assert results[0]["mesh_processes"] == [[[[0], [0]], [[0], [0]], [[1], [1]], [[1], [1]]]]
    single = [r["loss"] for r in train(cfg, str(tmp_path / "single"))]
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0)
    np.testing.assert_allclose(results[0]["losses"], single, rtol=2e-5)


def test_hybrid_grid_groups_each_slice_on_its_own_data_rows():
    """Devices listed with their processes interleaved (0, 1, 0, 1, ...): a plain reshape would mix them; the
    multi-slice grid gives each process (slice) its own contiguous data rows, fsdp and tensor inside it."""
    from types import SimpleNamespace

    from stts_jax.train import sharding

    devices = [SimpleNamespace(id=i, process_index=i % 2, slice_index=0, platform="cpu", device_kind="cpu")
               for i in range(8)]
    grid = sharding.hybrid_grid((4, 2, 1), 2, devices)
    assert grid.shape == (4, 2, 1)
    assert [[d.process_index for d in row[:, 0]] for row in grid] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert sorted(d.id for d in grid[:2].flat) == [0, 2, 4, 6]
