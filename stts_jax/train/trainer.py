"""The training loop: config check → mesh → input → model → shard → step → checkpoint → loop.

`train(cfg, workdir)` is what `launch/train.py` runs; tests call it in-process. A run resumes from the
newest checkpoint in `workdir/checkpoints` (after checking the saved config is compatible), saves every
`train.ckpt_every` steps (async) and on SIGTERM, and logs to stdout, `metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from stts_jax.config import ConfigError, tokens_per_frame, validate_model_config
from stts_jax.model import pruning
from stts_jax.model.adapter import video_pooling_indices
from stts_jax.model.pruning import FrameLayout
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.train import checkpoint as ckpt_lib
from stts_jax.train import inputs, sharding
from stts_jax.train.metrics import MetricWriter
from stts_jax.train.optim import GROUPS, make_optimizer
from stts_jax.train.step import init_state, make_train_step, shardings_of


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field `{field}`: {message}")


def validate_train_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible field of a training config (before any work)."""
    for section in ("model", "data", "mesh", "optim", "train"):
        _require(section in cfg, section, "missing section")
    validate_model_config(cfg.model)
    tr, data, optim = cfg.train, cfg.data, cfg.optim
    _require(tr.steps > 0, "train.steps", f"must be > 0, got {tr.steps}")
    _require(tr.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {tr.grad_accum}")
    _require(tr.log_every >= 1 and tr.ckpt_every >= 1 and tr.keep_ckpts >= 1, "train.log_every",
             "log_every, ckpt_every and keep_ckpts must be >= 1")
    for group in tuple(optim.freeze):
        _require(group in GROUPS, "optim.freeze", f"unknown group {group!r}; groups are {GROUPS}")
    _require(data.kind in inputs.KINDS, "data.kind", f"must be one of {inputs.KINDS}, got {data.kind!r}")
    if data.kind != "random":
        _require(bool(data.path) and os.path.exists(data.path), "data.path",
                 f"dataset path {data.path!r} does not exist")
    _require(data.num_frames >= 1 and data.videos_per_batch >= 1 and data.rows >= 1, "data.num_frames",
             "num_frames, videos_per_batch and rows must be >= 1")
    if tr.init_from:
        _require(os.path.isdir(tr.init_from), "train.init_from", f"checkpoint directory {tr.init_from!r} does not exist")


def frame_layout(cfg: ml_collections.ConfigDict) -> FrameLayout:
    """Returns the static FrameLayout of one micro-batch: videos_per_batch videos of num_frames frames."""
    return FrameLayout.videos(*([cfg.data.num_frames] * cfg.data.videos_per_batch))


def load_own_init(cfg: ml_collections.ConfigDict) -> Molmo2VLM | None:
    """Returns the model of `train.init_from` if it is this project's own weights (a training workdir's latest
    checkpoint or a params checkpoint), with cfg.model's STTS setup (scorer fresh); else None.

    Call it outside any mesh context (the checkpoint is restored on one device, then sharded).
    """
    from stts_jax.interop import params_io

    path = cfg.train.init_from
    if not path:
        return None
    if params_io.is_params_checkpoint(path):
        own = params_io.load_model(path)
    elif params_io.is_train_workdir(path):
        own = params_io.load_train_checkpoint(path)[0]
    else:
        return None
    model, fresh = params_io.transplant(own, cfg.model, seed=cfg.train.seed, fresh=("scorer",))
    logging.info("initialised from %s; fresh: %s", path, fresh)
    return model


def build_model(cfg: ml_collections.ConfigDict, own: Molmo2VLM | None = None) -> Molmo2VLM:
    """Returns the model: `own` weights (load_own_init), a Molmo2 checkpoint in `train.init_from` (scorer
    fresh), or initialised from scratch."""
    if own is not None:
        return own
    if cfg.train.init_from:
        from stts_jax.interop.hf_import import load_molmo2

        model, report = load_molmo2(cfg.train.init_from, cfg.model, seed=cfg.train.seed)
        logging.info("initialised from %s (%s layout); fresh: %s", cfg.train.init_from, report.layout, report.fresh)
        return model
    return Molmo2VLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))


class _Preemption:
    """Turns SIGTERM into a flag the loop polls (checkpoint, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) training; returns the logged records of this run. `stop_after` ends early (tests)."""
    # ---- config and workdir: refuse bad input before any compilation
    validate_train_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train.ckpt_every,
                                         cfg.train.keep_ckpts)
    latest = checkpointer.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(checkpointer.saved_config(latest), cfg)

    # ---- mesh
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    logging.info("mesh: %s", sharding.describe(mesh))
    layout = frame_layout(cfg)
    own = load_own_init(cfg)
    with jax.set_mesh(mesh):
        # ---- input
        source = inputs.make_input(cfg)
        # ---- model, optimizer, sharded state
        model = build_model(cfg, own)
        del own
        sharding.shard_model(model, mesh)
        optimizer = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
        graphdef, state = init_state(model, optimizer)
        del model
        state_shardings = shardings_of(state)
        step_fn = make_train_step(graphdef, optimizer, layout, seed=cfg.train.seed, state_shardings=state_shardings)
        # ---- resume
        if latest is not None:
            state, data_state = checkpointer.restore(latest, state)
            source.set_state(data_state)
            logging.info("resumed from step %d", latest)
        start = int(state["step"])
        # ---- metrics
        w = tokens_per_frame(cfg.model)
        st = cfg.model.stts
        kept = (pruning.kept_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
                if st.method != "none" else w * layout.num_frames)
        tokens_per_step = cfg.data.rows * cfg.data.seq_len * cfg.train.grad_accum
        writer = MetricWriter(workdir, cfg.train.steps, tokens_per_step=tokens_per_step)
        records: list[dict] = []
        # ---- loop
        with _Preemption() as preemption:
            last = time.perf_counter()
            for step in range(start, cfg.train.steps):
                batch = host_batch_to_global(source.next_batches(cfg.train.grad_accum), mesh, cfg)
                if step == start:
                    writer.step_flops = step_flops(step_fn, state, batch)
                state, metrics = step_fn(state, batch)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    elapsed = (now - last) / (cfg.train.log_every if done > start + 1 else 1)
                    last = now
                    metrics["kept_fraction"] = kept / (w * layout.num_frames)
                    records.append(writer.write(done, metrics, elapsed, done - start))
                checkpointer.save(done, state, source.get_state(), cfg)
                if preemption.requested or (stop_after is not None and done - start >= stop_after):
                    if preemption.requested:
                        logging.warning("SIGTERM: checkpointing step %d and exiting", done)
                    checkpointer.save(done, state, source.get_state(), cfg, force=True)
                    break
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    records_compiles = step_fn._cache_size()
    for r in records:
        r["compilations"] = records_compiles
    return records


def step_flops(step_fn, state, batch) -> float:
    """Returns XLA's FLOP count of one train step (for MFU)."""
    from stts_jax.train.estimate import flops_of

    try:  # the lowered program's estimate: no second compilation
        return flops_of(step_fn.lower(state, batch).cost_analysis())
    except Exception:  # cost analysis is best effort
        return 0.0


def host_batch_to_global(batch: dict, mesh, cfg: ml_collections.ConfigDict) -> dict:
    """Returns global jax.Arrays from this host's stacked micro-batches [accum, ...].

    Axis 1 (rows / frames) is split over data x fsdp when it divides; the pooling indices are the same
    static function of the global frame count on every host, so they are built here, not shipped.
    """
    out = {}
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    for key, value in batch.items():
        if key in ("pooling_idx", "num_videos"):
            continue
        value = np.asarray(value)
        global_shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])
        spec = [None, ("data", "fsdp") if global_shape[1] % dp == 0 else None] + [None] * (value.ndim - 2)
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        out[key] = jax.make_array_from_process_local_data(shard, value, global_shape)
    accum, frames = out["pixel_values"].shape[:2]
    grid = cfg.model.vit.image_size // cfg.model.vit.patch_size
    pooling = video_pooling_indices(frames, grid, cfg.model.adapter.pool_size).astype(np.int32)
    out["pooling_idx"] = jax.device_put(np.broadcast_to(pooling, (accum, *pooling.shape)), sharding.replicated(mesh))
    return out
