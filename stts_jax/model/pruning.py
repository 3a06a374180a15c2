"""STTS pruning as pure, jit-friendly functions over arrays (spec: ../shared/STTS_SPEC.md §4–7).

Everything that decides a shape is a Python int derived from the static `FrameLayout` and the config:
the prune count K of every video, the number of kept windows, the length of the LLM sequence. The data
decide only *which* windows are kept.

Terms: F frames in the flat frame list of a batch, N = grid*grid patches per frame, W windows per frame
(pool x pool patches each; 81 at Molmo2 shapes), D the ViT width.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.model.adapter import window_patch_ids

DEFAULT_FLOOR = math.exp(-2.0)
TEMPORAL_PAIR_CHUNK = 8  # frame pairs whose patch products are formed at once in the temporal loss


@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """Static structure of the flat frame list: ("video", T) / ("image", 1) groups in order. Hashable."""

    groups: tuple[tuple[str, int], ...]

    def __post_init__(self):
        for kind, count in self.groups:
            if kind not in ("video", "image") or not isinstance(count, int) or count < 1:
                raise ValueError(f"FrameLayout group {(kind, count)!r}: need ('video', T>=1) or ('image', n>=1)")

    @staticmethod
    def videos(*frames_per_video: int) -> "FrameLayout":
        """Returns a layout of videos only."""
        return FrameLayout(tuple(("video", int(t)) for t in frames_per_video))

    @property
    def num_frames(self) -> int:
        """Returns F, the total number of frames."""
        return sum(count for _, count in self.groups)

    def spans(self) -> list[tuple[str, int, int]]:
        """Returns [(kind, first flat frame, num frames)] per group."""
        out, start = [], 0
        for kind, count in self.groups:
            out.append((kind, start, count))
            start += count
        return out


def protected_frames(num_frames: int, prune_from_frame: int) -> int:
    """Returns how many leading frames of a video are never pruned (the first always, more with prune_from_frame)."""
    return min(num_frames, max(1, prune_from_frame))


def prune_count(num_frames: int, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> int:
    """Returns K = floor(W * ratio * (T - prune_from_frame)) exactly, capped so protected frames stay whole."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {ratio}")
    exact = Fraction(windows_per_frame) * Fraction(str(ratio)) * (num_frames - prune_from_frame)
    k = max(0, math.floor(exact))
    return min(k, windows_per_frame * (num_frames - protected_frames(num_frames, prune_from_frame)))


def video_prune_counts(layout: FrameLayout, windows_per_frame: int, ratio: float,
                       prune_from_frame: int = 0) -> list[int]:
    """Returns K per group (0 for images)."""
    return [prune_count(count, windows_per_frame, ratio, prune_from_frame) if kind == "video" else 0
            for kind, count in layout.groups]


def kept_tokens(layout: FrameLayout, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> int:
    """Returns the static number of LLM vision tokens of the batch: sum over groups of W*T - K."""
    counts = video_prune_counts(layout, windows_per_frame, ratio, prune_from_frame)
    return sum(windows_per_frame * n for _, n in layout.groups) - sum(counts)


def placeholder_counts(num_frames: int, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> list[int]:
    """Returns host-side placeholders per frame summing to W*T - K (protected frames whole, the rest even).

    Only the total matters: the model regroups placeholders to the real per-frame keep counts.
    """
    k = prune_count(num_frames, windows_per_frame, ratio, prune_from_frame)
    prot = protected_frames(num_frames, prune_from_frame)
    rest = num_frames - prot
    share, extra = divmod(windows_per_frame * rest - k, rest) if rest else (0, 0)
    return [windows_per_frame] * prot + [share + (1 if i < extra else 0) for i in range(rest)]


def _prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
    """Yields (start, T, K, protected) of video groups with K > 0."""
    counts = video_prune_counts(layout, windows_per_frame, ratio, prune_from_frame)
    for (kind, start, t), k in zip(layout.spans(), counts):
        if k > 0:
            yield start, t, k, protected_frames(t, prune_from_frame)


def select_windows(scores: jax.Array, layout: FrameLayout, *, ratio: float, prune_from_frame: int = 0) -> jax.Array:
    """Returns keep [F, W] bool: per prunable video, its K lowest-scoring windows (jointly ranked) are dropped.

    Protected frames, images and K=0 videos keep everything. Ties drop the lower flat index first
    (jax.lax.top_k keeps the lower index first among equal values). Videos of equal (T, K) are ranked in one
    batched top_k.
    """
    f, w = scores.shape
    keep = jnp.ones((f, w), dtype=bool)
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for start, t, k, prot in _prunable_groups(layout, w, ratio, prune_from_frame):
        by_shape.setdefault((t, k, prot), []).append(start)
    for (t, k, prot), starts in by_shape.items():
        frames = (np.asarray(starts)[:, None] + np.arange(prot, t)[None]).reshape(-1)  # [V * (t - prot)]
        candidates = scores[frames].reshape(len(starts), (t - prot) * w)  # [V, C]
        _, drop = jax.lax.top_k(-candidates.astype(jnp.float32), k)  # lowest scores; ties -> lower index
        dropped = jnp.zeros(candidates.shape, bool).at[jnp.arange(len(starts))[:, None], drop].set(True)
        keep = keep.at[frames].set(~dropped.reshape(-1, w))
    return keep


def patch_window_index(grid: int, pool: int) -> np.ndarray:
    """Returns [grid*grid]: the window each patch belongs to."""
    ids = window_patch_ids(grid, pool)
    index = np.zeros(grid * grid, np.int64)
    for window, row in enumerate(ids):
        index[row[row >= 0]] = window
    return index


def windows_to_patches(window_values: jax.Array, grid: int, pool: int) -> jax.Array:
    """Returns [F, grid*grid] (…) with every patch taking its window's value from [F, W] (…)."""
    return jnp.take(window_values, jnp.asarray(patch_window_index(grid, pool)), axis=1)


def _score_frames_mask(layout, windows_per_frame, ratio, prune_from_frame) -> np.ndarray:
    """Returns [F] bool: frames whose scores bias attention (non-protected frames of prunable videos)."""
    mask = np.zeros(layout.num_frames, bool)
    for start, t, _, prot in _prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
        mask[start + prot: start + t] = True
    return mask


def rescale_scores(scores: jax.Array, layout: FrameLayout, *, grid: int, pool: int, ratio: float,
                   prune_from_frame: int = 0, scope: str = "frame", floor: float = DEFAULT_FLOOR) -> jax.Array:
    """Returns patch-level s~ [F, N] in [floor, 1]: min-max rescaled scores (per frame or per grid row).

    s~ = floor + (s - min)(1 - floor)/(max - min + 1e-6); 1 on protected frames, images and K=0 videos.
    """
    if scope not in ("frame", "row"):
        raise ValueError(f"rescale scope must be 'frame' or 'row', got {scope!r}")
    f, w = scores.shape
    s = windows_to_patches(scores.astype(jnp.float32), grid, pool)  # [F, N]
    grouped = s.reshape(f, grid, grid) if scope == "row" else s.reshape(f, 1, grid * grid)
    lo = grouped.min(-1, keepdims=True)
    hi = grouped.max(-1, keepdims=True)
    rescaled = (floor + (grouped - lo) * (1.0 - floor) / (hi - lo + 1e-6)).reshape(f, grid * grid)
    active = jnp.asarray(_score_frames_mask(layout, w, ratio, prune_from_frame))[:, None]
    return jnp.where(active, rescaled, 1.0)


def key_bias(rescaled: jax.Array) -> jax.Array:
    """Returns the additive attention bias log(s~) [F, N] for the keys of block prune_at + 1."""
    return jnp.log(rescaled)


def _previous_frame_index(layout: FrameLayout, pairing: str) -> np.ndarray:
    """Returns [F]: the flat index of each frame's predecessor, or -1 where it is paired with zeros."""
    if pairing not in ("per-video", "flat"):
        raise ValueError(f"pairing must be 'per-video' or 'flat', got {pairing!r}")
    prev = np.arange(layout.num_frames) - 1
    if pairing == "per-video":
        for _, start, _ in layout.spans():
            prev[start] = -1
    return prev


def pair_with_previous(z: jax.Array, layout: FrameLayout, pairing: str = "per-video") -> jax.Array:
    """Returns u [F, W, 2D] = concat(z[previous frame] or zeros, z[f])."""
    prev = _previous_frame_index(layout, pairing)
    previous = jnp.where(jnp.asarray(prev >= 0)[:, None, None], z[np.maximum(prev, 0)], 0)
    return jnp.concatenate([previous, z], axis=-1)


def _loss_pairs(layout, windows_per_frame, ratio, prune_from_frame, pairing) -> np.ndarray:
    """Returns [P] flat indices f of the (f-1, f) pairs the temporal loss averages over."""
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
    """Returns [F, W, pool*pool, D]: each window's patch features, zeros in padding slots."""
    ids = window_patch_ids(grid, pool)
    gathered = hidden[:, np.maximum(ids, 0)]  # [F, W, S, D]
    return jnp.where(jnp.asarray(ids >= 0)[None, :, :, None], gathered, 0)


def _window_sum_matrix(grid: int, pool: int) -> np.ndarray:
    """Returns [N, W] 0/1: patch n belongs to window w (padding slots belong to nothing)."""
    index = patch_window_index(grid, pool)
    out = np.zeros((grid * grid, window_patch_ids(grid, pool).shape[0]), np.float32)
    out[np.arange(grid * grid), index] = 1.0
    return out


def temporal_similarity(hidden: jax.Array, pairs: np.ndarray, grid: int, pool: int) -> jax.Array:
    """Returns c [P, W]: cosine similarity of each window's flattened patches between frames f-1 and f.

    Never materialises window vectors or the (WF)^2 Gram matrix of the release: per-patch dot products and
    squared norms ([P, N]) are summed into windows, so memory beyond the inputs is O(P * N), linear in frames.
    """
    h = hidden.astype(jnp.float32)
    to_windows = jnp.asarray(_window_sum_matrix(grid, pool))  # [N, W]
    # per-patch dot products of the listed pairs, a few pairs at a time: shifted slices of [F, N, D] would
    # be copied whole by XLA (2x the hidden states), the chunked map needs only `chunk` frames at once
    chunk = min(TEMPORAL_PAIR_CHUNK, len(pairs))
    pair_dot = jax.lax.map(lambda f: (h[f - 1] * h[f]).sum(-1), jnp.asarray(pairs), batch_size=chunk)  # [P, N]
    dot = pair_dot @ to_windows  # [P, W]
    sq = jnp.square(h).sum(-1) @ to_windows  # [F, W]
    return dot / (jnp.maximum(jnp.sqrt(sq[pairs - 1]), 1e-8) * jnp.maximum(jnp.sqrt(sq[pairs]), 1e-8))


def temporal_loss(scores: jax.Array, hidden: jax.Array, layout: FrameLayout, *, grid: int, pool: int,
                  ratio: float, prune_from_frame: int = 0, pairing: str = "per-video",
                  target_grad: str = "stop") -> jax.Array:
    """Returns L_temp = mean over pairs and windows of (s[f, w] - (1 - c[f, w]))^2 (0 when nothing pairs)."""
    if target_grad not in ("stop", "pass"):
        raise ValueError(f"aux target_grad must be 'stop' or 'pass', got {target_grad!r}")
    pairs = _loss_pairs(layout, scores.shape[1], ratio, prune_from_frame, pairing)
    if pairs.size == 0:
        return jnp.zeros((), jnp.float32)
    if target_grad == "stop":
        hidden = jax.lax.stop_gradient(hidden)
    target = 1.0 - temporal_similarity(hidden, pairs, grid, pool)
    return jnp.mean(jnp.square(scores[pairs].astype(jnp.float32) - target))


def kept_window_rows(keep: jax.Array, num_kept: int) -> jax.Array:
    """Returns [num_kept] flat indices (frame-major) of kept windows, in order; num_kept is static."""
    return jnp.nonzero(keep.reshape(-1), size=num_kept, fill_value=0)[0]


def relayout_vision_tokens(input_ids: jax.Array, keep_counts: jax.Array, *, placeholder_id: int,
                           end_marker_ids: Sequence[int]) -> jax.Array:
    """Returns input_ids [B, L] with each frame's placeholders regrouped to its real kept count.

    The host reserves exactly sum(k_f) placeholders per video (the static W*T - K) but cannot know how they
    split over frames. Every frame's placeholder block ends with an end marker (<frame_end>); a
    non-placeholder token that follows m end markers (counted over the flattened batch, the marker itself
    included) moves to (#non-placeholders before it) + (kept tokens of frames 0..m-1), and placeholders fill
    the remaining slots. Totals per video are unchanged, so nothing crosses an example boundary and
    positions / segment ids / targets outside the vision spans stay valid.
    """
    b, length = input_ids.shape
    flat = input_ids.reshape(-1)
    is_placeholder = flat == placeholder_id
    markers = jnp.cumsum(jnp.isin(flat, jnp.asarray(end_marker_ids, flat.dtype)))  # inclusive
    kept_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(keep_counts.astype(jnp.int32))])
    others_before = jnp.cumsum(~is_placeholder) - (~is_placeholder)
    target = others_before + kept_before[jnp.clip(markers, 0, keep_counts.shape[0])]
    target = jnp.where(is_placeholder, b * length, target)  # placeholders are dropped, then refilled
    out = jnp.full((b * length,), placeholder_id, flat.dtype).at[target].set(flat, mode="drop")
    return out.reshape(b, length)


# ------------------------------------------------------------------------------------------- packing
#
# `packed` execution (spec §7) with static shapes. After block prune_at+1 every frame keeps k_f windows
# (9 patch slots each). Frames are packed whole, first-fit-decreasing, into a static number of rows R of
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
# R = ceil((1 + pack_slack) * kept windows / W), a Python int. A keep pattern that first-fit-decreasing
# cannot fit into R rows (possible: e.g. most frames keeping 41 of 81 windows) takes the exact `masked`
# branch of a lax.cond instead, so no keep pattern ever loses a token.


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where every kept window goes: arrays describing R rows of W windows (all shapes static)."""

    source_window: jax.Array  # [R, W] flat window index (frame*W + w) filling each packed slot, -1 = empty
    overflow: jax.Array  # [] bool: the pattern did not fit into R rows (take the masked branch)


jax.tree_util.register_dataclass(PackPlan, data_fields=["source_window", "overflow"], meta_fields=[])


def pack_rows(num_kept_windows: int, windows_per_frame: int, slack: float) -> int:
    """Returns the static row budget R = ceil((1 + slack) * kept windows / W), at least 1."""
    return max(1, math.ceil((1.0 + slack) * num_kept_windows / windows_per_frame))


def plan_packing(keep: jax.Array, num_rows: int) -> PackPlan:
    """Returns the first-fit-decreasing placement of whole frames (k_f kept windows each) into rows of W windows."""
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
    return PackPlan(source.reshape(num_rows, w), failed.any())


def _slot_patches(plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (frame [R, W*S], patch [R, W*S], valid [R, W*S]) of every packed token slot."""
    w = plan.source_window.shape[1]
    ids = jnp.asarray(window_patch_ids(grid, pool))  # [W, S]
    src = plan.source_window
    frame = jnp.where(src >= 0, src // w, -1)
    patch = ids[jnp.maximum(src, 0) % w]  # [R, W, S]
    valid = (src >= 0)[..., None] & (patch >= 0)
    frame = jnp.broadcast_to(frame[..., None], patch.shape)
    r = src.shape[0]
    return frame.reshape(r, -1), jnp.maximum(patch, 0).reshape(r, -1), valid.reshape(r, -1)


def pack_tokens(x: jax.Array, plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array]:
    """Returns (packed tokens [R, W*S, D], attention mask [R, W*S, W*S]: same frame, valid keys)."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    packed = x[jnp.maximum(frame, 0), patch] * valid[..., None].astype(x.dtype)
    segment = jnp.where(valid, frame, -1)
    mask = (segment[:, :, None] == segment[:, None, :]) & valid[:, None, :]
    return packed, mask


def unpack_tokens(packed: jax.Array, plan: PackPlan, num_frames: int, grid: int, pool: int) -> jax.Array:
    """Returns [F, N, D]: packed tokens scattered back to their frame/patch, zeros at pruned positions."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    out = jnp.zeros((num_frames, grid * grid, packed.shape[-1]), packed.dtype)
    frame = jnp.where(valid, frame, num_frames)  # invalid slots -> dropped
    return out.at[frame, patch].set(packed, mode="drop")
