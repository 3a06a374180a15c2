"""Faults during training: non-finite updates, a stalled input under SIGTERM, saves on checkpoint steps and at the end.

Each test builds its fault from the input itself (NaN pixels in chosen steps' batches, an input that stops
delivering) and checks that the run goes on or stops cleanly, and that the checkpoints stay good.
"""

import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from stts_jax.train import inputs, trainer  # noqa: E402
from stts_jax.train.checkpoint import Checkpointer  # noqa: E402


def tiny_cfg(**train_overrides):
    """The tiny run, 10 steps in every test (the step count is compiled into the LR schedule: one program, which
    the session's compilation cache then serves to every test)."""
    from configs import tiny_train

    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=10, log_every=1, **train_overrides)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)  # the faults are per host; one device compiles fastest
    return cfg


class FaultySource(inputs.InputSource):
    """The config's real input; the batches of the steps in `nan_steps` (1-based) get NaN pixels, and asking for
    step `stall_at`'s batches sends this process a SIGTERM and blocks forever (a hung decoder)."""

    def __init__(self, source, nan_steps=(), stall_at=None, extra_placeholder_at=None, patch_id=None):
        super().__init__(source.iterator)
        self.nan_steps, self.stall_at, self.fetched = set(nan_steps), stall_at, 0
        self.extra_placeholder_at, self.patch_id = extra_placeholder_at, patch_id

    def next_batches(self, count):
        self.fetched += 1
        if self.fetched == self.stall_at:  # the loop takes the batches before and runs its step meanwhile
            threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            threading.Event().wait()
        batches = super().next_batches(count)
        if self.fetched in self.nan_steps:
            batches["pixel_values"] = np.full_like(batches["pixel_values"], np.nan)
        if self.fetched == self.extra_placeholder_at:  # e.g. question text that tokenised to one more <im_patch>
            row = batches["input_ids"][0, 1]
            row[np.flatnonzero((row != self.patch_id) & (row > 0))[0]] = self.patch_id
        return batches


def with_faults(monkeypatch, **faults):
    make = inputs.make_input
    monkeypatch.setattr(inputs, "make_input", lambda cfg: FaultySource(make(cfg), **faults))


def saved(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 10)
    return ckpt.manager.all_steps(), ckpt


def latest_params_finite(workdir) -> bool:
    steps, ckpt = saved(workdir)
    state = ckpt.manager.restore(max(steps), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ckpt.close()
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state["params"]))


def test_nonfinite_updates_are_skipped_counted_and_never_saved(tmp_path, monkeypatch):
    """Steps 3 and 4 see NaN pixels: their updates are skipped (counted in the metrics), the run goes on with
    finite losses, and the saved parameters are finite."""
    with_faults(monkeypatch, nan_steps=(3, 4))
    records = trainer.train(tiny_cfg(ckpt_every=2), str(tmp_path), stop_after=6)
    loss = [r["loss"] for r in records]
    assert np.isnan(loss[2]) and np.isnan(loss[3]), loss
    assert np.all(np.isfinite(loss[:2] + loss[4:])), loss
    assert [r["skipped_updates"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert [r["nonfinite_streak"] for r in records] == [0, 0, 1, 2, 0, 0]
    assert latest_params_finite(str(tmp_path))


def test_a_streak_of_nonfinite_updates_stops_the_run_with_finite_checkpoints(tmp_path, monkeypatch):
    with_faults(monkeypatch, nan_steps=range(3, 100))
    cfg = tiny_cfg(ckpt_every=2, max_nonfinite=3)
    with pytest.raises(trainer.NonFiniteUpdates, match="stopping at step 5: 3 updates in a row"):
        trainer.train(cfg, str(tmp_path))
    steps, ckpt = saved(str(tmp_path))
    ckpt.close()
    assert steps == [2, 4]  # nothing saved at or after the step that stopped the run
    assert latest_params_finite(str(tmp_path))


def test_sigterm_while_the_input_stalls_saves_the_last_step_and_resume_saves_the_final_step(tmp_path, monkeypatch,
                                                                                              caplog):
    """The input hangs when asked for step 4's batches and SIGTERM arrives while the loop waits: the run returns,
    keeping step 3, which is also a periodic checkpoint step (saved once: no StepAlreadyExistsError). Resumed with
    a clean input, it runs to step 10 and saves step 10 although 10 is not a multiple of ckpt_every; with
    keep_period=3 the checkpoints at multiples of 3 survive keep-last-2 rotation."""
    with_faults(monkeypatch, stall_at=4)
    workdir = str(tmp_path)
    records = trainer.train(tiny_cfg(ckpt_every=3), workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "SIGTERM while waiting for input: checkpointing step 3" in caplog.text
    assert saved(workdir)[0] == [1, 3]  # Orbax's save policy also keeps the first step of a fresh run
    monkeypatch.undo()
    records = trainer.train(tiny_cfg(ckpt_every=3, keep_period=3), workdir)
    assert [r["step"] for r in records] == list(range(4, 11))
    assert saved(workdir)[0] == [3, 6, 9, 10]


def test_a_batch_whose_placeholders_disagree_with_its_frames_is_refused(tmp_path, monkeypatch):
    """One extra placeholder in row 1 (never clamped, never shifted into other rows): the run stops with an error
    naming the micro-batch and the row, before anything is compiled."""
    cfg = tiny_cfg(ckpt_every=2)
    with_faults(monkeypatch, extra_placeholder_at=1, patch_id=cfg.model.tokens.image_patch_id)
    with pytest.raises(ValueError, match=r"input micro-batch 0 refused: row 1 holds \d+ image-patch placeholders but "
                                         r"its real frames give \d+ vision tokens.*rows with a mismatch: \[1\]"):
        trainer.train(cfg, str(tmp_path))
