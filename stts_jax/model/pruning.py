"""STTS pruning as pure, jit-friendly functions over batch-major arrays (spec: ../shared/STTS_SPEC.md §4–7).

Every array carries the batch axis B first and every function works inside each row: nothing mixes rows.
The frames of a row follow one static `FrameLayout` (stts_jax.geometry), the same for every row; which slots
hold a real video is data (`frame_mask [B, F]`, 1 = real frame). Everything that decides a shape is a Python
int derived from the layout and the config: the prune count K of every video, the kept windows per row,
the packed row budget. The data decide only *which* windows are kept.

Terms: B rows, F frame slots per row, N = grid*grid patches per frame, W windows per frame (pool x pool
patches each; 81 at Molmo2 shapes), D the ViT width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.geometry import (FrameLayout, kept_tokens, patch_window_index, placeholder_counts,  # noqa: F401
                               protected_frames, prune_count, video_prune_counts, window_patch_ids,
                               window_sum_matrix)

DEFAULT_FLOOR = math.exp(-2.0)
TEMPORAL_PAIR_CHUNK = 8  # frame pairs whose patch products are formed at once in the temporal loss


def _prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
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
    for start, t, k, prot in _prunable_groups(layout, w, ratio, prune_from_frame):
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
    for start, t, _, prot in _prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
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


def _previous_frame_index(layout: FrameLayout, pairing: str) -> np.ndarray:
    """Returns [F]: the index (in the row) of each frame's predecessor, or -1 where it is paired with zeros.

    `per-video`: the previous frame of the same video. `flat` (release compat): the previous frame slot of
    the row, crossing video boundaries (never rows: the first frame of a row pairs with zeros).
    """
    if pairing not in ("per-video", "flat"):
        raise ValueError(f"pairing must be 'per-video' or 'flat', got {pairing!r}")
    prev = np.arange(layout.num_frames) - 1
    if pairing == "per-video":
        for _, start, _ in layout.spans():
            prev[start] = -1
    return prev


def pair_with_previous(z: jax.Array, layout: FrameLayout, pairing: str = "per-video") -> jax.Array:
    """Returns u [B, F, W, 2D] = concat(z[previous frame] or zeros, z[f]) for z [B, F, W, D]."""
    prev = _previous_frame_index(layout, pairing)
    previous = jnp.where(jnp.asarray(prev >= 0)[None, :, None, None], z[:, np.maximum(prev, 0)], 0)
    return jnp.concatenate([previous, z], axis=-1)


def _loss_pairs(layout, windows_per_frame, ratio, prune_from_frame, pairing) -> np.ndarray:
    """Returns [P] row frame indices f of the (f-1, f) pairs the temporal loss averages over."""
    prunable = np.zeros(layout.num_frames, bool)
    first = np.zeros(layout.num_frames, bool)
    for start, t, _, _ in _prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
        prunable[start: start + t] = True
        first[start] = True
    frames = np.arange(layout.num_frames)
    if pairing == "per-video":
        return frames[prunable & ~first]
    _previous_frame_index(layout, pairing)  # validates the name
    return frames[prunable & (frames >= 1)]


def window_features(hidden: jax.Array, grid: int, pool: int) -> jax.Array:
    """Returns [..., W, pool*pool, D]: each window's patch features of hidden [..., N, D], zeros in padding slots."""
    ids = window_patch_ids(grid, pool)
    gathered = jnp.take(hidden, jnp.asarray(np.maximum(ids, 0)), axis=-2)  # [..., W, S, D]
    return jnp.where(jnp.asarray(ids >= 0)[:, :, None], gathered, 0)


def temporal_similarity(hidden: jax.Array, pairs: np.ndarray, grid: int, pool: int) -> jax.Array:
    """Returns c [B, P, W]: cosine similarity of each window's flattened patches between frames f-1 and f.

    hidden [B, F, N, D]. Never materialises window vectors or the (WF)^2 Gram matrix of the release:
    per-patch dot products and squared norms ([B, P, N]) are summed into windows, so memory beyond the
    inputs is O(B * P * N), linear in frames.
    """
    h = hidden.astype(jnp.float32)
    to_windows = jnp.asarray(window_sum_matrix(grid, pool))  # [N, W]
    # per-patch dot products of the listed pairs, a few pairs at a time: shifted slices of [B, F, N, D] would
    # be copied whole by XLA (2x the hidden states), the chunked map needs only `chunk` frames at once
    chunk = min(TEMPORAL_PAIR_CHUNK, len(pairs))
    pair_dot = jax.lax.map(lambda f: (h[:, f - 1] * h[:, f]).sum(-1), jnp.asarray(pairs), batch_size=chunk)  # [P, B, N]
    dot = jnp.einsum("pbn,nw->bpw", pair_dot, to_windows)  # [B, P, W]
    sq = jnp.square(h).sum(-1) @ to_windows  # [B, F, W]
    # the guard inside the sqrt: max(sqrt(sq), eps) has an infinite sqrt' at sq = 0, and 0 * inf is NaN, which the
    # window-sum matmul's transpose spreads over the whole frame; here a zero window gets a finite gradient
    norm = jnp.sqrt(jnp.maximum(sq, 1e-16))
    return dot / (norm[:, pairs - 1] * norm[:, pairs])


def evs_scores(hidden: jax.Array, layout: FrameLayout, *, grid: int, pool: int) -> jax.Array:
    """Returns EVS scores [B, F, W] = 1 - cos(window, the same window of the previous frame of its video).

    The training-free baseline (vLLM's Efficient Video Sampling): windows that changed most since the previous
    frame rank highest (kept). hidden [B, F, N, D] are the pruning block's outputs, the states the scorer reads;
    windows compare as the temporal target does (`temporal_similarity`). First frames of videos have no
    predecessor and score 1; selection never ranks them anyway (protected, as for every method).
    """
    prev = _previous_frame_index(layout, "per-video")
    pairs = np.flatnonzero(prev >= 0)
    b, f = hidden.shape[:2]
    scores = jnp.ones((b, f, len(window_patch_ids(grid, pool))), jnp.float32)
    if pairs.size == 0:
        return scores
    change = 1.0 - temporal_similarity(jax.lax.stop_gradient(hidden), pairs, grid, pool)  # [B, P, W]
    return scores.at[:, pairs].set(change)


def temporal_loss(scores: jax.Array, hidden: jax.Array, layout: FrameLayout, *, grid: int, pool: int,
                  ratio: float, prune_from_frame: int = 0, pairing: str = "per-video",
                  target_grad: str = "stop", frame_mask: jax.Array | None = None) -> jax.Array:
    """Returns L_temp = mean over real pairs and windows of (s[b, f, w] - (1 - c[b, f, w]))^2 (0 when nothing pairs).

    scores [B, F, W], hidden [B, F, N, D]; a pair counts when both its frames are real (frame_mask [B, F]).
    """
    if target_grad not in ("stop", "pass"):
        raise ValueError(f"aux target_grad must be 'stop' or 'pass', got {target_grad!r}")
    pairs = _loss_pairs(layout, scores.shape[-1], ratio, prune_from_frame, pairing)
    if pairs.size == 0:
        return jnp.zeros((), jnp.float32)
    if target_grad == "stop":
        hidden = jax.lax.stop_gradient(hidden)
    target = 1.0 - temporal_similarity(hidden, pairs, grid, pool)  # [B, P, W]
    err = jnp.square(scores[:, pairs].astype(jnp.float32) - target)
    if frame_mask is None:
        return jnp.mean(err)
    weight = (frame_mask[:, pairs] * frame_mask[:, pairs - 1]).astype(jnp.float32)  # [B, P]
    total = (err.sum(-1) * weight).sum()
    return total / jnp.maximum(weight.sum() * err.shape[-1], 1.0)


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


# ------------------------------------------------------------------------------------------- packing
#
# `packed` execution (spec §7) with static shapes, inside each batch row (so on the device holding it).
# After block prune_at+1 every frame keeps k_f windows (9 patch slots each). A batch row's frames are packed
# whole, first-fit-decreasing, into a static number of packed rows R of
# W windows (W*9 slots) each; attention inside a row is block-diagonal by frame, so every kept token sees
# exactly the kept tokens of its own frame, as in `masked` execution, on ~R/F of the rows:
#
#     frames (kept windows)          rows (W = 81 windows each, R static)
#     f0 |#########81#########|      r0 |f0 ################# 81 |
#     f1 |####40####|                r1 |f3 ####50#####|f2 ##31##|
#     f2 |###31###|          FFD     r2 |f1 ####40####|f4 ##38##|.|
#     f3 |#####50#####|     ----->   ...
#     f4 |###38###|                  (unfilled slots masked; rows never split a frame)
#
# R = ceil((1 + pack_slack) * kept windows of a batch row / W), a Python int. When some batch row's keep
# pattern does not fit into R rows (possible: e.g. most frames keeping 41 of 81 windows), the whole batch
# takes the exact `masked` branch of a lax.cond instead, so no keep pattern ever loses a token.


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where every kept window goes: arrays describing, per batch row, R packed rows of W windows (shapes static)."""

    source_window: jax.Array  # [B, R, W] window index in its batch row (frame*W + w) filling each slot, -1 = empty
    overflow: jax.Array  # [B] bool: the row's pattern did not fit into R packed rows (take the masked branch)


jax.tree_util.register_dataclass(PackPlan, data_fields=["source_window", "overflow"], meta_fields=[])


def pack_rows(num_kept_windows: int, windows_per_frame: int, slack: float) -> int:
    """Returns the static packed-row budget R = ceil((1 + slack) * kept windows / W) of one batch row, at least 1."""
    return max(1, math.ceil((1.0 + slack) * num_kept_windows / windows_per_frame))


def _plan_row(keep: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    f, w = keep.shape
    counts = keep.sum(-1).astype(jnp.int32)  # [F]
    order = jnp.argsort(-counts, stable=True)  # largest frames first

    def place(fill, frame):
        k = counts[frame]
        fits = fill + k <= w
        row = jnp.argmax(fits)  # first row with room
        ok = fits[row] | (k == 0)
        offset = fill[row]
        fill = fill.at[row].add(jnp.where(ok, k, 0))
        return fill, (jnp.where(ok, row, -1), offset, ~ok)

    _, (row_sorted, offset_sorted, failed) = jax.lax.scan(place, jnp.zeros((num_rows,), jnp.int32), order)
    row = jnp.zeros((f,), jnp.int32).at[order].set(row_sorted)
    offset = jnp.zeros((f,), jnp.int32).at[order].set(offset_sorted)
    rank = jnp.cumsum(keep, axis=1) - 1  # [F, W] rank of each kept window within its frame
    slot = row[:, None] * w + offset[:, None] + rank  # [F, W]
    slot = jnp.where(keep & (row[:, None] >= 0), slot, num_rows * w)  # dropped -> out of range
    flat_index = jnp.arange(f * w, dtype=jnp.int32).reshape(f, w)
    source = jnp.full((num_rows * w,), -1, jnp.int32).at[slot.reshape(-1)].set(flat_index.reshape(-1), mode="drop")
    return source.reshape(num_rows, w), failed.any()


def plan_packing(keep: jax.Array, num_rows: int) -> PackPlan:
    """Returns, per batch row, the first-fit-decreasing placement of whole frames (k_f kept windows each) of
    keep [B, F, W] into `num_rows` packed rows of W windows."""
    source, overflow = jax.vmap(lambda k: _plan_row(k, num_rows))(keep)
    return PackPlan(source, overflow)


def _slot_patches(plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (frame [B, R, W*S], patch [B, R, W*S], valid [B, R, W*S]) of every packed token slot."""
    b, r, w = plan.source_window.shape
    ids = jnp.asarray(window_patch_ids(grid, pool))  # [W, S]
    src = plan.source_window
    frame = jnp.where(src >= 0, src // w, -1)
    patch = ids[jnp.maximum(src, 0) % w]  # [B, R, W, S]
    valid = (src >= 0)[..., None] & (patch >= 0)
    frame = jnp.broadcast_to(frame[..., None], patch.shape)
    return frame.reshape(b, r, -1), jnp.maximum(patch, 0).reshape(b, r, -1), valid.reshape(b, r, -1)


def pack_tokens(x: jax.Array, plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array]:
    """Returns (packed tokens [B, R, W*S, D], attention mask [B, R, W*S, W*S]: same frame, valid keys) of x [B, F, N, D]."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    rows = jnp.arange(x.shape[0])[:, None, None]
    packed = x[rows, jnp.maximum(frame, 0), patch] * valid[..., None].astype(x.dtype)
    segment = jnp.where(valid, frame, -1)
    mask = (segment[..., :, None] == segment[..., None, :]) & valid[..., None, :]
    return packed, mask


def unpack_tokens(packed: jax.Array, plan: PackPlan, num_frames: int, grid: int, pool: int) -> jax.Array:
    """Returns [B, F, N, D]: packed tokens [B, R, W*S, D] scattered back to their frame/patch, zeros at pruned positions."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    b = packed.shape[0]
    out = jnp.zeros((b, num_frames, grid * grid, packed.shape[-1]), packed.dtype)
    frame = jnp.where(valid, frame, num_frames)  # invalid slots -> dropped
    rows = jnp.arange(b)[:, None, None]
    return out.at[rows, frame, patch].set(packed, mode="drop")
