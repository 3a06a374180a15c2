"""Decode videos with PyAV and sample frames."""

from __future__ import annotations

import numpy as np


class VideoDecodeError(ValueError):
    """A video file cannot be decoded; the message names the file."""


def decode_frames(path: str, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Returns (frames uint8 [T, H, W, 3], fps) of every decoded frame (or the first `max_frames`)."""
    import av

    frames = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise VideoDecodeError(f"{path}: cannot decode video ({e})") from None
    if not frames:
        raise VideoDecodeError(f"{path}: no video frames decoded")
    return np.stack(frames), fps


def uniform_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Returns `num_frames` indices spread evenly over [0, total-1], first and last included."""
    if total <= 0 or num_frames <= 0:
        raise ValueError(f"need total > 0 and num_frames > 0, got total={total}, num_frames={num_frames}")
    return np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)
