"""Parity with transformers' Molmo2: tiny random config -> save_pretrained -> our importer -> our model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oracle import hf_logits, tiny_hf_model, video_example
from stts_jax.data.processor import patchify, resize_frames
from stts_jax.data.video import decode_frames, uniform_frame_indices
from stts_jax.interop.hf_import import load_molmo2

TOL = 1e-4


def hf_pooling(frames_per_video, grid=9, pool=3):
    """Molmo2's video_token_pooling for grids divisible by the pool, built here from the published layout."""
    rows = []
    offset = 0
    for t in frames_per_video:
        for f in range(t):
            for wr in range(grid // pool):
                for wc in range(grid // pool):
                    rows.append([offset + f * grid * grid + (wr * pool + dy) * grid + wc * pool + dx
                                 for dy in range(pool) for dx in range(pool)])
        offset += t * grid * grid
    return np.array(rows, np.int64)


@pytest.fixture(scope="module")
def frames(bikes_mp4):
    video, _ = decode_frames(bikes_mp4, max_frames=60)
    picked = video[uniform_frame_indices(len(video), 6)]
    return patchify(resize_frames(picked, 126), 14)  # [6, 81, 588]


def make_batch(frames, frames_per_video, question_lens, seed=0):
    """Returns (our batch-major batch, transformers' inputs) for one example (row) per video.

    Ours: row i holds example i's frames in its first slots (pixel_values [B, F, N, P], F = the longest
    video), frame_mask marks the real ones. Transformers: its own flat frame list (the videos in order),
    `hf_pooling` windows and grids.
    """
    rng = np.random.default_rng(seed)
    examples = [video_example(rng, t, 9, q) for t, q in zip(frames_per_video, question_lens)]
    length = max(len(e) for e in examples) + 3
    ids = np.zeros((len(examples), length), np.int32)
    seg = np.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = e
        seg[i, : len(e)] = 1
    total = sum(frames_per_video)
    flat = frames[:total].astype(np.float32)  # [total, N, P]: example 0's frames, then example 1's, ...
    pixels = np.zeros((len(examples), max(frames_per_video), *flat.shape[1:]), np.float32)
    mask = np.zeros(pixels.shape[:2], np.int32)
    starts = np.cumsum([0] + list(frames_per_video))
    for i, t in enumerate(frames_per_video):
        pixels[i, :t] = flat[starts[i]: starts[i] + t]
        mask[i, :t] = 1
    positions = np.broadcast_to(np.arange(length), ids.shape).astype(np.int32)
    batch = dict(input_ids=ids, segment_ids=seg, positions=positions, pixel_values=pixels, frame_mask=mask)
    grids = np.array([[t, 3, 3] for t in frames_per_video])
    hf = dict(pixel_values=flat, pooling=hf_pooling(frames_per_video), grids=grids)
    return batch, hf


def compare(model_hf, ours, batch, hf):
    ref, ref_hidden = hf_logits(model_hf, batch["input_ids"], batch["segment_ids"], hf["pixel_values"],
                                hf["pooling"], hf["grids"])
    with jax.default_matmul_precision("highest"):
        got = np.asarray(nnx.jit(lambda m, b: m(b))(ours, {k: jnp.asarray(v) for k, v in batch.items()}))
        hidden = [np.asarray(h) for h in ours.vit_hidden_states(jnp.asarray(batch["pixel_values"]))]  # [B, F, N, D]
    valid = batch["segment_ids"] > 0
    err = np.abs(got[valid] - ref[valid]).max()
    assert err <= TOL, f"logits differ from transformers by {err}"
    assert np.abs(ref[valid]).max() > 1.0, "oracle logits are too small to prove anything"
    real = batch["frame_mask"].astype(bool)
    for layer in ours.feature_layers:
        assert hidden[layer].shape[:2] == real.shape
        herr = np.abs(hidden[layer][real] - ref_hidden[layer + 1]).max()  # real frames, row by row = HF's order
        assert herr <= TOL, f"ViT block {layer} output differs by {herr}"
    print(f"max |logits diff| = {err:.2e}, max |logit| = {np.abs(ref[valid]).max():.2f}")
    return err


@pytest.mark.parametrize("layout", ["native", "released"])
def test_logits_match_transformers(tmp_path, frames, layout):
    hf = tiny_hf_model(seed=1)
    hf.save_pretrained(tmp_path, **({"save_original_format": False} if layout == "native" else {}))
    ours, report = load_molmo2(str(tmp_path))
    assert report.layout == layout and report.fresh == []
    # one video of 4 frames
    batch, inputs = make_batch(frames, [4], [7])
    compare(hf, ours, batch, inputs)
    # two examples of different lengths (and different frame counts: row 1's last 2 slots empty), right-padded
    batch, inputs = make_batch(frames, [4, 2], [5, 11], seed=3)
    assert batch["frame_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    compare(hf, ours, batch, inputs)


def test_scaled_rope_on_some_layers(tmp_path, frames):
    hf = tiny_hf_model(seed=2, rope_type="linear", rope_scaling_layers=[1], vision_layers=(2, 0))
    hf.save_pretrained(tmp_path, save_original_format=False)
    ours, _ = load_molmo2(str(tmp_path))
    assert tuple(ours.cfg.llm.rope_scaling_layers) == (1,) and ours.cfg.llm.rope_type == "linear"
    batch, inputs = make_batch(frames, [3], [6])
    compare(hf, ours, batch, inputs)
