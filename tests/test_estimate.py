"""launch/estimate.py's numbers: per-device bytes of the abstract sharded state equal the trainer's real arrays."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from stts_jax import estimate, topology
from stts_jax.train import sharding
from stts_jax.train.inputs import random_micro_batch
from stts_jax.train.optim import make_optimizer
from stts_jax.train.step import init_state
from stts_jax.train.trainer import build_model



def tiny_cfg(method="scorer"):
    from configs import tiny_train

    return tiny_train.get_config(method)


def real_state(cfg, mesh):
    """The trainer's state (trainer.train: build_model (sharded init) -> make_optimizer -> init_state)."""
    with jax.set_mesh(mesh):
        model = build_model(cfg, mesh)
        optimizer = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
        return init_state(model, optimizer)[1]


@pytest.mark.parametrize("axes", [(1, 8, 1), (2, 2, 2)])
def test_estimated_per_device_bytes_equal_the_sharded_arrays(axes):
    cfg = tiny_cfg()
    mesh = sharding.make_mesh(*axes)
    real = real_state(cfg, mesh)
    _, _, abstract = estimate.abstract_train_state(cfg, mesh)
    for part in ("params", "opt_state"):
        got = estimate.per_device_bytes(abstract[part])
        want = estimate.actual_per_device_bytes(real[part])
        assert got == want, (part, got, want)
    # the check is not vacuous: parameters are sharded, so no device holds all of them
    total = sum(x.nbytes for x in jax.tree.leaves(real["params"]))
    held = estimate.per_device_bytes(abstract["params"])
    assert len(held) == 8 and max(held.values()) < total
    specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
    assert specs(abstract["params"]) == specs(real["params"])
    assert specs(abstract["opt_state"]) == specs(real["opt_state"])
    # AdamW's mu and nu sharded like their parameters -> 2x the parameter bytes + step counts (2 int32 per group,
    # 4 groups) + optax.apply_if_finite's two int32 counters and one bool
    params_held = estimate.per_device_bytes(abstract["params"])
    for device, opt_held in estimate.per_device_bytes(abstract["opt_state"]).items():
        assert 0 <= opt_held - 2 * params_held[device] <= 4 * 4 * 2 + 9, (device, opt_held, params_held[device])


def test_trainer_mfu_flops_equal_the_estimate_and_count_every_attention_tile():
    """trainer.step_flops (the MFU numerator, from the real sharded step) is estimate.global_flops's count, and
    both exceed the compiled step's own count, which XLA takes from one loop body per attention tile loop."""
    from stts_jax.train.step import make_train_step, shardings_of
    from stts_jax.train.trainer import frame_layout, step_flops

    cfg = tiny_cfg()
    mesh = sharding.make_mesh(1, 8, 1)
    with jax.set_mesh(mesh):
        model = build_model(cfg, mesh)
        optimizer = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
        graphdef, state = init_state(model, optimizer)
        batch = estimate.abstract_batch(cfg, mesh)
        step_fn = make_train_step(graphdef, optimizer, frame_layout(cfg), seed=0, state_shardings=shardings_of(state))
        counted = step_flops(step_fn, state, batch)
        looped = estimate.flops_of(step_fn.lower(state, batch).cost_analysis())
    # the estimate lowers the global step without the mesh, where attention tiles (and their backward
    # recompute) are decided for all rows on one device; on the mesh a shard's rows may fit one tile
    unsharded = estimate.global_flops(graphdef, optimizer, frame_layout(cfg), cfg, state, batch)
    assert counted == pytest.approx(unsharded, rel=0.02)
    assert counted > looped > 0


def test_abstract_batch_matches_the_trainers_global_batch():
    cfg = tiny_cfg()
    cfg.train.grad_accum = 2
    mesh = sharding.make_mesh(2, 4, 1)
    host = [random_micro_batch(cfg, i) for i in range(2)]
    host = {k: np.stack([h[k] for h in host]) for k in host[0]}
    with jax.set_mesh(mesh):
        real = sharding.to_global(host, mesh, batch_axis=1)
    abstract = estimate.abstract_batch(cfg, mesh)
    assert set(abstract) == set(real)
    for key, value in real.items():
        assert abstract[key].shape == value.shape and abstract[key].dtype == value.dtype, key
        assert abstract[key].sharding.spec == value.sharding.spec, key


def test_batch_scaling_and_closed_forms():
    from configs import molmo2_4b_stts

    base = molmo2_4b_stts.get_config("none")
    # unpruned: 81 placeholders + 4 layout/text tokens per frame, + 256 text tokens, rounded up to 128
    cfg = estimate.scale_batch(base, 8, global_batch=64, videos_per_device=1, text_tokens=256)
    assert (cfg.data.videos_per_batch, cfg.data.rows, cfg.train.grad_accum) == (8, 8, 8)
    assert cfg.data.seq_len == -(-(64 * 85 + 256) // 128) * 128 == 5760
    pruned = molmo2_4b_stts.get_config("scorer")
    pruned.data.num_frames = 128
    cfg = estimate.scale_batch(pruned, 256, global_batch=64, videos_per_device=1, text_tokens=256)
    assert (cfg.data.videos_per_batch, cfg.train.grad_accum) == (256, 1)  # 64 does not split over 256
    assert cfg.data.seq_len == -(-(81 * 128 - 81 * 64 + 4 * 128 + 256) // 128) * 128
    assert base.data.seq_len == 9728  # the input config is left alone
    assert topology.topology_name("v5p", 4) == "v5p:2x2x1"
    assert topology.topology_name("v5p", 8) == "v5p:2x2x2"
    assert topology.topology_name("v5p", 64) == "v5p:4x4x4"
    assert topology.topology_name("v5p", 256) == "v5p:4x8x8"
    assert topology.topology_name("v5e", 256) == "v5e:16x16"
    assert topology.accelerator_type("v5p", 32) == "v5p-64" and topology.accelerator_type("v5e", 64) == "v5litepod-64"
    with pytest.raises(ValueError, match="48 chips: TPU slices here are powers of two"):
        topology.accelerator_type("v5p", 48)
    with pytest.raises(ValueError, match="the smallest v5p slice has 4 chips"):
        topology.accelerator_type("v5p", 2)
    assert topology.accelerator_type("v5e", 1) == "v5litepod-1"
    assert estimate.step_seconds(459e12 * 64 * 0.5, 64, 459e12, 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["--mesh=2,2"], "expected fsdp, config or D,F,T"),
    (["--mesh=3,-1,1", "--chips=8"], "8 chips do not divide by 3"),
    (["--chips=eight"], "expected integers"),
    (["--platform=tpu", "--chips=48"], "not a power of two"),
    (["--mesh=fsdp", "--chips=8", "--slices=2"], "data=1 on 8 chips is not a multiple of --slices=2"),
    (["--chips=8", "--slices=3"], "--slices=3 must be >= 1 and divide --chips (8)"),
    (["--platform=cpu", "--chips=8", "--slices=2"], "--slices=2 needs --platform=tpu"),
])
def test_cli_refuses_bad_flags_before_compiling(args, message):
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "launch/estimate.py", "--config=configs/tiny_train.py", *args],
                         capture_output=True, text=True, timeout=60, cwd=root)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_eval_estimate_holds_the_restored_parameters_and_a_forward(tmp_path):
    """--program=eval: parameter bytes per device equal a checkpoint restored onto the mesh by load_model (what
    launch/eval.py runs), the program compiles on the 8-device mesh, and it costs a forward: between 1/6 and 1/2 of
    the train step's FLOPs (forward + backward + update) at the same batch."""
    from stts_jax.interop import params_io
    from stts_jax.model.vlm import Molmo2VLM

    cfg = estimate.scale_batch(tiny_cfg(), 8, global_batch=8, videos_per_device=1, text_tokens=32)
    mesh = sharding.make_mesh(2, 4, 1)
    est = estimate.estimate_eval(cfg, mesh)
    params_io.save_model(str(tmp_path / "ckpt"), Molmo2VLM(cfg.model, rngs=nnx.Rngs(0)))
    restored = params_io.load_model(str(tmp_path / "ckpt"), mesh=mesh)
    assert est.params_bytes == max(estimate.actual_per_device_bytes(nnx.state(restored)).values())
    assert est.opt_bytes == 0 and est.compile_error is None and est.temp_bytes > 0 and est.peak_bytes > 0
    train = estimate.estimate_step(cfg, mesh, packed_flops=False)
    assert train.flops_step / 6 < est.flops_step < train.flops_step / 2, (est.flops_step, train.flops_step)
