"""The Molmo2-shaped video VLM: ViT -> adapter -> splice into the LLM sequence -> LLM.

Inputs are a dict of arrays with static shapes (`VideoBatch` documents them):

  input_ids     [B, L] int32   token ids; one `image_patch_id` placeholder per pooled vision token
  segment_ids   [B, L] int32   example index inside a packed row, 1-based; 0 = padding
  positions     [B, L] int32   RoPE positions, restarting at 0 for every example
  pixel_values  [F, N, P*P*3]  flattened, normalised patches of every frame of the batch, in order
  pooling_idx   [T, S] int32   flat indices into the F*N patch list of each pooled token's window (-1 = pad)

Pooled vision features are *added* to the placeholder embeddings in sequence order (row-major over
[B, L]), as Molmo2 does. Attention: a token attends to keys of its own example (same segment id) that are
earlier or equal (causal), and every vision-layout token (frame/image special tokens and placeholders)
attends to every vision-layout token of its example (bidirectional block).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stts_jax.config import validate_model_config
from stts_jax.model.adapter import Adapter
from stts_jax.model.llm import LanguageModel
from stts_jax.model.vit import VisionTransformer

VISION_LAYOUT_TOKENS = ("image_patch_id", "image_col_id", "image_start_id", "low_res_image_start_id",
                        "frame_start_id", "image_end_id", "frame_end_id", "image_low_id")
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "pixel_values", "pooling_idx")


def attention_mask(segment_ids: jax.Array, vision_layout: jax.Array) -> jax.Array:
    """Returns [B, L, L] bool: same example AND (causal OR both tokens in the vision layout)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    both_vision = vision_layout[:, :, None] & vision_layout[:, None, :]
    return same & (causal | both_vision)


def splice_vision(embeddings: jax.Array, input_ids: jax.Array, features: jax.Array,
                  placeholder_id: int) -> jax.Array:
    """Returns embeddings [B, L, H] with features [T, H] added at the placeholders, in row-major order.

    Static shapes: the k-th placeholder (counting over the flattened [B*L]) receives features[k]; the
    batch builder guarantees exactly T placeholders (`check_batch`).
    """
    is_placeholder = input_ids == placeholder_id  # [B, L]
    order = jnp.cumsum(is_placeholder.reshape(-1)) - 1
    order = jnp.clip(order, 0, features.shape[0] - 1).reshape(input_ids.shape)
    gathered = jnp.take(features, order, axis=0).astype(embeddings.dtype)  # [B, L, H]
    return embeddings + jnp.where(is_placeholder[..., None], gathered, 0)


class Molmo2VLM(nnx.Module):
    """ViT + adapter + LLM; `__call__(batch)` returns logits [B, L, vocab]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.vit = VisionTransformer(cfg.vit, **kw)
        self.adapter = Adapter(cfg, **kw)
        self.llm = LanguageModel(cfg, **kw)
        self.feature_layers = tuple(cfg.adapter.feature_layers)
        self.vision_layout_ids = tuple(int(cfg.tokens[name]) for name in VISION_LAYOUT_TOKENS)

    def vit_hidden_states(self, pixel_values: jax.Array) -> list[jax.Array]:
        """Returns the outputs [F, N, D] of ViT blocks 0..max(feature_layers)."""
        return self.vit(pixel_values, num_blocks=max(self.feature_layers) + 1)

    def encode_video(self, pixel_values: jax.Array, pooling_idx: jax.Array) -> jax.Array:
        """Returns pooled vision tokens [T, H_llm] for patches [F, N, P*P*3] and windows [T, S]."""
        hidden = self.vit_hidden_states(pixel_values)
        features = jnp.concatenate([hidden[layer] for layer in self.feature_layers], axis=-1)
        return self.adapter(features.reshape(-1, features.shape[-1]), pooling_idx)

    def __call__(self, batch: dict) -> jax.Array:
        """Returns logits [B, L, vocab_size] for a batch dict (see module docstring)."""
        input_ids = batch["input_ids"]
        embeddings = self.llm.embed(input_ids)
        features = self.encode_video(batch["pixel_values"], batch["pooling_idx"])
        embeddings = splice_vision(embeddings, input_ids, features, self.cfg.tokens.image_patch_id)
        vision_layout = jnp.isin(input_ids, jnp.asarray(self.vision_layout_ids, jnp.int32))
        mask = attention_mask(batch["segment_ids"], vision_layout)
        return self.llm(embeddings, batch["positions"], mask)


class Forward(NamedTuple):
    """A jitted forward over split model state: `apply(state, batch) -> logits`."""
    graphdef: nnx.GraphDef
    state: nnx.State
    apply: Callable


def make_forward(model: Molmo2VLM, mesh=None) -> Forward:
    """Returns a Forward whose `apply` is one jax.jit compilation per batch shape.

    With a mesh, parameters keep their logical-rule shardings and logits come out sharded over the batch.
    """
    graphdef, state = nnx.split(model)
    kwargs = {}
    if mesh is not None:
        from stts_jax.train import sharding

        kwargs["out_shardings"] = sharding.batch_sharding(mesh, 3)

    @functools.partial(jax.jit, **kwargs)
    def apply(state, batch):
        return nnx.merge(graphdef, state)(batch)

    return Forward(graphdef, state, apply)


def check_batch(batch: dict, cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the problem if a host-side batch (numpy) cannot be run by Molmo2VLM."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {BATCH_KEYS}")
    ids = np.asarray(batch["input_ids"])
    for key in ("segment_ids", "positions"):
        if np.shape(batch[key]) != ids.shape:
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, input_ids has {ids.shape}")
    grid = cfg.vit.image_size // cfg.vit.patch_size
    patch_dim = cfg.vit.patch_size ** 2 * cfg.vit.num_channels
    pix = np.shape(batch["pixel_values"])
    if len(pix) != 3 or pix[1:] != (grid * grid, patch_dim):
        raise ValueError(f"batch['pixel_values'] has shape {pix}, expected [frames, {grid * grid}, {patch_dim}]")
    pool = np.asarray(batch["pooling_idx"])
    if pool.ndim != 2 or pool.max(initial=-1) >= pix[0] * pix[1]:
        raise ValueError(f"batch['pooling_idx'] (shape {pool.shape}) must be [tokens, window] indices "
                         f"below frames*patches={pix[0] * pix[1]}")
    placeholders = int((ids == cfg.tokens.image_patch_id).sum())
    if placeholders != pool.shape[0]:
        raise ValueError(f"input_ids hold {placeholders} image-patch placeholders but pooling_idx describes "
                         f"{pool.shape[0]} vision tokens")
