"""The Molmo2-shaped video VLM: ViT -> adapter -> splice into the LLM sequence -> LLM.

The batch contract (batch-major: every array carries the batch axis B first; rows never interact):

  input_ids     [B, L] int32            token ids; one `image_patch_id` placeholder per vision token of the row
  segment_ids   [B, L] int32            example index inside a packed row, 1-based; 0 = padding
  positions     [B, L] int32            RoPE positions, restarting at 0 for every example
  pixel_values  [B, F, N, P*P*3] float  each row's F frame slots (flattened, normalised patches), laid out by
                                        one static per-row `FrameLayout` (input pipeline: V video slots of
                                        T frames; [B, V, T, N, P*P*3] is accepted and flattened to F = V*T)
  frame_mask    [B, F] int32/bool       optional (default: all real): 1 = a real frame, 0 = an empty slot
                                        (zeros; it yields no vision tokens). STTS needs whole videos: a video
                                        slot is either all real or all empty.
  targets, loss_mask [B, L] int32       for `total_loss`

Vision tokens of a row, in order: its real frames, slot by slot, each frame's pooling windows row-major
(only the kept ones with STTS: W*T - K per video, a static count from stts_jax.geometry). The k-th
placeholder along the row's L receives the row's k-th vision token (its features are *added* to the
placeholder embedding, as in Molmo2). Pooling windows come from the geometry, not from the batch.
Attention: a token attends to keys of its own example (same segment id) that are earlier or equal
(causal), and every vision-layout token (frame/image special tokens and placeholders) attends to every
vision-layout token of its example (bidirectional block). Activations are constrained to the rules table's
`batch` sharding (rows over data x fsdp) whenever a mesh is set (`jax.set_mesh`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stts_jax import geometry
from stts_jax.config import validate_model_config
from stts_jax.geometry import FrameLayout, tokens_per_frame
from stts_jax.model.adapter import Adapter
from stts_jax.model.layers import run_block
from stts_jax.model.llm import LanguageModel
from stts_jax.model.partitioning import constrain, under_mesh
from stts_jax.model.vit import VisionTransformer
from stts_jax.stts import selection, token_packing
from stts_jax.stts.decide import decide
from stts_jax.stts.scorer import TemporalTokenScorer

VISION_LAYOUT_TOKENS = ("image_patch_id", "image_col_id", "image_start_id", "low_res_image_start_id",
                        "frame_start_id", "image_end_id", "frame_end_id", "image_low_id")
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "pixel_values")  # + optional frame_mask


def attention_mask(segment_ids: jax.Array, vision_layout: jax.Array) -> jax.Array:
    """Returns [B, L, L] bool: same example AND (causal OR both tokens in the vision layout)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    both_vision = vision_layout[:, :, None] & vision_layout[:, None, :]
    return same & (causal | both_vision)


def row_inputs(batch: dict, layout: FrameLayout | None = None) -> tuple[jax.Array, jax.Array, FrameLayout | None]:
    """Returns (pixel_values [B, F, N, P], frame_mask [B, F] bool, layout) of a batch (5-D pixels flattened;
    their layout, if none is given, is V video slots of T frames)."""
    pixels = batch["pixel_values"]
    mask = batch.get("frame_mask")
    if pixels.ndim == 5:
        b, v, t = pixels.shape[:3]
        pixels = pixels.reshape(b, v * t, *pixels.shape[3:])
        mask = None if mask is None else mask.reshape(b, v * t)
        layout = layout or FrameLayout.video_slots(v, t)
    if pixels.ndim != 4:
        raise ValueError(f"pixel_values must be [B, F, N, P] or [B, V, T, N, P], got shape {pixels.shape}")
    if mask is None:
        mask = jnp.ones(pixels.shape[:2], bool)
    return pixels, mask.astype(bool), layout


def splice_vision(embeddings: jax.Array, input_ids: jax.Array, tokens: jax.Array, valid: jax.Array,
                  placeholder_id: int) -> jax.Array:
    """Returns embeddings [B, L, H] with each row's real vision tokens added at its placeholders, in order.

    tokens [B, T, H], valid [B, T] (tokens of empty frame slots are skipped). Within each row, the k-th
    placeholder along L receives the k-th valid token; `check_batch` guarantees the counts agree.
    """
    t = tokens.shape[1]

    def row(emb, ids, tok, ok):
        real = tok[jnp.nonzero(ok, size=t, fill_value=0)[0]]  # [T, H]: valid tokens first, in order
        is_placeholder = ids == placeholder_id  # [L]
        order = jnp.clip(jnp.cumsum(is_placeholder) - 1, 0, t - 1)
        return emb + jnp.where(is_placeholder[:, None], real[order].astype(emb.dtype), 0)

    return jax.vmap(row)(embeddings, input_ids, tokens, valid)


class Molmo2VLM(nnx.Module):
    """ViT + adapter + LLM (+ the STTS scorer when cfg.stts.method == "scorer").

    `__call__(batch, layout)` returns logits [B, L, vocab]; `forward(batch, layout, rng)` also returns the
    STTS auxiliaries. `layout` is the static FrameLayout of one row's frame slots; STTS needs it (with
    method scorer/random and some video with K > 0); rows must then hold exactly W*T - K placeholders per
    real video, and the model regroups each frame's placeholders to its kept count.
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
        """Returns the outputs [..., N, D] of ViT blocks 0..max(feature_layers) for patches [..., N, P] (no pruning)."""
        lead = pixel_values.shape[:-2]
        flat = pixel_values.reshape(-1, *pixel_values.shape[-2:])
        hidden = self.vit(flat, num_blocks=max(self.feature_layers) + 1)
        return [h.reshape(*lead, *h.shape[1:]) for h in hidden]

    def pruning_active(self, layout: FrameLayout | None) -> bool:
        """Returns whether STTS prunes anything for this row layout (static)."""
        st = self.cfg.stts
        if st.method == "none":
            return False
        if layout is None:
            raise ValueError("STTS pruning is on (cfg.stts.method=%r): pass the static FrameLayout of a row's "
                             "frame slots" % st.method)
        w = tokens_per_frame(self.cfg)
        return any(geometry.video_prune_counts(layout, w, st.prune_ratio, st.prune_from_frame))

    def vision_tokens(self, pixel_values: jax.Array, frame_mask: jax.Array, layout: FrameLayout | None = None,
                      rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """Returns (vision tokens [B, T, H_llm], valid [B, T], aux) for patches [B, F, N, P*P*3].

        T = W*F unpruned, or the row layout's static kept count with STTS; `valid` is False for the
        tokens of empty frame slots (frame_mask [B, F]).
        """
        b, f = pixel_values.shape[:2]
        w = tokens_per_frame(self.cfg)
        features, rows, aux = self.vision_features(pixel_values, frame_mask, layout, rng)
        pooling = geometry.video_pooling_indices(f, geometry.grid_size(self.cfg), self.cfg.adapter.pool_size)
        if rows is None:
            pooling_idx = jnp.asarray(pooling, jnp.int32)  # [F*W, S], the same for every row
            valid = jnp.repeat(frame_mask, w, axis=1)
        else:
            pooling_idx = jnp.asarray(pooling, jnp.int32)[rows]  # [B, T_kept, S]
            valid = jnp.take_along_axis(frame_mask, rows // w, axis=1)
        tokens = constrain(self.adapter(features, pooling_idx), ("batch", "tokens", "act"))
        return tokens, valid, aux

    def vision_features(self, pixel_values: jax.Array, frame_mask: jax.Array, layout: FrameLayout | None = None,
                        rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None, dict]:
        """Returns (adapter input [B, F*N, C] with zeros at pruned patches, kept window rows [B, T_kept] or None, aux)."""
        cfg = self.cfg
        b, f, n = pixel_values.shape[:3]
        pixel_values = constrain(pixel_values, ("batch", "frames", "tokens", "act"))
        if not self.pruning_active(layout):
            hidden = self.vit_hidden_states(pixel_values)
            features = jnp.concatenate([hidden[layer] for layer in self.feature_layers], axis=-1)
            features = constrain(features.reshape(b, f * n, -1), ("batch", "tokens", "act"))
            return features, None, dict(temporal_loss=jnp.zeros((), jnp.float32))
        st = cfg.stts
        grid, pool, w = geometry.grid_size(cfg), cfg.adapter.pool_size, tokens_per_frame(cfg)
        if f != layout.num_frames:
            raise ValueError(f"pixel_values has {f} frame slots per row; the layout describes {layout.num_frames}")
        x = self.vit.embed(pixel_values.reshape(b * f, n, -1))  # [B*F, N, D]
        hidden, bias = {}, None
        num_blocks = max(max(self.feature_layers), st.prune_at + 1) + 1
        for i, block in enumerate(self.vit.blocks[: st.prune_at + 2]):
            # block prune_at+1 runs on every token, keys down-weighted by log(s~)
            x = run_block(block, self.vit.remat, x, key_bias=bias if i == st.prune_at + 1 else None)
            x = constrain(x.reshape(b, f, n, -1), ("batch", "frames", "tokens", "act")).reshape(x.shape)
            hidden[i] = x
            if i != st.prune_at:
                continue
            decision = decide(x.reshape(b, f, n, -1), layout, st, grid=grid, pool=pool, scorer=self.scorer, rng=rng,
                              frame_mask=frame_mask)
            keep, scores, temporal = decision.keep, decision.scores, decision.temporal_loss
            bias = None if decision.key_bias is None else decision.key_bias.reshape(b * f, n)
            keep_patch = selection.windows_to_patches(keep, grid, pool)  # [B, F, N]
        num_kept = geometry.kept_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
        later = list(range(st.prune_at + 2, num_blocks))
        wanted = [layer for layer in later if layer in self.feature_layers]
        outs = self.later_blocks(x.reshape(b, f, n, -1), keep, later, wanted, st.execution,
                                 token_packing.packed_row_budget(num_kept, w, st.pack_slack), fallback=self.pack_fallback)
        hidden.update(zip(wanted, outs))
        features = jnp.concatenate([hidden[layer].reshape(b, f, n, -1) for layer in self.feature_layers], axis=-1)
        features = features * keep_patch[..., None].astype(features.dtype)  # zeros at pruned positions
        features = constrain(features.reshape(b, f * n, -1), ("batch", "tokens", "act"))
        rows = selection.kept_window_rows(keep, num_kept)
        return features, rows, dict(temporal_loss=temporal, keep=keep, scores=scores)

    def later_blocks(self, x: jax.Array, keep: jax.Array, later: list[int], wanted: list[int], execution: str,
                     num_rows: int, fallback: bool = True) -> list[jax.Array]:
        """Returns the outputs [B, F, N, D] of ViT blocks `wanted` (subset of `later`) after pruning by keep [B, F, W].

        `masked`: key mask on the full [B, F, N] layout. `packed`: the same on `num_rows` packed rows of kept
        tokens per batch row (see stts/token_packing.py), scattered back only where the adapter reads; when some batch
        row's keep pattern does not fit, the batch takes the masked branch (lax.cond), so both are exact on
        every kept token. `fallback=False` drops that branch: only for reading the packed path's cost (XLA's
        cost analysis of a cond is the max of its branches); an overflowing pattern would then lose tokens.
        """
        if not later:
            return []
        grid, pool = geometry.grid_size(self.cfg), self.cfg.adapter.pool_size
        b, f, n, d = x.shape
        keep_patch = selection.windows_to_patches(keep, grid, pool).reshape(b * f, 1, n)
        blocks = self.vit.blocks

        def masked(x):
            h, out = x.reshape(b * f, n, d), {}
            for i in later:
                h = run_block(blocks[i], self.vit.remat, h, mask=keep_patch)
                out[i] = constrain(h.reshape(b, f, n, d), ("batch", "frames", "tokens", "act"))
            return [out[layer] for layer in wanted]

        if execution == "masked":
            return masked(x)
        plan = token_packing.plan_packing(keep, num_rows)

        def packed(x):
            rows, row_mask = token_packing.pack_tokens(x, plan, grid, pool)  # [B, R, S, D], [B, R, S, S]
            r, s = rows.shape[1:3]
            rows, row_mask = rows.reshape(b * r, s, d), row_mask.reshape(b * r, s, s)
            out = {}
            for i in later:
                rows = run_block(blocks[i], self.vit.remat, rows, mask=row_mask)
                rows = constrain(rows.reshape(b, r, s, d), ("batch", "frames", "tokens", "act")).reshape(rows.shape)
                if i in wanted:
                    out[i] = token_packing.unpack_tokens(rows.reshape(b, r, s, d), plan, f, grid, pool)
            return [out[layer] for layer in wanted]

        if not fallback:
            return packed(x)
        return jax.lax.cond(plan.overflow.any(), masked, packed, x)

    def llm_inputs(self, batch: dict, layout: FrameLayout | None = None,
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """Returns (input embeddings [B, L, H] with vision spliced in, attention mask [B, L, L], aux)."""
        input_ids = batch["input_ids"]
        pixel_values, frame_mask, layout = row_inputs(batch, layout)
        tokens, valid, aux = self.vision_tokens(pixel_values, frame_mask, layout, rng)
        if "keep" in aux:
            input_ids = selection.relayout_vision_tokens(
                input_ids, aux["keep"].sum(-1), placeholder_id=self.cfg.tokens.image_patch_id,
                end_marker_ids=(self.cfg.tokens.frame_end_id, self.cfg.tokens.image_end_id), frame_mask=frame_mask)
        embeddings = splice_vision(self.llm.embed(input_ids), input_ids, tokens, valid, self.cfg.tokens.image_patch_id)
        embeddings = constrain(embeddings, ("batch", "tokens", "act"))
        vision_layout = jnp.isin(input_ids, jnp.asarray(self.vision_layout_ids, jnp.int32))
        return embeddings, attention_mask(batch["segment_ids"], vision_layout), aux

    def forward(self, batch: dict, layout: FrameLayout | None = None, rng: jax.Array | None = None):
        """Returns (logits [B, L, vocab_size], aux) where aux holds `temporal_loss` (and keep/scores if pruning)."""
        hidden, aux = self.forward_hidden(batch, layout, rng)
        return constrain(self.llm.lm_head(hidden), ("batch", "tokens", "vocab")), aux

    def forward_hidden(self, batch: dict, layout: FrameLayout | None = None, rng: jax.Array | None = None):
        """Returns (final-normed LLM hidden states [B, L, H], aux); `self.llm.lm_head` of them gives the logits."""
        embeddings, mask, aux = self.llm_inputs(batch, layout, rng)
        return self.llm.hidden(embeddings, batch["positions"], mask), aux

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


LOSS_CHUNK = 1024  # sequence positions whose [chunk, vocab] logits are formed at once in the training loss


def _nll_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Returns the summed next-token cross-entropy over positions where loss_mask is set."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # special tokens (ids >= vocab_size) cannot be predicted: they must be masked, and are clipped so the
    # gather stays in range (an out-of-range gather yields NaN, and NaN * 0 is NaN)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(loss_mask.astype(bool), nll, 0.0).sum()


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Returns the mean next-token cross-entropy over positions where loss_mask is set."""
    count = jnp.maximum(loss_mask.astype(bool).sum(), 1).astype(jnp.float32)
    return _nll_sum(logits, targets, loss_mask) / count


def lm_loss_from_hidden(head: Callable, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                        chunk: int = LOSS_CHUNK) -> jax.Array:
    """Returns `lm_loss(head(hidden), ...)` without forming the [B, L, vocab] logits at once: `chunk` positions
    at a time, each chunk's logits rematerialised in the backward pass (at 128 frames a row's f32 logits are
    ~7 GB with Qwen3's 152k vocabulary)."""
    b, length = targets.shape
    if length <= chunk:
        return lm_loss(head(hidden), targets, loss_mask)
    n = -(-length // chunk)
    pad = n * chunk - length
    split = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
        b, n, chunk, *x.shape[2:]).swapaxes(0, 1)
    piece = jax.checkpoint(lambda args: _nll_sum(head(args[0]), args[1], args[2]))
    total = jax.lax.map(piece, (split(hidden), split(targets), split(loss_mask))).sum()
    return total / jnp.maximum(loss_mask.astype(bool).sum(), 1).astype(jnp.float32)


def total_loss(model: Molmo2VLM, batch: dict, layout: FrameLayout | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Returns (L_LM + aux_loss_weight * L_temp, metrics) for a batch with `targets` and `loss_mask` [B, L]."""
    hidden, aux = model.forward_hidden(batch, layout, rng)
    lm = lm_loss_from_hidden(model.llm.lm_head, hidden, batch["targets"], batch["loss_mask"])
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

    `layout` is the static row FrameLayout STTS needs (closed over: one Forward per layout). With a mesh,
    the forward runs under it: activations and logits stay sharded over the batch rows.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, batch, rng=None):
        return nnx.merge(graphdef, state)(batch, layout, rng)

    return Forward(graphdef, state, under_mesh(jitted, mesh))


def expected_row_tokens(cfg: ml_collections.ConfigDict, layout: FrameLayout, frame_mask: np.ndarray) -> np.ndarray:
    """Returns [B] int: the vision tokens (= placeholders) each row must hold, from its real frames (host side)."""
    w = tokens_per_frame(cfg)
    frame_mask = np.asarray(frame_mask, bool)
    if not geometry.pruning_on(cfg):
        return w * frame_mask.sum(1)
    st = cfg.stts
    per_group = geometry.group_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
    total = np.zeros(frame_mask.shape[0], np.int64)
    for (kind, start, count), tokens in zip(layout.spans(), per_group):
        real = frame_mask[:, start: start + count]
        partial = real.any(1) & ~real.all(1)
        if partial.any():
            raise ValueError(f"rows {np.flatnonzero(partial).tolist()}: {kind} slot at frames {start}..{start + count - 1} "
                             "is partly empty; with STTS a video slot must be all real or all empty")
        total += np.where(real.all(1), tokens, 0)
    return total


def check_batch(batch: dict, cfg: ml_collections.ConfigDict, layout: FrameLayout | None = None) -> None:
    """Raises ValueError naming the problem if a host-side batch (numpy) cannot be run by Molmo2VLM."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {BATCH_KEYS} (+ optional frame_mask)")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be [rows, length], got shape {ids.shape}")
    for key in ("segment_ids", "positions", "targets", "loss_mask"):
        if key in batch and np.shape(batch[key]) != ids.shape:
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, input_ids has {ids.shape}")
    grid, patch_dim = geometry.grid_size(cfg), geometry.patch_dim(cfg)
    pix = np.shape(batch["pixel_values"])
    mask = batch.get("frame_mask")
    if len(pix) == 5:
        layout = layout or FrameLayout.video_slots(pix[1], pix[2])
        pix = (pix[0], pix[1] * pix[2], *pix[3:])
        mask = None if mask is None else np.reshape(mask, pix[:2])
    if len(pix) != 4 or pix[2:] != (grid * grid, patch_dim):
        raise ValueError(f"batch['pixel_values'] has shape {np.shape(batch['pixel_values'])}, expected "
                         f"[rows, frames, {grid * grid}, {patch_dim}] (or [rows, videos, frames, ...])")
    if pix[0] != ids.shape[0]:
        raise ValueError(f"pixel_values holds {pix[0]} rows, input_ids {ids.shape[0]}: every vision array is batch-major")
    mask = np.ones(pix[:2], bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != pix[:2]:
        raise ValueError(f"batch['frame_mask'] has shape {mask.shape}, expected [rows, frames] = {pix[:2]}")
    if cfg.stts.method != "none":
        if layout is None:
            raise ValueError("STTS is on: check_batch needs the FrameLayout of a row's frame slots")
        if layout.num_frames != pix[1]:
            raise ValueError(f"layout describes {layout.num_frames} frame slots per row, pixel_values holds {pix[1]}")
    want = expected_row_tokens(cfg, layout or FrameLayout.videos(*([1] * pix[1])), mask)
    have = (ids == cfg.tokens.image_patch_id).sum(1)
    bad = np.flatnonzero(have != want)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"row {r} holds {int(have[r])} image-patch placeholders but its real frames give "
                         f"{int(want[r])} vision tokens" + (f" (STTS ratio {cfg.stts.prune_ratio}: W*T - K per video)"
                                                            if geometry.pruning_on(cfg) else "")
                         + f"; rows with a mismatch: {bad.tolist()}")
