"""Multiple-choice evaluation: accuracy from the option letters' logits, or from a generated answer.

For every example of a prepared `video_qa` split (one video per packed row, no shuffling), the model reads
the prompt (video + question + "A. option" lines + the letter instruction; Molmo2's own wording for Video-MME
and MVBench records) and the prediction is, with `scoring="logits"`, the option whose letter has the largest
logit at the first answer position, i.e. the most likely option under the model (each option is one letter
token); with `scoring="generate"`, the option named by the greedily generated answer (KV cache,
`stts_jax.model.generate`; parsed Molmo2-style by `scoring.parse_choice`, unparsed answers count as wrong).
Accuracy is reported per question kind and overall, with the vision tokens per example the LLM sees, so methods
(none / scorer / evs / random) and frame counts (test-time scaling: more frames at the same token budget) can be
put side by side; `EvalResult.summary()` gives the benchmark scores (per task, macro, by duration, standard
errors clustered by video: `stts_jax.eval.scoring`).

Batches are the input pipeline's batch-major host batches (pixel_values [R, T, N, P], frame_mask [R, T]: one
video slot per row, `FrameLayout.video_slots(1, T)`), made device arrays by `sharding.to_global` on a mesh
(one device unless one is given). On several hosts every host reads its own share of the split (the pipeline's
per-process slice), the hosts step together (a host whose share ran out feeds a batch of empty rows) and every
host ends with every prediction (gathered after each batch), so results are the same on 1 or N devices / hosts.
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
from stts_jax.config import data_config
from stts_jax.data.processor import prompt_overhead_tokens
from stts_jax.geometry import FrameLayout
from stts_jax.model.partitioning import under_mesh
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.train import sharding

METHODS = ("none", "scorer", "evs", "random")
EVAL_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "pixel_values", "frame_mask")  # frame_mask optional
SCORINGS = ("logits", "generate")
CSV_FIELDS = ("run", "train_method", "train_ratio", "method", "ratio", "frames", "scoring", "kind", "correct",
              "count", "accuracy", "vision_tokens", "vision_tokens_unpruned")


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
    scoring: str = "logits"
    examples: list = dataclasses.field(default_factory=list)  # per question: scoring.summarize's input (+ "text")

    def summary(self, benchmark: str = "") -> dict:
        """Returns the benchmark scores of the predictions (`scoring.summarize`: per task, macro, clustered SEs)."""
        from stts_jax.eval import scoring

        return scoring.summarize(self.examples, benchmark=benchmark)

    def accuracy(self, kind: str = "all") -> float:
        """Returns the fraction of correct answers of a kind (nan if there is none)."""
        return self.correct.get(kind, 0) / self.count[kind] if self.count.get(kind) else float("nan")

    def rows(self, **extra) -> list[dict]:
        """Returns one CSV row per kind (CSV_FIELDS; `extra` fills run / train_method / train_ratio)."""
        kinds = sorted(k for k in self.count if k != "all") + ["all"]
        return [dict(extra, method=self.method, ratio=self.ratio, frames=self.frames, scoring=self.scoring, kind=k,
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


@dataclasses.dataclass(frozen=True)
class Question:
    """What scoring needs of one record of a prepared split."""

    options: tuple  # option texts
    answer: int  # answer_index
    kind: str  # question kind ("all" when empty)
    id: str
    benchmark: str = ""
    task: str = ""  # the benchmark's task; the kind when the record has none ("untagged" without either)
    duration_group: str = ""
    video_id: str = ""  # questions on one video are one cluster for standard errors (default: the video path)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


EVAL_TEXT_TOKENS = 160  # question, options, instruction and chat markup of one example (beyond 10 per frame)


def eval_seq_len(cfg: ml_collections.ConfigDict, frames: int, method: str, ratio: float) -> int:
    """Returns the row length evaluation packs one example into: its vision placeholders (pruned with STTS),
    10 tokens of timestamp (up to 8) and frame markers per frame, and EVAL_TEXT_TOKENS of text (longer ones are skipped and
    counted as `too_long`). `launch/estimate.py --program=eval` sizes its rows with it too."""
    return vision_tokens_per_example(cfg, frames, method, ratio) + prompt_overhead_tokens(frames, 8) + EVAL_TEXT_TOKENS


def option_letter_ids(tok, count: int) -> list[int]:
    """Returns the token ids of the first `count` option letters; EvalError if the tokenizer splits one."""
    from stts_jax.data.processor import OPTION_LETTERS

    letters = []
    for letter in OPTION_LETTERS[:count]:
        ids = tok.encode(letter, add_special_tokens=False).ids
        if len(ids) != 1:
            raise EvalError(f"the tokenizer splits option letter {letter!r} into {ids}; expected one token")
        letters.append(ids[0])
    return letters


@functools.lru_cache(maxsize=8)
def answer_sheet(data_dir: str, split: str) -> dict:
    """Returns {record index: Question} of a prepared `video_qa` split.

    Reads every record once per (data_dir, split) and process (the records hold the video bytes too).
    Datasets prepared before the benchmark fields existed read them as "".
    """
    from stts_jax.data.pipeline import open_source

    source = open_source(data_dir, split)
    sheet = {}
    for i in range(len(source)):
        r = source[i]
        field = {k: _text(r.get(k, b"")) for k in ("kind", "id", "benchmark", "task", "duration_group", "video_id")}
        sheet[int(r["index"])] = Question(
            options=tuple(_text(o) for o in r["options"]), answer=int(r["answer_index"]), kind=field["kind"] or "all",
            id=field["id"], benchmark=field["benchmark"], task=field["task"] or field["kind"] or "untagged",
            duration_group=field["duration_group"], video_id=field["video_id"] or _text(r["video_path"]))
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
        model = nnx.merge(graphdef, state)
        hidden, _ = model.forward_hidden(batch, layout, jax.random.key(seed))  # [R, L, H]
        first = jnp.argmax(batch["loss_mask"] > 0, axis=1)  # [R]
        # the vocabulary projection of the answer position only (not [R, L, vocab]: 3.5 GB a row at 4B, 64 frames)
        answer = jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]
        return model.llm.lm_head(answer).astype(jnp.float32)

    return state, under_mesh(jitted, mesh)


def _gather(x) -> np.ndarray:
    """Returns a batch-major array whole on this host: a global array's rows of every host, or a host-local array
    concatenated over hosts in process order (`to_global`'s row order); itself in one process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _empty_like(batch: dict) -> dict:
    """Returns a batch of the same shapes with no example in it (a host whose share of the split ran out)."""
    out = {k: np.zeros_like(v) for k, v in batch.items() if isinstance(v, np.ndarray)}
    out["record"] = np.full_like(batch["record"], -1)
    return out


def _prompt_rows(batch: dict) -> dict:
    """Returns the prompt part of an eval batch for generation: tokens after each row's first answer position get
    segment id 0 (padding), so the generated answer continues right after the prompt."""
    first = np.argmax(np.asarray(batch["loss_mask"]) > 0, axis=1)  # [R]: the prompt's last token
    length = batch["input_ids"].shape[1]
    keep = np.arange(length)[None] <= first[:, None]
    out = {k: batch[k] for k in ("input_ids", "positions", "pixel_values", "frame_mask") if k in batch}
    out["segment_ids"] = np.where(keep, batch["segment_ids"], 0).astype(np.int32)
    empty = ~(out["segment_ids"] > 0).any(axis=1)  # padding rows: one token so the generator accepts them
    out["segment_ids"][empty, 0] = 1
    return out


def evaluate(model: Molmo2VLM, data_dir: str, *, split: str = "validation", tokenizer: str, method: str,
             ratio: float, frames: int, rows: int = 8, seq_len: int | None = None, max_examples: int = 0,
             max_fps: float | None = 2.0, seed: int = 0, progress: bool = True, log=print, mesh=None,
             scoring: str = "logits", max_new_tokens: int = 8) -> EvalResult:
    """Returns the multiple-choice accuracy of `model` with STTS (method, ratio) at `frames` frames per video.

    `mesh`: where the batches go (`sharding.to_global`, rows over data x fsdp); default one device. `scoring`:
    "logits" (the option letter with the largest logit) or "generate" (greedy answer of up to `max_new_tokens`
    tokens, parsed by `scoring.parse_choice`; one process).
    """
    from stts_jax.data import pipeline as pipe
    from stts_jax.data.tokenizer import load_tokenizer
    from stts_jax.eval.scoring import UNPARSED, parse_choice

    if scoring not in SCORINGS:
        raise EvalError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "generate" and jax.process_count() > 1:
        raise EvalError("scoring='generate' runs in one process (the generator reads its tokens on the host)")
    eval_model = with_stts(model, method, ratio)
    cfg = eval_model.cfg
    if seq_len is None:
        seq_len = eval_seq_len(cfg, frames, method, ratio)
    source = pipe.open_source(data_dir, split)
    sheet = answer_sheet(data_dir, split)
    total = min(len(sheet), max_examples) if max_examples else len(sheet)
    if not total:
        raise EvalError(f"split {split!r} of {data_dir} has no examples")
    open_ended = [q.id for q in sheet.values() if not q.options]
    if open_ended:
        raise EvalError(f"split {split!r} of {data_dir} holds {len(open_ended)} open questions (no options, e.g. "
                        f"{open_ended[0]!r}); multiple-choice evaluation needs options for every question")
    tok = load_tokenizer(tokenizer)
    letters = option_letter_ids(tok, max(len(q.options) for q in sheet.values()))
    data = data_config(kind="video", path=data_dir, split=split, tokenizer=tokenizer, num_frames=frames,
                       seq_len=seq_len, rows=rows, videos_per_batch=rows, shuffle=False, num_epochs=1,
                       packing_bins=rows, max_fps=max_fps,
                       max_consecutive_bad=1 << 31, max_bad_fraction=1.0)  # one epoch: report, never stop
    p = pipe.make_pipeline(data, cfg, source=source)
    mesh = mesh if mesh is not None else single_device_mesh()
    if scoring == "logits":
        state, answer_logits = make_answer_logits(eval_model, p.layout, seed, mesh)  # p.layout: one row's slots
    else:
        from stts_jax.model.generate import Generator

        generator = Generator(eval_model, p.layout)
        eos = tok.token_to_id("<|im_end|>")
        if eos is None:
            raise EvalError("scoring='generate' needs the tokenizer's <|im_end|> token to stop on")
    correct, count = collections.Counter(), collections.Counter()
    predictions, examples = [], []
    start = last_log = time.perf_counter()
    batches, template = iter(p), None
    while True:
        batch = next(batches, None)
        # every host decides together: stop when all are done; a host with no batch yet cannot step along
        has = _gather(np.asarray([[batch is not None, batch is not None or template is not None]]))
        if not has[:, 0].any():
            break  # every host's share is done
        if not has[:, 1].all():
            raise EvalError(f"hosts {np.flatnonzero(~has[:, 1]).tolist()} got no example of split {split!r} while "
                            "others did; give the split at least one readable example per host")
        if batch is None:  # this host's share ran out before another's: step along with empty rows
            batch = _empty_like(template)
        template = batch
        texts = None
        if scoring == "logits":
            keys = [k for k in EVAL_KEYS if k in batch] + ["record"]
            model_batch = sharding.to_global({k: batch[k] for k in keys}, mesh)
            records = _gather(model_batch.pop("record"))[:, 0]  # the global rows' records, in the logits' order
            logits = _gather(answer_logits(state, model_batch))  # [R, V]: every host's rows
        else:
            records = np.asarray(batch["record"])[:, 0]
            with jax.set_mesh(mesh):
                out = generator.generate(sharding.to_global(_prompt_rows(batch), mesh), max_new_tokens,
                                         stop_tokens=(eos,), rng=jax.random.key(seed))
            generated = [[int(t) for t in out.tokens[r, : out.lengths[r]]] for r in range(out.tokens.shape[0])]
            texts = [tok.decode([t for t in ids if t != eos]) for ids in generated]
        for r, index in enumerate(records):
            if index < 0 or len(predictions) >= total:
                continue
            q = sheet[int(index)]
            n = len(q.options)
            pred = int(np.argmax(logits[r, letters[:n]])) if texts is None else parse_choice(texts[r], q.options)
            predictions.append((int(index), pred, q.answer))
            examples.append(dict(id=q.id or str(int(index)), pred=pred, answer=q.answer, benchmark=q.benchmark,
                                 task=q.task, duration_group=q.duration_group, video_id=q.video_id,
                                 **({} if texts is None else {"text": texts[r], "tokens": generated[r]})))
            for k in (q.kind, "all"):
                count[k] += 1
                correct[k] += int(pred == q.answer)
        done = len(predictions)
        now = time.perf_counter()
        if progress and (now - last_log > 10 or done >= total):
            rate = done / max(now - start, 1e-9)
            unparsed = sum(e["pred"] == UNPARSED for e in examples) if texts is not None else 0
            log(f"  eval {method} r={ratio:g} T={frames} ({scoring}): {done}/{total} examples, acc "
                f"{correct['all'] / max(done, 1):.3f}" + (f", {unparsed} unparsed" if unparsed else "") +
                f", {rate:.1f} ex/s, ETA {(total - done) / max(rate, 1e-9):.0f} s")
            last_log = now
        if done >= total:
            break
    if p.report.total:
        log(f"  eval: {p.report.summary()}")
    skipped = int(_gather(np.asarray([p.report.total])).sum())  # every host's skipped examples
    return EvalResult(method=method, ratio=float(ratio) if method != "none" else 0.0, frames=frames,
                      correct=dict(correct), count=dict(count),
                      vision_tokens=vision_tokens_per_example(cfg, frames, method, ratio),
                      vision_tokens_unpruned=vision_tokens_per_example(cfg, frames, "none", 0),
                      seconds=time.perf_counter() - start, skipped=skipped, predictions=predictions,
                      scoring=scoring, examples=examples)


def settings(methods: Iterable[str], ratios: Iterable[float], frames: Iterable[int]) -> list[tuple[str, float, int]]:
    """Returns the (method, ratio, frames) grid, with method none once per frame count (ratio unused)."""
    out = []
    for t in frames:
        for m in methods:
            for r in ([0.0] if m == "none" else ratios):
                if (m, r, t) not in out:
                    out.append((m, float(r), int(t)))
    return out
