"""Shared building blocks: parameters with logical axis names, Dense, LayerNorm, RMSNorm, attention.

Every parameter carries `out_sharding` metadata holding *logical* axis names (`embed`, `mlp`, `heads`,
`kv`, `vocab`, ...). `stts_jax.train.sharding` maps them onto the (data, fsdp, tensor) mesh through one
rules table; the modules themselves never mention mesh axes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stts_jax.model.partitioning import batch_shards

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


# Attention is computed in tiles so the logits held at once stay bounded (and, on CPU, in cache: whole
# [rows, H, L, L] logits are 3-4x slower there than tiles: a 16-frame ViT attention of bench_cpu, 345 ms whole,
# 77-86 ms one frame at a time, torch's SDPA 60 ms, on a 2-core EPYC). Rows: each device attends its own rows of the batch a few at a time (never mixing shards), as many
# per step as fit TILE_BYTES of float32 logits (one row per step on CPU). Queries: a sequence longer than
# LONG_SEQUENCE is attended QUERY_CHUNK queries at a time. Both are per backend (the one traced for).
TILE_BYTES = {"cpu": 0}
DEFAULT_TILE_BYTES = 2 ** 30
QUERY_CHUNK = {"cpu": 128}
DEFAULT_QUERY_CHUNK = LONG_SEQUENCE = 1024
_ONE_TILE = [False]


def default_query_chunk() -> int:
    """Returns the query chunk for the backend being traced for (QUERY_CHUNK, else DEFAULT_QUERY_CHUNK)."""
    return QUERY_CHUNK.get(jax.default_backend(), DEFAULT_QUERY_CHUNK)


@contextlib.contextmanager
def one_tile():
    """Within: attention is traced as one tile (no loop), rematerialised in the backward pass where the real
    program tiles it, so the FLOPs are the real program's.

    For FLOP counts only: XLA's cost analysis counts a while loop's body once, so a program traced normally
    under-reports attention by its number of tiles. Trace (lower) a *fresh* jitted function inside this
    context (a function already traced outside it would be served from jax's trace cache), and run the
    normal one outside it. `stts_jax.estimate.counted_flops` does both."""
    previous, _ONE_TILE[0] = _ONE_TILE[0], True
    try:
        yield
    finally:
        _ONE_TILE[0] = previous


def row_tiles(rows: int, bytes_per_row: int) -> tuple[int, int, int]:
    """Returns (shards, steps, rows per shard per step) for attending `rows` batch rows: the rows' shards
    under the current mesh (1 without one, or when they do not divide), and as many of a shard's rows per
    step as fit the backend's TILE_BYTES (at least one)."""
    shards = batch_shards(rows)
    local = rows // shards
    budget = TILE_BYTES.get(jax.default_backend(), DEFAULT_TILE_BYTES)
    per_step = max([r for r in range(1, local + 1) if local % r == 0 and r * bytes_per_row <= budget] or [1])
    return shards, local // per_step, per_step


def _attend(q, k, v, mask, key_bias):
    """Returns softmax(q k^T + bias, masked) v in the heads-major layout: q [B, Hkv, G, Lq, d] (already scaled),
    k/v [B, Hkv, Lk, d], mask [B, Lq, Lk] | None, key_bias [B, Lk] | None -> [B, Hkv, G, Lq, d].

    The softmax is normalised after P.V (exp(logits - max) V / sum): one pass less over the logits."""
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k).astype(jnp.float32)
    if key_bias is not None:
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, None, :]
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("bkgqs,bksd->bkgqd", unnormalised.astype(v.dtype), v)
    return (out.astype(jnp.float32) / unnormalised.sum(-1, keepdims=True)).astype(v.dtype)


def _attend_chunked(q, k, v, mask, key_bias, chunk: int):
    """Returns `_attend`, `chunk` queries at a time (each chunk rematerialised in the backward pass)."""
    b, hkv, g, lq, d = q.shape
    if lq <= chunk:
        return _attend(q, k, v, mask, key_bias)
    chunks = -(-lq // chunk)
    pad = chunks * chunk - lq
    qc = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0))).reshape(b, hkv, g, chunks, chunk, d).transpose(3, 0, 1, 2, 4, 5)
    mc = None if mask is None else jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(
        b, chunks, chunk, -1).transpose(1, 0, 2, 3)
    out = jax.lax.map(jax.checkpoint(lambda qm: _attend(qm[0], k, v, qm[1], key_bias)), (qc, mc))
    return out.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, chunks * chunk, d)[:, :, :, :lq]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          key_bias: jax.Array | None = None, query_chunk: int | None = None) -> jax.Array:
    """Returns softmax(q k^T / sqrt(d) + key_bias, masked) v with grouped-query heads.

    q [B, Lq, H, d], k/v [B, Lk, Hkv, d] (H a multiple of Hkv), mask [B, Lq, Lk] bool (True = attend),
    key_bias [B, Lk] added to the logits of every query and head. A fully masked row gets a uniform
    average instead of NaN (its output is never read). Output [B, Lq, H, d]. Computed heads-major (q scaled
    first) in tiles (see TILE_BYTES above): each device's rows a few at a time, and queries `query_chunk` at
    a time (default: QUERY_CHUNK of the backend when Lq > LONG_SEQUENCE, else all), each tile rematerialised
    in the backward pass, so the logits held at once are [rows per step, H, chunk, Lk], not [B, H, Lq, Lk]
    (the 128 frames of a row in the ViT; the 6-11k-token LLM rows of 64-128 frames). Rows are tiled within
    their shard, so a batch sharded over devices stays sharded.
    """
    b, lq, h, d = q.shape
    if query_chunk is None:
        query_chunk = default_query_chunk() if lq > LONG_SEQUENCE else lq
    chunk = min(query_chunk, lq)
    shards, steps, per_step = row_tiles(b, 4 * h * chunk * k.shape[1])
    if _ONE_TILE[0]:
        attend = _attention_tile if steps == 1 and chunk == lq else jax.checkpoint(_attention_tile, static_argnums=5)
        return attend(q, k, v, mask, key_bias, lq)
    if steps == 1:
        return _attention_tile(q, k, v, mask, key_bias, chunk)

    def split(t):  # [B, ...] -> [steps, shards * per_step, ...]: step i holds rows i*per_step.. of every shard
        if t is None:
            return None
        t = t.reshape(shards, steps, per_step, *t.shape[1:]).swapaxes(0, 1)
        return t.reshape(steps, shards * per_step, *t.shape[3:])

    # the heads-major layout is formed inside each step, on a tile that stays in cache
    step = jax.checkpoint(lambda a: _attention_tile(*a, chunk))
    out = jax.lax.map(step, (split(q), split(k), split(v), split(mask), split(key_bias)))
    return out.reshape(steps, shards, per_step, *out.shape[2:]).swapaxes(0, 1).reshape(b, *out.shape[2:])


def _attention_tile(q, k, v, mask, key_bias, chunk: int) -> jax.Array:
    """Returns dot_product_attention of one tile of rows (q [B, Lq, H, d] ... -> [B, Lq, H, d]), heads-major
    inside, `chunk` queries at a time."""
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, lq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, d]
    out = _attend_chunked(q, k, v, mask, key_bias, chunk)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
