"""Molmo2 preprocessing of frames (resize, normalise, patchify) and the video prompt layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stts_jax.config import tokens_per_frame


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Returns uint8 [T, size, size, 3]: bilinear (half-pixel centres, no antialias), rounded and clamped."""
    t, _, _, c = frames.shape
    out = jax.image.resize(jnp.asarray(frames, jnp.float32), (t, size, size, c), "bilinear", antialias=False)
    return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)


def patchify(frames: np.ndarray, patch: int) -> np.ndarray:
    """Returns [T, n*n, patch*patch*3] float32 in [-1, 1]: row-major patches, (y, x, channel) inside each."""
    t, h, w, c = frames.shape
    x = frames.astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    n = h // patch
    x = x.reshape(t, n, patch, n, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(t, n * n, patch * patch * c)


def video_token_layout(cfg: ml_collections.ConfigDict, timestamp_ids: list[list[int]],
                       tokens_per_frame_kept: list[int] | None = None) -> list[int]:
    """Returns the token ids of a video: per frame `timestamp ids, <frame_start>, <im_patch> x k, <frame_end>`.

    `timestamp_ids[i]` are the tokenised text of frame i's timestamp; k defaults to the tokens per frame.
    """
    per_frame = tokens_per_frame(cfg)
    ids: list[int] = []
    for i, stamp in enumerate(timestamp_ids):
        k = per_frame if tokens_per_frame_kept is None else tokens_per_frame_kept[i]
        ids += list(stamp) + [cfg.tokens.frame_start_id] + [cfg.tokens.image_patch_id] * k + [cfg.tokens.frame_end_id]
    return ids
