"""Synthetic videos encoded as real mp4 files (PyAV), for demos and tests that must not download."""

from __future__ import annotations

import numpy as np


def moving_square_frames(num_frames: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Returns uint8 [T, size, size, 3]: a coloured square moving across a textured background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = rng.integers(120, 256, size=3, dtype=np.uint8)
    side = size // 5
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        x = int((size - side) * t / max(num_frames - 1, 1))
        y = (size - side) // 2
        frames[t, y: y + side, x: x + side] = colour
    return frames


def write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> str:
    """Encodes uint8 [T, H, W, 3] frames (H, W even) as an MPEG-4 mp4 at `path`; returns the path."""
    import av

    t, h, w, _ = frames.shape
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
