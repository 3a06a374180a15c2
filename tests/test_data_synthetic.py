"""The synthetic video-QA benchmark: deterministic h264 clips, questions whose answers the pixels confirm,
mostly redundant windows, and the make_synthetic.py / prepare_data.py entry points."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stts_jax.data.processor import normalize_pixels, preprocess_frames
from stts_jax.data.synthetic import COLOURS, QUESTION_KINDS, ClipSpec, make_clip, window_redundancy, write_mp4
from stts_jax.data.video import decode_clip, decode_frames


def test_clips_are_deterministic(tmp_path):
    a, qa, _ = make_clip(5)
    b, qb, _ = make_clip(5)
    c, _, _ = make_clip(6)
    assert np.array_equal(a, b) and qa == qb and not np.array_equal(a, c)
    pa = write_mp4(str(tmp_path / "a.mp4"), a, codec="libx264")
    pb = write_mp4(str(tmp_path / "b.mp4"), b, codec="libx264")
    assert open(pa, "rb").read() == open(pb, "rb").read()  # same mp4 bytes
    frames, fps = decode_frames(pa)
    assert frames.shape == (64, 128, 128, 3) and fps == 8.0


def _colour_mask(frames, name, tol=40):
    return (np.abs(frames.astype(int) - np.asarray(COLOURS[name])).max(-1) < tol)


@pytest.mark.parametrize("seed", range(6))
def test_answers_follow_from_the_pixels(seed, tmp_path):
    """Decode the h264 clip and recover each answer from colours alone (an independent check of the generator)."""
    frames, questions, scene = make_clip(seed)
    frames, _ = decode_frames(write_mp4(str(tmp_path / "c.mp4"), frames, codec="libx264"))
    assert [q.kind for q in questions] == list(QUESTION_KINDS)
    answers = {q.kind: q.answer for q in questions}
    assert all(len(q.options) >= 2 and 0 <= q.answer_index < len(q.options) for q in questions)

    mover = _colour_mask(frames, scene["mover"].split()[0])
    dy = np.nonzero(mover[-1])[0].mean() - np.nonzero(mover[0])[0].mean()
    dx = np.nonzero(mover[-1])[1].mean() - np.nonzero(mover[0])[1].mean()
    direction = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
    assert answers["direction"] == direction and answers["which_moved"] == scene["mover"]

    visible = _colour_mask(frames, scene["flasher"].split()[0]).sum((1, 2)) > 20
    flashes = int(np.sum(np.diff(visible.astype(int)) == 1) + visible[0])
    assert answers["flash_count"] == str(flashes)

    appear = int(np.argmax(_colour_mask(frames, scene["appearer"].split()[0]).sum((1, 2)) > 20))
    first_flash = int(np.argmax(visible))
    assert answers["appeared_last"] == (scene["appearer"] if appear > first_flash else scene["flasher"])
    assert abs(appear - first_flash) >= 2 * ClipSpec().event_frames


def test_most_windows_are_temporally_redundant(tmp_path):
    """Fraction of 3x3 windows (raw normalised pixels of the 9 patches the ViT sees) whose cosine similarity with
    the same window of the previous sampled frame exceeds 0.95, at 16 sampled frames."""
    fractions = {126: [], 378: []}
    for seed in range(4):
        frames, _, _ = make_clip(seed)
        clip = decode_clip(write_mp4(str(tmp_path / f"{seed}.mp4"), frames, codec="libx264"), 16)
        assert len(np.unique(clip.indices)) == 16  # 8 s at 8 fps: 16 distinct frames, no repeats
        for size in fractions:
            pixels = normalize_pixels(preprocess_frames(clip.frames, size, 14))
            fractions[size].append(window_redundancy(pixels, size // 14, 3))
    means = {size: float(np.mean(v)) for size, v in fractions.items()}
    print(f"\nredundant windows (cos > 0.95): tiny 126 px {means[126]:.1%}, Molmo2 378 px {means[378]:.1%}")
    assert means[126] > 0.75 and means[378] > 0.9


def test_make_synthetic_and_prepare_data_scripts(tmp_path):
    out = tmp_path / "synth"
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    made = run("launch/make_synthetic.py", f"--out={out}", "--num_clips=3", "--validation_clips=1")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "clips: 100%" in made.stderr  # tqdm progress bar (rate and ETA)
    lines = [json.loads(x) for x in open(out / "train.jsonl")]
    assert len(lines) == 12 and {x["kind"] for x in lines} == set(QUESTION_KINDS)
    assert os.path.exists(out / "tokenizer.json") and len(os.listdir(out / "videos")) == 4
    prepared = run("launch/prepare_data.py", f"--manual_dir={out}", f"--data_dir={tmp_path / 'tfds'}")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "{'train': 12, 'validation': 4}" in prepared.stdout and "skipped 0 examples" in prepared.stdout
