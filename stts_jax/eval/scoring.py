"""Benchmark scores from per-example multiple-choice predictions: accuracy with video-clustered standard errors.

Pure numpy (no jax): it reads predictions that an evaluation already made and turns them into the numbers a
benchmark's users quote, each with a standard error.

Input: one dict per question,

    {"id": str, "pred": int, "answer": int,                                  # required
     "benchmark": str, "task": str, "duration_group": str, "video_id": str}  # optional, "" when absent

`pred` is the predicted option index, or -1 (`UNPARSED`) when a generated answer could not be parsed; an unparsed
prediction counts as wrong and is counted in `unparsed`.

Scores (`summarize`):
  * `overall`: the micro average (correct / count over all questions).
  * `per_task`: the same per `task`; `macro`: the mean of the per-task accuracies (every task weighs the same).
  * `per_duration` (Video-MME's short / medium / long videos; present whenever examples carry a `duration_group`).
  * `headline`: which of micro / macro the benchmark's leaderboard quotes. MVBench and MLVU quote the mean over
    their tasks (macro); Video-MME and the others quote the micro average. (On MVBench, 20 tasks x 200
    questions, the two coincide; they differ on a subset or on MLVU, whose tasks are of unequal size.)

Standard errors (`clustered_se`). Questions about the same video are not independent (a model that misreads a
video tends to miss all of its questions), so the SE of a mean accuracy is the cluster-robust (sandwich) SE of
the intercept of the regression y_i = mu + e_i, clustered by video: with y_i in {0, 1} the correctness of
question i, n questions, ybar their mean, e_i = y_i - ybar, and G clusters g (one per distinct `video_id`),

    SE^2 = G / (G - 1) * sum_g (sum_{i in g} e_i)^2 / n^2.

G / (G - 1) is the usual small-sample correction of cluster-robust variances: Stata's CR1 factor
G/(G-1) * (n-1)/(n-k) is exactly G/(G-1) for this intercept-only model (k = 1). An example without a
`video_id` is its own cluster (keyed by its `id`). When every example is its own cluster (G = n) the formula
reduces to the familiar binomial SE with an n - 1 denominator:

    SE^2 = n / (n - 1) * sum_i e_i^2 / n^2 = p (1 - p) / (n - 1),   p = ybar.

The SE is undefined (None, JSON null) with fewer than 2 clusters. Per-task and per-duration SEs use the same
formula on that group's questions (clusters = the group's videos).

The macro mean's SE treats the tasks as independent samples and combines the per-task SEs as the SE of a mean of
T independent estimates (an approximation: tasks that share videos, as several MVBench tasks share CLEVRER or STAR
clips, are correlated, and then this SE is somewhat optimistic):

    SE_macro = sqrt(sum_t SE_t^2) / T.

It is None when any task's SE is undefined.

For reference, lmms-eval's `clustered_stderr` (lmms_eval/api/metrics.py, after Miller 2024, "Adding Error Bars to
Evals", eq. 4) computes sqrt(s^2/n + sum_g sum_{i != j in g} e_i e_j / n^2) with s^2 the (n - 1)-denominator sample
variance: the same cross terms, a slightly different small-sample factor and no G / (G - 1), so its values are a
little smaller than these with few clusters.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

from stts_jax import paths

UNPARSED = -1  # `pred` of an answer that could not be parsed (counts as wrong)
DURATIONS = ("short", "medium", "long")  # Video-MME's duration groups, in display order
OPTIONAL_FIELDS = ("benchmark", "task", "duration_group", "video_id")


def _norm(name: str) -> str:
    """Returns a benchmark name lower-cased, keeping only letters and digits ("Video-MME" -> "videomme")."""
    return "".join(c for c in str(name).lower() if c.isalnum())


# Benchmarks whose headline number is the mean of the per-task accuracies (normalized names; prefixes match, so
# "mvbench_val" and "MLVU-dev" count too).
MACRO_HEADLINE = ("mvbench", "mlvu")


def headline_kind(benchmark: str) -> str:
    """Returns "macro" if `benchmark`'s leaderboard quotes the mean over tasks (MVBench, MLVU), else "micro"."""
    b = _norm(benchmark)
    return "macro" if any(b.startswith(m) for m in MACRO_HEADLINE) else "micro"


def is_video_mme(benchmark: str) -> bool:
    """Returns whether `benchmark` names Video-MME ("Video-MME", "videomme", "video_mme_w_subtitle", ...)."""
    return _norm(benchmark).startswith("videomme")


@dataclasses.dataclass
class Group:
    """Accuracy of one group of questions (all, a task, a duration), with its clustered SE (None: undefined)."""

    accuracy: float
    count: int
    correct: int
    se: float | None
    clusters: int


def clustered_se(correct, clusters) -> float | None:
    """Returns the cluster-robust SE of the mean of `correct` (0/1 per question), clustered by `clusters` (one
    hashable key per question): sqrt(G/(G-1) * sum_g (sum_{i in g} (y_i - ybar))^2 / n^2). None if G < 2."""
    y = np.asarray(correct, dtype=np.float64)
    keys = list(clusters)
    if y.ndim != 1 or len(keys) != y.shape[0]:
        raise ValueError(f"correct and clusters must be 1-D of the same length, got {y.shape} and {len(keys)}")
    n = y.shape[0]
    index = {}
    codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=n)
    g = len(index)
    if g < 2:
        return None
    sums = np.bincount(codes, weights=y - y.mean(), minlength=g)  # sum of residuals per cluster
    return math.sqrt(g / (g - 1) * float(np.sum(sums ** 2)) / n ** 2)


def macro_se(task_ses) -> float | None:
    """Returns sqrt(sum_t se_t^2) / T, the SE of the mean of T independent per-task accuracies (None if any is)."""
    ses = list(task_ses)
    if not ses:
        raise ValueError("macro SE of an empty task list: there are no tasks to average")
    if any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def _int_field(ex: dict, key: str) -> int:
    v = ex.get(key)
    if isinstance(v, (bool, np.bool_)) or v is None:
        raise ValueError(f"example {ex.get('id')!r}: {key!r} must be an int, got {v!r}")
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"example {ex.get('id')!r}: {key!r} must be an int, got {v!r}") from None
    if i != v:
        raise ValueError(f"example {ex.get('id')!r}: {key!r} must be an int, got {v!r}")
    return i


def _clean(examples) -> list[dict]:
    """Validates the examples and returns them with int pred/answer, str id and "" for absent optional fields."""
    if examples is None:
        raise ValueError("no examples to score (got None)")
    out, seen = [], set()
    for ex in examples:
        if not isinstance(ex, dict):
            raise ValueError(f"each example must be a dict, got {type(ex).__name__}")
        if "id" not in ex or str(ex["id"]) == "":
            raise ValueError(f"example without an id: {ex!r}")
        eid = str(ex["id"])
        if eid in seen:
            raise ValueError(f"duplicate example id {eid!r}: each question must be scored once")
        seen.add(eid)
        pred, answer = _int_field(ex, "pred"), _int_field(ex, "answer")
        if answer < 0:
            raise ValueError(f"example {eid!r}: answer must be an option index >= 0, got {answer}")
        if pred < UNPARSED:
            raise ValueError(f"example {eid!r}: pred must be an option index >= 0 or {UNPARSED} (unparsed), got {pred}")
        row = {"id": eid, "pred": pred, "answer": answer}
        for k in OPTIONAL_FIELDS:
            v = ex.get(k, "")
            row[k] = "" if v is None else str(v)
        out.append(row)
    if not out:
        raise ValueError("no examples to score: the prediction list is empty")
    return out


def _group(rows: list[dict]) -> Group:
    y = np.array([r["pred"] == r["answer"] for r in rows], dtype=np.float64)
    keys = [("video", r["video_id"]) if r["video_id"] else ("id", r["id"]) for r in rows]
    return Group(accuracy=float(y.mean()), count=len(rows), correct=int(y.sum()),
                 se=clustered_se(y, keys), clusters=len(set(keys)))


def summarize(examples, *, benchmark: str = "") -> dict:
    """Returns the scores of one benchmark's predictions (see the module docstring for the formulas).

    `benchmark` names it (for the headline choice); "" takes the examples' own `benchmark` field (they must agree).
    Raises ValueError on empty input, malformed examples, duplicate ids, predictions from several benchmarks, a
    macro-headline benchmark (MVBench, MLVU) whose examples carry no task, examples of which only some carry a task,
    or Video-MME examples without a short / medium / long `duration_group`.

    Returns {"benchmark", "headline" ("micro" | "macro"), "headline_accuracy", "headline_se",
    "overall": {accuracy, count, correct, se, clusters}, "per_task": {task: {...same}},
    "macro": {accuracy, se, tasks, count} or None when no example has a task,
    "per_duration": {duration: {...}} (only when examples carry duration groups), "unparsed", "se_method"}.
    """
    rows = _clean(examples)
    named = sorted({r["benchmark"] for r in rows if r["benchmark"]})
    if benchmark:
        if any(_norm(b) != _norm(benchmark) for b in named):
            raise ValueError(f"summarize(benchmark={benchmark!r}) got examples of {named}: "
                             f"score one benchmark at a time")
    else:
        if len(named) > 1:
            raise ValueError(f"examples of several benchmarks {named}: score one benchmark at a time")
        benchmark = named[0] if named else ""
    headline = headline_kind(benchmark)

    with_task = sum(1 for r in rows if r["task"])
    if 0 < with_task < len(rows):
        raise ValueError(f"{len(rows) - with_task} of {len(rows)} examples have no task: the per-task scores and their "
                         f"mean would leave them out")
    by_task = collections.defaultdict(list)
    for r in rows:
        if r["task"]:
            by_task[r["task"]].append(r)
    per_task = {t: _group(by_task[t]) for t in sorted(by_task)}
    if not per_task and headline == "macro":
        raise ValueError(f"{benchmark}'s headline is the mean over tasks, but no example has a task (empty task list)")
    macro = None
    if per_task:
        macro = {"accuracy": float(np.mean([g.accuracy for g in per_task.values()])),
                 "se": macro_se(g.se for g in per_task.values()),
                 "tasks": len(per_task), "count": sum(g.count for g in per_task.values())}

    by_duration = collections.defaultdict(list)
    for r in rows:
        if r["duration_group"]:
            by_duration[r["duration_group"]].append(r)
    if is_video_mme(benchmark):
        bad = sorted({r["duration_group"] for r in rows} - set(DURATIONS))
        if bad:
            raise ValueError(f"Video-MME examples need a duration_group in {DURATIONS}, got {bad}")
    order = [d for d in DURATIONS if d in by_duration] + sorted(set(by_duration) - set(DURATIONS))
    per_duration = {d: _group(by_duration[d]) for d in order}

    overall = _group(rows)
    summary = {
        "benchmark": benchmark,
        "headline": headline,
        "headline_accuracy": macro["accuracy"] if headline == "macro" else overall.accuracy,
        "headline_se": macro["se"] if headline == "macro" else overall.se,
        "overall": dataclasses.asdict(overall),
        "per_task": {t: dataclasses.asdict(g) for t, g in per_task.items()},
        "macro": macro,
        "unparsed": sum(1 for r in rows if r["pred"] == UNPARSED),
        "se_method": "cluster-robust by video_id (an example without one is its own cluster): "
                     "SE^2 = G/(G-1) * sum_g (sum_{i in g} (y_i - ybar))^2 / n^2; "
                     "macro: sqrt(sum_t SE_t^2) / T, tasks treated as independent",
    }
    if per_duration:
        summary["per_duration"] = {d: dataclasses.asdict(g) for d, g in per_duration.items()}
    return summary


def write_results(path_json: str, summary: dict, *, extra: dict | None = None) -> dict:
    """Writes `summary` (plus the keys of `extra`, e.g. model / frames / method, which must not collide with the
    summary's) as JSON with sorted keys and indentation; returns what was written. Undefined SEs are null."""
    payload = dict(summary)
    if extra:
        clash = sorted(set(extra) & set(payload))
        if clash:
            raise ValueError(f"extra keys {clash} would overwrite the summary's")
        payload.update(extra)
    text = json.dumps(payload, sort_keys=True, indent=2, allow_nan=False)
    paths.write_text(path_json, text + "\n")  # local or gs://
    return payload


def _pct(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def format_summary(summary: dict) -> str:
    """Returns a markdown table of `summary`: rows overall, macro, each task, each duration; columns accuracy %,
    ± SE %, count (the headline row is marked; macro's count is the questions over its tasks)."""
    name = summary.get("benchmark") or "benchmark"
    headline = summary.get("headline", "micro")
    lines = [f"**{name}**: headline = {headline} average, {summary.get('unparsed', 0)} unparsed answer(s) "
             f"counted wrong; SE clustered by video.", "",
             "| | accuracy % | ± SE % | count |", "|---|---:|---:|---:|"]

    def row(label, g, mark=False):
        label = f"**{label}** (headline)" if mark else label
        lines.append(f"| {label} | {_pct(g['accuracy'])} | {_pct(g['se'])} | {g['count']} |")

    row("overall (micro)", summary["overall"], headline == "micro")
    if summary.get("macro"):
        row(f"macro (mean of {summary['macro']['tasks']} tasks)", summary["macro"], headline == "macro")
    for t, g in summary.get("per_task", {}).items():
        row(f"task: {t}", g)
    for d, g in summary.get("per_duration", {}).items():
        row(f"duration: {d}", g)
    return "\n".join(lines) + "\n"


_ANSWER_PREFIX = re.compile(r"(the best answer is|the answer is|best answer|answer|option)\b\W*", re.IGNORECASE)
_LETTER = re.compile(r"[\(\[]?([A-Z])(?:$|[\.\):,]|\s*$)")


def parse_choice(text: str, options) -> int:
    """Returns the option index a generated answer names, or UNPARSED (-1); Molmo2-style: the letter first.

    After stripping whitespace and a leading "The best answer is" / "Answer:" / "Option" phrase (whole words): an
    answer that is exactly one option's text (case-insensitive, trailing punctuation dropped); else a leading
    option letter (A.. up to the number of options) standing alone or followed by ".", ")", ":" or ","
    ("B", "B.", "(B)", "B) text"); else an answer that starts with exactly one option's text (the longest
    match); else UNPARSED.
    """
    s = str(text).strip()
    s = _ANSWER_PREFIX.sub("", s, count=1) if _ANSWER_PREFIX.match(s) else s
    s = s.strip()
    texts = [str(o).strip().lower() for o in options]
    bare = s.lower().rstrip(" .!")
    exact = [i for i, o in enumerate(texts) if o and o == bare]
    if len(exact) == 1:
        return exact[0]
    letter = _LETTER.match(s)
    if letter and letter.group(1) in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(letter.group(1))
    low = s.lower()
    hits = [i for i, o in enumerate(texts) if o and low.startswith(o)]
    if hits:
        longest = max(len(texts[i]) for i in hits)
        hits = [i for i in hits if len(texts[i]) == longest]
    return hits[0] if len(hits) == 1 else UNPARSED
