"""Vision geometry: the one source of every count that decides a shape (numpy only; imports nothing of ours).

Frames are cut into grid x grid patches (27 x 27 at 378 px / patch 14); patches are grouped into pooling
windows of pool x pool (3 x 3 for video), the grid padded with -1 slots up to a multiple of the pool size
(Molmo2's layout). One window becomes one LLM token, so W = windows per frame = LLM tokens per frame.

A row of the batch holds frame *slots* in a static `FrameLayout`: groups ("video", T) / ("image", 1). STTS
prunes K(T) windows per video (`prune_count`), so each video contributes exactly W*T - K tokens: the host
reserves that many placeholders (`placeholders_per_frame`) and the model produces that many tokens.
Data, model, estimate and benchmarks all take these numbers from here.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np


# ------------------------------------------------------------------------------------------ per frame

def grid_size(cfg) -> int:
    """Returns patches per side of a frame (27 at 378 px / patch 14) for a model config."""
    return cfg.vit.image_size // cfg.vit.patch_size


def patches_per_frame(cfg) -> int:
    """Returns N = grid * grid."""
    return grid_size(cfg) ** 2


def patch_dim(cfg) -> int:
    """Returns P*P*3, the length of one flattened patch."""
    return cfg.vit.patch_size ** 2 * cfg.vit.get("num_channels", 3)


def windows_per_side(cfg) -> int:
    """Returns pooling windows per side of a frame (grid padded up to a multiple of the pool size)."""
    return -(-grid_size(cfg) // cfg.adapter.pool_size)


def tokens_per_frame(cfg) -> int:
    """Returns W, the pooling windows (= LLM tokens) per frame (81 at Molmo2 shapes)."""
    return windows_per_side(cfg) ** 2


def window_patch_ids(grid: int, pool: int) -> np.ndarray:
    """Returns int64 [W, pool*pool] patch ids of one frame's pooling windows (-1 = padding slot).

    The grid of patch ids is padded with -1 up to a multiple of `pool` (floor(pad/2) rows/cols before,
    the rest after), cut into pool x pool windows row-major, row-major inside each window (Molmo2's layout).
    """
    ids = np.arange(grid * grid, dtype=np.int64).reshape(grid, grid)
    pad = (-grid) % pool
    before, after = pad // 2, pad - pad // 2
    ids = np.pad(ids, ((before, after), (before, after)), constant_values=-1)
    side = ids.shape[0] // pool
    return ids.reshape(side, pool, side, pool).transpose(0, 2, 1, 3).reshape(side * side, pool * pool)


def video_pooling_indices(num_frames: int, grid: int, pool: int, offset: int = 0) -> np.ndarray:
    """Returns int64 [num_frames * W, pool*pool] flat indices into a [num_frames * grid*grid] patch list
    (+ offset patches), -1 = padding slot."""
    per_frame = window_patch_ids(grid, pool)
    offsets = (offset + np.arange(num_frames, dtype=np.int64) * grid * grid)[:, None, None]
    return np.where(per_frame[None] >= 0, per_frame[None] + offsets, -1).reshape(-1, pool * pool)


def patch_window_index(grid: int, pool: int) -> np.ndarray:
    """Returns int64 [grid*grid]: the window each patch belongs to."""
    ids = window_patch_ids(grid, pool)
    index = np.zeros(grid * grid, np.int64)
    for window, row in enumerate(ids):
        index[row[row >= 0]] = window
    return index


def window_sum_matrix(grid: int, pool: int) -> np.ndarray:
    """Returns float32 [N, W] 0/1: patch n belongs to window w (padding slots belong to nothing)."""
    out = np.zeros((grid * grid, window_patch_ids(grid, pool).shape[0]), np.float32)
    out[np.arange(grid * grid), patch_window_index(grid, pool)] = 1.0
    return out


# -------------------------------------------------------------------------------------- per row layout

@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """Static frame slots of ONE batch row: ("video", T) / ("image", 1) groups in order. Hashable.

    Every row of a batch has the same layout; which slots are filled is data (`frame_mask`).
    """

    groups: tuple[tuple[str, int], ...]

    def __post_init__(self):
        for kind, count in self.groups:
            if kind not in ("video", "image") or not isinstance(count, int) or count < 1:
                raise ValueError(f"FrameLayout group {(kind, count)!r}: need ('video', T>=1) or ('image', n>=1)")

    @staticmethod
    def videos(*frames_per_video: int) -> "FrameLayout":
        """Returns a layout of videos only."""
        return FrameLayout(tuple(("video", int(t)) for t in frames_per_video))

    @staticmethod
    def video_slots(videos_per_row: int, num_frames: int) -> "FrameLayout":
        """Returns the layout of `videos_per_row` video slots of `num_frames` frames (the input pipeline's rows)."""
        return FrameLayout.videos(*([num_frames] * videos_per_row))

    @property
    def num_frames(self) -> int:
        """Returns F, the frame slots of a row."""
        return sum(count for _, count in self.groups)

    def spans(self) -> list[tuple[str, int, int]]:
        """Returns [(kind, first frame in the row, num frames)] per group."""
        out, start = [], 0
        for kind, count in self.groups:
            out.append((kind, start, count))
            start += count
        return out


def protected_frames(num_frames: int, prune_from_frame: int) -> int:
    """Returns how many leading frames of a video are never pruned (the first always, more with prune_from_frame)."""
    return min(num_frames, max(1, prune_from_frame))


def prune_count(num_frames: int, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> int:
    """Returns K = floor(W * ratio * (T - prune_from_frame)) exactly, capped so protected frames stay whole."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {ratio}")
    exact = Fraction(windows_per_frame) * Fraction(str(ratio)) * (num_frames - prune_from_frame)
    k = max(0, math.floor(exact))
    return min(k, windows_per_frame * (num_frames - protected_frames(num_frames, prune_from_frame)))


def video_prune_counts(layout: FrameLayout, windows_per_frame: int, ratio: float,
                       prune_from_frame: int = 0) -> list[int]:
    """Returns K per group (0 for images)."""
    return [prune_count(count, windows_per_frame, ratio, prune_from_frame) if kind == "video" else 0
            for kind, count in layout.groups]


def kept_tokens(layout: FrameLayout, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> int:
    """Returns the static number of LLM vision tokens of a full row: sum over groups of W*T - K."""
    counts = video_prune_counts(layout, windows_per_frame, ratio, prune_from_frame)
    return sum(windows_per_frame * n for _, n in layout.groups) - sum(counts)


def group_tokens(layout: FrameLayout, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> list[int]:
    """Returns the vision tokens of each group (W*T - K), in order."""
    counts = video_prune_counts(layout, windows_per_frame, ratio, prune_from_frame)
    return [windows_per_frame * n - k for (_, n), k in zip(layout.groups, counts)]


def placeholder_counts(num_frames: int, windows_per_frame: int, ratio: float, prune_from_frame: int = 0) -> list[int]:
    """Returns host-side placeholders per frame summing to W*T - K (protected frames whole, the rest even).

    Only the total matters: the model regroups placeholders to the real per-frame keep counts.
    """
    k = prune_count(num_frames, windows_per_frame, ratio, prune_from_frame)
    prot = protected_frames(num_frames, prune_from_frame)
    rest = num_frames - prot
    share, extra = divmod(windows_per_frame * rest - k, rest) if rest else (0, 0)
    return [windows_per_frame] * prot + [share + (1 if i < extra else 0) for i in range(rest)]


def pruning_on(model_cfg) -> bool:
    """Returns whether the model config prunes at all (method scorer/random with a ratio > 0)."""
    st = model_cfg.stts
    return st.method != "none" and st.prune_ratio > 0


def placeholders_per_frame(model_cfg, num_frames: int) -> list[int]:
    """Returns placeholders a host reserves per frame of a video: W each unpruned, W*T - K in total with STTS."""
    w = tokens_per_frame(model_cfg)
    if not pruning_on(model_cfg):
        return [w] * num_frames
    st = model_cfg.stts
    return placeholder_counts(num_frames, w, st.prune_ratio, st.prune_from_frame)


def vision_tokens_per_video(model_cfg, num_frames: int) -> int:
    """Returns the LLM vision tokens of one video of `num_frames` frames under the model config."""
    return sum(placeholders_per_frame(model_cfg, num_frames))


def row_vision_tokens(model_cfg, layout: FrameLayout) -> int:
    """Returns the vision tokens of a full row (every slot filled) under the model config."""
    w = tokens_per_frame(model_cfg)
    if not pruning_on(model_cfg):
        return w * layout.num_frames
    st = model_cfg.stts
    return kept_tokens(layout, w, st.prune_ratio, st.prune_from_frame)
