"""Molmo2's adapter: concat of ViT layers -> masked mean-query attention pooling -> SwiGLU projector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stts_jax.model.layers import DTYPES, Dense
from stts_jax.model.vit import MultiHeadAttention


def window_patch_ids(grid: int, pool: int) -> np.ndarray:
    """Returns [W, pool*pool] patch ids of one frame's pooling windows (-1 = padding slot).

    The grid of patch ids is padded with -1 up to a multiple of `pool` (floor(pad/2) rows/cols before,
    the rest after), cut into pool x pool windows row-major, row-major inside each window (Molmo2's layout).
    """
    ids = np.arange(grid * grid, dtype=np.int64).reshape(grid, grid)
    pad = (-grid) % pool
    before, after = pad // 2, pad - pad // 2
    ids = np.pad(ids, ((before, after), (before, after)), constant_values=-1)
    side = ids.shape[0] // pool
    windows = ids.reshape(side, pool, side, pool).transpose(0, 2, 1, 3)
    return windows.reshape(side * side, pool * pool)


def video_pooling_indices(num_frames: int, grid: int, pool: int) -> np.ndarray:
    """Returns [num_frames * W, pool*pool] flat indices into the [num_frames * grid*grid] patch list."""
    per_frame = window_patch_ids(grid, pool)
    offsets = (np.arange(num_frames, dtype=np.int64) * grid * grid)[:, None, None]
    flat = np.where(per_frame[None] >= 0, per_frame[None] + offsets, -1)
    return flat.reshape(-1, pool * pool)


class Adapter(nnx.Module):
    """Pools windows of ViT features into LLM tokens: attention pooling + SwiGLU projection."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        dtype, param_dtype = DTYPES[dtype], DTYPES[param_dtype]
        vit_dim, text_dim = cfg.vit.hidden_size, cfg.llm.hidden_size
        feat_dim = vit_dim * len(cfg.adapter.feature_layers)
        ad = cfg.adapter
        self.pooling = MultiHeadAttention(feat_dim, vit_dim, ad.num_heads, ad.head_dim, rngs=rngs,
                                          dtype=dtype, param_dtype=param_dtype)
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = Dense(vit_dim, ad.mlp_dim, names=("embed", "mlp"), **kw)
        self.up = Dense(vit_dim, ad.mlp_dim, names=("embed", "mlp"), **kw)
        self.down = Dense(ad.mlp_dim, text_dim, names=("mlp", "embed"), **kw)

    def __call__(self, features: jax.Array, pooling_idx: jax.Array) -> jax.Array:
        """Returns pooled LLM tokens [P, text_dim].

        features [F*N, C]: concatenated ViT layers of every patch; pooling_idx [P, S]: flat patch indices
        of each window, -1 = padding slot (excluded from the mean and masked as a key).
        """
        valid = pooling_idx >= 0  # [P, S]
        window = features[jnp.maximum(pooling_idx, 0)] * valid[..., None].astype(features.dtype)  # [P, S, C]
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(features.dtype)  # [P, 1]
        query = window.sum(-2, keepdims=True) / count[..., None]  # [P, 1, C]
        pooled = self.pooling(query, window, mask=valid[:, None, :])[:, 0]  # [P, vit_dim]
        return self.down(jax.nn.silu(self.gate(pooled)) * self.up(pooled))
