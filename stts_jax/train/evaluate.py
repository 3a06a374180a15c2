"""Multiple-choice evaluation: accuracy from the option letters' logits at the answer position.

For every example of a prepared `video_qa` split (one video per packed row, no shuffling), the model reads
the prompt (video + question + "A. option" lines + the letter instruction) and the prediction is the option
whose letter has the largest logit at the first answer position, i.e. the most likely option under the
model (each option is one letter token). Accuracy is reported per question kind and overall, with the
vision tokens per example the LLM sees, so methods (none / scorer / random) and frame counts (test-time
scaling: more frames at the same token budget) can be put side by side.

Batches are the input pipeline's batch-major host batches (pixel_values [R, T, N, P], frame_mask [R, T]: one
video slot per row, `FrameLayout.video_slots(1, T)`), made device arrays by `sharding.to_global` on a mesh
(one device unless one is given).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stts_jax import geometry
from stts_jax.geometry import FrameLayout
from stts_jax.model.partitioning import under_mesh
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.train import sharding

METHODS = ("none", "scorer", "random")
EVAL_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "pixel_values", "frame_mask")  # frame_mask optional
CSV_FIELDS = ("run", "train_method", "train_ratio", "method", "ratio", "frames", "kind", "correct", "count",
              "accuracy", "vision_tokens", "vision_tokens_unpruned")


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message says why."""


@dataclasses.dataclass
class EvalResult:
    """Accuracy of one (model, method, ratio, frames) setting on one split."""

    method: str
    ratio: float
    frames: int
    correct: dict  # kind -> correct answers ("all" included)
    count: dict  # kind -> examples
    vision_tokens: int  # per example, as the LLM sees them
    vision_tokens_unpruned: int
    seconds: float
    skipped: int = 0  # examples with bad videos (reported by the pipeline)
    predictions: list = dataclasses.field(default_factory=list)  # (record index, predicted option, answer)

    def accuracy(self, kind: str = "all") -> float:
        """Returns the fraction of correct answers of a kind (nan if there is none)."""
        return self.correct.get(kind, 0) / self.count[kind] if self.count.get(kind) else float("nan")

    def rows(self, **extra) -> list[dict]:
        """Returns one CSV row per kind (CSV_FIELDS; `extra` fills run / train_method / train_ratio)."""
        kinds = sorted(k for k in self.count if k != "all") + ["all"]
        return [dict(extra, method=self.method, ratio=self.ratio, frames=self.frames, kind=k,
                     correct=self.correct.get(k, 0), count=self.count[k], accuracy=round(self.accuracy(k), 6),
                     vision_tokens=self.vision_tokens, vision_tokens_unpruned=self.vision_tokens_unpruned)
                for k in kinds]


def with_stts(model: Molmo2VLM, method: str, ratio: float) -> Molmo2VLM:
    """Returns a model sharing `model`'s weights with STTS set to (method, ratio); the scorer must exist for it."""
    if method not in METHODS:
        raise EvalError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= ratio < 1.0:
        raise EvalError(f"prune ratio must be in [0, 1), got {ratio}")
    if method == "scorer" and model.scorer is None:
        raise EvalError(f"method 'scorer' needs a model trained with the STTS scorer; this one was trained with "
                        f"stts.method={model.cfg.stts.method!r} (evaluate it with method none or random)")
    from stts_jax.interop.params_io import transplant

    cfg = copy.deepcopy(model.cfg)
    cfg.stts.method = method
    cfg.stts.prune_ratio = float(ratio) if method != "none" else cfg.stts.prune_ratio
    return transplant(model, cfg)[0]


def vision_tokens_per_example(cfg: ml_collections.ConfigDict, frames: int, method: str, ratio: float) -> int:
    """Returns the vision tokens one video of `frames` frames puts into the LLM sequence (W*T, or W*T - K)."""
    w = geometry.tokens_per_frame(cfg)
    if method == "none" or ratio == 0:
        return w * frames
    return w * frames - geometry.prune_count(frames, w, ratio, cfg.stts.prune_from_frame)


@functools.lru_cache(maxsize=8)
def answer_sheet(data_dir: str, split: str) -> dict:
    """Returns {record index: (number of options, answer_index, kind)} of a prepared `video_qa` split.

    Reads every record once per (data_dir, split) and process (the records hold the video bytes too).
    """
    from stts_jax.data.pipeline import open_source

    source = open_source(data_dir, split)
    sheet = {}
    for i in range(len(source)):
        r = source[i]
        kind = r["kind"].decode() if isinstance(r["kind"], bytes) else str(r["kind"])
        sheet[int(r["index"])] = (len(r["options"]), int(r["answer_index"]), kind or "all")
    return sheet


def single_device_mesh():
    """Returns a (data, fsdp, tensor) = (1, 1, 1) mesh on the first device."""
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def make_answer_logits(model: Molmo2VLM, layout: FrameLayout, seed: int = 0, mesh=None):
    """Returns (state, fn): fn(state, batch) -> logits [R, V] float32 at each row's first answer position
    (loss_mask), for a batch of global arrays (`sharding.to_global`). `layout` is the row FrameLayout; with a
    mesh the forward runs under it (rows over data x fsdp)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, batch):
        logits, _ = nnx.merge(graphdef, state).forward(batch, layout, jax.random.key(seed))
        first = jnp.argmax(batch["loss_mask"] > 0, axis=1)  # [R]
        return jnp.take_along_axis(logits, first[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    return state, under_mesh(jitted, mesh)


def evaluate(model: Molmo2VLM, data_dir: str, *, split: str = "validation", tokenizer: str, method: str,
             ratio: float, frames: int, rows: int = 8, seq_len: int | None = None, max_examples: int = 0,
             max_fps: float | None = 2.0, seed: int = 0, progress: bool = True, log=print, mesh=None) -> EvalResult:
    """Returns the multiple-choice accuracy of `model` with STTS (method, ratio) at `frames` frames per video.

    `mesh`: where the batches go (`sharding.to_global`, rows over data x fsdp); default one device.
    """
    from stts_jax.data import pipeline as pipe
    from stts_jax.data.processor import OPTION_LETTERS
    from stts_jax.data.tokenizer import load_tokenizer

    eval_model = with_stts(model, method, ratio)
    cfg = eval_model.cfg
    if seq_len is None:
        seq_len = vision_tokens_per_example(cfg, frames, "none", 0) + 10 * frames + 160
    source = pipe.open_source(data_dir, split)
    sheet = answer_sheet(data_dir, split)
    total = min(len(sheet), max_examples) if max_examples else len(sheet)
    if not total:
        raise EvalError(f"split {split!r} of {data_dir} has no examples")
    tok = load_tokenizer(tokenizer)
    letters = []
    for letter in OPTION_LETTERS[: max(n for n, _, _ in sheet.values())]:
        ids = tok.encode(letter, add_special_tokens=False).ids
        if len(ids) != 1:
            raise EvalError(f"the tokenizer splits option letter {letter!r} into {ids}; expected one token")
        letters.append(ids[0])
    data = pipe.data_config(data_dir=data_dir, split=split, tokenizer=tokenizer, num_frames=frames,
                            seq_len=seq_len, rows=rows, videos_per_row=1, shuffle=False, num_epochs=1,
                            packing_bins=rows, max_fps=max_fps,
                            max_consecutive_bad=1 << 31, max_bad_fraction=1.0)  # one epoch: report, never stop
    p = pipe.make_pipeline(data, cfg, source=source)
    mesh = mesh if mesh is not None else single_device_mesh()
    state, answer_logits = make_answer_logits(eval_model, p.layout, seed, mesh)  # p.layout: one row's slots
    correct, count = collections.Counter(), collections.Counter()
    predictions = []
    start = last_log = time.perf_counter()
    for batch in p:
        model_batch = sharding.to_global({k: batch[k] for k in EVAL_KEYS if k in batch}, mesh)
        logits = np.asarray(answer_logits(state, model_batch))  # [R, V]
        for r, index in enumerate(batch["record"][:, 0]):
            if index < 0 or len(predictions) >= total:
                continue
            n, answer, kind = sheet[int(index)]
            pred = int(np.argmax(logits[r, letters[:n]]))
            predictions.append((int(index), pred, answer))
            for k in (kind, "all"):
                count[k] += 1
                correct[k] += int(pred == answer)
        done = len(predictions)
        now = time.perf_counter()
        if progress and (now - last_log > 10 or done >= total):
            rate = done / max(now - start, 1e-9)
            log(f"  eval {method} r={ratio:g} T={frames}: {done}/{total} examples, acc {correct['all'] / max(done, 1):.3f}, "
                f"{rate:.1f} ex/s, ETA {(total - done) / max(rate, 1e-9):.0f} s")
            last_log = now
        if done >= total:
            break
    if p.report.total:
        log(f"  eval: {p.report.summary()}")
    return EvalResult(method=method, ratio=float(ratio) if method != "none" else 0.0, frames=frames,
                      correct=dict(correct), count=dict(count),
                      vision_tokens=vision_tokens_per_example(cfg, frames, method, ratio),
                      vision_tokens_unpruned=vision_tokens_per_example(cfg, frames, "none", 0),
                      seconds=time.perf_counter() - start, skipped=p.report.total, predictions=predictions)


def settings(methods: Iterable[str], ratios: Iterable[float], frames: Iterable[int]) -> list[tuple[str, float, int]]:
    """Returns the (method, ratio, frames) grid, with method none once per frame count (ratio unused)."""
    out = []
    for t in frames:
        for m in methods:
            for r in ([0.0] if m == "none" else ratios):
                if (m, r, t) not in out:
                    out.append((m, float(r), int(t)))
    return out
