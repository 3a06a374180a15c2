"""Forward pass of a (randomly initialised) Molmo2-shaped VLM on a real mp4, printing what it did.

  python launch/forward_demo.py --config=configs/tiny.py [--video=path.mp4]

Without --video it encodes a synthetic moving-square clip to mp4 with PyAV and decodes it back, so
the whole path (decode -> sample -> resize -> patchify -> prompt layout -> jit forward) runs offline.
The weights are random: the printed tokens are not meaningful, the shapes and timings are.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from stts_jax import cli
from stts_jax.config import validate_model_config
from stts_jax.data.processor import patchify, resize_frames, video_token_layout
from stts_jax.data.synthetic import moving_square_frames, write_mp4
from stts_jax.data.video import decode_frames, uniform_frame_indices
from stts_jax.geometry import FrameLayout, placeholders_per_frame, tokens_per_frame
from stts_jax.model.vlm import Molmo2VLM, check_batch, make_forward

_CONFIG = cli.config("configs/tiny.py")
_VIDEO = flags.DEFINE_string("video", None, "An mp4 to run on; default: a synthetic clip written with PyAV.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    model_cfg = validate_model_config(cfg.model)
    video = _VIDEO.value
    if video is None:
        video = write_mp4(os.path.join(tempfile.mkdtemp(), "moving_square.mp4"), moving_square_frames(32))
        print(f"[video]   wrote a synthetic 32-frame clip to {video}")
    frames, fps = decode_frames(video)
    picked = uniform_frame_indices(len(frames), cfg.frames)
    print(f"[decode]  {video}: {len(frames)} frames {frames.shape[1]}x{frames.shape[2]} at {fps:.1f} fps; "
          f"sampled {picked.tolist()}")
    patches = patchify(resize_frames(frames[picked], model_cfg.vit.image_size), model_cfg.vit.patch_size)
    rng = np.random.default_rng(cfg.seed)
    text = lambda n: rng.integers(0, min(model_cfg.llm.vocab_size, 100), size=n).tolist()
    counts = placeholders_per_frame(model_cfg, len(picked))  # W per frame (W*T - K in all with STTS)
    ids = text(1) + video_token_layout(model_cfg, [text(2) for _ in picked], counts) + text(12)
    layout = FrameLayout.videos(len(picked))  # the one row: one video of T frames
    batch = dict(input_ids=np.array([ids], np.int32), segment_ids=np.ones((1, len(ids)), np.int32),
                 positions=np.arange(len(ids), dtype=np.int32)[None], pixel_values=patches[None])  # [1, T, N, P]
    check_batch(batch, model_cfg, layout)
    print(f"[prompt]  {len(ids)} tokens: {len(picked)} frames, {sum(counts)} vision tokens (of "
          f"{len(picked) * tokens_per_frame(model_cfg)}) + frame markers + text; pixel_values "
          f"{batch['pixel_values'].shape}")
    model = Molmo2VLM(model_cfg, rngs=nnx.Rngs(cfg.seed))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"[model]   {params / 1e6:.2f} M parameters (random init) on {jax.devices()[0].platform}")
    forward = make_forward(model, layout=layout)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    logits = forward.apply(forward.state, batch).block_until_ready()
    t1 = time.perf_counter()
    logits = forward.apply(forward.state, batch).block_until_ready()
    t2 = time.perf_counter()
    print(f"[forward] logits {logits.shape}; first call (compile + run) {t1 - t0:.2f} s, second call "
          f"{(t2 - t1) * 1e3:.1f} ms; compilations: {forward.apply._cache_size()}")
    print(f"[output]  argmax of the last 5 positions: {np.asarray(logits[0, -5:].argmax(-1)).tolist()}")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
