"""STTS selection (spec §4–5, §7): which windows a row keeps, the attention bias of block prune_at + 1, and the
regrouping of a row's placeholders to its kept counts. Pure, jit-friendly functions over batch-major arrays.

Every array carries the batch axis B first and every function works inside each row: nothing mixes rows.
The frames of a row follow one static `FrameLayout` (stts_jax.geometry), the same for every row; which slots
hold a real video is data (`frame_mask [B, F]`, 1 = real frame). Everything that decides a shape is a Python
int derived from the layout and the config: the prune count K of every video, the kept windows per row.
The data decide only *which* windows are kept.

Terms: B rows, F frame slots per row, N = grid*grid patches per frame, W windows per frame (pool x pool
patches each; 81 at Molmo2 shapes), D the ViT width.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.geometry import FrameLayout, patch_window_index, protected_frames, video_prune_counts

DEFAULT_FLOOR = math.exp(-2.0)


def prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
    """Yields (start, T, K, protected) of video groups with K > 0."""
    counts = video_prune_counts(layout, windows_per_frame, ratio, prune_from_frame)
    for (kind, start, t), k in zip(layout.spans(), counts):
        if k > 0:
            yield start, t, k, protected_frames(t, prune_from_frame)


def select_windows(scores: jax.Array, layout: FrameLayout, *, ratio: float, prune_from_frame: int = 0) -> jax.Array:
    """Returns keep [B, F, W] bool: per row and prunable video, its K lowest-scoring windows (jointly ranked) dropped.

    scores [B, F, W]. Protected frames, images and K=0 videos keep everything. Ties drop the lower index
    within the video first (jax.lax.top_k keeps the lower index first among equal values). Videos of equal
    (T, K) are ranked in one batched top_k over [B, V, T*W].
    """
    b, f, w = scores.shape
    keep = jnp.ones((b, f, w), dtype=bool)
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for start, t, k, prot in prunable_groups(layout, w, ratio, prune_from_frame):
        by_shape.setdefault((t, k, prot), []).append(start)
    for (t, k, prot), starts in by_shape.items():
        v = len(starts)
        frames = (np.asarray(starts)[:, None] + np.arange(prot, t)[None]).reshape(-1)  # [V * (t - prot)]
        candidates = scores[:, frames].reshape(b, v, (t - prot) * w)  # [B, V, C]
        _, drop = jax.lax.top_k(-candidates.astype(jnp.float32), k)  # lowest scores; ties -> lower index
        dropped = jnp.zeros(candidates.shape, bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(v)[None, :, None], drop].set(True)
        keep = keep.at[:, frames].set(~dropped.reshape(b, -1, w))
    return keep


def windows_to_patches(window_values: jax.Array, grid: int, pool: int) -> jax.Array:
    """Returns [..., grid*grid] with every patch taking its window's value from [..., W]."""
    return jnp.take(window_values, jnp.asarray(patch_window_index(grid, pool)), axis=-1)


def _score_frames_mask(layout, windows_per_frame, ratio, prune_from_frame) -> np.ndarray:
    """Returns [F] bool: frames whose scores bias attention (non-protected frames of prunable videos)."""
    mask = np.zeros(layout.num_frames, bool)
    for start, t, _, prot in prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
        mask[start + prot: start + t] = True
    return mask


def rescale_scores(scores: jax.Array, layout: FrameLayout, *, grid: int, pool: int, ratio: float,
                   prune_from_frame: int = 0, scope: str = "frame", floor: float = DEFAULT_FLOOR) -> jax.Array:
    """Returns patch-level s~ [B, F, N] in [floor, 1]: min-max rescaled scores [B, F, W] (per frame or grid row).

    s~ = floor + (s - min)(1 - floor)/(max - min + 1e-6); 1 on protected frames, images and K=0 videos.
    """
    if scope not in ("frame", "row"):
        raise ValueError(f"rescale scope must be 'frame' or 'row', got {scope!r}")
    b, f, w = scores.shape
    s = windows_to_patches(scores.astype(jnp.float32), grid, pool)  # [B, F, N]
    grouped = s.reshape(b, f, grid, grid) if scope == "row" else s.reshape(b, f, 1, grid * grid)
    lo = grouped.min(-1, keepdims=True)
    hi = grouped.max(-1, keepdims=True)
    rescaled = (floor + (grouped - lo) * (1.0 - floor) / (hi - lo + 1e-6)).reshape(b, f, grid * grid)
    active = jnp.asarray(_score_frames_mask(layout, w, ratio, prune_from_frame))[None, :, None]
    return jnp.where(active, rescaled, 1.0)


def key_bias(rescaled: jax.Array) -> jax.Array:
    """Returns the additive attention bias log(s~) [B, F, N] for the keys of block prune_at + 1."""
    return jnp.log(rescaled)


def kept_window_rows(keep: jax.Array, num_kept: int) -> jax.Array:
    """Returns [B, num_kept] indices (frame * W + window, frame-major) of each row's kept windows, in order."""
    return jax.vmap(lambda k: jnp.nonzero(k.reshape(-1), size=num_kept, fill_value=0)[0])(keep)


def _relayout_row(ids: jax.Array, counts: jax.Array, placeholder_id: int, end_markers: jax.Array) -> jax.Array:
    length = ids.shape[0]
    is_placeholder = ids == placeholder_id
    markers = jnp.cumsum(jnp.isin(ids, end_markers))  # inclusive
    kept_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts.astype(jnp.int32))])
    others_before = jnp.cumsum(~is_placeholder) - (~is_placeholder)
    target = others_before + kept_before[jnp.clip(markers, 0, counts.shape[0])]
    target = jnp.where(is_placeholder, length, target)  # placeholders are dropped, then refilled
    return jnp.full((length,), placeholder_id, ids.dtype).at[target].set(ids, mode="drop")


def relayout_vision_tokens(input_ids: jax.Array, keep_counts: jax.Array, *, placeholder_id: int,
                           end_marker_ids: Sequence[int], frame_mask: jax.Array | None = None) -> jax.Array:
    """Returns input_ids [B, L] with each frame's placeholders regrouped to its real kept count.

    keep_counts [B, F]: kept windows per frame slot; frame_mask [B, F]: real frames (empty slots have no
    text). The host reserves exactly sum(k_f) placeholders per video (the static W*T - K) but cannot know how
    they split over frames. Every frame's placeholder block ends with an end marker (<frame_end>); within a
    row, a non-placeholder token that follows m end markers (the marker itself included) moves to
    (#non-placeholders before it) + (kept tokens of the row's real frames 0..m-1), and placeholders fill the
    remaining slots. Totals per video are unchanged, so nothing crosses an example boundary and positions /
    segment ids / targets outside the vision spans stay valid.
    """
    counts = keep_counts.astype(jnp.int32)
    if frame_mask is not None:  # real frames first, in order: the m-th marker belongs to the m-th real frame
        real = frame_mask.astype(bool)
        order = jnp.argsort(~real, axis=-1, stable=True)
        counts = jnp.take_along_axis(jnp.where(real, counts, 0), order, axis=-1)
    markers = jnp.asarray(end_marker_ids, input_ids.dtype)
    return jax.vmap(lambda ids, c: _relayout_row(ids, c, placeholder_id, markers))(input_ids, counts)
