"""The trainer: sharded meshes agree, one compilation, preemption + resume is exact, bad input refused early."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stts_jax.config import ConfigError
from stts_jax.train.checkpoint import IncompatibleCheckpoint, check_compatible
from stts_jax.train.trainer import train



def tiny_cfg(method="scorer", **train_overrides):
    from configs import tiny_train

    cfg = tiny_train.get_config(method)
    cfg.train.update(train_overrides)
    return cfg


def test_meshes_agree_after_three_steps(tmp_path):
    """Single device, (8,1,1), (2,4,1), (2,2,2): the same losses after 3 steps (rtol 2e-5: reduction order)."""
    runs = {}
    for mesh in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        cfg = tiny_cfg(steps=3, log_every=1, ckpt_every=100)
        cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        records = train(cfg, str(tmp_path / "x".join(map(str, mesh))))
        assert records[-1]["compilations"] == 1
        runs[mesh] = [r["loss"] for r in records]
    for mesh, got in runs.items():
        np.testing.assert_allclose(got, runs[(1, 1, 1)], rtol=2e-5, err_msg=str(mesh))


def test_twenty_steps_compile_once_and_resume_continues(tmp_path):
    records = train(tiny_cfg(steps=20, log_every=5, ckpt_every=10), str(tmp_path))
    assert [r["step"] for r in records] == [5, 10, 15, 20] and records[-1]["compilations"] == 1
    more = train(tiny_cfg(steps=25, log_every=5, ckpt_every=10), str(tmp_path))
    assert [r["step"] for r in more] == [25]


def run_train(workdir, *extra, wait=True):
    cmd = [sys.executable, "launch/train.py", "--config=configs/tiny_train.py", f"--workdir={workdir}",
           "--config.train.steps=16", "--config.train.ckpt_every=4", "--config.train.log_every=1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if not wait else \
        subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs}


def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path):
    straight = run_train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    proc = run_train(tmp_path / "killed", wait=False)
    for line in proc.stdout:  # wait until step 6 is logged, then preempt
        if line.startswith("step 6/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit())
    assert saved and 6 <= saved[-1] < 16, saved
    resumed = run_train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert set(a) == set(range(1, 17))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b.get(s)) for s in a if a[s] != b.get(s)}


def test_a_second_sigterm_takes_the_default_action(tmp_path):
    """The first SIGTERM asks for a checkpoint and a clean exit; a second one, sent before that exit, terminates
    the process at once (status -SIGTERM), as an operator stopping a hung save expects."""
    proc = run_train(tmp_path / "w", "--config.train.steps=1000", wait=False)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
        if line.startswith("SIGTERM: saving a checkpoint"):  # the first one is handled
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out[-2000:])


def test_bad_input_is_refused_before_compiling(tmp_path):
    out = run_train(tmp_path / "w", "--config.train.no_such_field=3")
    assert out.returncode != 0 and "no_such_field" in (out.stderr + out.stdout)
    cfg = tiny_cfg()
    cfg.data.kind = "video"
    cfg.data.path = str(tmp_path / "missing_dataset")
    with pytest.raises(ConfigError, match="data.path.*missing_dataset"):
        train(cfg, str(tmp_path / "w2"))
    train(tiny_cfg(steps=2, ckpt_every=1), str(tmp_path / "w3"))
    other = tiny_cfg(steps=4)
    other.model.llm.mlp_dim = 128
    t0 = time.perf_counter()
    with pytest.raises(IncompatibleCheckpoint, match=r"model\.llm\.mlp_dim: checkpoint 96 vs config 128"):
        train(other, str(tmp_path / "w3"))
    assert time.perf_counter() - t0 < 5  # refused before building or compiling anything
    # not only shapes: any field that changes what is trained (data source and seed, STTS ratio, optimizer, seed)
    for field, value in [("data.path", "/elsewhere"), ("data.shuffle_seed", 7), ("model.stts.prune_ratio", 0.3),
                         ("optim.lr_llm", 0.5), ("train.seed", 3), ("model.tokens.image_patch_id", 110)]:
        changed = tiny_cfg(steps=4)
        section, *rest = field.split(".")
        node = changed[section]
        for name in rest[:-1]:
            node = node[name]
        node[rest[-1]] = value
        with pytest.raises(IncompatibleCheckpoint, match=rf"{field}: checkpoint .* vs config {value!r}"):
            train(changed, str(tmp_path / "w3"))
    # a field the checkpoint's config predates (saved without it) resumes while it holds its default, not otherwise
    saved = json.loads(tiny_cfg(steps=4).to_json_best_effort())
    del saved["data"]["sampler"]
    check_compatible(saved, tiny_cfg(steps=4))
    changed = tiny_cfg(steps=4)
    changed.data.sampler = "transformers"
    with pytest.raises(IncompatibleCheckpoint, match=r"data\.sampler: checkpoint None vs config 'transformers'"):
        check_compatible(saved, changed)


def test_fsdp_fill_mesh_and_optimizer_state_sharded_like_params():
    import jax
    from flax import nnx

    from stts_jax.model.vlm import Molmo2VLM
    from stts_jax.train import sharding as sh
    from stts_jax.train.optim import make_optimizer
    from stts_jax.train.step import init_state

    mesh = sh.make_mesh(data=1, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    cfg = tiny_cfg()
    with jax.set_mesh(mesh):
        model = sh.shard_model(Molmo2VLM(cfg.model, rngs=nnx.Rngs(0)), mesh)
        optimizer = make_optimizer(cfg.optim, 10, nnx.state(model, nnx.Param))
        _, state = init_state(model, optimizer)
    kernel = state["params"]["llm"]["layers"][0]["gate"]["kernel"]
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
          if "'layers'][0]['gate']['kernel']" in jax.tree_util.keystr(path).replace(".", "")]
    assert len(mu) >= 2 and all(m.sharding.is_equivalent_to(kernel.sharding, m.ndim) for m in mu)
    assert not kernel.sharding.is_fully_replicated


def test_sharded_init_is_born_sharded_and_equals_the_eager_init():
    """One jitted init creates every parameter in its rules-table sharding, with the eager init's values (up to
    float rounding: XLA fuses the jitted truncated-normal differently)."""
    from flax import nnx

    from stts_jax.model.vlm import Molmo2VLM
    from stts_jax.train import sharding as sh

    cfg = tiny_cfg()
    mesh = sh.make_mesh(data=2, fsdp=4, tensor=1)
    make = lambda: Molmo2VLM(cfg.model, rngs=nnx.Rngs(3))  # noqa: E731
    born = nnx.state(sh.init_sharded(make, mesh))
    eager = nnx.state(make())
    want = sh.state_shardings(eager, mesh)
    flat_born, flat_eager, flat_want = (dict(nnx.to_flat_state(t)) for t in (born, eager, want))
    assert flat_born.keys() == flat_eager.keys()
    sharded = 0
    for path, var in flat_born.items():
        value = var.get_value()
        np.testing.assert_allclose(np.asarray(value), np.asarray(flat_eager[path].get_value()), rtol=1e-6, atol=1e-8,
                                   err_msg=str(path))
        assert value.sharding.is_equivalent_to(flat_want[path].get_value(), value.ndim), path
        sharded += not value.sharding.is_fully_replicated
    assert sharded > 10  # not vacuous: most weights are split over fsdp


def test_auto_fsdp_mesh_divides_every_embed_width():
    """mesh fsdp=0: the widest fsdp dividing every embed width (Molmo2-4B: 1152, 2304, 2560 -> 128 of 256 chips)."""
    from stts_jax.train import sharding as sh

    assert sh.auto_fsdp(256, (1152, 2304, 2560)) == 128
    assert sh.auto_fsdp(8, (1152, 2304, 2560)) == 8
    assert sh.auto_fsdp(6, (4, 10)) == 2
    mesh = sh.make_mesh(data=-1, fsdp=0, tensor=1, embed_dims=(12, 20))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_profile_steps_write_a_trace_of_exactly_those_steps(tmp_path):
    """train.profile_steps="2,3": a jax.profiler trace in workdir/profile whose step annotations are steps 2 and 3
    (read back from the trace's own JSON); malformed ranges are refused before any work."""
    import glob
    import gzip

    records = train(tiny_cfg(steps=4, log_every=1, ckpt_every=100, profile_steps="2,3"), str(tmp_path / "run"))
    assert records[-1]["step"] == 4 and records[-1]["compilations"] == 1
    traces = glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
    assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    steps = {int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert steps == {2, 3}
    for bad in ["3,2", "0,1", "2", "1,5", "a,b"]:
        with pytest.raises(ConfigError, match="train.profile_steps"):
            train(tiny_cfg(steps=4, profile_steps=bad), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "profile")


def test_data_state_is_saved_per_host_and_old_checkpoints_still_restore(tmp_path):
    """The data-iterator state goes to Grain's per-process file (process_0-of-1.json here) and comes back equal; a
    checkpoint written the old way (one JSON item) restores its state too."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from stts_jax.train.checkpoint import Checkpointer, config_json

    cfg = tiny_cfg()
    state = {"w": jnp.arange(3.0)}
    data = {"position": 7, "slices": [1, 2]}
    new = Checkpointer(str(tmp_path / "new"), every=1, keep=2)
    new.save(1, state, data, cfg, force=True)
    new.wait()
    assert json.loads((tmp_path / "new" / "1" / "data" / "process_0-of-1.json").read_text()) == data
    restored, got = new.restore(1, state)
    assert got == data and np.array_equal(restored["w"], state["w"])
    new.close()
    old = Checkpointer(str(tmp_path / "old"), every=1, keep=2)
    old.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                                 config=ocp.args.JsonSave(config_json(cfg))), force=True)
    old.wait()
    assert old.restore(1, state)[1] == data
    old.close()
