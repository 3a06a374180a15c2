"""The STTS pruning step at ViT block prune_at (spec §4–6): score the windows, keep the top ones per video, and
return the key bias for block prune_at + 1 and the auxiliary temporal loss. The model calls `decide` once."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from stts_jax.geometry import FrameLayout, window_patch_ids
from stts_jax.stts import selection, temporal


class Decision(NamedTuple):
    keep: jax.Array  # [B, F, W] bool: kept windows
    scores: jax.Array  # [B, F, W] the scores the selection ranked
    key_bias: jax.Array | None  # [B, F, N] additive log-score bias for block prune_at + 1 (scorer with bias), or None
    temporal_loss: jax.Array  # scalar auxiliary loss (0 unless the method is the scorer)


def decide(hidden: jax.Array, layout: FrameLayout, st: ml_collections.ConfigDict, *, grid: int, pool: int,
           scorer: Callable | None = None, rng: jax.Array | None = None,
           frame_mask: jax.Array | None = None) -> Decision:
    """Returns the pruning Decision for hidden [B, F, N, D] (block prune_at's outputs) under `st` (cfg.stts)."""
    b, f, _ = hidden.shape[:3]
    w = len(window_patch_ids(grid, pool))
    if st.method == "scorer":
        scores = scorer(hidden, layout, st.pairing)
    elif st.method == "evs":
        scores = temporal.evs_scores(hidden, layout, grid=grid, pool=pool)
    elif st.method == "random":
        if rng is None:
            raise ValueError("stts.method='random' needs an rng key")
        scores = jax.random.uniform(rng, (b, f, w))
    else:
        raise ValueError(f"unknown stts.method {st.method!r}")
    keep = selection.select_windows(scores, layout, ratio=st.prune_ratio, prune_from_frame=st.prune_from_frame)
    bias, loss = None, jnp.zeros((), jnp.float32)
    if st.method == "scorer":
        if st.score_bias:
            bias = selection.key_bias(selection.rescale_scores(
                scores, layout, grid=grid, pool=pool, ratio=st.prune_ratio, prune_from_frame=st.prune_from_frame,
                scope=st.rescale_scope, floor=st.bias_floor))
        loss = temporal.temporal_loss(
            scores, hidden, layout, grid=grid, pool=pool, ratio=st.prune_ratio, prune_from_frame=st.prune_from_frame,
            pairing=st.pairing, target_grad=st.aux_target_grad, frame_mask=frame_mask)
    return Decision(keep, scores, bias, loss)
