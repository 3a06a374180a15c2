"""Synthetic videos encoded as real mp4 files (PyAV), and a synthetic video-QA benchmark.

The benchmark (`make_clip`) draws, over a static textured background, three objects with distinct colours and
shapes, each with one temporal role:

  mover     slides in one direction (left/right/up/down) during part of the clip
  flasher   stays in place and is visible only during 1-4 flashes
  appearer  appears at some moment and stays

and asks multiple-choice questions that need temporal information (`QUESTION_KINDS`): which direction the
mover moves, which object moves, how many times the flasher flashes, which of two objects appears last.
Every event (a flash, a gap, an appearance) lasts at least `event_frames` frames, so a sampler that takes a
frame at least every `event_frames` frames sees all of them (the default: 64 frames at 8 fps, sampled to 16
frames by Molmo2 at 2 fps).
Most 3x3 windows never change (static background), so a good temporal scorer can drop half of the vision
tokens and a random one cannot: `window_redundancy` measures it.

Clips are deterministic: the same seed gives the same frames and the same mp4 bytes (libx264, one thread).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (225, 40, 40),
    "green": (40, 200, 70),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "purple": (165, 60, 205),
}
DIRECTIONS = ("left", "right", "up", "down")
QUESTION_KINDS = ("direction", "which_moved", "flash_count", "appeared_last")
QUESTION_TEXT = {
    "direction": "Which direction does the {mover} move?",
    "which_moved": "Which object moves during the video?",
    "flash_count": "How many times does the {flasher} flash?",
    "appeared_last": "Which object appears later, the {a} or the {b}?",
}


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


def write_mp4(path: str, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4", crf: int = 18) -> str:
    """Encodes uint8 [T, H, W, 3] frames (H, W even) as an mp4 at `path` (moov atom first); returns the path.

    codec "mpeg4" (quality 2) or "libx264" (crf, one thread, so the bytes are deterministic).
    """
    import av

    t, h, w, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        if codec == "libx264":
            options = {"crf": str(crf), "threads": "1", "preset": "medium"}
            stream = container.add_stream("libx264", rate=fps, options=options)
        else:
            stream = container.add_stream(codec, rate=fps)
            stream.options = {"qscale": "2"}
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------- benchmark

@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Shape of the benchmark clips."""

    size: int = 128  # square frames, even
    num_frames: int = 64
    fps: int = 8
    event_frames: int = 5  # shortest flash / gap / time between appearances, in frames
    object_radius: int = 7
    shuffle_options: bool = True  # False: options in a fixed order (directions, counts 1-4, ...): an easier task


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question about a clip."""

    kind: str
    question: str
    options: tuple[str, ...]
    answer_index: int

    @property
    def answer(self) -> str:
        """Returns the correct option's text."""
        return self.options[self.answer_index]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Returns a static uint8 [size, size, 3] background: smooth colour blobs plus a faint fixed grain."""
    coarse = rng.uniform(50, 140, size=(5, 5, 3))
    idx = np.linspace(0, 4, size)
    lo, frac = np.floor(idx).astype(int), idx - np.floor(idx)
    hi = np.minimum(lo + 1, 4)
    rows = coarse[lo] * (1 - frac)[:, None, None] + coarse[hi] * frac[:, None, None]
    smooth = rows[:, lo] * (1 - frac)[None, :, None] + rows[:, hi] * frac[None, :, None]
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 12 * np.sin(2 * np.pi * (xx * rng.uniform(0.02, 0.06) + yy * rng.uniform(0.02, 0.06)))[..., None]
    grain = rng.normal(0, 4, size=(size, size, 1))
    return np.clip(smooth + stripes + grain, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def _boxes_overlap(a, b, margin):
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def make_clip(seed: int, spec: ClipSpec = ClipSpec()) -> tuple[np.ndarray, list[Question], dict]:
    """Returns (frames uint8 [T, S, S, 3], one Question per kind, the scene description) for `seed`."""
    rng = np.random.default_rng(seed)
    s, t, r = spec.size, spec.num_frames, spec.object_radius
    e = max(1, min(spec.event_frames, t // 8))  # short clips get shorter events
    background = _texture(rng, s)
    colours = rng.choice(list(COLOURS), size=4, replace=False)
    shapes = rng.choice(SHAPES, size=4, replace=True)
    names = [f"{c} {sh}" for c, sh in zip(colours, shapes)]  # 3 in the clip + 1 distractor for options
    mover, flasher, appearer, absent = names

    direction = DIRECTIONS[rng.integers(4)]
    travel = int(s * 0.45)
    step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    pad = r + 2
    while True:  # place the three objects so that none overlaps another (or the mover's path)
        start = rng.integers(pad, s - pad, size=2).astype(float)
        end = start + travel * np.asarray(step, float)
        if not (pad <= end[0] <= s - pad and pad <= end[1] <= s - pad):
            continue
        lo, hi = np.minimum(start, end), np.maximum(start, end)
        path = (lo[0] - r, lo[1] - r, hi[0] + r, hi[1] + r)
        others = [rng.integers(pad, s - pad, size=2).astype(float) for _ in range(2)]
        boxes = [(y - r, x - r, y + r, x + r) for y, x in others]
        pairs = [(path, boxes[0]), (path, boxes[1]), (boxes[0], boxes[1])]
        if not any(_boxes_overlap(a, b, 4) for a, b in pairs):
            break
    move_start = int(rng.integers(0, t // 4))
    move_end = int(rng.integers(3 * t // 4, t))

    # flashes: k flashes of e frames, separated by gaps of >= e frames, inside [e, t - e)
    max_flashes = max(1, min(4, ((t - 2 * e) // e + 1) // 2))
    num_flashes = int(rng.integers(1, max_flashes + 1))
    extra = (t - 2 * e) - (2 * num_flashes - 1) * e
    spare = rng.multinomial(extra, [1.0 / (num_flashes + 1)] * (num_flashes + 1))
    flash_on = np.zeros(t, bool)
    first = e + int(spare[0])
    for j in range(num_flashes):
        flash_on[first: first + e] = True
        first += 2 * e + int(spare[j + 1])
    first_flash = int(np.argmax(flash_on))
    # the appearer shows up at least 2e frames before or after the first flash (the order is unambiguous)
    candidates = [a for a in range(e, t - e) if abs(a - first_flash) >= 2 * e] or [t - 1]
    appear_at = int(rng.choice(candidates))

    frames = np.repeat(background[None], t, axis=0)
    masks = {name: None for name in names[:3]}
    masks[flasher] = _shape_mask(shapes[1], s, others[0][0], others[0][1], r)
    masks[appearer] = _shape_mask(shapes[2], s, others[1][0], others[1][1], r)
    for i in range(t):
        if flash_on[i]:
            frames[i][masks[flasher]] = COLOURS[colours[1]]
        if i >= appear_at:
            frames[i][masks[appearer]] = COLOURS[colours[2]]
        progress = np.clip((i - move_start) / max(move_end - move_start, 1), 0.0, 1.0)
        cy, cx = np.round(start + (end - start) * progress)
        frames[i][_shape_mask(shapes[0], s, cy, cx, r)] = COLOURS[colours[0]]

    def mc(kind, text, options, answer):
        if spec.shuffle_options:
            order = rng.permutation(len(options))
            options = [options[j] for j in order]
        return Question(kind, text, tuple(options), options.index(answer))

    later = appearer if appear_at > first_flash else flasher
    pair = [flasher, appearer] if rng.integers(2) else [appearer, flasher]
    questions = [
        mc("direction", QUESTION_TEXT["direction"].format(mover=mover), list(DIRECTIONS), direction),
        mc("which_moved", QUESTION_TEXT["which_moved"], [mover, flasher, appearer, absent], mover),
        mc("flash_count", QUESTION_TEXT["flash_count"].format(flasher=flasher), ["1", "2", "3", "4"], str(num_flashes)),
        mc("appeared_last", QUESTION_TEXT["appeared_last"].format(a=pair[0], b=pair[1]), pair, later),
    ]
    scene = dict(mover=mover, direction=direction, move=[move_start, move_end], flasher=flasher,
                 flashes=num_flashes, first_flash=first_flash, appearer=appearer, appear_at=appear_at)
    return frames, questions, scene


FLASH_COLOURS = ("red", "green", "blue", "yellow")  # the options of "flash_colour"
DISTRACTOR_COLOURS = ("purple", "white")
QUESTION_TEXT["flash_colour"] = "What colour is the object that flashes?"


def make_flash_clip(seed: int, spec: ClipSpec = ClipSpec()) -> tuple[np.ndarray, list[Question], dict]:
    """Returns (frames, [the "flash_colour" Question], scene) of a transient-event clip for `seed`.

    Over a static textured background, two static distractors (purple and white, present in every frame) and
    one object of an option colour (red / green / blue / yellow) that is visible only during one flash of
    `event_frames` frames. The answer is seen in a few frames and one 3x3 window: a sampler that takes a
    frame at least every `event_frames` frames sees it, and a pruner that drops that window misses it. A
    temporal scorer keeps it (it is the only change), a random one keeps it with probability 1 - ratio.
    """
    rng = np.random.default_rng(seed)
    s, t, r = spec.size, spec.num_frames, spec.object_radius
    e = max(1, min(spec.event_frames, t // 4))
    background = _texture(rng, s)
    colour = FLASH_COLOURS[int(rng.integers(len(FLASH_COLOURS)))]
    shapes = rng.choice(SHAPES, size=3, replace=True)
    pad = r + 2
    while True:  # three non-overlapping objects
        centres = [rng.integers(pad, s - pad, size=2).astype(float) for _ in range(3)]
        boxes = [(y - r, x - r, y + r, x + r) for y, x in centres]
        if not any(_boxes_overlap(boxes[i], boxes[j], 4) for i in range(3) for j in range(i + 1, 3)):
            break
    start = int(rng.integers(e, t - e))
    frames = np.repeat(background[None], t, axis=0)
    for (cy, cx), shape, name in zip(centres[1:], shapes[1:], DISTRACTOR_COLOURS):
        frames[:, _shape_mask(shape, s, cy, cx, r)] = COLOURS[name]
    frames[start: start + e, _shape_mask(shapes[0], s, centres[0][0], centres[0][1], r)] = COLOURS[colour]
    options = list(FLASH_COLOURS)
    if spec.shuffle_options:
        options = [options[j] for j in rng.permutation(len(options))]
    question = Question("flash_colour", QUESTION_TEXT["flash_colour"], tuple(options), options.index(colour))
    scene = dict(flasher=f"{colour} {shapes[0]}", flash=[start, start + e], centre=[float(v) for v in centres[0]],
                 distractors=[f"{c} {sh}" for c, sh in zip(DISTRACTOR_COLOURS, shapes[1:])])
    return frames, [question], scene


def benchmark_words() -> list[str]:
    """Returns every word / punctuation run the benchmark's questions and answers can contain."""
    from stts_jax.data.processor import MC_INSTRUCTION, OPTION_LETTERS
    from stts_jax.data.tokenizer import words_of

    texts = list(QUESTION_TEXT.values()) + list(COLOURS) + list(SHAPES) + list(DIRECTIONS)
    texts += [MC_INSTRUCTION, " ".join(OPTION_LETTERS[:4]), "0 1 2 3 4 5 6 7 8 9 . user assistant"]
    return [w for w in words_of(texts) if "{" not in w and "}" not in w]


def write_clip(out_dir: str, index: int, seed: int, spec: ClipSpec = ClipSpec(),
               kinds: Sequence[str] = QUESTION_KINDS) -> list[dict]:
    """Writes videos/clip_{index:06d}.mp4 under out_dir; returns its JSONL records (one per question kind).

    kinds ("flash_colour",) writes a transient-event clip (`make_flash_clip`), any other kinds a `make_clip` one.
    """
    if "flash_colour" in kinds and len(kinds) > 1:
        raise ValueError("kind 'flash_colour' has clips of its own: ask it alone")
    frames, questions, scene = (make_flash_clip if "flash_colour" in kinds else make_clip)(seed, spec)
    rel = os.path.join("videos", f"clip_{index:06d}.mp4")
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    write_mp4(os.path.join(out_dir, rel), frames, fps=spec.fps, codec="libx264")
    return [dict(id=f"clip_{index:06d}_{q.kind}", video=rel, question=q.question, options=list(q.options),
                 answer_index=q.answer_index, answer=q.answer, kind=q.kind, scene=scene)
            for q in questions if q.kind in kinds]


def write_jsonl(path: str, records: Sequence[dict]) -> str:
    """Writes one JSON object per line; returns the path."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def window_redundancy(pixels: np.ndarray, grid: int, pool: int, threshold: float = 0.95) -> float:
    """Returns the fraction of (frame >= 1, window) pairs whose window is nearly unchanged from the previous frame.

    pixels [T, grid*grid, P] are the normalised patches the ViT sees (`patchify` output, [-1, 1]); a window's
    vector is its pool x pool patches concatenated (padding slots zero); "unchanged" = cosine similarity with
    the same window of the previous frame > threshold.
    """
    from stts_jax.geometry import window_patch_ids

    ids = window_patch_ids(grid, pool)  # [W, pool*pool]
    x = np.asarray(pixels, np.float64)
    win = np.where(ids[None, :, :, None] >= 0, x[:, np.maximum(ids, 0)], 0.0).reshape(x.shape[0], ids.shape[0], -1)
    a, b = win[:-1], win[1:]
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return float((cos > threshold).mean())


def write_benchmark(out_dir: str, num_clips: int, spec: ClipSpec = ClipSpec(), *, seed: int = 0,
                    validation_clips: int = 0, tokens=None, workers: int = 1, progress: bool = False,
                    kinds: Sequence[str] = QUESTION_KINDS) -> dict:
    """Writes clips, train.jsonl (+ validation.jsonl) and tokenizer.json under out_dir (a `video_qa` manual dir).

    Clip i uses seed * 1_000_003 + i; `kinds` picks the question kinds asked of every clip. `tokens` are the model config's special-token ids for the word-level
    tokenizer (default: the tiny config's). Returns {"train": records, "validation": records}.
    """
    import multiprocessing

    from stts_jax.data.tokenizer import build_word_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    total = num_clips + validation_clips
    unknown = sorted(set(kinds) - set(QUESTION_KINDS) - {"flash_colour"})
    if unknown or not kinds:
        raise ValueError(f"question kinds {unknown or list(kinds)} are not among {QUESTION_KINDS + ('flash_colour',)}")
    jobs = [(out_dir, i, seed * 1_000_003 + i, spec, tuple(kinds)) for i in range(total)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="clips", unit="clip")  # rate and ETA
    results = []
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for recs in pool.imap(_write_job, jobs, chunksize=4):
                results.append(recs)
                if bar is not None:
                    bar.update(1)
    else:
        for job in jobs:
            results.append(_write_job(job))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    records = dict(train=[r for recs in results[:num_clips] for r in recs],
                   validation=[r for recs in results[num_clips:] for r in recs])
    write_jsonl(os.path.join(out_dir, "train.jsonl"), records["train"])
    if validation_clips:
        write_jsonl(os.path.join(out_dir, "validation.jsonl"), records["validation"])
    if tokens is None:
        from stts_jax.config import tiny_model_config

        tokens = dict(tiny_model_config().tokens)
    build_word_tokenizer(benchmark_words(), tokens).save(os.path.join(out_dir, "tokenizer.json"))
    return records


def _write_job(args):
    out_dir, index, seed, spec, kinds = args
    return write_clip(out_dir, index, seed, spec, kinds)
