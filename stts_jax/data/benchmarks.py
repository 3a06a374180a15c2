"""Readers that turn public video-QA benchmarks' annotation files into our annotation JSONL (`video_qa` builder).

`prepare_benchmark(name, annotations, videos, out_dir)` reads the benchmark's annotation file(s) as upstream ships
them, checks that every video exists (cutting `start`/`end` clips where a row asks for one), and writes

  <out_dir>/<split>.jsonl     one record per accepted row (the format of stts_jax/data/tfds_builders/video_qa.py)
  <out_dir>/refused.jsonl     one line per refused row: {"id", "reason", "error", "source", "stage": "read"}
  <out_dir>/clips/*.mp4       the cut clips (once per (video, start, end))

`launch/prepare_benchmark.py` then builds the ArrayRecord dataset from <out_dir> and writes prepare_report.json.

Each record: "id" = "<benchmark>/<question id>", "video" (absolute path, or "clips/..." relative to out_dir),
"question", "options" (texts without an "A. " prefix), "answer_index", "answer" (= the option's text), "kind" (=
"task"), "benchmark", "task", "duration_group", "video_id" ("" where the source has none), and "source" (file and
row it came from; the builder ignores it).

Benchmarks (upstream layouts; PATH = --annotations, DIR = --videos):

  videomme        parquet (one file, or a folder of shards of one split): video_id, duration (short|medium|long),
                  domain, sub_category, videoID, question_id, task_type, question, options (4, "A. ..."), answer
                  (a letter). id = question_id, task = task_type, duration_group = duration, video_id = videoID;
                  video DIR/{videoID}.mp4, else DIR/data/{videoID}.mp4 (the unzipped upstream archives).
  mvbench         a folder of JSON lists, one per task (task = file stem, e.g. action_sequence), entries {video,
                  question, candidates, answer (a candidate's text)}, some with start/end seconds (a clip is cut).
                  id = <task>/<entry index>, video_id = <the task's video folder>/<video> (tasks sharing a folder
                  share clusters). Video: see "per-task video folders".
  nextqa          CSV video,frame_count,width,height,question,answer (0-4),qid,type,a0..a4 + the JSON map from
                  video id to its relative path (map_vid_vidorID.json, "1164/3238737531"); video = DIR/<path>.mp4.
                  PATH = the CSV or its folder (val.csv for --split=validation, test.csv, train.csv); the map is
                  found next to the CSV (map_vid_vidorID.json, or the only JSON there) unless video_map is given.
                  id = <video>_<qid>, task = type (CW, CH, TN, TC, TP, DL, DO, DC, ...), video_id = video.
  egoschema       parquet: question_idx, question, video_idx, option (5, "A. ..."), answer ("0"-"4" as a string).
                  id = question_idx, video_id = video_idx, task = "" (one task); video DIR/{video_idx}.mp4 (or .MP4).
  perceptiontest  parquet (mc, val): video_name, question_id, question, options (3), answer_id (an int, or a string
                  of digits in some releases), area, reasoning, tag. id = <video_name>/<question_id>, task = area
                  (memory / abstraction / physics / semantics; `reasoning` is not used), video DIR/{video_name}.mp4.
  longvideobench  JSON list (lvb_val.json): id, video_id, video_path, question, candidates, correct_choice (int),
                  duration, duration_group, level, question_category. task = question_category, duration_group =
                  str(duration_group); video DIR/<video_path>.
  mlvu            (dev) a folder of JSON lists, one per task (task = file stem, e.g. 1_plotQA), entries {video,
                  duration, question, candidates, answer (a candidate's text)}. id = <task>/<entry index>.

Per-task video folders (mvbench, mlvu): the entry's `video` is looked up, in order, at
  1. DIR/<subdir>/<video>  where `video_subdirs` maps the task to <subdir> (for mvbench the upstream layout
                           MVBENCH_VIDEO_DIRS is the default, e.g. action_sequence -> star/Charades_v1_480);
  2. DIR/<task>/<video>    (MLVU's video/<task>/ layout);
  3. DIR/<video>;
the first that is a file wins; when none is, the row is refused ("missing_video", naming every path tried).

Answers are decoded only in the encoding each upstream uses (letter: videomme; text: mvbench, mlvu; index-as-string:
nextqa, egoschema; int: longvideobench; int or index-as-string: perceptiontest); a row whose answer does not pick
exactly one option is refused, never guessed. Refusal reasons (REASONS): bad_row (a field missing / of the wrong
type), empty_question, bad_options, too_few_options (< 2), too_many_options (> 26), empty_option, no_answer,
bad_answer (not the benchmark's encoding), letter_not_in_options, index_out_of_range, answer_not_in_options,
ambiguous_answer (the text matches several options), duplicate_id (the first is kept), video_not_in_map (nextqa),
missing_video, video_is_folder (e.g. MVBench's episodic_reasoning ships frame folders), unreadable_video (a clip's
source cannot be decoded), bad_interval (start < 0, end <= start, outside the video, or no frame inside).

Clips: the frames whose timestamp t (seconds from the stream's first frame) is in [start, end] are decoded with
PyAV and re-encoded (codec mpeg4, same frame size, the source's average frame rate). An interval that starts at or
after the video's end (num_frames / fps), or ends more than `clip_slack_s` (default one frame) after it, is refused
(upstream MVBench silently clamps such bounds).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import fractions
import hashlib
import itertools
import json
import os
import re
from typing import Any, Iterable, Iterator

import numpy as np

from stts_jax.data.video import ERROR_KINDS, VideoDecodeError, probe_video

BENCHMARKS = ("videomme", "mvbench", "nextqa", "egoschema", "perceptiontest", "longvideobench", "mlvu")
PER_TASK = ("mvbench", "mlvu")  # a folder of JSON lists, one per task (the file stem)
MAX_OPTIONS = 26  # one letter each (the builder's limit)
REASONS = ("bad_row", "empty_question", "bad_options", "too_few_options", "too_many_options", "empty_option",
           "no_answer", "bad_answer", "letter_not_in_options", "index_out_of_range", "answer_not_in_options",
           "ambiguous_answer", "duplicate_id", "video_not_in_map", "missing_video", "video_is_folder",
           "unreadable_video", "bad_interval")
VIDEO_REASONS = ("video_not_in_map", "missing_video", "video_is_folder", "unreadable_video")
SPLIT_ALIASES = {"validation": ("validation", "val", "dev"), "test": ("test",), "train": ("train",)}

# MVBench's upstream video folders per task (the data_list of the MVBench notebook; paths inside its video/ folder).
MVBENCH_VIDEO_DIRS = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd", "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa", "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}

COLUMNS = {  # required upstream columns / keys
    "videomme": ("duration", "videoID", "question_id", "task_type", "question", "options", "answer"),
    "mvbench": ("video", "question", "candidates", "answer"),
    "nextqa": ("video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"),
    "egoschema": ("question_idx", "question", "video_idx", "option", "answer"),
    "perceptiontest": ("video_name", "question_id", "question", "options", "answer_id", "area"),
    "longvideobench": ("id", "video_id", "video_path", "question", "candidates", "correct_choice", "duration_group",
                       "question_category"),
    "mlvu": ("video", "question", "candidates", "answer"),
}


class BenchmarkFormatError(ValueError):
    """An annotation file (not one row) is unusable: missing, wrong type, missing columns; the message names it."""


class Refused(Exception):
    """One row is refused: `reason` is one of REASONS, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class ReadResult:
    """What reading a benchmark gave: `records` (JSONL dicts), `refused` ({"id", "reason", "error", "source"}),
    `rows` (upstream rows read: len(records) + len(refused))."""

    benchmark: str
    rows: int = 0
    records: list = dataclasses.field(default_factory=list)
    refused: list = dataclasses.field(default_factory=list)

    def refuse(self, ident: str, where: str, error: Refused, **extra) -> None:
        """Lists a refused row."""
        self.refused.append(dict(id=ident, reason=error.reason, error=f"{where}: {error.detail}", source=where,
                                 **extra))


@dataclasses.dataclass
class _Row:
    """An upstream row, picked apart (before validation)."""

    question: Any
    options: Any
    answer: Any
    encoding: str  # "letter" | "text" | "index" (int) | "index_str" (digits) | "index_any" (either)
    videos: tuple  # candidate paths, the first that is a file wins
    task: str = ""
    duration_group: str = ""
    video_id: str = ""
    prefixed: bool = False  # the source writes options as "A. ..."
    interval: tuple | None = None  # (start, end) seconds: cut a clip


# ------------------------------------------------------------------------------------------------ files


def _tokens(path: str) -> set:
    return set(re.split(r"[^a-z0-9]+", os.path.splitext(os.path.basename(path))[0].lower()))


def _shard_groups(files: list[str]) -> set:
    """Returns the distinct files that `files` are shards of (the name without "-00000-of-00002")."""
    return {re.sub(r"-\d+-of-\d+$", "", os.path.splitext(os.path.basename(f))[0]) for f in files}


def find_files(path: str, ext: str, split: str, benchmark: str, *, one_split: bool = True) -> list[str]:
    """Returns the annotation files `path` names: itself if a file, else the `*.ext` files directly in the folder
    (sorted). With `one_split`, the folder must hold one file, or the parquet shards of one file
    (<name>-00000-of-00002.parquet, ...), or files named for several splits of which those named for `split` (tokens
    of SPLIT_ALIASES, e.g. val.csv, lvb_val.json, test-00000-of-00001.parquet) are kept: one file or the shards of
    one. Raises BenchmarkFormatError naming the path."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise BenchmarkFormatError(f"{path}: no such annotation file or folder for {benchmark}")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith("." + ext) and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise BenchmarkFormatError(f"{path}: no *.{ext} file in this folder ({benchmark} annotations); pass the file")
    if not one_split or len(_shard_groups(files)) == 1:
        return files
    named = [f for f in files if _tokens(f) & set(SPLIT_ALIASES.get(split, (split,)))]
    if len(_shard_groups(named)) == 1:
        return named
    raise BenchmarkFormatError(f"{path}: several *.{ext} files ({', '.join(os.path.basename(f) for f in files)}) "
                               f"and not exactly one for split {split!r}: pass the {benchmark} file itself")


def _load_json_list(path: str) -> list:
    """Returns the JSON list in `path`, or raises BenchmarkFormatError naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkFormatError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def _require(columns: Iterable[str], have: Iterable[str], path: str, benchmark: str) -> None:
    missing = [c for c in columns if c not in set(have)]
    if missing:
        raise BenchmarkFormatError(f"{path}: missing column(s) {missing} of the {benchmark} format (has "
                                   f"{sorted(have)}); is this the {benchmark} annotation file?")


def _parquet_rows(files: list[str], benchmark: str, task: str = "") -> Iterator[tuple[str, str, Any]]:
    """Yields (where, task, row dict) of parquet files, after checking their columns."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a non-parquet file
            raise BenchmarkFormatError(f"{path}: cannot read it as parquet ({e})") from None
        _require(COLUMNS[benchmark], table.column_names, path, benchmark)
        for number, row in enumerate(table.to_pylist()):
            yield f"{path}:row {number}", task, row


def _json_rows(files: list[str], benchmark: str, per_task: bool) -> Iterator[tuple[str, str, Any]]:
    """Yields (where, task, entry) of JSON lists; the task is the file stem for per-task benchmarks."""
    for path in files:
        task = os.path.splitext(os.path.basename(path))[0] if per_task else ""
        for number, entry in enumerate(_load_json_list(path)):
            yield f"{path}:[{number}]", task, entry


def _csv_rows(path: str, benchmark: str) -> Iterator[tuple[str, str, Any]]:
    """Yields (where, task, row dict) of a CSV file with a header (line numbers count the header as line 1)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        _require(COLUMNS[benchmark], reader.fieldnames or [], path, benchmark)
        for number, row in enumerate(reader):
            yield f"{path}:line {number + 2}", "", row


# ------------------------------------------------------------------------------------------------ fields


def _str(value: Any, field: str) -> str:
    """Returns a string field (ints and numpy scalars are written as text); None refuses the row."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise Refused("bad_row", f"field {field!r} must be a string, got {value!r}")
    return value if isinstance(value, str) else str(value)


def _field(row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise Refused("bad_row", f"expected an object, got {type(row).__name__}")
    if key not in row:
        raise Refused("bad_row", f"missing field {key!r}")
    return row[key]


def as_list(value: Any) -> list:
    """Returns a list column as a Python list (pyarrow gives lists, pandas numpy arrays); refuses anything else."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise Refused("bad_options", f"options must be a list, got {type(value).__name__} {value!r}")
    return [v.item() if isinstance(v, np.generic) else v for v in value]


_PREFIX = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s*")


def strip_letter_prefixes(options: list[str]) -> list[str]:
    """Returns the options without their "A. " / "A) " / "(A) " / "A: " prefixes when every option carries the
    letters A, B, C, ... in order; unprefixed options unchanged; refuses a mix ("bad_options")."""
    matches = [_PREFIX.match(o) for o in options]
    letters = [(m.group(1) or m.group(2)) if m else None for m in matches]
    if all(m is None for m in matches):
        return list(options)
    if letters != [chr(ord("A") + i) for i in range(len(options))]:
        raise Refused("bad_options", f"options {options!r} are not all prefixed 'A. ', 'B. ', ... in order")
    return [o[m.end():] for o, m in zip(options, matches)]


def _options(value: Any, prefixed: bool) -> list[str]:
    """Returns the validated option texts (stripped of letter prefixes where the source writes them)."""
    options = as_list(value)
    if not all(isinstance(o, str) for o in options):
        raise Refused("bad_options", f"options must be strings, got {options!r}")
    if len(options) < 2:
        raise Refused("too_few_options", f"{len(options)} option(s) {options!r}, a question needs at least 2")
    if len(options) > MAX_OPTIONS:
        raise Refused("too_many_options", f"{len(options)} options, at most {MAX_OPTIONS} (one letter each)")
    if prefixed:
        options = strip_letter_prefixes(options)
    options = [o.strip() for o in options]
    empty = [i for i, o in enumerate(options) if not o]
    if empty:
        raise Refused("empty_option", f"option(s) {empty} are empty: {options!r}")
    return options


def _index(answer: Any, count: int, encoding: str) -> int:
    """Returns the option index of an index answer (an int and/or a string of digits, per `encoding`)."""
    if isinstance(answer, np.generic):
        answer = answer.item()
    is_int = isinstance(answer, int) and not isinstance(answer, bool)
    is_digits = isinstance(answer, str) and answer.strip().isdecimal() and answer.strip().isascii()
    allowed = {"index": is_int, "index_str": is_digits, "index_any": is_int or is_digits}[encoding]
    if not allowed:
        want = {"index": "an int", "index_str": "a string of digits", "index_any": "an int or a string of digits"}
        raise Refused("bad_answer", f"answer {answer!r} is not an option index ({want[encoding]})")
    index = int(answer)
    if not 0 <= index < count:
        raise Refused("index_out_of_range", f"answer index {index} is not one of the {count} options (0-{count - 1})")
    return index


def answer_index(answer: Any, options: list[str], encoding: str) -> int:
    """Returns the index of the option `answer` picks under `encoding` ("letter", "text", "index", "index_str",
    "index_any"); raises Refused when it does not pick exactly one."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise Refused("no_answer", "the row has no answer")
    if encoding == "letter":
        letter = answer.strip() if isinstance(answer, str) else None
        if letter is None or len(letter) != 1 or not "A" <= letter <= "Z":
            raise Refused("bad_answer", f"answer {answer!r} is not an option letter A-Z")
        index = ord(letter) - ord("A")
        if index >= len(options):
            raise Refused("letter_not_in_options", f"answer {letter!r} but only {len(options)} options "
                          f"(A-{chr(ord('A') + len(options) - 1)})")
        return index
    if encoding == "text":
        if not isinstance(answer, str):
            raise Refused("bad_answer", f"answer {answer!r} is not an option's text")
        hits = [i for i, o in enumerate(options) if o == answer.strip()]
        if not hits:
            raise Refused("answer_not_in_options", f"answer {answer!r} matches none of the options {options!r}")
        if len(hits) > 1:
            raise Refused("ambiguous_answer", f"answer {answer!r} matches options {hits} of {options!r}")
        return hits[0]
    return _index(answer, len(options), encoding)


def _interval(row: dict) -> tuple[float, float] | None:
    """Returns (start, end) seconds when the row gives them (both), None when it gives neither."""
    has = [k in row and row[k] is not None for k in ("start", "end")]
    if not any(has):
        return None
    values = [row.get("start"), row.get("end")]
    if not all(has) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise Refused("bad_interval", f"start/end must both be numbers of seconds, got {values!r}")
    return float(values[0]), float(values[1])


# ------------------------------------------------------------------------------------------------ adapters


def _videomme(row: dict, task: str, ctx: dict) -> _Row:
    vid = _str(row["videoID"], "videoID")
    return _Row(question=row["question"], options=row["options"], answer=row["answer"], encoding="letter",
                prefixed=True, task=_str(row["task_type"], "task_type"),
                duration_group=_str(row["duration"], "duration"), video_id=vid,
                videos=(os.path.join(ctx["videos"], vid + ".mp4"), os.path.join(ctx["videos"], "data", vid + ".mp4")))


def _per_task_videos(video: str, task: str, ctx: dict) -> tuple:
    """Candidate paths of a per-task benchmark's video (module docstring: per-task video folders)."""
    root, sub = ctx["videos"], ctx["video_subdirs"].get(task)
    candidates = ([os.path.join(root, sub, video)] if sub else []) + [os.path.join(root, task, video),
                                                                     os.path.join(root, video)]
    return tuple(dict.fromkeys(os.path.normpath(c) for c in candidates))


def _mvbench(row: dict, task: str, ctx: dict) -> _Row:
    video = _str(_field(row, "video"), "video")
    return _Row(question=_field(row, "question"), options=_field(row, "candidates"), answer=_field(row, "answer"),
                encoding="text", task=task, video_id=f"{ctx['video_subdirs'].get(task) or task}/{video}",
                videos=_per_task_videos(video, task, ctx),
                interval=_interval(row))


_mlvu = _mvbench  # same entry layout (MLVU carries no start/end)


def _nextqa(row: dict, task: str, ctx: dict) -> _Row:
    video = _str(row["video"], "video")
    if video not in ctx["video_map"]:
        raise Refused("video_not_in_map", f"video {video!r} is not in the video map {ctx['video_map_path']}")
    path = os.path.join(ctx["videos"], _str(ctx["video_map"][video], "video map value") + ".mp4")
    return _Row(question=row["question"], options=[row[f"a{i}"] for i in range(5)], answer=row["answer"],
                encoding="index_str", task=_str(row["type"], "type"), video_id=video, videos=(path,))


def _egoschema(row: dict, task: str, ctx: dict) -> _Row:
    vid = _str(row["video_idx"], "video_idx")
    return _Row(question=row["question"], options=row["option"], answer=row["answer"], encoding="index_str",
                prefixed=True, video_id=vid,
                videos=(os.path.join(ctx["videos"], vid + ".mp4"), os.path.join(ctx["videos"], vid + ".MP4")))


def _perceptiontest(row: dict, task: str, ctx: dict) -> _Row:
    name = _str(row["video_name"], "video_name")
    return _Row(question=row["question"], options=row["options"], answer=row["answer_id"], encoding="index_any",
                task=_str(row["area"], "area"), video_id=name, videos=(os.path.join(ctx["videos"], name + ".mp4"),))


def _longvideobench(row: dict, task: str, ctx: dict) -> _Row:
    for key in COLUMNS["longvideobench"]:
        _field(row, key)
    return _Row(question=row["question"], options=row["candidates"], answer=row["correct_choice"], encoding="index",
                task=_str(row["question_category"], "question_category"),
                duration_group=_str(row["duration_group"], "duration_group"),
                video_id=_str(row["video_id"], "video_id"),
                videos=(os.path.join(ctx["videos"], _str(row["video_path"], "video_path")),))


ADAPTERS = dict(videomme=_videomme, mvbench=_mvbench, nextqa=_nextqa, egoschema=_egoschema,
                perceptiontest=_perceptiontest, longvideobench=_longvideobench, mlvu=_mlvu)

# Question id within the benchmark (the record's id is "<benchmark>/<this>"), read before anything else so that a
# refused row is listed under its own id.
IDS = dict(
    videomme=lambda row, task, number: _str(_field(row, "question_id"), "question_id"),
    mvbench=lambda row, task, number: f"{task}/{number}",
    nextqa=lambda row, task, number: f"{_str(_field(row, 'video'), 'video')}_{_str(_field(row, 'qid'), 'qid')}",
    egoschema=lambda row, task, number: _str(_field(row, "question_idx"), "question_idx"),
    perceptiontest=lambda row, task, number: (f"{_str(_field(row, 'video_name'), 'video_name')}/"
                                              f"{_str(_field(row, 'question_id'), 'question_id')}"),
    longvideobench=lambda row, task, number: _str(_field(row, "id"), "id"),
    mlvu=lambda row, task, number: f"{task}/{number}",
)


def _record(benchmark: str, ident: str, row: _Row, where: str) -> dict:
    """Returns the JSONL record of a picked-apart row, or raises Refused."""
    question = row.question.strip() if isinstance(row.question, str) else None
    if not question:
        raise Refused("empty_question", f"question {row.question!r} is empty or not a string")
    options = _options(row.options, row.prefixed)
    index = answer_index(row.answer, options, row.encoding)
    record = dict(id=ident, video=os.path.abspath(_pick(row.videos)), question=question,
                  options=options, answer_index=index, answer=options[index], kind=row.task, benchmark=benchmark,
                  task=row.task, duration_group=row.duration_group, video_id=row.video_id, source=where)
    if row.interval is not None:
        record["clip"] = list(row.interval)
    record["_videos"] = [os.path.abspath(v) for v in row.videos]
    return record


def _pick(candidates: tuple) -> str:
    """Returns the first candidate that is a file, else the first one."""
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


# ------------------------------------------------------------------------------------------------ reading


def read_rows(benchmark: str, rows: Iterable[tuple[str, str, Any]], videos: str, *, video_map: dict | None = None,
              video_map_path: str = "", video_subdirs: dict | None = None) -> ReadResult:
    """Returns the ReadResult of upstream rows (where, task, row dict) of `benchmark` with videos under `videos`.

    Rows whose question, options or answer do not make one valid multiple-choice question, and repeated ids (the
    first is kept), are refused. Videos are not checked here (`check_videos`)."""
    if benchmark not in ADAPTERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    subdirs = dict(MVBENCH_VIDEO_DIRS) if benchmark == "mvbench" else {}
    subdirs.update(video_subdirs or {})
    ctx = dict(videos=os.path.abspath(videos), video_map=video_map or {}, video_map_path=video_map_path,
               video_subdirs=subdirs)
    result, seen, numbers = ReadResult(benchmark), set(), collections.Counter()
    for where, task, row in rows:
        result.rows += 1
        number = numbers[task]
        numbers[task] += 1
        ident = f"{benchmark}/{task + '/' if task else ''}row-{number}"  # until the row's own id is read
        try:
            ident = f"{benchmark}/{IDS[benchmark](row, task, number)}"
            if ident in seen:
                raise Refused("duplicate_id", f"duplicate id {ident!r} (the first one is kept)")
            seen.add(ident)
            result.records.append(_record(benchmark, ident, ADAPTERS[benchmark](row, task, ctx), where))
        except Refused as e:
            result.refuse(ident, where, e)
        except KeyError as e:  # a JSON entry without a required key
            result.refuse(ident, where, Refused("bad_row", f"missing field {e}"))
    return result


def _nextqa_map(csv_path: str, video_map: str | None) -> tuple[dict, str]:
    """Returns (map video id -> relative path, its file): `video_map`, else map_vid_vidorID.json next to the CSV,
    else the only JSON file there."""
    if video_map is None:
        folder = os.path.dirname(os.path.abspath(csv_path))
        default = os.path.join(folder, "map_vid_vidorID.json")
        if os.path.isfile(default):
            video_map = default
        else:
            found = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(".json")]
            if len(found) != 1:
                raise BenchmarkFormatError(f"{folder}: no map_vid_vidorID.json (NExT-QA's video id -> path map) and "
                                           f"{len(found)} other JSON files: pass --video_map")
            video_map = os.path.join(folder, found[0])
    try:
        with open(video_map) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkFormatError(f"{video_map}: cannot read the NExT-QA video map ({e})") from None
    if not isinstance(data, dict):
        raise BenchmarkFormatError(f"{video_map}: expected a JSON object video id -> path, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}, video_map


def load_video_subdirs(value: str | dict | None) -> dict:
    """Returns a task -> subfolder mapping from a dict, a JSON object text, or a JSON file's path ({} for None)."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    text = value
    if not value.lstrip().startswith("{"):
        with open(value) as f:
            text = f.read()
    data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BenchmarkFormatError(f"video_subdirs {value!r}: expected a JSON object task -> subfolder")
    return data


def read_benchmark(benchmark: str, annotations: str, videos: str, *, split: str = "validation",
                   video_map: str | None = None, video_subdirs: str | dict | None = None) -> ReadResult:
    """Returns the ReadResult of a benchmark's annotation file / folder as upstream ships it (module docstring);
    raises BenchmarkFormatError when a file is unusable. Videos are not checked here (`check_videos`)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    kw = dict(video_subdirs=load_video_subdirs(video_subdirs))
    if benchmark in ("videomme", "egoschema", "perceptiontest"):
        rows = _parquet_rows(find_files(annotations, "parquet", split, benchmark), benchmark)
    elif benchmark in PER_TASK:
        rows = _json_rows(find_files(annotations, "json", split, benchmark, one_split=False), benchmark, True)
    elif benchmark == "longvideobench":
        rows = _json_rows(find_files(annotations, "json", split, benchmark), benchmark, False)
    else:  # nextqa
        (path,) = find_files(annotations, "csv", split, benchmark)
        kw["video_map"], kw["video_map_path"] = _nextqa_map(path, video_map)
        rows = _csv_rows(path, benchmark)
    return read_rows(benchmark, rows, videos, **kw)


# ------------------------------------------------------------------------------------------------ videos and clips


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "clip"


def clip_name(video: str, start: float, end: float) -> str:
    """Returns the file name of the clip [start, end] of `video` (readable stem + a hash of the full path)."""
    digest = hashlib.sha1(os.path.realpath(video).encode()).hexdigest()[:10]
    return f"{_safe(os.path.splitext(os.path.basename(video))[0])}_{start:g}-{end:g}_{digest}.mp4"


def check_interval(start: float, end: float, num_frames: int, fps: float, slack_s: float | None = None) -> None:
    """Raises Refused("bad_interval") unless [start, end] lies in a video of num_frames at fps (end may pass the
    video's end, num_frames / fps, by `slack_s`, default one frame)."""
    if fps <= 0:
        raise Refused("bad_interval", "the video declares no frame rate: cannot cut a clip by seconds")
    duration = num_frames / fps
    slack = 1.0 / fps if slack_s is None else slack_s
    if start < 0 or end <= start:
        raise Refused("bad_interval", f"interval [{start:g}, {end:g}] s is empty or negative")
    if start >= duration or end > duration + slack:
        raise Refused("bad_interval", f"interval [{start:g}, {end:g}] s is outside the video ({duration:.3f} s "
                      f"long, {num_frames} frames at {fps:g} fps)")


_OVERSHOT = object()  # the seek landed after the clip's start


def _frames_between(container, stream, start: float, end: float, name: str, seek: bool):
    """Yields the decoded frames of `stream` with start <= t <= end (t in seconds from the stream's first frame),
    seeking to the keyframe before `start` if `seek`; yields only _OVERSHOT when the seek landed after `start`."""
    eps = 1e-6
    origin = stream.start_time or 0
    if seek and start > 0:
        container.seek(origin + int(start / stream.time_base), stream=stream, backward=True)
    first = True
    for frame in container.decode(stream):
        if frame.pts is None:
            raise VideoDecodeError(name, "corrupt", "a frame without a timestamp: cannot cut clips")
        t = float((frame.pts - origin) * stream.time_base)
        if first and seek and start > 0 and t > start + eps:
            yield _OVERSHOT  # the caller decodes from the beginning instead
            return
        first = False
        if t < start - eps:
            continue
        if t > end + eps:
            return
        yield frame


def cut_clip(src: str, start: float, end: float, dst: str, codec: str = "mpeg4") -> int:
    """Writes the frames of `src` with timestamp in [start, end] to the mp4 `dst` (codec, same size, the source's
    average fps), decoding and encoding one frame at a time; returns their count. Raises VideoDecodeError
    (unreadable source) or Refused("bad_interval")."""
    import av

    info = probe_video(src)
    check_interval(start, end, info.num_frames, info.fps, slack_s=float("inf"))
    tmp = dst + ".part"
    try:
        with av.open(src) as container:
            stream = container.streams.video[0]
            frames = _frames_between(container, stream, start, end, src, seek=True)
            first = next(frames, None)
            if first is _OVERSHOT:
                container.seek(0)
                frames = _frames_between(container, stream, start, end, src, seek=False)
                first = next(frames, None)
            if first is None:
                raise Refused("bad_interval", f"no frame of {src} has a timestamp in [{start:g}, {end:g}] s")
            rate = fractions.Fraction(stream.average_rate or stream.guessed_rate).limit_denominator(65535)
            count = _encode(itertools.chain([first], frames), tmp, rate, stream.width, stream.height, codec)
        os.replace(tmp, dst)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(src, "corrupt", f"cannot cut [{start:g}, {end:g}] s ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def _encode(frames: Iterable, path: str, rate: fractions.Fraction, width: int, height: int, codec: str) -> int:
    """Encodes decoded PyAV frames into the mp4 `path` (moov atom first) at `rate` frames per second; returns
    their count."""
    import av

    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for number, frame in enumerate(frames):
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = number, 1 / rate  # consecutive, as the encoder's clock counts them
            frame.pict_type = 0  # let the encoder choose (a decoded frame keeps its own type: all I-frames)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return number + 1


def _check_video(record: dict) -> None:
    """Raises Refused unless the record's video (one of its candidates) is a file."""
    if os.path.isfile(record["video"]):
        return
    tried = record["_videos"]
    if any(os.path.isdir(c) for c in tried):
        folder = next(c for c in tried if os.path.isdir(c))
        raise Refused("video_is_folder", f"video {folder} is a folder (of frames?), not a video file: encode it "
                      "to a video first")
    raise Refused("missing_video", "video not found: tried " + ", ".join(tried))


def check_videos(result: ReadResult, out_dir: str, *, clip_slack_s: float | None = None) -> ReadResult:
    """Returns `result` with records whose video is missing refused and "clip" records pointed at their clip
    (cut once per (video, start, end) into <out_dir>/clips/, kept when it already exists there)."""
    kept, clips = [], {}
    for record in result.records:
        try:
            _check_video(record)
            if "clip" in record:
                record["source_video"] = record["video"]
                record["video"] = _clip(record["video"], *record["clip"], out_dir, clips, clip_slack_s)
        except Refused as e:
            result.refuse(record["id"], record["source"], e, video=record["video"])
            continue
        kept.append(record)
    result.records = kept
    return result


def _clip(video: str, start: float, end: float, out_dir: str, cache: dict, slack_s: float | None) -> str:
    """Returns the clip's path relative to out_dir, cutting it the first time; raises Refused."""
    key = (os.path.realpath(video), start, end)
    if key not in cache:
        rel = os.path.join("clips", clip_name(video, start, end))
        try:
            info = probe_video(video)
            check_interval(start, end, info.num_frames, info.fps, slack_s)
            if not os.path.isfile(os.path.join(out_dir, rel)):
                os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
                cut_clip(video, start, end, os.path.join(out_dir, rel))
            cache[key] = rel
        except VideoDecodeError as e:
            cache[key] = Refused("unreadable_video", f"cannot cut a clip from it ({e.kind}): {e}")
        except Refused as e:
            cache[key] = e
    if isinstance(cache[key], Refused):
        raise cache[key]
    return cache[key]


# ------------------------------------------------------------------------------------------------ writing


def write_jsonl(items: Iterable[dict], path: str) -> None:
    """Writes dicts one JSON object per line (keys starting with "_" are internal and left out)."""
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps({k: v for k, v in item.items() if not k.startswith("_")}) + "\n")


def prepare_benchmark(benchmark: str, annotations: str, videos: str, out_dir: str, *, split: str = "validation",
                      video_map: str | None = None, video_subdirs: str | dict | None = None,
                      clip_slack_s: float | None = None) -> ReadResult:
    """Reads a benchmark (`read_benchmark`), checks its videos and cuts clips (`check_videos`), and writes
    <out_dir>/<split>.jsonl and <out_dir>/refused.jsonl (stage "read"); returns the ReadResult."""
    os.makedirs(out_dir, exist_ok=True)
    result = read_benchmark(benchmark, annotations, videos, split=split, video_map=video_map,
                            video_subdirs=video_subdirs)
    result = check_videos(result, out_dir, clip_slack_s=clip_slack_s)
    write_jsonl(result.records, os.path.join(out_dir, f"{split}.jsonl"))
    write_jsonl([dict(r, stage="read") for r in result.refused], os.path.join(out_dir, "refused.jsonl"))
    return result


def summarize(result: ReadResult, *, split: str, builder_skipped: Iterable[dict] = (),
              examples: int | None = None) -> dict:
    """Returns the prepare report: rows read, written, refused (by reason), rows whose video is missing or
    unreadable (at read time and those the builder skipped), and the examples in the dataset."""
    skipped = [s for s in builder_skipped if s.get("split", split) == split]
    reasons = collections.Counter(r["reason"] for r in result.refused)
    missing = [r for r in result.refused if r["reason"] in ("video_not_in_map", "missing_video", "video_is_folder")]
    bad_videos = [s for s in skipped if s["kind"] in ERROR_KINDS]  # the builder's other kinds: annotations, paths
    unreadable = reasons["unreadable_video"] + len(bad_videos)
    return dict(benchmark=result.benchmark, split=split, rows_read=result.rows, written=len(result.records),
                refused=len(result.refused), refused_by_reason=dict(sorted(reasons.items())),
                videos_missing=len(missing), videos_missing_files=len({r.get("video", r["id"]) for r in missing}),
                videos_unreadable=unreadable, builder_skipped=len(skipped),
                builder_skipped_by_kind=dict(sorted(collections.Counter(s["kind"] for s in skipped).items())),
                examples=examples)


def format_summary(report: dict) -> str:
    """Returns the one-line summary "N rows read, M written, K refused (...), V videos missing/unreadable"."""
    by_reason = ", ".join(f"{k}: {v}" for k, v in report["refused_by_reason"].items())
    line = (f"{report['rows_read']} rows read, {report['written']} written, {report['refused']} refused"
            f"{f' ({by_reason})' if by_reason else ''}, "
            f"{report['videos_missing'] + report['videos_unreadable']} videos missing/unreadable "
            f"({report['videos_missing']} missing, {report['videos_unreadable']} unreadable)")
    if report.get("examples") is not None:
        line += f"; {report['examples']} examples in the dataset"
    return line
