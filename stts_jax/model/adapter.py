"""Molmo2's adapter: concat of ViT layers -> masked mean-query attention pooling -> SwiGLU projector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stts_jax.model.layers import DTYPES, Dense
from stts_jax.model.vit import MultiHeadAttention


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
        """Returns pooled LLM tokens [B, T, text_dim].

        features [B, F*N, C]: concatenated ViT layers of every patch of each row; pooling_idx [B, T, S] (or
        [T, S], the same for every row): indices into the row's F*N patches of each window, -1 = padding slot
        (excluded from the mean and masked as a key). Pooling stays inside each row.
        """
        b, t, s = features.shape[0], *pooling_idx.shape[-2:]
        pooling_idx = jnp.broadcast_to(pooling_idx, (b, t, s))
        valid = pooling_idx >= 0  # [B, T, S]
        window = jax.vmap(lambda f, i: f[i])(features, jnp.maximum(pooling_idx, 0))  # [B, T, S, C]
        window = (window * valid[..., None].astype(features.dtype)).reshape(b * t, s, -1)
        valid = valid.reshape(b * t, s)
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(features.dtype)  # [B*T, 1]
        query = window.sum(-2, keepdims=True) / count[..., None]  # [B*T, 1, C]
        pooled = self.pooling(query, window, mask=valid[:, None, :])[:, 0]  # [B*T, vit_dim]
        return self.down(jax.nn.silu(self.gate(pooled)) * self.up(pooled)).reshape(b, t, -1)
