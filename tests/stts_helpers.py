"""Batch-major batches with STTS placeholder layouts for the tiny config (9 windows per frame)."""

import numpy as np

from stts_jax.config import tiny_model_config, stts_config
from stts_jax.geometry import (FrameLayout, grid_size, patch_dim, placeholder_counts, placeholders_per_frame,
                               tokens_per_frame)


def stts_tiny_config(**stts):
    cfg = tiny_model_config()
    cfg.stts = stts_config(**{"prune_at": 0, **stts})
    return cfg


def video_ids(cfg, rng, counts, question_len):
    """bos, per frame `2 stamp tokens, <frame_start>, <im_patch> x counts[f], <frame_end>`, then a question."""
    t = cfg.tokens
    ids = [int(rng.integers(0, 100))]
    for c in counts:
        ids += [int(x) for x in rng.integers(0, 100, size=2)] + [t.frame_start_id] + [t.image_patch_id] * c + [t.frame_end_id]
    return ids + [int(x) for x in rng.integers(0, 100, size=question_len)]


def slots_batch(cfg, frames_per_video, filled, seed=0, question_len=6, ratio=None, counts=None):
    """Returns (batch, layout): rows in the layout FrameLayout.videos(*frames_per_video); row i holds the
    videos of slots `filled[i]` (in slot order), each its own example (segment 1, 2, .. with positions
    restarting), every other slot empty (frame_mask 0, zero pixels).

    Host placeholders per frame: `counts[i][j]` for the j-th video of row i if given, else
    `placeholder_counts` at `ratio` if given, else what the config needs (`placeholders_per_frame`).
    Pixels are smooth-ish random frames (adjacent frames similar).
    """
    rng = np.random.default_rng(seed)
    layout = FrameLayout.videos(*frames_per_video)
    w, grid, pdim = tokens_per_frame(cfg), grid_size(cfg), patch_dim(cfg)
    spans = layout.spans()
    rows, segs, questions = [], [], []
    for i, slots in enumerate(filled):
        ids, seg, spans_q = [], [], []
        for j, slot in enumerate(slots):
            t = frames_per_video[slot]
            if counts is not None:
                c = counts[i][j]
            elif ratio is not None:
                c = placeholder_counts(t, w, ratio, cfg.stts.prune_from_frame)
            else:
                c = placeholders_per_frame(cfg, t)
            example = video_ids(cfg, rng, c, question_len)
            spans_q.append((len(ids) + len(example) - question_len, len(ids) + len(example)))
            ids += example
            seg += [j + 1] * len(example)
        rows.append(ids)
        segs.append(seg)
        questions.append(spans_q)
    length = max(len(r) for r in rows) + 2
    b = len(rows)
    input_ids = np.zeros((b, length), np.int32)
    seg = np.zeros_like(input_ids)
    positions = np.zeros_like(input_ids)
    loss_mask = np.zeros_like(input_ids)
    for i, (r, s) in enumerate(zip(rows, segs)):
        input_ids[i, : len(r)] = r
        seg[i, : len(s)] = s
        for e in range(1, max(s, default=0) + 1):  # positions restart at 0 for every example
            where = np.flatnonzero(seg[i] == e)
            positions[i, where] = np.arange(where.size)
        for a, e in questions[i]:
            loss_mask[i, a - 1: e - 1] = 1  # predict every question token
    targets = np.roll(input_ids, -1, axis=1)
    f = layout.num_frames
    pixels = np.zeros((b, f, grid * grid, pdim), np.float32)  # [B, F, N, P]
    frame_mask = np.zeros((b, f), np.int32)  # [B, F]
    base = rng.uniform(-1, 1, size=(1, grid * grid, pdim))
    for i, slots in enumerate(filled):
        for slot in slots:
            _, start, t = spans[slot]
            pixels[i, start: start + t] = np.clip(base + 0.3 * rng.normal(size=(t, grid * grid, pdim)), -1, 1)
            frame_mask[i, start: start + t] = 1
    batch = dict(input_ids=input_ids, segment_ids=seg, positions=positions, pixel_values=pixels,
                 frame_mask=frame_mask, targets=targets.astype(np.int32), loss_mask=loss_mask)
    return batch, layout


def stts_batch(cfg, frames_per_video, seed=0, question_len=6, ratio=None, counts=None):
    """Returns (batch, layout): one example (row) per video; the row layout holds every video's slot
    (FrameLayout.videos(*frames_per_video)) and row i fills only slot i (the others empty).

    `counts[i]`: host placeholders per frame of video i (default: see `slots_batch`).
    """
    filled = [[i] for i in range(len(frames_per_video))]
    per_row = None if counts is None else [[c] for c in counts]
    return slots_batch(cfg, frames_per_video, filled, seed, question_len, ratio, per_row)


def real_frames(batch):
    """Returns the real frames [sum of frame_mask, N, P] of a batch-major batch, row by row (a flat frame list)."""
    return np.asarray(batch["pixel_values"])[np.asarray(batch["frame_mask"]).astype(bool)]


def take_rows(batch, rows):
    """Returns the batch restricted to `rows` (a list of row indices, in that order)."""
    return {k: np.asarray(v)[list(rows)] for k, v in batch.items()}
