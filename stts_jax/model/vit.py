"""SigLIP2-style ViT of Molmo2: linear patch embedding + learned positions, pre-LN blocks, tanh-GELU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stts_jax.model.layers import DTYPES, Dense, LayerNorm, dot_product_attention, param, run_block


class MultiHeadAttention(nnx.Module):
    """Full multi-head attention with biased q/k/v/o (the ViT's and the adapter's pooling attention)."""

    def __init__(self, in_features: int, out_features: int, num_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(in_features, num_heads * head_dim, names=("embed", "heads"), **kw)
        self.k = Dense(in_features, num_heads * head_dim, names=("embed", "heads"), **kw)
        self.v = Dense(in_features, num_heads * head_dim, names=("embed", "heads"), **kw)
        self.o = Dense(num_heads * head_dim, out_features, names=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = num_heads, head_dim

    def __call__(self, x_q: jax.Array, x_kv: jax.Array, *, mask: jax.Array | None = None,
                 key_bias: jax.Array | None = None) -> jax.Array:
        """Returns attention of queries x_q [B, Lq, C] over x_kv [B, Lk, C] -> [B, Lq, out]."""
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
        out = dot_product_attention(split(self.q(x_q)), split(self.k(x_kv)), split(self.v(x_kv)),
                                    mask=mask, key_bias=key_bias)
        return self.o(out.reshape(*out.shape[:-2], -1))


class VisionBlock(nnx.Module):
    """Pre-LN transformer block: x + o(attn(LN1 x)); x + fc2(gelu_tanh(fc1(LN2 x)))."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden_size
        self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attn = MultiHeadAttention(d, d, cfg.num_heads, cfg.head_dim, rngs=rngs, dtype=dtype,
                                       param_dtype=param_dtype)
        self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(d, cfg.mlp_dim, names=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.mlp_dim, d, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 key_bias: jax.Array | None = None) -> jax.Array:
        """Returns the block output for rows x [R, N, D]; mask [R, N, N] / key_bias [R, N] are optional."""
        h = self.norm1(x)
        x = x + self.attn(h, h, mask=mask, key_bias=key_bias)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True))


class VisionTransformer(nnx.Module):
    """The ViT; `__call__` returns the hidden state after every block (no CLS token, no final norm)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 remat: bool = False):
        dtype, param_dtype = DTYPES[dtype], DTYPES[param_dtype]
        self.remat = remat
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = Dense(patch_dim, cfg.hidden_size, names=(None, "embed"), use_bias=True,
                                     rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.position_embedding = param(rngs, nnx.initializers.normal(0.02), (num_patches, cfg.hidden_size),
                                        (None, "embed"), param_dtype)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.dtype = dtype

    def embed(self, patches: jax.Array) -> jax.Array:
        """Returns patch embeddings + positions [F, N, D] for flattened patches [F, N, 14*14*3]."""
        x = self.patch_embedding(patches)
        return x + self.position_embedding[...].astype(self.dtype)[None]

    def __call__(self, patches: jax.Array, num_blocks: int | None = None) -> list[jax.Array]:
        """Returns [block_0 output, ..., block_{n-1} output], each [F, N, D]; n = num_blocks or all."""
        x = self.embed(patches)
        hidden = []
        for block in self.blocks[: num_blocks or len(self.blocks)]:
            x = run_block(block, self.remat, x)
            hidden.append(x)
        return hidden
