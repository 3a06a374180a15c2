"""Training input sources: each yields host-local micro-batches (numpy) with static shapes and a
checkpointable state. `random` needs no data (smoke tests, pod bring-up); `video` reads prepared video-QA
records through the Grain pipeline of `stts_jax.data`.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from stts_jax import geometry
from stts_jax.data.processor import prompt_overhead_tokens, random_video_prompt



def random_micro_batch(cfg: ml_collections.ConfigDict, index: int) -> dict:
    """Returns this host's rows of the deterministic random micro-batch `index` (batch-major).

    Row r holds V = videos_per_batch / rows video slots: input_ids etc. [rows, L], pixel_values [rows, V*T, N,
    P*P*3] (its videos' frames), frame_mask [rows, V*T]. With `data.empty_slots` > 0 that share of the slots
    (drawn at random, anywhere in a row) is empty: no tokens, zero pixels, frame_mask 0. The global
    micro-batch depends only on (seed, index), so any number of hosts sees the same data.
    """
    data, model = cfg.data, cfg.model
    rng = np.random.default_rng([cfg.train.seed, index])
    rows, videos = data.rows, data.videos_per_batch
    if videos % rows:
        raise ValueError(f"data.videos_per_batch={videos} does not split evenly over data.rows={rows} rows")
    per_row = videos // rows
    filled = np.random.default_rng([cfg.train.seed, index, 1]).random((rows, per_row)) >= data.get("empty_slots", 0.0)
    vocab = min(model.llm.vocab_size, 1000)
    counts = geometry.placeholders_per_frame(model, data.num_frames)
    need = per_row * (1 + sum(counts) + prompt_overhead_tokens(data.num_frames) + data.answer_len)
    if need > data.seq_len:
        raise ValueError(f"data.seq_len={data.seq_len} is too short for {per_row} videos of "
                         f"{data.num_frames} frames per row ({need} tokens)")
    ids = np.zeros((rows, data.seq_len), np.int32)
    seg = np.zeros_like(ids)
    loss_mask = np.zeros_like(ids)
    positions = np.zeros_like(ids)
    for r in range(rows):
        seq = []
        for v in range(per_row):
            start = len(seq)
            example = random_video_prompt(model, rng, data.num_frames, vocab=vocab)
            answer = [int(x) for x in rng.integers(0, vocab, data.answer_len)]
            if not filled[r, v]:  # an empty slot (its draws are still made: the other slots' data stay the same)
                continue
            seq += example + answer
            seg[r, start: len(seq)] = v + 1
            positions[r, start: len(seq)] = np.arange(len(seq) - start)
            loss_mask[r, len(seq) - len(answer) - 1: len(seq) - 1] = 1
        ids[r, : len(seq)] = seq
    frames = per_row * data.num_frames  # F = V*T slots per row
    base = rng.uniform(-1, 1, size=(videos, 1, geometry.patches_per_frame(model), geometry.patch_dim(model)))
    pixels = np.clip(base + 0.2 * rng.normal(size=(videos, data.num_frames, *base.shape[2:])), -1, 1)
    frame_mask = np.repeat(filled, data.num_frames, axis=1).astype(np.int32)  # [rows, V*T]
    pixels = pixels.reshape(rows, frames, *base.shape[2:]).astype(np.float32)  # row r: videos r*V .. r*V+V-1
    pixels *= frame_mask[..., None, None]
    batch = dict(input_ids=ids, segment_ids=seg, positions=positions, targets=np.roll(ids, -1, axis=1),
                 loss_mask=loss_mask, pixel_values=pixels, frame_mask=frame_mask)
    return host_slice(batch, rows)


def host_slice(batch: dict, rows: int) -> dict:
    """Returns this process's contiguous share of the rows of a batch-major batch (every key has rows first)."""
    p, n = jax.process_index(), jax.process_count()
    if rows % n:
        raise ValueError(f"{rows} rows per micro-batch do not split over {n} hosts")
    return {key: value[p * rows // n: (p + 1) * rows // n] for key, value in batch.items()}


class InputSource:
    """Wraps a Grain iterator of micro-batches: next_batches(k) stacks k of them; state is checkpointable."""

    def __init__(self, iterator, report=None):
        self.iterator = iterator
        self.report = report  # the pipeline's BadExampleReport (skipped examples), if it has one

    def next_batches(self, count: int) -> dict:
        """Returns `count` micro-batches stacked on a new leading axis."""
        micro = [next(self.iterator) for _ in range(count)]
        return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def make_input(cfg: ml_collections.ConfigDict) -> InputSource:
    """Returns the InputSource the config asks for."""
    if cfg.data.kind == "random":
        dataset = (grain.MapDataset.range(1 << 30)
                   .map(lambda i: random_micro_batch(cfg, int(i)))
                   .to_iter_dataset())
        return InputSource(iter(dataset))
    from stts_jax.data import pipeline  # the video-QA Grain pipeline

    return InputSource(*pipeline.make_train_iterator(cfg))
