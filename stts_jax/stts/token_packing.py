"""ViT token packing (spec §7): the `packed` execution of the ViT blocks after pruning, with static shapes.

Not Grain's sequence packing of examples into LLM rows (stts_jax.data.pipeline): this packs the kept *vision
tokens* of one batch row into fewer, fuller ViT rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from stts_jax.geometry import window_patch_ids

# ------------------------------------------------------------------------------------------- packing
#
# `packed` execution (spec §7) with static shapes, inside each batch row (so on the device holding it).
# After block prune_at+1 every frame keeps k_f windows (9 patch slots each). A batch row's frames are packed
# whole, first-fit-decreasing, into a static number of packed rows R of
# W windows (W*9 slots) each; attention inside a row is block-diagonal by frame, so every kept token sees
# exactly the kept tokens of its own frame, as in `masked` execution, on ~R/F of the rows:
#
#     frames (kept windows)          rows (W = 81 windows each, R static)
#     f0 |#########81#########|      r0 |f0 ################# 81 |
#     f1 |####40####|                r1 |f3 ####50#####|f2 ##31##|
#     f2 |###31###|          FFD     r2 |f1 ####40####|f4 ##38##|.|
#     f3 |#####50#####|     ----->   ...
#     f4 |###38###|                  (unfilled slots masked; rows never split a frame)
#
# R = ceil((1 + pack_slack) * kept windows of a batch row / W), a Python int. When some batch row's keep
# pattern does not fit into R rows (possible: e.g. most frames keeping 41 of 81 windows), the whole batch
# takes the exact `masked` branch of a lax.cond instead, so no keep pattern ever loses a token.


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where every kept window goes: arrays describing, per batch row, R packed rows of W windows (shapes static)."""

    source_window: jax.Array  # [B, R, W] window index in its batch row (frame*W + w) filling each slot, -1 = empty
    overflow: jax.Array  # [B] bool: the row's pattern did not fit into R packed rows (take the masked branch)


jax.tree_util.register_dataclass(PackPlan, data_fields=["source_window", "overflow"], meta_fields=[])


def packed_row_budget(num_kept_windows: int, windows_per_frame: int, slack: float) -> int:
    """Returns the static packed-row budget R = ceil((1 + slack) * kept windows / W) of one batch row, at least 1."""
    return max(1, math.ceil((1.0 + slack) * num_kept_windows / windows_per_frame))


def _plan_row(keep: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    f, w = keep.shape
    counts = keep.sum(-1).astype(jnp.int32)  # [F]
    order = jnp.argsort(-counts, stable=True)  # largest frames first

    def place(fill, frame):
        k = counts[frame]
        fits = fill + k <= w
        row = jnp.argmax(fits)  # first row with room
        ok = fits[row] | (k == 0)
        offset = fill[row]
        fill = fill.at[row].add(jnp.where(ok, k, 0))
        return fill, (jnp.where(ok, row, -1), offset, ~ok)

    _, (row_sorted, offset_sorted, failed) = jax.lax.scan(place, jnp.zeros((num_rows,), jnp.int32), order)
    row = jnp.zeros((f,), jnp.int32).at[order].set(row_sorted)
    offset = jnp.zeros((f,), jnp.int32).at[order].set(offset_sorted)
    rank = jnp.cumsum(keep, axis=1) - 1  # [F, W] rank of each kept window within its frame
    slot = row[:, None] * w + offset[:, None] + rank  # [F, W]
    slot = jnp.where(keep & (row[:, None] >= 0), slot, num_rows * w)  # dropped -> out of range
    flat_index = jnp.arange(f * w, dtype=jnp.int32).reshape(f, w)
    source = jnp.full((num_rows * w,), -1, jnp.int32).at[slot.reshape(-1)].set(flat_index.reshape(-1), mode="drop")
    return source.reshape(num_rows, w), failed.any()


def plan_packing(keep: jax.Array, num_rows: int) -> PackPlan:
    """Returns, per batch row, the first-fit-decreasing placement of whole frames (k_f kept windows each) of
    keep [B, F, W] into `num_rows` packed rows of W windows."""
    source, overflow = jax.vmap(lambda k: _plan_row(k, num_rows))(keep)
    return PackPlan(source, overflow)


def _slot_patches(plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (frame [B, R, W*S], patch [B, R, W*S], valid [B, R, W*S]) of every packed token slot."""
    b, r, w = plan.source_window.shape
    ids = jnp.asarray(window_patch_ids(grid, pool))  # [W, S]
    src = plan.source_window
    frame = jnp.where(src >= 0, src // w, -1)
    patch = ids[jnp.maximum(src, 0) % w]  # [B, R, W, S]
    valid = (src >= 0)[..., None] & (patch >= 0)
    frame = jnp.broadcast_to(frame[..., None], patch.shape)
    return frame.reshape(b, r, -1), jnp.maximum(patch, 0).reshape(b, r, -1), valid.reshape(b, r, -1)


def pack_tokens(x: jax.Array, plan: PackPlan, grid: int, pool: int) -> tuple[jax.Array, jax.Array]:
    """Returns (packed tokens [B, R, W*S, D], attention mask [B, R, W*S, W*S]: same frame, valid keys) of x [B, F, N, D]."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    rows = jnp.arange(x.shape[0])[:, None, None]
    packed = x[rows, jnp.maximum(frame, 0), patch] * valid[..., None].astype(x.dtype)
    segment = jnp.where(valid, frame, -1)
    mask = (segment[..., :, None] == segment[..., None, :]) & valid[..., None, :]
    return packed, mask


def unpack_tokens(packed: jax.Array, plan: PackPlan, num_frames: int, grid: int, pool: int) -> jax.Array:
    """Returns [B, F, N, D]: packed tokens [B, R, W*S, D] scattered back to their frame/patch, zeros at pruned positions."""
    frame, patch, valid = _slot_patches(plan, grid, pool)
    b = packed.shape[0]
    out = jnp.zeros((b, num_frames, grid * grid, packed.shape[-1]), packed.dtype)
    frame = jnp.where(valid, frame, num_frames)  # invalid slots -> dropped
    rows = jnp.arange(b)[:, None, None]
    return out.at[rows, frame, patch].set(packed, mode="drop")
