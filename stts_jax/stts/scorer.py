"""STTS's TemporalTokenScorer: window attention pooling -> (previous, current) pair -> 3-layer SiLU MLP -> sigmoid."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stts_jax.geometry import FrameLayout, grid_size, window_patch_ids
from stts_jax.model.layers import DTYPES, Dense
from stts_jax.model.vit import MultiHeadAttention
from stts_jax.stts.temporal import pair_with_previous, window_features


def _fan_in_truncated_normal(fan_in: int):
    return nnx.initializers.truncated_normal(stddev=math.sqrt(1.0 / fan_in))


class TemporalTokenScorer(nnx.Module):
    """Scores every pooling window of every frame: s[f, w] in (0, 1), high = keep (~33.8 M params at so400m)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        dtype, param_dtype = DTYPES[dtype], DTYPES[param_dtype]
        d, hidden = cfg.vit.hidden_size, cfg.vit.mlp_dim
        self.pooling = MultiHeadAttention(d, d, cfg.vit.num_heads, cfg.vit.head_dim, rngs=rngs, dtype=dtype,
                                          param_dtype=param_dtype)
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(2 * d, hidden, names=("embed", "mlp"), kernel_init=_fan_in_truncated_normal(2 * d), **kw)
        self.fc2 = Dense(hidden, hidden, names=("mlp", None), kernel_init=_fan_in_truncated_normal(hidden), **kw)
        self.fc3 = Dense(hidden, 1, names=("mlp", None), kernel_init=_fan_in_truncated_normal(hidden), **kw)
        self.grid = grid_size(cfg)
        self.pool = cfg.adapter.pool_size

    def __call__(self, hidden: jax.Array, layout: FrameLayout, pairing: str = "per-video") -> jax.Array:
        """Returns scores [B, F, W] for ViT hidden states [B, F, N, D] after block prune_at (rows independent)."""
        b, f = hidden.shape[:2]
        windows = window_features(hidden, self.grid, self.pool)  # [B, F, W, S, D], zeros in padding slots
        valid = jnp.asarray(window_patch_ids(self.grid, self.pool) >= 0)  # [W, S]
        count = valid.sum(-1).astype(windows.dtype)[:, None]  # [W, 1]
        query = windows.sum(-2) / count  # [B, F, W, D]: mean of the valid patches
        w, s, d = windows.shape[2:]
        mask = jnp.broadcast_to(valid[:, None, :], (b * f, w, 1, s)).reshape(b * f * w, 1, s)
        z = self.pooling(query.reshape(b * f * w, 1, d), windows.reshape(b * f * w, s, d), mask=mask)
        u = pair_with_previous(z.reshape(b, f, w, d), layout, pairing)  # [B, F, W, 2D]
        h = jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(u))))
        return jax.nn.sigmoid(self.fc3(h)[..., 0].astype(jnp.float32))
