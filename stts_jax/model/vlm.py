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

from stts_jax.config import tokens_per_frame, validate_model_config
from stts_jax.model import pruning
from stts_jax.model.adapter import Adapter
from stts_jax.model.layers import run_block
from stts_jax.model.llm import LanguageModel
from stts_jax.model.pruning import FrameLayout
from stts_jax.model.scorer import TemporalTokenScorer
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
    """ViT + adapter + LLM (+ the STTS scorer when cfg.stts.method == "scorer").

    `__call__(batch)` returns logits [B, L, vocab]; `forward(batch, layout, rng)` also returns the STTS
    auxiliaries. With STTS on (method scorer/random and some video with K > 0), `layout` (a static
    FrameLayout of the flat frame list) is required, `pooling_idx` must hold every window of every frame
    ([F*W, S], frame-major), and `input_ids` must hold exactly W*T - K placeholders per video; the model
    drops the pruned windows and regroups each frame's placeholders to its kept count.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.vit = VisionTransformer(cfg.vit, remat=bool(cfg.get("remat", False)), **kw)
        self.adapter = Adapter(cfg, **kw)
        self.llm = LanguageModel(cfg, **kw)
        self.scorer = TemporalTokenScorer(cfg, **kw) if cfg.stts.method == "scorer" else None
        self.feature_layers = tuple(cfg.adapter.feature_layers)
        self.vision_layout_ids = tuple(int(cfg.tokens[name]) for name in VISION_LAYOUT_TOKENS)
        self.pack_fallback = True  # see later_blocks; set False only to read the packed path's cost

    def vit_hidden_states(self, pixel_values: jax.Array) -> list[jax.Array]:
        """Returns the outputs [F, N, D] of ViT blocks 0..max(feature_layers) (no pruning)."""
        return self.vit(pixel_values, num_blocks=max(self.feature_layers) + 1)

    def pruning_active(self, layout: FrameLayout | None) -> bool:
        """Returns whether STTS prunes anything for this layout (static)."""
        st = self.cfg.stts
        if st.method == "none":
            return False
        if layout is None:
            raise ValueError("STTS pruning is on (cfg.stts.method=%r): pass the static FrameLayout of the "
                             "batch's frames" % st.method)
        w = tokens_per_frame(self.cfg)
        return any(pruning.video_prune_counts(layout, w, st.prune_ratio, st.prune_from_frame))

    def encode_video(self, pixel_values: jax.Array, pooling_idx: jax.Array, layout: FrameLayout | None = None,
                     rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Returns (pooled vision tokens [T_kept, H_llm], aux) for patches [F, N, P*P*3] and windows [F*W, S]."""
        features, rows, aux = self.vision_features(pixel_values, layout, rng)
        if rows is not None:
            w = tokens_per_frame(self.cfg)
            if pooling_idx.shape[0] != pixel_values.shape[0] * w:
                raise ValueError(f"with STTS, pooling_idx must list every window of every frame: "
                                 f"{pixel_values.shape[0] * w} rows, got {pooling_idx.shape[0]}")
            pooling_idx = pooling_idx[rows]
        return self.adapter(features, pooling_idx), aux

    def vision_features(self, pixel_values: jax.Array, layout: FrameLayout | None = None,
                        rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None, dict]:
        """Returns (adapter input [F*N, C] with zeros at pruned patches, kept window rows [T_kept] or None, aux)."""
        if not self.pruning_active(layout):
            hidden = self.vit_hidden_states(pixel_values)
            features = jnp.concatenate([hidden[layer] for layer in self.feature_layers], axis=-1)
            return features.reshape(-1, features.shape[-1]), None, dict(temporal_loss=jnp.zeros((), jnp.float32))
        st, cfg = self.cfg.stts, self.cfg
        grid, pool, w = cfg.vit.image_size // cfg.vit.patch_size, cfg.adapter.pool_size, tokens_per_frame(cfg)
        f = pixel_values.shape[0]
        if f != layout.num_frames:
            raise ValueError(f"pixel_values has {f} frames; the layout describes {layout.num_frames}")
        x = self.vit.embed(pixel_values)
        hidden, key_bias = {}, None
        temporal = jnp.zeros((), jnp.float32)
        num_blocks = max(max(self.feature_layers), st.prune_at + 1) + 1
        for i, block in enumerate(self.vit.blocks[: st.prune_at + 2]):
            # block prune_at+1 runs on every token, keys down-weighted by log(s~)
            x = run_block(block, self.vit.remat, x, key_bias=key_bias if i == st.prune_at + 1 else None)
            hidden[i] = x
            if i != st.prune_at:
                continue
            if st.method == "scorer":
                scores = self.scorer(x, layout, st.pairing)
            else:
                if rng is None:
                    raise ValueError("stts.method='random' needs an rng key")
                scores = jax.random.uniform(rng, (f, w))
            keep = pruning.select_windows(scores, layout, ratio=st.prune_ratio, prune_from_frame=st.prune_from_frame)
            keep_patch = pruning.windows_to_patches(keep, grid, pool)  # [F, N]
            if st.method == "scorer":
                if st.score_bias:
                    key_bias = pruning.key_bias(pruning.rescale_scores(
                        scores, layout, grid=grid, pool=pool, ratio=st.prune_ratio,
                        prune_from_frame=st.prune_from_frame, scope=st.rescale_scope, floor=st.bias_floor))
                temporal = pruning.temporal_loss(
                    scores, x, layout, grid=grid, pool=pool, ratio=st.prune_ratio,
                    prune_from_frame=st.prune_from_frame, pairing=st.pairing, target_grad=st.aux_target_grad)
        num_kept = pruning.kept_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
        later = list(range(st.prune_at + 2, num_blocks))
        wanted = [layer for layer in later if layer in self.feature_layers]
        outs = self.later_blocks(x, keep, later, wanted, st.execution, pruning.pack_rows(num_kept, w, st.pack_slack),
                                 fallback=self.pack_fallback)
        hidden.update(zip(wanted, outs))
        features = jnp.concatenate([hidden[layer] for layer in self.feature_layers], axis=-1)
        features = features * keep_patch[..., None].astype(features.dtype)  # zeros at pruned positions
        rows = pruning.kept_window_rows(keep, num_kept)
        return features.reshape(-1, features.shape[-1]), rows, dict(temporal_loss=temporal, keep=keep, scores=scores)

    def later_blocks(self, x: jax.Array, keep: jax.Array, later: list[int], wanted: list[int], execution: str,
                     num_rows: int, fallback: bool = True) -> list[jax.Array]:
        """Returns the outputs [F, N, D] of ViT blocks `wanted` (subset of `later`) after pruning by keep [F, W].

        `masked`: key mask on the full [F, N] layout. `packed`: the same on `num_rows` rows of packed kept
        tokens (see pruning.py), scattered back only where the adapter reads; a keep pattern that does not
        fit takes the masked branch (lax.cond), so both are exact on every kept token. `fallback=False` drops
        that branch: only for reading the packed path's cost (XLA's cost analysis of a cond is the max of its
        branches); an overflowing pattern would then lose tokens.
        """
        if not later:
            return []
        grid, pool = self.cfg.vit.image_size // self.cfg.vit.patch_size, self.cfg.adapter.pool_size
        keep_patch = pruning.windows_to_patches(keep, grid, pool)  # [F, N]

        def masked(x):
            out = {}
            for i in later:
                x = run_block(self.vit.blocks[i], self.vit.remat, x, mask=keep_patch[:, None, :])
                out[i] = x
            return [out[layer] for layer in wanted]

        if execution == "masked":
            return masked(x)
        plan = pruning.plan_packing(keep, num_rows)

        def packed(x):
            rows, row_mask = pruning.pack_tokens(x, plan, grid, pool)
            out = {}
            for i in later:
                rows = run_block(self.vit.blocks[i], self.vit.remat, rows, mask=row_mask)
                if i in wanted:
                    out[i] = pruning.unpack_tokens(rows, plan, x.shape[0], grid, pool)
            return [out[layer] for layer in wanted]

        if not fallback:
            return packed(x)
        return jax.lax.cond(plan.overflow, masked, packed, x)

    def llm_inputs(self, batch: dict, layout: FrameLayout | None = None,
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """Returns (input embeddings [B, L, H] with vision spliced in, attention mask [B, L, L], aux)."""
        input_ids = batch["input_ids"]
        features, aux = self.encode_video(batch["pixel_values"], batch["pooling_idx"], layout, rng)
        if "keep" in aux:
            input_ids = pruning.relayout_vision_tokens(
                input_ids, aux["keep"].sum(-1), placeholder_id=self.cfg.tokens.image_patch_id,
                end_marker_ids=(self.cfg.tokens.frame_end_id, self.cfg.tokens.image_end_id))
        embeddings = splice_vision(self.llm.embed(input_ids), input_ids, features, self.cfg.tokens.image_patch_id)
        vision_layout = jnp.isin(input_ids, jnp.asarray(self.vision_layout_ids, jnp.int32))
        return embeddings, attention_mask(batch["segment_ids"], vision_layout), aux

    def forward(self, batch: dict, layout: FrameLayout | None = None, rng: jax.Array | None = None):
        """Returns (logits [B, L, vocab_size], aux) where aux holds `temporal_loss` (and keep/scores if pruning)."""
        embeddings, mask, aux = self.llm_inputs(batch, layout, rng)
        return self.llm(embeddings, batch["positions"], mask), aux

    def __call__(self, batch: dict, layout: FrameLayout | None = None, rng: jax.Array | None = None) -> jax.Array:
        """Returns logits [B, L, vocab_size] for a batch dict (see module docstring)."""
        return self.forward(batch, layout, rng)[0]

    def prefill(self, batch: dict, cache: tuple, layout: FrameLayout | None = None,
                rng: jax.Array | None = None) -> tuple[jax.Array, tuple, dict]:
        """Returns (final-normed hidden [B, L, H], cache holding the prompt in slots 0..L-1, aux) for generation.

        Same inputs and computation as `forward`; `cache` comes from `self.llm.init_cache(B, S)` with S >= L.
        `self.llm.lm_head(hidden)` gives forward's logits.
        """
        embeddings, mask, aux = self.llm_inputs(batch, layout, rng)
        hidden, cache = self.llm.extend(embeddings, batch["positions"], mask, cache, 0)
        return hidden, cache, aux


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Returns the mean next-token cross-entropy over positions where loss_mask is set."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # special tokens (ids >= vocab_size) cannot be predicted: they must be masked, and are clipped so the
    # gather stays in range (an out-of-range gather yields NaN, and NaN * 0 is NaN)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(bool)
    return jnp.where(mask, nll, 0.0).sum() / jnp.maximum(mask.sum(), 1).astype(jnp.float32)


def total_loss(model: Molmo2VLM, batch: dict, layout: FrameLayout | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Returns (L_LM + aux_loss_weight * L_temp, metrics) for a batch with `targets` and `loss_mask` [B, L]."""
    logits, aux = model.forward(batch, layout, rng)
    lm = lm_loss(logits, batch["targets"], batch["loss_mask"])
    weight = model.cfg.stts.aux_loss_weight if model.cfg.stts.method == "scorer" else 0.0
    loss = lm + weight * aux["temporal_loss"]
    return loss, dict(loss=loss, lm_loss=lm, temporal_loss=aux["temporal_loss"])


class Forward(NamedTuple):
    """A jitted forward over split model state: `apply(state, batch) -> logits`."""
    graphdef: nnx.GraphDef
    state: nnx.State
    apply: Callable


def make_forward(model: Molmo2VLM, mesh=None, layout: FrameLayout | None = None) -> Forward:
    """Returns a Forward whose `apply(state, batch, rng=None)` is one jax.jit compilation per batch shape.

    `layout` is the static FrameLayout STTS needs (closed over: one Forward per layout). With a mesh,
    parameters keep their logical-rule shardings and logits come out sharded over the batch.
    """
    graphdef, state = nnx.split(model)
    kwargs = {}
    if mesh is not None:
        from stts_jax.train import sharding

        kwargs["out_shardings"] = sharding.batch_sharding(mesh, 3)

    @functools.partial(jax.jit, **kwargs)
    def apply(state, batch, rng=None):
        return nnx.merge(graphdef, state)(batch, layout, rng)

    return Forward(graphdef, state, apply)


def check_batch(batch: dict, cfg: ml_collections.ConfigDict, layout: FrameLayout | None = None) -> None:
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
    st = cfg.stts
    if st.method != "none":
        if layout is None:
            raise ValueError("STTS is on: check_batch needs the batch's FrameLayout")
        if layout.num_frames != pix[0]:
            raise ValueError(f"layout describes {layout.num_frames} frames, pixel_values holds {pix[0]}")
        w = tokens_per_frame(cfg)
        want = pruning.kept_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
        if pool.shape[0] != pix[0] * w:
            raise ValueError(f"with STTS, pooling_idx must list every window: {pix[0] * w} rows, got {pool.shape[0]}")
        if placeholders != want:
            raise ValueError(f"input_ids hold {placeholders} image-patch placeholders; with STTS (ratio "
                             f"{st.prune_ratio}) the layout keeps {want} vision tokens (sum of W*T - K)")
    elif placeholders != pool.shape[0]:
        raise ValueError(f"input_ids hold {placeholders} image-patch placeholders but pooling_idx describes "
                         f"{pool.shape[0]} vision tokens")
