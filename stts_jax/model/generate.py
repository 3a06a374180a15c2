"""Generation with a static-shape KV cache: one jitted prefill, one jitted decode step reused for every token.

  prefill  (ViT -> STTS -> adapter -> LLM over the prompt [B, L] and each row's frames) writes the prompt's
           keys/values into cache slots 0..L-1 of a cache of S = L + max_new_tokens slots and samples the
           first new token
  step     embeds one token per row, writes it at slot L + t, attends over all S slots through a key mask
           (prompt padding and not-yet-written slots masked), samples the next token

Prompts are batch-major (the model's contract, stts_jax.model.vlm): one example per row, its frames in the
row's slots (pixel_values [B, F, N, P*P*3], optional frame_mask [B, F] for empty slots), laid out by one
static row `FrameLayout` (STTS needs it). Everything that decides a shape is static (B, L, S, F, the row
layout), so `step` compiles once per (B, S); the slot index, positions, temperature, top-p and stop ids are
traced values. Prompts of different lengths share one [B, L] batch with padding on either side (segment id
0): each row's RoPE positions continue from its own last prompt position, as transformers' `generate` derives
them from the attention mask. Decode steps use no block mask (a new token is text and attends to every earlier
valid slot), also as transformers does. With STTS the prompt holds W*T - K placeholders per video, so the
prefill and every cache slot of the pruned vision prefix are smaller.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature restricted to the smallest set of
tokens whose probability reaches top_p (nucleus), sampled with `jax.random.categorical`. A row that emits a
stop token is done: later positions hold `pad_id` and its length stops growing; the loop ends when every row
is done or max_new_tokens is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.geometry import FrameLayout

MAX_STOP_TOKENS = 8  # stop ids are passed as a fixed-size array (-1 = unused) so they never recompile the step
PROMPT_KEYS = ("input_ids", "segment_ids", "positions", "pixel_values", "frame_mask")  # frame_mask optional


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left",
                length: int | None = None) -> dict[str, np.ndarray]:
    """Returns input_ids / segment_ids / positions [B, L] int32 for token lists of different lengths.

    Padding (segment id 0) goes on `side`; positions count the valid tokens of each row from 0.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max(len(p) for p in prompts) if length is None else length
    ids = np.full((len(prompts), length), pad_id, np.int32)
    seg = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than length={length}")
        span = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[i, span] = p
        seg[i, span] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return dict(input_ids=ids, segment_ids=seg, positions=positions)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Returns [B] int32 tokens: argmax if temperature <= 0, else nucleus (top-p) sampling at `temperature`."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before each sorted token
    kept = before < top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.random.categorical(rng, filtered, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _finish(token, done, stop_ids, pad_id):
    """Returns (token with pad where the row was already done, done updated with this token)."""
    token = jnp.where(done, pad_id, token)
    done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    return token, done


@dataclasses.dataclass
class GenerateOutput:
    """Generated tokens and what it took."""
    tokens: np.ndarray  # [B, steps] int32 (pad after a stop token)
    lengths: np.ndarray  # [B] tokens up to and including the stop token
    first_logits: np.ndarray  # [B, vocab] logits of the first new token (the prompt's last position)
    prompt_length: int  # L (padded)
    cache_length: int  # S = L + max_new_tokens
    cache_bytes: int
    prefill_seconds: float
    decode_seconds: float
    keep: np.ndarray | None = None  # [B, F, W] kept windows of each row's frame slots (STTS)


class Generator:
    """Greedy / top-p generation for one Molmo2VLM and one static row FrameLayout (the frame slots of every
    row; STTS needs it, unpruned models may pass None)."""

    def __init__(self, model, layout: FrameLayout | None = None, cache_dtype=None):
        self.graphdef, self.state = nnx.split(model)
        self.layout = layout
        self.cache_dtype = cache_dtype
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_length",))
        self.step = jax.jit(self._step, donate_argnames=("cache",))

    # ----------------------------------------------------------------------------- jitted pieces
    def _prefill(self, state, batch, rng, temperature, top_p, stop_ids, pad_id, *, cache_length: int):
        model = nnx.merge(self.graphdef, state)
        b, length = batch["input_ids"].shape
        cache = model.llm.init_cache(b, cache_length, self.cache_dtype)
        hidden, cache, aux = model.prefill(batch, cache, self.layout, rng)
        valid = batch["segment_ids"] > 0  # [B, L]
        last = jnp.max(jnp.where(valid, jnp.arange(length)[None], 0), axis=1)  # last prompt token of each row
        logits = model.llm.lm_head(hidden[jnp.arange(b), last]).astype(jnp.float32)  # [B, V]
        token = sample_tokens(logits, jax.random.fold_in(rng, 0), temperature, top_p)
        token, done = _finish(token, jnp.zeros((b,), bool), stop_ids, pad_id)
        key_mask = jnp.zeros((b, cache_length), bool).at[:, :length].set(valid)
        next_position = jnp.max(jnp.where(valid, batch["positions"], -1), axis=1) + 1
        keep = aux.get("keep")
        return token, done, cache, key_mask, next_position, logits, keep

    def _step(self, state, cache, token, position, index, key_mask, done, rng, temperature, top_p, stop_ids, pad_id):
        model = nnx.merge(self.graphdef, state)
        b = token.shape[0]
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, index))
        x = model.llm.embed(token[:, None])
        hidden, cache = model.llm.extend(x, position[:, None], key_mask[:, None, :], cache, index)
        logits = model.llm.lm_head(hidden[:, 0]).astype(jnp.float32)
        nxt = sample_tokens(logits, jax.random.fold_in(rng, index), temperature, top_p)
        nxt, done = _finish(nxt, done, stop_ids, pad_id)
        return nxt, done, cache, key_mask, position + 1

    # ----------------------------------------------------------------------------- driver
    def generate(self, batch: dict, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] = (), pad_id: int = 0, rng: jax.Array | None = None) -> GenerateOutput:
        """Returns up to `max_new_tokens` new tokens per row for a batch-major prompt batch: input_ids,
        segment_ids, positions [B, L] (one example per row, `pad_prompts`), pixel_values [B, F, N, P*P*3] and
        optional frame_mask [B, F] (other keys are ignored)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(stop_tokens) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stop_tokens)}")
        seg = np.asarray(batch["segment_ids"])
        if seg.max() > 1:
            raise ValueError("generation takes one example per row (segment ids 0/1), not packed rows")
        if not (seg > 0).any(axis=1).all():
            raise ValueError("every row needs at least one prompt token")
        rng = jax.random.key(0) if rng is None else rng
        stop_ids = jnp.asarray(list(stop_tokens) + [-1] * (MAX_STOP_TOKENS - len(stop_tokens)), jnp.int32)
        temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
        pad = jnp.int32(pad_id)
        batch = {k: jnp.asarray(batch[k]) for k in PROMPT_KEYS if k in batch}
        b, length = batch["input_ids"].shape
        cache_length = length + max_new_tokens
        t0 = time.perf_counter()
        token, done, cache, key_mask, position, logits, keep = self.prefill(
            self.state, batch, rng, temperature, top_p, stop_ids, pad, cache_length=cache_length)
        token.block_until_ready()
        t1 = time.perf_counter()
        tokens = [np.asarray(token)]
        finished = np.asarray(done)
        for t in range(max_new_tokens - 1):
            if finished.all():
                break
            token, done, cache, key_mask, position = self.step(
                self.state, cache, token, position, jnp.int32(length + t), key_mask, done, rng, temperature, top_p,
                stop_ids, pad)
            tokens.append(np.asarray(token))
            finished = np.asarray(done)
        t2 = time.perf_counter()
        out = np.stack(tokens, axis=1)
        is_stop = np.isin(out, np.asarray(list(stop_tokens), np.int32)) if len(stop_tokens) else np.zeros_like(out, bool)
        first_stop = np.where(is_stop.any(1), is_stop.argmax(1) + 1, out.shape[1])
        return GenerateOutput(
            tokens=out, lengths=first_stop, first_logits=np.asarray(logits), prompt_length=length,
            cache_length=cache_length, cache_bytes=cache_nbytes(cache), prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1, keep=None if keep is None else np.asarray(keep))


def cache_nbytes(cache) -> int:
    """Returns the bytes held by a KV cache pytree."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def cache_bytes_for(model, batch_size: int, cache_length: int, dtype=None) -> int:
    """Returns the bytes of a KV cache of `cache_length` slots for `model` (no allocation)."""
    shapes = jax.eval_shape(functools.partial(model.llm.init_cache, batch_size, cache_length, dtype))
    return cache_nbytes(shapes)
