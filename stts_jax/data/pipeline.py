"""Grain input pipeline: `video_qa` ArrayRecord shards -> packed, static-shape, batch-major host batches.

  source (tfds ArrayRecord)  -> this host's slice -> shuffle(shuffle_seed), reshuffled every epoch -> repeat
  -> decode + sample + resize + tokenise (`ExampleBuilder`; in `workers` processes via mp_prefetch)
  -> screen: bad examples (bad videos, bad fields, longer than a row) are counted, reported and skipped
     (on_bad_video="skip") within a skip budget (max_consecutive_bad in a row, max_bad_fraction overall; past it
     TooManyBadExamples stops the run), or raise naming the example (on_bad_video="fail")
  -> grain.experimental.FirstFitPackIterDataset: rows of seq_len tokens AND at most V * T frames
  -> batch `rows` rows -> host batch (below) -> thread prefetch

Host batch (numpy, static shapes, batch-major: every array but `num_videos` has the R rows first; R = rows per
host, V = videos_per_batch / rows videos per row, T = num_frames, F = V*T frame slots per row):

  input_ids, targets, loss_mask, segment_ids, positions  [R, L] int32  (segment ids 1-based per row, 0 = pad;
                                                          positions restart at 0 per example)
  pixel_values  [R, F, N, P*P*3] float32  each row's frames in its own row: the packed videos' frames in
                                          sequence order, normalised, then zeros in the empty slots
  frame_mask    [R, F] int32   1 = a real frame, 0 = an empty slot (whole videos: T slots at a time)
  num_videos    []   int32  real videos in the batch (for metrics)
  row_videos    [R]  int32  real videos per row
  record        [R, V] int64  `index` of each packed example (-1 = empty slot), for tests and debugging

Rows missing from the last partial batch are empty rows (no tokens, frame_mask 0). The model reads one row's
frame slots with the static `BatchGeometry.layout()` (V video slots of T frames) and derives pooling windows
from stts_jax.geometry; an empty slot yields no vision tokens and no placeholders, so empty slots and empty
rows can sit anywhere. Multi-host: every host packs its own slice and passes its rows to
`stts_jax.train.sharding.to_global`, which concatenates them in process order.

Why Grain's packer: first-fit over several features at once gives the two static caps (tokens and frames per
row) for free, keeps iterator state checkpointable, and never splits an example.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from stts_jax import geometry as geo
from stts_jax import paths
from stts_jax.config import ConfigError, remote_data_message, validate_data_config
from stts_jax.data.examples import ExampleBuilder
from stts_jax.data.processor import Molmo2TextEncoder, PromptFormat, normalize_pixels

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "pixel_values", "frame_mask")


class BadExampleError(RuntimeError):
    """A bad example (video, fields) with on_bad_video="fail"; the message names the example and the file."""


class ExampleTooLongError(ValueError):
    """An example does not fit into one packed row (with on_bad_video="fail"); the message names it."""


class TooManyBadExamples(RuntimeError):
    """Skipping bad examples went past the skip budget (in a row, or as a share): the data, not one record, is
    broken (paths moved, a codec missing, seq_len too small). The message names the count and the kinds."""


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """Static shapes of one host's batch (rows per host; process_count hosts make the global batch)."""

    rows: int  # rows per host
    seq_len: int
    videos_per_row: int
    num_frames: int
    grid: int
    pool: int
    windows_per_frame: int
    patch_dim: int
    process_count: int = 1

    @property
    def videos_per_batch(self) -> int:
        """Returns video slots per host batch (real + empty)."""
        return self.rows * self.videos_per_row

    @property
    def frames_per_row(self) -> int:
        """Returns F = V*T, the frame slots of one row."""
        return self.videos_per_row * self.num_frames

    def layout(self) -> geo.FrameLayout:
        """Returns the static FrameLayout of ONE row's frame slots: videos_per_row video slots of T frames."""
        return geo.FrameLayout.video_slots(self.videos_per_row, self.num_frames)


# -------------------------------------------------------------------------------------- bad examples

@dataclasses.dataclass
class BadExampleReport:
    """Counts of skipped examples per error kind, and the last messages (each names its file)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: list = dataclasses.field(default_factory=list)
    keep: int = 50

    @property
    def total(self) -> int:
        """Returns how many examples were skipped."""
        return sum(self.counts.values())

    def add(self, kind: str, message: str) -> None:
        """Records one skipped example."""
        self.counts[kind] += 1
        self.messages = (self.messages + [message])[-self.keep:]

    def summary(self) -> str:
        """Returns a one-line summary."""
        if not self.total:
            return "no bad examples"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad examples ({kinds}); last: {self.messages[-1]}"


class _ScreenIterator(grain.DatasetIterator):
    def __init__(self, parent, cfg: ml_collections.ConfigDict, report: BadExampleReport):
        super().__init__(parent)
        self._cfg, self._report = cfg, report
        self._seen = self._in_a_row = 0

    def _skip(self, ident: str, kind: str, message: str, error: type[Exception]) -> None:
        """Counts one bad example, or raises `error` (on_bad_video="fail") or TooManyBadExamples (over budget)."""
        if self._cfg.on_bad_video == "fail":
            raise error(f"bad example {ident!r}: {message}")
        self._report.add(kind, message)
        self._in_a_row += 1
        logging.warning("skipping example %s: %s", ident, message)
        cfg, total = self._cfg, self._report.total
        if self._in_a_row >= cfg.max_consecutive_bad:
            why = f"{self._in_a_row} consecutive bad examples"
        elif self._seen >= cfg.bad_fraction_after and total > cfg.max_bad_fraction * self._seen:
            why = f"{total} of {self._seen} examples were bad (more than max_bad_fraction={cfg.max_bad_fraction})"
        else:
            return
        raise TooManyBadExamples(f"stopping: {why}; {self._report.summary()}")

    def __next__(self):
        while True:
            element = next(self._parent)
            self._seen += 1
            ident = str(element["id"])
            if "error" in element:
                self._skip(ident, str(element["error_kind"]), str(element["error"]), BadExampleError)
                continue
            n = len(element["input_ids"])
            if n > self._cfg.seq_len:
                self._skip(ident, "too_long", f"record {int(element['record'][0])} has {n} tokens, more than a "
                           f"packed row holds (seq_len={self._cfg.seq_len}): raise seq_len, lower num_frames or "
                           "shorten its text", ExampleTooLongError)
                continue
            self._in_a_row = 0
            element = dict(element)
            del element["id"]
            return element

    def get_state(self) -> dict[str, Any]:
        return dict(parent=self._parent.get_state(), counts=dict(self._report.counts),
                    messages=list(self._report.messages), seen=self._seen, in_a_row=self._in_a_row)

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._report.counts = collections.Counter(state["counts"])
        self._report.messages = list(state["messages"])
        self._seen, self._in_a_row = int(state.get("seen", 0)), int(state.get("in_a_row", 0))


class _ScreenIterDataset(grain.IterDataset):
    """Skips (counting and reporting) error markers and over-long examples within the skip budget, or raises with
    on_bad_video="fail"; removes the string id."""

    def __init__(self, parent, cfg: ml_collections.ConfigDict, report: BadExampleReport):
        super().__init__(parent)
        self._cfg, self._report = cfg, report

    def __iter__(self):
        return _ScreenIterator(self._parent.__iter__(), self._cfg, self._report)


# ------------------------------------------------------------------------------------------ host batch

class ToModelBatch:
    """Turns a batch of packed rows into the model's host batch (see module docstring); pads missing rows."""

    def __init__(self, geometry: BatchGeometry):
        self.g = geometry

    def __call__(self, packed: dict) -> dict:
        g = self.g
        rows = packed["input_ids"].shape[0]

        def pad_rows(x, fill=0):
            if rows == g.rows:
                return x
            return np.concatenate([x, np.full((g.rows - rows, *x.shape[1:]), fill, x.dtype)])

        out = dict(
            input_ids=pad_rows(packed["input_ids"]).astype(np.int32),
            segment_ids=pad_rows(packed["input_ids_segment_ids"]).astype(np.int32),
            positions=pad_rows(packed["input_ids_positions"]).astype(np.int32),
            targets=pad_rows(packed["targets"]).astype(np.int32),
            loss_mask=pad_rows(packed["loss_mask"]).astype(np.int32),
        )
        frame_mask = pad_rows(packed["frames_segment_ids"] > 0)  # [R, F]: each row's videos first, in sequence order
        frames = pad_rows(packed["frames"])  # [R, F, N, P*P*3] uint8, empty slots unspecified
        pixel_values = np.zeros(frames.shape, np.float32)
        pixel_values[frame_mask] = normalize_pixels(frames[frame_mask])
        record = pad_rows(np.where(packed["record_segment_ids"] > 0, packed["record"], -1), fill=-1)
        out.update(pixel_values=pixel_values, frame_mask=frame_mask.astype(np.int32),
                   num_videos=np.int32(frame_mask.sum() // g.num_frames),
                   row_videos=(record >= 0).sum(1).astype(np.int32), record=record.astype(np.int64))
        return out


# ---------------------------------------------------------------------------------------------- wiring

def find_dataset_dir(data_dir: str, name: str = "video_qa") -> str:
    """Returns the tfds version directory (holding dataset_info.json) under data_dir."""
    if paths.as_path(paths.join(data_dir, "dataset_info.json")).exists():
        return data_dir
    base = paths.as_path(paths.join(data_dir, name))
    versions = sorted(v.name for v in base.iterdir() if (v / "dataset_info.json").exists()) if base.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no prepared {name} dataset under {data_dir} (run launch/prepare_data.py)")
    return paths.join(data_dir, name, versions[-1])


def open_source(data_dir: str, split: str = "train"):
    """Returns the random-access tfds ArrayRecord source of a prepared split (records are dicts); a URL is refused
    (ArrayRecord's reader opens local files only: it would hang on gs://)."""
    import tensorflow_datasets as tfds

    if paths.is_remote(data_dir):
        raise ValueError(remote_data_message(data_dir))

    builder = tfds.builder_from_directory(find_dataset_dir(data_dir))
    return builder.as_data_source(split)


class Pipeline:
    """A configured input pipeline: iterate it for host batches; `report` counts skipped bad examples."""

    def __init__(self, dataset: grain.IterDataset, geometry: BatchGeometry, report: BadExampleReport):
        self.dataset, self.geometry, self.report = dataset, geometry, report

    def __iter__(self):
        return iter(self.dataset)

    @property
    def layout(self) -> geo.FrameLayout:
        """Returns the static FrameLayout of one row's frame slots (for the model / STTS)."""
        return self.geometry.layout()


def make_pipeline(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, *, source=None,
                  process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """Returns the Pipeline of data section `cfg` (stts_jax.config.data_config, validated there) for model config
    `model_cfg` (this host's slice). Its tokenizer is `cfg.tokenizer`, else the tokenizer.json next to `cfg.path`."""
    validate_data_config(cfg)
    for field in ("num_frames", "seq_len", "rows", "videos_per_batch"):
        if not isinstance(cfg[field], int):
            raise ConfigError(f"config field `data.{field}`: must be a Python int (it decides a shape), got {cfg[field]!r}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.rows % process_count:
        raise ConfigError(f"config field `data.rows`: {cfg.rows} rows cannot be split over {process_count} hosts")
    tokenizer = find_tokenizer(cfg)
    geometry = BatchGeometry(
        rows=cfg.rows // process_count, seq_len=cfg.seq_len, videos_per_row=cfg.videos_per_batch // cfg.rows,
        num_frames=cfg.num_frames, grid=geo.grid_size(model_cfg), pool=model_cfg.adapter.pool_size,
        windows_per_frame=geo.tokens_per_frame(model_cfg), patch_dim=geo.patch_dim(model_cfg),
        process_count=process_count)
    from stts_jax.data.tokenizer import load_tokenizer

    encoder = Molmo2TextEncoder(load_tokenizer(tokenizer), PromptFormat())
    encoder.check_model_tokens(model_cfg.tokens)
    builder = ExampleBuilder(
        tokenizer, image_size=model_cfg.vit.image_size, patch_size=model_cfg.vit.patch_size,
        num_frames=cfg.num_frames, placeholders_per_frame=geo.placeholders_per_frame(model_cfg, cfg.num_frames),
        max_fps=cfg.max_fps, sampler=cfg.sampler, decode_threads=cfg.decode_threads,
        decode_timeout_s=cfg.decode_timeout_s, decode_memory_bytes=int(cfg.decode_memory_gb * 2**30))

    if source is None:
        source = open_source(cfg.path, cfg.split)
    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(builder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if cfg.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when starting workers (outside app.run)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                         per_worker_buffer_size=cfg.worker_buffer))
    report = BadExampleReport()
    ds = _ScreenIterDataset(ds, cfg, report)
    v, t = geometry.videos_per_row, cfg.num_frames
    lengths = dict(input_ids=cfg.seq_len, targets=cfg.seq_len, loss_mask=cfg.seq_len, frames=v * t, record=v)
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths,
        num_packing_bins=cfg.packing_bins or 2 * geometry.rows, seed=cfg.shuffle_seed, shuffle_bins=cfg.shuffle)
    ds = ds.batch(geometry.rows, drop_remainder=False)
    ds = ds.map(ToModelBatch(geometry))
    if cfg.host_prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.host_prefetch)
    return Pipeline(ds, geometry, report)


TRAIN_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "pixel_values", "frame_mask",
              "num_videos")


def _train_keys(batch: dict) -> dict:
    return {k: batch[k] for k in TRAIN_KEYS}


def find_tokenizer(cfg_data: ml_collections.ConfigDict) -> str:
    """Returns data.tokenizer, else the first tokenizer.json in data.path or its two parent directories
    (prepare_data / the demo write it next to the tfds directory)."""
    if cfg_data.get("tokenizer"):
        return cfg_data.tokenizer
    here = paths.as_path(cfg_data.path)
    for _ in range(3):
        candidate = here / "tokenizer.json"
        if candidate.exists():
            return str(candidate)
        here = here.parent
    raise FileNotFoundError(f"no tokenizer.json in {cfg_data.path} or its parents; set data.tokenizer")


def make_train_iterator(cfg: ml_collections.ConfigDict):
    """Returns (iterator, BadExampleReport): the checkpointable Grain iterator of host micro-batches the trainer
    consumes (`data.kind="video"`): the pipeline of the training config's data section as is (repeating forever
    with the default num_epochs=None), keeping the trainer's batch keys (TRAIN_KEYS)."""
    p = make_pipeline(cfg.data, cfg.model)
    p.dataset = p.dataset.map(_train_keys)
    return iter(p), p.report
