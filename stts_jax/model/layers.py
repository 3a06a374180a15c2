"""Shared building blocks: parameters with logical axis names, Dense, LayerNorm, RMSNorm, attention.

Every parameter carries `out_sharding` metadata holding *logical* axis names (`embed`, `mlp`, `heads`,
`kv`, `vocab`, ...). `stts_jax.train.sharding` maps them onto the (data, fsdp, tensor) mesh through one
rules table; the modules themselves never mention mesh axes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """Returns a Param initialised by `init` with logical axis names attached (no eager sharding)."""
    assert len(names) == len(shape), (names, shape)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (torch stores [out, in])."""

    def __init__(self, in_features: int, out_features: int, *, names: tuple[str | None, str | None],
                 use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer | None = None):
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), names[1:], param_dtype)
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x @ kernel + bias in the compute dtype."""
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the normalised x, in x's dtype."""
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in Qwen3/Molmo2: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, names=("embed",), param_dtype=jnp.float32):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), names, param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns weight * x / rms(x)."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def run_block(block: nnx.Module, remat: bool, *args, **kwargs):
    """Returns block(*args, **kwargs); with `remat` its activations are recomputed in the backward pass."""
    if not remat:
        return block(*args, **kwargs)
    # plain jax.checkpoint over (state, inputs): works inside lax.cond / scan, unlike an NNX transform
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, a, k: nnx.merge(graphdef, st)(*a, **k))(state, args, kwargs)


QUERY_CHUNK = 1024  # queries attended at once when a sequence is longer (bounds the [H, chunk, Lk] logits)


def _attend(q, k, v, mask, key_bias):
    """Returns softmax(q k^T + bias, masked) v in the heads-major layout: q [B, Hkv, G, Lq, d] (already scaled),
    k/v [B, Hkv, Lk, d], mask [B, Lq, Lk] | None, key_bias [B, Lk] | None -> [B, Hkv, G, Lq, d]."""
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k).astype(jnp.float32)
    if key_bias is not None:
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, None, :]
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bksd->bkgqd", probs, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          key_bias: jax.Array | None = None, query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """Returns softmax(q k^T / sqrt(d) + key_bias, masked) v with grouped-query heads.

    q [B, Lq, H, d], k/v [B, Lk, Hkv, d] (H a multiple of Hkv), mask [B, Lq, Lk] bool (True = attend),
    key_bias [B, Lk] added to the logits of every query and head. A fully masked row gets a uniform
    average instead of NaN (its output is never read). Output [B, Lq, H, d]. Computed heads-major (q scaled
    first); a sequence longer than `query_chunk` is attended `query_chunk` queries at a time, each chunk
    rematerialised in the backward pass, so the logits held at once are [B, H, query_chunk, Lk], not
    [B, H, Lq, Lk] (the 6-11k-token LLM rows of 64-128 frames).
    """
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, lq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, d]
    if lq <= query_chunk:
        out = _attend(q, k, v, mask, key_bias)
    else:
        chunks = -(-lq // query_chunk)
        pad = chunks * query_chunk - lq
        qc = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
        qc = qc.reshape(b, hkv, h // hkv, chunks, query_chunk, d).transpose(3, 0, 1, 2, 4, 5)
        if mask is not None:
            mc = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, query_chunk, -1).transpose(1, 0, 2, 3)
        else:
            mc = jnp.zeros((chunks,), bool)  # placeholder scanned alongside (unused)
        attend = jax.checkpoint(lambda qm: _attend(qm[0], k, v, qm[1] if mask is not None else None, key_bias))
        out = jax.lax.map(attend, (qc, mc))  # [chunks, B, Hkv, G, chunk, d]
        out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, h // hkv, chunks * query_chunk, d)[:, :, :, :lq]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
