"""Orbax checkpoints (the only file that knows Orbax): state + data-iterator state + config, async, keep-last-K.

The data-iterator state is per host: every process writes its own `data/process_<i>-of-<n>.json` (Grain's
checkpoint handler) and restores its own, so hosts whose pipelines diverged (different slices, packing or
skipped videos) each resume where they were. Checkpoints written before this (one JSON item from the primary
host) still restore: every host then gets that one state, as it did then.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from stts_jax import paths


class IncompatibleCheckpoint(ValueError):
    """The workdir holds a checkpoint written by a different config; the message names the fields."""


# What a resumed run may change: how long it runs (the LR schedule follows the new train.steps), how it logs and
# keeps checkpoints, the mesh (Orbax reshards on restore), the input workers and what bad input does. Every other field (model, STTS,
# data source and seed, optimizer, seeds) decides what the run computes, so a resume must match it.
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.keep_period",
                     "train.max_nonfinite", "train.init_from", "mesh.", "data.workers", "data.worker_buffer",
                     "data.read_threads", "data.read_buffer", "data.host_prefetch", "data.decode_threads",
                     "data.on_bad_video",
                     "data.max_consecutive_bad", "data.max_bad_fraction", "train.eval_", "train.profile_steps",
                     "train.lease_stale_s")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_json(cfg: ml_collections.ConfigDict) -> dict:
    """Returns the config as JSON-able nested dicts (tuples as lists)."""
    return json.loads(cfg.to_json_best_effort())


def check_compatible(saved: dict, cfg: ml_collections.ConfigDict) -> None:
    """Raises IncompatibleCheckpoint naming every field outside RESUME_MAY_CHANGE that differs from the saved
    config (shapes, STTS, data, optimizer, seeds: resuming with them changed would silently train something else)."""
    old, new = _flatten(saved), _flatten(config_json(cfg))
    # a field newer than the checkpoint's config is compatible while it holds its default (what the old code did)
    from stts_jax.config import train_config

    defaults = _flatten(config_json(train_config()))
    differ = sorted(k for k in set(old) | set(new)
                    if not k.startswith(RESUME_MAY_CHANGE) and old.get(k) != new.get(k)
                    and not (k not in old and k in defaults and new.get(k) == defaults[k]))
    if differ:
        details = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs config {new.get(k)!r}" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise IncompatibleCheckpoint(f"the workdir's checkpoint was written by a different config ({details}{more}); "
                                     f"use a new --workdir or the original config (a resume may change only "
                                     f"{', '.join(RESUME_MAY_CHANGE)})")


class HostDataState:
    """This host's data-iterator state (a JSON-able dict) in the shape Grain's checkpoint handler saves and
    restores (it would otherwise want the iterator itself; the trainer saves the state of the last batch it took,
    which its prefetch thread has moved past)."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by the handler after set_state; nothing runs here
        pass


class Checkpointer:
    """Saves {state, data, config} every `every` steps (async) and on demand; restores the latest.

    Keeps the newest `keep`, and with `keep_period` > 0 also every checkpoint whose step is a multiple of it.
    """

    def __init__(self, directory: str, every: int, keep: int, keep_period: int = 0):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               keep_period=keep_period or None, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(paths.as_path(directory), options=options)

    def latest_step(self) -> int | None:
        """Returns the newest saved step, or None."""
        return self.manager.latest_step()

    def saved_config(self, step: int) -> dict:
        """Returns the config stored with checkpoint `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def due(self, step: int) -> bool:
        """Whether `step` is a periodic checkpoint step not saved yet."""
        return self.manager.should_save(step)

    def save(self, step: int, state, data_state: dict, cfg: ml_collections.ConfigDict, force: bool = False) -> bool:
        """Saves if `step` is due (or force) and not saved already; returns whether a save started."""
        if self.manager.latest_step() == step:  # e.g. SIGTERM on a periodic step: that save is the one
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain_checkpoint.CheckpointSave(HostDataState(data_state)),
            config=ocp.args.JsonSave(config_json(cfg))), force=force)

    def restore(self, step: int, like_state) -> tuple[object, dict]:
        """Returns (state, data_state) of checkpoint `step`, placed like `like_state` (shapes + shardings)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        per_host = any((self.manager.directory / str(step) / "data").glob("process_*-of-*.json"))
        data = grain_checkpoint.CheckpointRestore(HostDataState()) if per_host else ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=data))
        return out["state"], out["data"].state if per_host else out["data"]

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
