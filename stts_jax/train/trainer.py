"""The training loop: config check → mesh → input → model → shard → step → checkpoint → loop.

`train(cfg, workdir)` is what `launch/train.py` runs; tests call it in-process. A run resumes from the
newest checkpoint in `workdir/checkpoints` (after checking the saved config is compatible), saves every
`train.ckpt_every` steps (async) and on SIGTERM, and logs to stdout, `metrics.jsonl` and TensorBoard. With
`train.eval_every` it runs the multiple-choice evaluator (`stts_jax.eval.evaluate`, the run's own STTS method and
ratio) on `data.path`'s `train.eval_split` every that many steps and at the last step, logged to `eval.jsonl` and
TensorBoard (`eval/...`); with `train.profile_steps="a,b"` it writes a `jax.profiler` trace of steps a..b to
`workdir/profile` (TensorBoard's profile plugin / xprof read it).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import tempfile
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from stts_jax import geometry, paths
from stts_jax.config import ConfigError, profile_range, validate_train_config
from stts_jax.geometry import tokens_per_frame
from stts_jax.geometry import FrameLayout
from stts_jax.model.vlm import Molmo2VLM, check_batch
from stts_jax.train import checkpoint as ckpt_lib
from stts_jax.train import inputs, sharding
from stts_jax.train.lease import Lease, WorkdirBusy
from stts_jax.train.metrics import MetricWriter
from stts_jax.train.optim import make_optimizer
from stts_jax.train.step import init_state, make_train_step, shardings_of


def frame_layout(cfg: ml_collections.ConfigDict) -> FrameLayout:
    """Returns the static FrameLayout of one batch row: videos_per_batch / rows video slots of num_frames frames."""
    return FrameLayout.video_slots(cfg.data.videos_per_batch // cfg.data.rows, cfg.data.num_frames)


def model_embed_dims(model_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Returns the model's `embed` widths (what an auto fsdp size must divide), from abstract shapes only."""
    return sharding.embed_dims_of(nnx.state(nnx.eval_shape(lambda: Molmo2VLM(model_cfg, rngs=nnx.Rngs(0)))))


def load_own_init(cfg: ml_collections.ConfigDict, mesh=None) -> Molmo2VLM | None:
    """Returns the model of `train.init_from` if it is this project's own weights (a training workdir's latest
    checkpoint or a params checkpoint), with cfg.model's STTS setup (scorer fresh); else None.

    With a mesh, the weights are restored straight into their shardings and the fresh scorer is initialised
    sharded.
    """
    from stts_jax.interop import params_io

    path = cfg.train.init_from
    if not path:
        return None
    try:
        own = params_io.load_checkpoint(path, kinds=("params", "train"), mesh=mesh).model
    except params_io.ParamsCheckpointError:
        if params_io.is_params_checkpoint(path) or params_io.is_train_workdir(path):
            raise  # ours, but unreadable: say why rather than fall through to the Molmo2 importer
        return None
    model, fresh = params_io.transplant(own, cfg.model, seed=cfg.train.seed, fresh=("scorer",), mesh=mesh)
    logging.info("initialised from %s; fresh: %s", path, fresh)
    return model


def build_model(cfg: ml_collections.ConfigDict, mesh, own: Molmo2VLM | None = None) -> Molmo2VLM:
    """Returns the model sharded on `mesh`: `own` weights (load_own_init), a Molmo2 checkpoint in
    `train.init_from` (scorer fresh), or initialised from scratch by one jitted, sharded init."""
    if own is not None:
        return sharding.shard_model(own, mesh)  # already in place when restored with the mesh
    if cfg.train.init_from:
        from stts_jax.interop.hf_import import load_molmo2

        model, report = load_molmo2(cfg.train.init_from, cfg.model, seed=cfg.train.seed)
        logging.info("initialised from %s (%s layout); fresh: %s", cfg.train.init_from, report.layout, report.fresh)
        return sharding.shard_model(model, mesh)
    return sharding.init_sharded(lambda: Molmo2VLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), mesh)


class BadBatchError(ValueError):
    """A micro-batch the model cannot run as it is (e.g. a row whose placeholders disagree with its frames)."""


class NonFiniteUpdates(RuntimeError):
    """At least `train.max_nonfinite` updates in a row had a non-finite gradient (all skipped: parameters stay
    finite); checked whenever the loop reads the metrics (log and checkpoint steps)."""


class _Prefetch:
    """Fetches each step's micro-batches on a thread, one step ahead.

    The loop waits for input with a timeout, so a SIGTERM is honoured while the input stalls (a hung decoder, a
    stalled bucket), and the host prepares step n+1 while step n runs. `state` is the input's checkpointable
    state after the batches handed out so far (not after the one fetched ahead).
    """

    POLL_S = 0.5

    def __init__(self, source: inputs.InputSource, count: int, check=None):
        self.report, self._check = source.report, check
        self.state = source.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._taken = threading.Event()  # the loop took the last batches: fetch the next (one step ahead, not two)
        threading.Thread(target=self._run, args=(source, count), daemon=True, name="stts-input").start()

    def _put(self, item) -> None:
        """Hands `item` over and waits until the loop takes it."""
        self._taken.clear()
        self._queue.put(item)  # the queue is empty here: the previous item was taken
        while not self._closed.is_set() and not self._taken.wait(self.POLL_S):
            continue

    def _run(self, source: inputs.InputSource, count: int) -> None:
        try:
            while not self._closed.is_set():
                batches = source.next_batches(count)
                if self._check is not None:
                    self._check(batches)
                self._put((batches, source.get_state()))
        except BaseException as e:  # handed to the loop, raised there
            self._put((e, None))

    def next(self, give_up) -> dict | None:
        """Returns the next step's batches, or None once `give_up()` is true while waiting for them."""
        while True:
            try:
                batches, state = self._queue.get(timeout=self.POLL_S)
            except queue.Empty:
                if give_up():
                    return None
                continue
            self._taken.set()
            if isinstance(batches, BaseException):
                raise batches
            self.state = state
            return batches

    def close(self) -> None:
        self._closed.set()


class _Preemption:
    """Turns the first SIGTERM into a flag the loop polls (checkpoint, then exit); a second SIGTERM takes the
    handler that was there before (by default: terminate), so an operator can still stop a hung save."""

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
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        os.write(2, b"SIGTERM: saving a checkpoint after this step, then exiting (a second SIGTERM terminates)\n")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) training; returns the logged records of this run. `stop_after` ends early (tests)."""
    # ---- config and workdir: refuse bad input before any compilation
    validate_train_config(cfg)
    evaluator = _Evaluator(cfg, workdir) if cfg.train.get("eval_every", 0) else None  # its split checked now
    try:  # the devices checked against the mesh section before the workdir is touched
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                  embed_dims=model_embed_dims(cfg.model) if cfg.mesh.fsdp == 0 else (),
                                  slices=cfg.mesh.get("slices", 1))
    except ValueError as e:
        raise ConfigError(f"config section `mesh`: {str(e).removeprefix('mesh: ')}") from None
    paths.makedirs(workdir)
    lease, busy = None, None
    if jax.process_index() == 0:  # one lease per job: the other hosts of this job share process 0's
        stale = float(cfg.train.get("lease_stale_s", 300.0))
        try:
            lease = Lease(workdir, stale_s=stale, heartbeat_s=min(30.0, stale / 4)).acquire()
        except WorkdirBusy as e:
            busy = e
    if jax.process_count() > 1:  # every host learns process 0's answer (else they would go on into collectives)
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
            busy = WorkdirBusy(f"workdir {workdir} is in use by another job (process 0 names the holder)")
    if busy is not None:
        raise busy
    try:
        return _run(cfg, workdir, evaluator, stop_after, mesh)
    finally:
        if lease is not None:
            lease.release()


def _run(cfg: ml_collections.ConfigDict, workdir: str, evaluator, stop_after: int | None, mesh) -> list[dict]:
    """train() once the config is checked and the workdir leased."""
    checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), cfg.train.ckpt_every,
                                         cfg.train.keep_ckpts, cfg.train.keep_period)
    latest = checkpointer.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(checkpointer.saved_config(latest), cfg)

    # ---- mesh
    logging.info("mesh: %s", sharding.describe(mesh))
    layout = frame_layout(cfg)
    own = load_own_init(cfg, mesh)
    with jax.set_mesh(mesh):
        # ---- input
        source = inputs.make_input(cfg)
        # ---- model, optimizer, sharded state
        model = build_model(cfg, mesh, own)
        del own
        optimizer = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
        graphdef, state = init_state(model, optimizer)
        del model
        state_shardings = shardings_of(state)
        step_fn = make_train_step(graphdef, optimizer, layout, seed=cfg.train.seed, state_shardings=state_shardings)
        # ---- resume
        if latest is not None:
            try:
                state, data_state = checkpointer.restore(latest, state)
            except (ValueError, KeyError, TypeError) as e:
                raise ckpt_lib.IncompatibleCheckpoint(
                    f"checkpoint step {latest} in {workdir} does not fit this trainer's state ({type(e).__name__}: "
                    f"{str(e)[:300]}); it was probably written by an older version: use a new --workdir "
                    "(--config.train.init_from=<that workdir> keeps its weights)") from e
            source.set_state(data_state)
            logging.info("resumed from step %d", latest)
        start = int(state["step"])
        # ---- metrics
        w = tokens_per_frame(cfg.model)
        kept = geometry.row_vision_tokens(cfg.model, layout)
        tokens_per_step = cfg.data.rows * cfg.data.seq_len * cfg.train.grad_accum
        writer = MetricWriter(workdir, cfg.train.steps, tokens_per_step=tokens_per_step)
        if evaluator is not None:
            evaluator.bind(graphdef, writer, mesh)
        records: list[dict] = []
        # ---- loop
        fetch = _Prefetch(source, cfg.train.grad_accum, check=lambda batches: check_micro_batches(batches, cfg, layout))
        try:
            with _Preemption() as preemption:
                records += _loop(cfg, start, step_fn, state, fetch, preemption, checkpointer, writer, mesh,
                                 stop_after, kept / (w * layout.num_frames), evaluator,
                                 paths.join(workdir, "profile"))
        finally:
            fetch.close()
            checkpointer.wait()
            checkpointer.close()
            writer.close()
    records_compiles = step_fn._cache_size()
    for r in records:
        r["compilations"] = records_compiles
    return records


def check_micro_batches(batches: dict, cfg: ml_collections.ConfigDict, layout: FrameLayout) -> None:
    """Raises BadBatchError naming the micro-batch and row whose placeholders disagree with its frames (the model
    would otherwise give some placeholders another row's features or none): `check_batch` on every micro-batch."""
    for i in range(len(batches["input_ids"])):
        try:
            check_batch({k: v[i] for k, v in batches.items()}, cfg.model, layout)
        except ValueError as e:
            raise BadBatchError(f"input micro-batch {i} refused: {e}") from None


class _Evaluator:
    """Evaluation during training: the multiple-choice evaluator on the training parameters, every
    `train.eval_every` steps and at the last; one line of `eval.jsonl` per evaluation (process 0), TensorBoard
    scalars `eval/...`. The split and the tokenizer are checked when it is built (before any compilation)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        from stts_jax.data.pipeline import find_tokenizer
        from stts_jax.eval import evaluate as ev

        self.cfg, self.every = cfg, int(cfg.train.eval_every)
        split = cfg.train.get("eval_split", "validation")
        try:
            sheet = ev.answer_sheet(cfg.data.path, split)
            self.tokenizer = find_tokenizer(cfg.data)
        except Exception as e:  # missing split, unreadable dataset, no tokenizer
            raise ConfigError(f"config field `train.eval_split`: cannot evaluate split {split!r} of "
                              f"{cfg.data.path} ({type(e).__name__}: {str(e)[:300]})") from None
        if not sheet:
            raise ConfigError(f"config field `train.eval_split`: split {split!r} of {cfg.data.path} is empty")
        if not all(q.options for q in sheet.values()):
            raise ConfigError(f"config field `train.eval_split`: split {split!r} of {cfg.data.path} holds open "
                              "questions (no options); the evaluator is multiple-choice")
        from stts_jax.data.tokenizer import load_tokenizer

        try:
            ev.option_letter_ids(load_tokenizer(self.tokenizer), max(len(q.options) for q in sheet.values()))
        except ev.EvalError as e:
            raise ConfigError(f"config field `train.eval_split`: {self.tokenizer}: {e}") from None
        self.split, self.path = split, paths.join(workdir, "eval.jsonl")
        self.graphdef = self.writer = self.mesh = None

    def bind(self, graphdef, writer: MetricWriter, mesh) -> None:
        self.graphdef, self.writer, self.mesh = graphdef, writer, mesh

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.train.steps

    def __call__(self, params, step: int) -> dict:
        """Evaluates the parameters of `step`; returns the record written."""
        import json

        from stts_jax.eval import evaluate as ev

        cfg, st = self.cfg, self.cfg.model.stts
        result = ev.evaluate(nnx.merge(self.graphdef, params), cfg.data.path, split=self.split,
                             tokenizer=self.tokenizer, method=st.method,
                             ratio=st.prune_ratio if st.method != "none" else 0.0, frames=cfg.data.num_frames,
                             rows=cfg.data.rows, max_examples=cfg.train.get("eval_max_examples", 0),
                             max_fps=cfg.data.get("max_fps", 2.0), seed=cfg.train.seed, progress=False,
                             mesh=self.mesh)
        record = dict(step=step, accuracy=result.accuracy(), examples=result.count.get("all", 0),
                      skipped=result.skipped, seconds=round(result.seconds, 2),
                      **{f"accuracy_{k}": result.accuracy(k) for k in sorted(result.count) if k != "all"})
        if jax.process_index() == 0:
            print(f"eval step {step}: {self.split} accuracy {100 * record['accuracy']:.1f}% ({record['examples']} "
                  f"examples, {st.method} ratio {result.ratio:g}, {record['seconds']:.0f} s)", flush=True)
            paths.append_line(self.path, json.dumps(record))
            if self.writer is not None and self.writer.tb is not None:
                for k, v in record.items():
                    if k != "step":
                        self.writer.tb.add_scalar(f"eval/{k}", v, step)
        return record


def _loop(cfg, start, step_fn, state, fetch, preemption, checkpointer, writer, mesh, stop_after,
          kept_fraction, evaluator=None, profile_dir="profile") -> list[dict]:
    """Steps from `start` until the last step, SIGTERM or `stop_after`; returns the logged records.

    Saves every `ckpt_every` steps and always the step it stops at (the last one included); a SIGTERM while
    waiting for input saves the last completed step. Updates with a non-finite gradient are skipped by the
    optimizer; `max_nonfinite` of them in a row raise NonFiniteUpdates (checked whenever metrics are read: at log
    and checkpoint steps), so no checkpoint ever holds what they would have written.
    """
    trace = dict(range=profile_range(cfg), dir=profile_dir, target=profile_dir, on=False)
    if trace["range"] and paths.is_remote(profile_dir):  # the profiler writes local files: uploaded when it stops
        trace["dir"] = tempfile.mkdtemp(prefix="stts_profile_")
    try:
        return _steps(cfg, start, step_fn, state, fetch, preemption, checkpointer, writer, mesh, stop_after,
                      kept_fraction, evaluator, trace)
    finally:
        if trace["on"]:  # stopped (SIGTERM, error) inside the profiled steps: close the trace anyway
            try:
                _stop_trace(trace)
            except Exception as e:  # never hide the error that stopped the loop
                logging.warning("profile: could not close the trace: %s", e)
        if trace["dir"] != trace["target"]:
            shutil.rmtree(trace["dir"], ignore_errors=True)


def _stop_trace(trace: dict) -> None:
    """Stops the profiler; a trace written for a gs:// profile dir is uploaded there now (not at the run's end)."""
    trace["on"] = False
    jax.profiler.stop_trace()
    if trace["dir"] != trace["target"]:
        paths.upload_tree(trace["dir"], trace["target"])


def _steps(cfg, start, step_fn, state, fetch, preemption, checkpointer, writer, mesh, stop_after, kept_fraction,
           evaluator, trace) -> list[dict]:
    records = []
    last = time.perf_counter()
    done, skipped = start, 0
    while done < cfg.train.steps:
        # one process: a SIGTERM while the input stalls saves the last step; several: this host waits for its input
        # (a save on one host alone would hang), and the per-step agreement below stops every host together
        batches = fetch.next(give_up=lambda: preemption.requested and jax.process_count() == 1)
        if batches is None:  # SIGTERM while the input stalled: keep the last completed step
            logging.warning("SIGTERM while waiting for input: checkpointing step %d and exiting", done)
            checkpointer.save(done, state, fetch.state, cfg, force=True)
            break
        batch = sharding.to_global(batches, mesh, batch_axis=1)
        if done == start:
            writer.step_flops = step_flops(step_fn, state, batch)
        first, last_traced = trace["range"] or (0, -1)
        if first <= done + 1 <= last_traced and not trace["on"]:
            jax.profiler.start_trace(trace["dir"])
            trace["on"] = True
        with jax.profiler.StepTraceAnnotation("train", step_num=done + 1):  # xprof's step boundaries
            state, metrics = step_fn(state, batch)
        done += 1
        preempted = _any_host(preemption.requested)  # every host stops (and saves) at the same step
        if trace["on"] and done >= last_traced:
            jax.block_until_ready(state)
            _stop_trace(trace)
            logging.info("profile: trace of steps %d-%d in %s", max(first, start + 1), done, trace["target"])
        stopping = (preempted or done == cfg.train.steps
                    or (stop_after is not None and done - start >= stop_after))
        log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
        save_now = stopping or checkpointer.due(done)
        if log_now or save_now:
            metrics = jax.device_get(metrics)
            streak = int(metrics.get("nonfinite_streak", 0))
            if streak >= cfg.train.max_nonfinite:
                raise NonFiniteUpdates(
                    f"stopping at step {done}: {streak} updates in a row had a non-finite gradient (loss "
                    f"{float(metrics['loss'])}); they were skipped, so parameters and checkpoints stay finite "
                    f"(latest checkpoint: step {checkpointer.latest_step()}). Look for bad input; to go on with "
                    "another learning rate or data, start a new --workdir with --config.train.init_from=<this "
                    "workdir> (a resume here would repeat the same steps); train.max_nonfinite sets the limit")
        if log_now:
            if fetch.report is not None:  # bad examples skipped so far (counted ahead of the step by the prefetch)
                if fetch.report.total > skipped:
                    logging.warning("input: %s", fetch.report.summary())
                skipped = metrics["skipped_examples"] = fetch.report.total
            now = time.perf_counter()
            elapsed = (now - last) / (cfg.train.log_every if done > start + 1 else 1)
            last = now
            metrics["kept_fraction"] = kept_fraction
            records.append(writer.write(done, metrics, elapsed, done - start))
        if save_now:
            if preempted:
                logging.warning("SIGTERM: checkpointing step %d and exiting", done)
            checkpointer.save(done, state, fetch.state, cfg, force=stopping)
        if evaluator is not None and evaluator.due(done) and not preempted:
            evaluator(state["params"], done)
        if stopping:
            break
    return records


def _any_host(flag: bool) -> bool:
    """Returns whether `flag` is set on any host (itself in one process): a small all-gather per call."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def step_flops(step_fn, state, batch) -> float:
    """Returns XLA's FLOP count of one train step (for MFU)."""
    from stts_jax.estimate import counted_flops

    try:  # the lowered program's estimate: no second compilation
        return counted_flops(step_fn, state, batch)
    except Exception:  # cost analysis is best effort
        return 0.0
