"""Writes the synthetic video-QA benchmark: N deterministic h264 clips, a JSONL of questions, a tokenizer.

  python launch/make_synthetic.py --out=/tmp/synth --num_clips=400 [--validation_clips=64] [--workers=2]

Writes <out>/videos/clip_NNNNNN.mp4, <out>/train.jsonl (+ validation.jsonl), one question of every kind per
clip (direction, which_moved, flash_count, appeared_last; see stts_jax/data/synthetic.py), and
<out>/tokenizer.json: a word-level tokenizer covering the benchmark's words, with the special tokens at the
ids of --tokens (tiny: the ids of configs/tiny.py; molmo2: the real Molmo2 ids). <out> is then a
`video_qa` manual dir:  python launch/prepare_data.py --manual_dir=<out> --data_dir=<out>/tfds
"""

import time

from absl import app, flags

from stts_jax import cli
from stts_jax.config import MOLMO2_TOKENS, tiny_model_config
from stts_jax.data import synthetic

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NUM = flags.DEFINE_integer("num_clips", 400, "Training clips.")
_VAL = flags.DEFINE_integer("validation_clips", 0, "Validation clips (written after the training clips).")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed; clip i uses seed * 1_000_003 + i.")
_SIZE = flags.DEFINE_integer("size", 128, "Frame side in pixels (even).")
_FRAMES = cli.frames(64, "Frames per clip.")
_FPS = flags.DEFINE_integer("fps", 8, "Frames per second.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes writing clips.")
_RADIUS = flags.DEFINE_integer("object_radius", 7, "Object radius in pixels.")
_EVENT = flags.DEFINE_integer("event_frames", 5, "Shortest flash / gap / time between appearances, in frames.")
_KINDS = flags.DEFINE_list("kinds", list(synthetic.QUESTION_KINDS), "Question kinds asked of every clip.")
_FIXED = flags.DEFINE_bool("fixed_options", False, "Options in a fixed order (an easier task) instead of shuffled.")
_TOKENS = flags.DEFINE_enum("tokens", "tiny", ["tiny", "molmo2"], "Special-token ids of the tokenizer.")


def main(argv):
    del argv
    start = time.perf_counter()
    spec = synthetic.ClipSpec(size=_SIZE.value, num_frames=_FRAMES.value, fps=_FPS.value, event_frames=_EVENT.value,
                              object_radius=_RADIUS.value, shuffle_options=not _FIXED.value)
    tokens = dict(tiny_model_config().tokens) if _TOKENS.value == "tiny" else dict(MOLMO2_TOKENS)
    records = synthetic.write_benchmark(_OUT.value, _NUM.value, spec, seed=_SEED.value,
                                        validation_clips=_VAL.value, tokens=tokens, workers=_WORKERS.value,
                                        progress=True, kinds=_KINDS.value)
    print(f"wrote {_NUM.value + _VAL.value} clips ({len(records['train'])} training / "
          f"{len(records['validation'])} validation questions) to {_OUT.value} in "
          f"{time.perf_counter() - start:.1f} s; tokenizer.json has {_TOKENS.value} special-token ids")


if __name__ == "__main__":
    app.run(main)
