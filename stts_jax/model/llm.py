"""Qwen3-style decoder of Molmo2: RMSNorm, RoPE (per-layer scaled/unscaled), GQA, qk-norm, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stts_jax.model.layers import DTYPES, Dense, RMSNorm, dot_product_attention, param, run_block
from stts_jax.model.partitioning import constrain


def rope_inv_freq(llm: ml_collections.ConfigDict, scaled: bool) -> np.ndarray:
    """Returns the RoPE inverse frequencies [head_dim/2] (theta^(-2i/d), divided by the factor if linear)."""
    d = llm.head_dim
    inv_freq = 1.0 / (llm.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    if scaled and llm.rope_type == "linear":
        inv_freq = inv_freq / llm.rope_factor
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Returns x [B, L, H, d] rotated (rotate-half layout) by angles positions [B, L] * inv_freq."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, L, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class DecoderLayer(nnx.Module):
    """One decoder layer (pre-norm by default; `norm_after` normalises sublayer outputs instead)."""

    def __init__(self, llm: ml_collections.ConfigDict, *, scaled_rope: bool, rngs: nnx.Rngs, dtype, param_dtype):
        h, hd = llm.hidden_size, llm.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(h, eps=llm.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.q = Dense(h, llm.num_heads * hd, names=("embed", "heads"), use_bias=False, **kw)
        self.k = Dense(h, llm.num_kv_heads * hd, names=("embed", "kv"), use_bias=False, **kw)
        self.v = Dense(h, llm.num_kv_heads * hd, names=("embed", "kv"), use_bias=False, **kw)
        self.o = Dense(llm.num_heads * hd, h, names=("heads", "embed"), use_bias=False, **kw)
        per_head = llm.qk_norm_type == "qwen3"
        self.q_norm = RMSNorm(hd if per_head else llm.num_heads * hd, eps=llm.rms_norm_eps, rngs=rngs,
                              names=(None,) if per_head else ("heads",), param_dtype=param_dtype)
        self.k_norm = RMSNorm(hd if per_head else llm.num_kv_heads * hd, eps=llm.rms_norm_eps, rngs=rngs,
                              names=(None,) if per_head else ("kv",), param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(h, eps=llm.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.gate = Dense(h, llm.mlp_dim, names=("embed", "mlp"), use_bias=False, **kw)
        self.up = Dense(h, llm.mlp_dim, names=("embed", "mlp"), use_bias=False, **kw)
        self.down = Dense(llm.mlp_dim, h, names=("mlp", "embed"), use_bias=False, **kw)
        self.inv_freq = tuple(rope_inv_freq(llm, scaled_rope).tolist())  # static, not a parameter
        self.num_heads, self.num_kv_heads, self.head_dim = llm.num_heads, llm.num_kv_heads, hd
        self.per_head_qk_norm, self.norm_after = per_head, llm.norm_after

    def _project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns q [B, L, H, d], k, v [B, L, Hkv, d]: projected, qk-normed, q and k rotated."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        if not self.per_head_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(*q.shape[:-1], self.num_heads, self.head_dim)
        k = k.reshape(*k.shape[:-1], self.num_kv_heads, self.head_dim)
        v = v.reshape(*v.shape[:-1], self.num_kv_heads, self.head_dim)
        if self.per_head_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        return q, k, v

    def _attention(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self._project_qkv(x, positions)
        out = dot_product_attention(q, k, v, mask=mask)
        return self.o(out.reshape(*out.shape[:-2], -1))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Returns the layer output for x [B, L, H], positions [B, L], mask [B, L, L]."""
        if self.norm_after:
            x = x + self.attn_norm(self._attention(x, positions, mask))
            return x + self.mlp_norm(self.down(jax.nn.silu(self.gate(x)) * self.up(x)))
        x = x + self._attention(self.attn_norm(x), positions, mask)
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))

    # ---- cached decoding (generation); the training path above is unchanged

    def _cached_attention(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: tuple,
                          index) -> tuple[jax.Array, tuple]:
        """Returns (attention output, (k, v) cache with x's keys/values written at slots index..index+Lq-1)."""
        q, k, v = self._project_qkv(x, positions)
        cache_k, cache_v = cache
        start = (0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
        keys = mask.shape[-1]  # static: attend over cache slots 0..keys-1
        out = dot_product_attention(q, cache_k[:, :keys].astype(q.dtype), cache_v[:, :keys].astype(q.dtype), mask=mask)
        return self.o(out.reshape(*out.shape[:-2], -1)), (cache_k, cache_v)

    def extend(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: tuple,
               index) -> tuple[jax.Array, tuple]:
        """Returns (layer output [B, Lq, H], updated (k, v) cache [B, S, Hkv, d] each).

        x [B, Lq, H] are new tokens written at cache slots index..index+Lq-1 (index may be traced);
        mask [B, Lq, Lk] says which of the cache slots 0..Lk-1 each new token attends to.
        """
        if self.norm_after:
            attn, cache = self._cached_attention(x, positions, mask, cache, index)
            x = x + self.attn_norm(attn)
            return x + self.mlp_norm(self.down(jax.nn.silu(self.gate(x)) * self.up(x))), cache
        attn, cache = self._cached_attention(self.attn_norm(x), positions, mask, cache, index)
        x = x + attn
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h)), cache


class LanguageModel(nnx.Module):
    """Token embedding (base + additional vocabulary), decoder layers, final norm, untied LM head."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        llm = cfg.llm
        dtype, param_dtype = DTYPES[dtype], DTYPES[param_dtype]
        scaled = set(llm.rope_scaling_layers) if len(llm.rope_scaling_layers) else set(range(llm.num_layers))
        self.embedding = param(rngs, nnx.initializers.normal(0.02),
                               (llm.vocab_size + llm.additional_vocab_size, llm.hidden_size),
                               ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([DecoderLayer(llm, scaled_rope=i in scaled, rngs=rngs, dtype=dtype,
                                             param_dtype=param_dtype) for i in range(llm.num_layers)])
        self.final_norm = RMSNorm(llm.hidden_size, eps=llm.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = Dense(llm.hidden_size, llm.vocab_size, names=("embed", "vocab"), use_bias=False,
                             rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.remat = bool(cfg.get("remat", False))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Returns token embeddings [B, L, H] for ids [B, L]."""
        return jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)

    def hidden(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Returns the final-normed hidden states [B, L, H] for input embeddings x [B, L, H] (`lm_head` -> logits)."""
        for layer in self.layers:
            x = constrain(run_block(layer, self.remat, x, positions, mask), ("batch", "tokens", "act"))
        return self.final_norm(x)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Returns logits [B, L, vocab_size] for input embeddings x [B, L, H]."""
        return self.lm_head(self.hidden(x, positions, mask))

    def init_cache(self, batch_size: int, length: int, dtype=None) -> tuple:
        """Returns an empty KV cache: per layer (k, v), each [batch, length, kv_heads, head_dim] zeros."""
        layer = self.layers[0]
        shape = (batch_size, length, layer.num_kv_heads, layer.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers)

    def extend(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: tuple,
               index) -> tuple[jax.Array, tuple]:
        """Returns (final-normed hidden states [B, Lq, H], updated cache) for new input embeddings x [B, Lq, H].

        The new tokens' keys/values go to cache slots index..index+Lq-1; mask [B, Lq, Lk] selects the slots
        0..Lk-1 each attends to. `lm_head` of the result gives the logits.
        """
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.extend(x, positions, mask, layer_cache, index)
            new_cache.append(layer_cache)
        return self.final_norm(x), tuple(new_cache)
