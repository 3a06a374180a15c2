"""Ahead-of-time cost of one train step on a device mesh, from abstract shapes (no weights are allocated).

The state is built exactly as the trainer builds it (`trainer.train`), but abstractly: the model with
`nnx.eval_shape`, parameter shardings from the one logical-axis rules table (`sharding.state_shardings`),
the optimizer from `optim.make_optimizer`, the optimizer state's shardings from compiling `optimizer.init`
on the sharded abstract parameters (what `jax.jit(optimizer.init)(params)` gives the trainer), and the
batch with the shardings of `sharding.to_global` (rows over data x fsdp). The train step is `step.make_train_step`,
lowered and compiled for the mesh's devices (simulated CPU devices, or a TPU topology description).

What comes back (`StepEstimate`) is measured, per device: parameter and optimizer bytes from the sharded
abstract arrays (exact: the shard shapes), argument / output / temporary bytes from XLA's memory analysis
of the compiled step (temporaries = activations kept for the backward pass, gradients, workspace; when
XLA:TPU refuses a program that does not fit in HBM, the temporaries its error names), and FLOPs from XLA's
cost analysis of the unpartitioned step (lowered for the host CPU without shardings: the whole global batch)
plus the compiled per-device count. Derived: FLOPs of a step with grad_accum = a (XLA counts a loop body
once) and the step time = FLOPs / (chips x peak x MFU).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stts_jax import geometry
from stts_jax.data.processor import prompt_overhead_tokens
from stts_jax.model import layers
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.train import sharding
from stts_jax.train.optim import make_optimizer
from stts_jax.train.step import make_train_step, shardings_of
from stts_jax.train.trainer import frame_layout

INT_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


def tokens_per_video(cfg: ml_collections.ConfigDict, text_tokens: int) -> int:
    """Returns the LLM tokens of one video example: per frame 2 text + start + placeholders + end, plus text."""
    t = cfg.data.num_frames
    return geometry.vision_tokens_per_video(cfg.model, t) + prompt_overhead_tokens(t) + text_tokens


def scale_batch(cfg: ml_collections.ConfigDict, data_parallel: int, *, global_batch: int, videos_per_device: int,
                text_tokens: int, seq_multiple: int = 128) -> ml_collections.ConfigDict:
    """Returns a copy of `cfg` whose batch fits `data_parallel` devices: one video per row.

    Micro-batch = data_parallel * videos_per_device videos (rows); grad_accum = global_batch / micro-batch when
    that divides, else 1 (the global batch becomes the micro-batch: per-device batch). seq_len = one video's
    tokens (`tokens_per_video`) rounded up to `seq_multiple`.
    """
    cfg = cfg.copy_and_resolve_references()
    micro = data_parallel * videos_per_device
    accum = global_batch // micro if global_batch % micro == 0 and global_batch >= micro else 1
    cfg.data.videos_per_batch = cfg.data.rows = micro
    cfg.train.grad_accum = accum
    cfg.data.seq_len = -(-tokens_per_video(cfg, text_tokens) // seq_multiple) * seq_multiple
    return cfg


def abstract_model(cfg: ml_collections.ConfigDict, *, pack_fallback: bool = True) -> Molmo2VLM:
    """Returns the model with ShapeDtypeStruct parameters; `pack_fallback=False` keeps only the packed path."""
    model = nnx.eval_shape(lambda: Molmo2VLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
    model.pack_fallback = pack_fallback  # static attribute: lands in the graphdef
    return model


def with_shardings(tree, shardings):
    """Returns ShapeDtypeStructs of `tree`'s leaves carrying the matching leaf of `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_state(cfg: ml_collections.ConfigDict, mesh, *, pack_fallback: bool = True):
    """Returns (graphdef, optimizer, state) with state = {params, opt_state, step} of sharded ShapeDtypeStructs.

    Mirrors trainer.train: shard_model (logical rules), make_optimizer, and init_state's optimizer state
    sharded like its parameters (sharding.like_params).
    """
    model = abstract_model(cfg, pack_fallback=pack_fallback)
    graphdef, params = nnx.split(model, nnx.Param)
    params = with_shardings(params, sharding.state_shardings(params, mesh))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, params)
    opt_shape = jax.eval_shape(optimizer.init, params)
    opt_state = with_shardings(opt_shape, sharding.like_params(opt_shape, params, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    return graphdef, optimizer, dict(params=params, opt_state=opt_state, step=step)


def abstract_batch(cfg: ml_collections.ConfigDict, mesh, *, micro_batches: bool = True) -> dict:
    """Returns the global batch [accum, rows, ...] as sharded ShapeDtypeStructs, as sharding.to_global makes it
    (`micro_batches=False`: [rows, ...], the evaluation batch)."""
    data = cfg.data
    lead = (cfg.train.grad_accum,) if micro_batches else ()
    frames = frame_layout(cfg).num_frames  # frame slots per row
    shapes = {k: ((*lead, data.rows, data.seq_len), jnp.int32) for k in INT_KEYS}
    shapes["pixel_values"] = ((*lead, data.rows, frames, geometry.patches_per_frame(cfg.model),
                               geometry.patch_dim(cfg.model)), jnp.float32)
    shapes["frame_mask"] = ((*lead, data.rows, frames), jnp.int32)
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape,
                                                                                      batch_axis=len(lead)))
            for key, (shape, dtype) in shapes.items()}


def per_device_bytes(tree) -> dict[int, int]:
    """Returns {device id: bytes that device holds} for a tree of sharded arrays or ShapeDtypeStructs."""
    held: dict[int, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
            shard = [len(range(*s.indices(d))) for s, d in zip(index, leaf.shape)]
            held[device.id] += math.prod(shard) * itemsize
    return dict(held)


def actual_per_device_bytes(tree) -> dict[int, int]:
    """Returns {device id: bytes} of the addressable shards of real jax.Arrays (the check of per_device_bytes)."""
    held: dict[int, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] += shard.data.nbytes
    return dict(held)


@dataclasses.dataclass
class StepEstimate:
    """Per-device bytes and per-step FLOPs of one compiled train step (bytes are the max over devices)."""

    chips: int
    mesh: str
    params_bytes: int  # sharded abstract parameters
    opt_bytes: int  # sharded abstract optimizer state
    batch_bytes: int  # one step's global batch, this device's share
    argument_bytes: int | None  # compiled memory analysis: state + batch
    output_bytes: int | None
    alias_bytes: int | None  # outputs written into donated arguments
    temp_bytes: int | None  # activations saved for backward, gradients, workspace (or what a refusal names)
    peak_bytes: int | None  # argument + output - alias + temp
    flops: float  # XLA cost analysis of the unpartitioned step: global batch, loop body counted once
    flops_per_device_compiled: float | None  # cost analysis of the compiled per-device program (loop body once)
    flops_update: float  # the optimizer update alone (outside the accumulation loop)
    flops_step: float  # grad_accum * flops - (grad_accum - 1) * flops_update: every micro-batch counted
    flops_packed: float | None = None  # `flops` of the packed path alone (no masked fallback in the lax.cond)
    flops_packed_step: float | None = None
    compile_s: float = 0.0
    compile_error: str | None = None  # the compiler refused the program (TPU: does not fit in HBM)


def estimate_step(cfg: ml_collections.ConfigDict, mesh, *, packed_flops: bool = True) -> StepEstimate:
    """Returns the StepEstimate of `cfg`'s train step on `mesh` (lowered and compiled, nothing executed)."""
    t0 = time.perf_counter()
    layout = frame_layout(cfg)
    graphdef, optimizer, state = abstract_train_state(cfg, mesh)
    batch = abstract_batch(cfg, mesh)
    step_fn = make_train_step(graphdef, optimizer, layout, seed=cfg.train.seed, state_shardings=shardings_of(state))
    with jax.set_mesh(mesh):
        compiled, sizes, error = _compile_sizes(step_fn.lower(state, batch))
    flops_dev = flops_of(compiled.cost_analysis()) if compiled is not None else None
    # global FLOPs: XLA's cost analysis of the unpartitioned step, lowered for the host CPU without shardings
    # (the lowering for a TPU topology has no cost analysis in jax 0.10.2)
    flops = global_flops(graphdef, optimizer, layout, cfg, state, batch)
    st = cfg.model.stts
    flops_packed = None
    if packed_flops and st.method != "none" and st.execution == "packed":
        packed_graphdef = nnx.split(abstract_model(cfg, pack_fallback=False), nnx.Param)[0]
        flops_packed = global_flops(packed_graphdef, optimizer, layout, cfg, state, batch)
    update = update_flops(optimizer, state)
    accum = cfg.train.grad_accum
    per_step = lambda f: accum * f - (accum - 1) * update
    return StepEstimate(
        chips=mesh.devices.size, mesh=sharding.describe(mesh),
        params_bytes=max(per_device_bytes(state["params"]).values()),
        opt_bytes=max(per_device_bytes(state["opt_state"]).values()),
        batch_bytes=max(per_device_bytes(batch).values()),
        **sizes, compile_error=error,
        flops=flops, flops_per_device_compiled=flops_dev, flops_update=update, flops_step=per_step(flops),
        flops_packed=flops_packed, flops_packed_step=None if flops_packed is None else per_step(flops_packed),
        compile_s=time.perf_counter() - t0)


def _compile_sizes(lowered):
    """Returns (compiled or None, memory sizes dict, error) of a lowered program; a TPU out-of-memory refusal is
    reported through the temporaries its message names."""
    try:
        compiled, error = lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that does not fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, error = None, str(e).splitlines()[0]
    if compiled is None:
        return None, dict(argument_bytes=None, output_bytes=None, alias_bytes=None, peak_bytes=None,
                          temp_bytes=required_temp_bytes(error)), error
    mem = compiled.memory_analysis()
    sizes = dict(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                 alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes))
    sizes["peak_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
    return compiled, sizes, error


def estimate_eval(cfg: ml_collections.ConfigDict, mesh) -> StepEstimate:
    """Returns the estimate of `cfg`'s evaluation forward on `mesh`: the program `evaluate` runs per batch
    (`make_answer_logits`: ViT -> STTS -> adapter -> LLM, the answer position's logits), with parameters in
    their trainer shardings (as `load_model(..., mesh=)` restores them) and `cfg.data.rows` one-video rows split
    over (data, fsdp). No optimizer state; FLOPs = the forward's (`flops_step`), nothing executed."""
    from stts_jax.eval.evaluate import make_answer_logits

    t0 = time.perf_counter()
    layout = frame_layout(cfg)
    model = abstract_model(cfg)
    _, fn = make_answer_logits(model, layout, cfg.train.seed)
    params = nnx.state(model)
    params = with_shardings(params, sharding.state_shardings(params, mesh))
    batch = abstract_batch(cfg, mesh, micro_batches=False)
    del batch["targets"]  # evaluation feeds evaluate.EVAL_KEYS: no targets
    with jax.set_mesh(mesh):
        compiled, sizes, error = _compile_sizes(fn.lower(params, batch))
    flops = counted_flops(fn, unsharded(params), unsharded(batch))
    return StepEstimate(
        chips=mesh.devices.size, mesh=sharding.describe(mesh), params_bytes=max(per_device_bytes(params).values()),
        opt_bytes=0, batch_bytes=max(per_device_bytes(batch).values()), **sizes, compile_error=error, flops=flops,
        flops_per_device_compiled=flops_of(compiled.cost_analysis()) if compiled is not None else None,
        flops_update=0.0, flops_step=flops, compile_s=time.perf_counter() - t0)


def required_temp_bytes(error: str) -> int | None:
    """Returns the temporaries a refused TPU compilation says it needed ("... HLO temporaries (1002.92G) ...")."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", error or "")
    if not found:
        return None
    scale = 1024 ** " KMGT".index(found.group(2) or " ")
    return int(float(found.group(1)) * scale)


def unsharded(tree):
    """Returns ShapeDtypeStructs of `tree` without shardings (for a single-device lowering)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def global_flops(graphdef, optimizer, layout, cfg, state, batch) -> float:
    """Returns XLA's FLOPs of the whole train step (global batch; the accumulation loop body counted once)."""
    step_fn = make_train_step(graphdef, optimizer, layout, seed=cfg.train.seed)
    return counted_flops(step_fn, unsharded(state), unsharded(batch), lowering_platforms=("cpu",))


def counted_flops(fn, *args, lowering_platforms: tuple[str, ...] | None = None) -> float:
    """Returns XLA's FLOPs of `fn` (a jitted function, or a plain one) for `args`, with every attention tile
    counted: traced afresh with attention as one tile (`layers.one_tile`; XLA counts a loop body once)."""
    inner = getattr(fn, "__wrapped__", fn)
    fresh = jax.jit(lambda *a: inner(*a))  # a new function: jax's trace cache cannot serve a normal trace
    with layers.one_tile():
        traced = fresh.trace(*args)
    lowered = traced.lower(lowering_platforms=lowering_platforms) if lowering_platforms else traced.lower()
    return flops_of(lowered.cost_analysis())


def update_flops(optimizer, state) -> float:
    """Returns XLA's FLOPs of what the train step does once per step after its accumulation loop."""
    def tail(params, opt_state, grads):
        grads = jax.tree.map(lambda g: g / 2, grads)
        norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, norm

    params, opt_state = unsharded(state["params"]), unsharded(state["opt_state"])
    lowered = jax.jit(tail).trace(params, opt_state, params).lower(lowering_platforms=("cpu",))
    return flops_of(lowered.cost_analysis())


def flops_of(analysis) -> float:
    """Returns the FLOPs of an XLA cost analysis (a dict, or a list of one dict per program in older jax)."""
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def step_seconds(flops: float, chips: int, peak_flops_per_chip: float, mfu: float) -> float:
    """Returns the step time implied by `flops` on `chips` chips of `peak_flops_per_chip` at utilisation `mfu`."""
    return flops / (chips * peak_flops_per_chip * mfu)
