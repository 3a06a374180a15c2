"""Batches with STTS placeholder layouts for the tiny config (9 windows per frame)."""

import numpy as np

from stts_jax.config import tiny_model_config, stts_config, tokens_per_frame
from stts_jax.model.adapter import video_pooling_indices
from stts_jax.model.pruning import FrameLayout, placeholder_counts


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


def stts_batch(cfg, frames_per_video, seed=0, question_len=6, ratio=None, counts=None):
    """One example (row) per video, host placeholder layout from `placeholder_counts` (or `counts`)."""
    rng = np.random.default_rng(seed)
    w = tokens_per_frame(cfg)
    ratio = cfg.stts.prune_ratio if ratio is None else ratio
    rows, question_spans = [], []
    for i, t in enumerate(frames_per_video):
        c = counts[i] if counts is not None else placeholder_counts(t, w, ratio, cfg.stts.prune_from_frame)
        ids = video_ids(cfg, rng, c, question_len)
        rows.append(ids)
        question_spans.append((len(ids) - question_len, len(ids)))
    length = max(len(r) for r in rows) + 2
    b = len(rows)
    input_ids = np.zeros((b, length), np.int32)
    seg = np.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        seg[i, : len(r)] = 1
    targets = np.roll(input_ids, -1, axis=1)
    loss_mask = np.zeros_like(input_ids)
    for i, (a, e) in enumerate(question_spans):
        loss_mask[i, a - 1: e - 1] = 1  # predict every question token
    f = sum(frames_per_video)
    grid = cfg.vit.image_size // cfg.vit.patch_size
    # smooth-ish random frames so adjacent frames are similar (temporal redundancy)
    base = rng.uniform(-1, 1, size=(1, grid * grid, 588)).astype(np.float32)
    pixels = np.clip(base + 0.3 * rng.normal(size=(f, grid * grid, 588)), -1, 1).astype(np.float32)
    batch = dict(input_ids=input_ids, segment_ids=seg,
                 positions=np.broadcast_to(np.arange(length), input_ids.shape).astype(np.int32).copy(),
                 pixel_values=pixels, pooling_idx=video_pooling_indices(f, grid, cfg.adapter.pool_size).astype(np.int32),
                 targets=targets.astype(np.int32), loss_mask=loss_mask.astype(np.int32))
    return batch, FrameLayout.videos(*frames_per_video)
