"""`video_qa`: a tensorflow-datasets builder for a folder of videos + JSONL question files -> ArrayRecord.

Builds offline (no TensorFlow, no download): put the inputs in the *manual dir*

  <manual_dir>/train.jsonl          one JSON object per line (also validation.jsonl / test.jsonl;
  <manual_dir>/validation.jsonl     every file present becomes a split, at least one is required)
  <manual_dir>/videos/...           video files, any container/codec FFmpeg reads

Each line of a JSONL file:

  {"id": "clip_000001_direction",        unique within the file (default: "<split>-<line number>")
   "video": "videos/clip_000001.mp4",    path relative to the manual dir (or absolute)
   "question": "Which direction does the red circle move?",
   "answer": "left",                     free-form answer; optional when options are given
   "options": ["down", "left", "up"],    optional: a multiple-choice question
   "answer_index": 1,                    required with options: index of the correct option
   "kind": "direction"}                  optional tag (question type), kept for per-kind metrics

Optional string fields kept for benchmark scores (`launch/prepare_benchmark.py` writes them): "benchmark",
"task", "duration_group" (e.g. Video-MME's short / medium / long) and "video_id" (questions on one video are one
cluster for standard errors); "" when absent.

Other keys are ignored. Multiple-choice questions are rendered for the model by
`stts_jax.data.processor.format_question` (options as "A. ..." lines) and answered with the option's letter.

Each example stores the video's bytes (`embed_videos=True`, the default: shards are self-contained and can be
copied to a bucket) or only its absolute path, plus the container's frame count / fps / size from a probe.
Refused records are listed in `builder.skipped` with their kind (`on_error="skip"`, the default) or stop the
build (`on_error="fail"`): videos that cannot be probed (unreadable, corrupt, no video stream, no frames),
video paths that resolve (symlinks followed) outside the manual dir and the `video_roots` folders
("outside_dataset"), malformed lines, empty texts, an `answer` that is not the option `answer_index` picks, more
than 26 options ("bad_annotation"), and a repeated id ("duplicate_id": the first is kept). Truncated files are
only found when decoding; the Grain pipeline counts and skips those.

  python launch/prepare_data.py --manual_dir=/data/my_videos --data_dir=/data/tfds
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from stts_jax.data.processor import OPTION_LETTERS
from stts_jax.data.video import VideoDecodeError, probe_video

SPLITS = ("train", "validation", "test")
BENCHMARK_FIELDS = ("benchmark", "task", "duration_group", "video_id")  # optional strings, "" when absent
ON_ERROR = ("skip", "fail")


class AnnotationError(ValueError):
    """A JSONL line is malformed; the message names the file and the line."""


def _text(value, field, where):
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: field {field!r} must be a string, got {value!r}")
    return value


MAX_OPTIONS = len(OPTION_LETTERS)  # one letter each, A-Z


def _nonempty(value, field, where):
    if not _text(value, field, where).strip():
        raise AnnotationError(f"{where}: field {field!r} is empty")
    return value


def parse_annotation(line: str, where: str, default_id: str) -> dict:
    """Returns the normalised fields of one JSONL line, or raises AnnotationError naming `where` (file:line)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for field in ("video", "question"):
        if field not in raw:
            raise AnnotationError(f"{where}: missing required field {field!r}")
    options = raw.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise AnnotationError(f"{where}: 'options' must be a list of non-empty strings, got {options!r}")
    if len(options) > MAX_OPTIONS:
        raise AnnotationError(f"{where}: {len(options)} options, at most {MAX_OPTIONS} (one letter each)")
    answer = raw.get("answer")
    if options:
        index = raw.get("answer_index")
        if index is None and answer in options:
            index = options.index(answer)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(options):
            raise AnnotationError(f"{where}: 'answer_index' must pick one of the {len(options)} options, got {index!r}")
        if answer is not None and answer not in (options[index], OPTION_LETTERS[index]):
            raise AnnotationError(f"{where}: 'answer' {answer!r} is neither option {index} ({options[index]!r}) that "
                                  f"'answer_index' picks nor its letter {OPTION_LETTERS[index]!r}: which one is right?")
        answer = options[index]
    else:
        index = -1
        if answer is None:
            raise AnnotationError(f"{where}: an open question needs an 'answer' (or give 'options' + 'answer_index')")
        _nonempty(answer, "answer", where)
    return dict(id=_nonempty(raw.get("id", default_id), "id", where), video=_nonempty(raw["video"], "video", where),
                question=_nonempty(raw["question"], "question", where), answer=_text(answer, "answer", where),
                options=options, answer_index=int(index), kind=_text(raw.get("kind", ""), "kind", where),
                **{field: _text(raw.get(field, ""), field, where) for field in BENCHMARK_FIELDS})


class VideoQa(tfds.core.GeneratorBasedBuilder):
    """Video question answering from a manual dir of videos + JSONL annotations (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """Returns this file (tfds' default probes package resources via importlib_resources, not installed)."""
        return tfds.core.Path(__file__)

    def __init__(self, *, on_error: str = "skip", embed_videos: bool = True, progress: bool = False,
                 video_roots: tuple[str, ...] = (), **kwargs):
        """`video_roots`: folders besides the manual dir that videos may live in (after following symlinks),
        e.g. shared storage that `videos/` links to; any other path is refused."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        kwargs.setdefault("file_format", "array_record")
        self.on_error, self.embed_videos, self.progress = on_error, embed_videos, progress
        self.video_roots = tuple(os.path.realpath(r) for r in video_roots)
        self.skipped: list[dict] = []  # {"split", "id", "video", "kind", "error"} of skipped examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64, doc="line number in the split's JSONL (0-based)"),
            "id": tfds.features.Text(),
            "video": tfds.features.Tensor(shape=(), dtype=np.object_, doc="video file bytes (empty if not embedded)"),
            "video_path": tfds.features.Text(doc="absolute path of the source video"),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "options": tfds.features.Sequence(tfds.features.Text()),
            "answer_index": tfds.features.Scalar(dtype=np.int32, doc="-1 for open questions"),
            "kind": tfds.features.Text(),
            **{field: tfds.features.Text() for field in BENCHMARK_FIELDS},
            "num_frames": tfds.features.Scalar(dtype=np.int32, doc="frames the container declares"),
            "fps": tfds.features.Scalar(dtype=np.float32),
            "width": tfds.features.Scalar(dtype=np.int32),
            "height": tfds.features.Scalar(dtype=np.int32),
        })
        return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0], features=features)

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {s: os.path.join(root, f"{s}.jsonl") for s in SPLITS}
        splits = {s: path for s, path in splits.items() if os.path.exists(path)}
        if not splits:
            raise FileNotFoundError(f"no {'/'.join(s + '.jsonl' for s in SPLITS)} in the manual dir {root}")
        return {split: self._generate_examples(split, path, root) for split, path in splits.items()}

    def _generate_examples(self, split: str, jsonl: str, root: str):
        with open(jsonl) as f:
            lines = f.readlines()
        probes: dict[str, object] = {}  # one probe (and one read) per distinct video
        seen: set[str] = set()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(lines), desc=f"{split}: examples", unit="ex")
        for number, line in enumerate(lines):
            if bar is not None:
                bar.update(1)
            if not line.strip():
                continue
            where = f"{jsonl}:{number + 1}"
            try:
                ann = parse_annotation(line, where, default_id=f"{split}-{number}")
            except AnnotationError as e:
                self._refuse(split, f"{split}-{number}", "", "bad_annotation", e)
                continue
            if ann["id"] in seen:
                self._refuse(split, ann["id"], ann["video"], "duplicate_id",
                             AnnotationError(f"{where}: duplicate id {ann['id']!r} (the first one is kept)"))
                continue
            seen.add(ann["id"])
            path = ann["video"] if os.path.isabs(ann["video"]) else os.path.join(root, ann["video"])
            real = os.path.realpath(path)
            allowed = (os.path.realpath(root),) + self.video_roots
            if not any(os.path.commonpath([real, r]) == r for r in allowed):
                self._refuse(split, ann["id"], path, "outside_dataset", AnnotationError(
                    f"{where}: video {ann['video']!r} resolves to {real}, outside the dataset folder {root} (pass "
                    "video_roots / --video_roots to allow another folder)"))
                continue
            path = real
            if path not in probes:
                try:
                    probes[path] = probe_video(path)
                except VideoDecodeError as e:
                    probes[path] = e
            probe = probes[path]
            if isinstance(probe, VideoDecodeError):
                if self.on_error == "fail":
                    raise VideoDecodeError(probe.name, probe.kind, probe.detail + f" (example {ann['id']!r}, {where})")
                self.skipped.append(dict(split=split, id=ann["id"], video=path, kind=probe.kind, error=str(probe)))
                logging.warning("skipping example %s: %s", ann["id"], probe)
                continue
            video = b""
            if self.embed_videos:
                with open(path, "rb") as vf:
                    video = vf.read()
            yield ann["id"], dict(
                index=number, id=ann["id"], video=video, video_path=os.path.abspath(path),
                question=ann["question"], answer=ann["answer"], options=ann["options"],
                answer_index=ann["answer_index"], kind=ann["kind"], num_frames=probe.num_frames,
                **{field: ann[field] for field in BENCHMARK_FIELDS},
                fps=probe.fps, width=probe.width, height=probe.height)
        if bar is not None:
            bar.close()

    def _refuse(self, split: str, ident: str, video: str, kind: str, error: Exception) -> None:
        """Lists a record refused at prepare time (on_error="skip"), or raises `error` (on_error="fail")."""
        if self.on_error == "fail":
            raise error
        self.skipped.append(dict(split=split, id=ident, video=video, kind=kind, error=str(error)))
        logging.warning("skipping example %s: %s", ident, error)
