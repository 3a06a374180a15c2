"""STTS's temporal signal (spec §6): each window's change since the same window of the previous frame, the target
of the scorer's auxiliary loss and the EVS baseline's score. Pure functions over batch-major arrays (see
selection.py for the terms); memory is linear in frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.geometry import FrameLayout, window_patch_ids, window_sum_matrix
from stts_jax.stts.selection import prunable_groups

TEMPORAL_PAIR_CHUNK = 8  # frame pairs whose patch products are formed at once in the temporal loss


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
    for start, t, _, _ in prunable_groups(layout, windows_per_frame, ratio, prune_from_frame):
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
