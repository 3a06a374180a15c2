"""Forward pass of a (randomly initialised) Molmo2-shaped VLM on a real mp4, printing what it did.

  python launch/forward_demo.py --config=configs/tiny.py [--video=path.mp4]

Without --video it encodes a synthetic moving-square clip to mp4 with PyAV and decodes it back, so
the whole path (decode -> sample -> resize -> patchify -> prompt layout -> jit forward) runs offline.
The weights are random: the printed tokens are not meaningful, the shapes and timings are.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stts_jax.config import grid_size, tokens_per_frame, validate_model_config  # noqa: E402
from stts_jax.data.processor import patchify, resize_frames, video_token_layout  # noqa: E402
from stts_jax.data.synthetic import moving_square_frames, write_mp4  # noqa: E402
from stts_jax.data.video import decode_frames, uniform_frame_indices  # noqa: E402
from stts_jax.model.adapter import video_pooling_indices  # noqa: E402
from stts_jax.model.vlm import Molmo2VLM, check_batch, make_forward  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
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
    ids = text(1) + video_token_layout(model_cfg, [text(2) for _ in picked]) + text(12)
    batch = dict(input_ids=np.array([ids], np.int32), segment_ids=np.ones((1, len(ids)), np.int32),
                 positions=np.arange(len(ids), dtype=np.int32)[None], pixel_values=patches,
                 pooling_idx=video_pooling_indices(len(picked), grid_size(model_cfg), model_cfg.adapter.pool_size)
                 .astype(np.int32))
    check_batch(batch, model_cfg)
    print(f"[prompt]  {len(ids)} tokens: {len(picked)} frames x {tokens_per_frame(model_cfg)} vision tokens "
          f"+ frame markers + text; pixel_values {patches.shape}")
    model = Molmo2VLM(model_cfg, rngs=nnx.Rngs(cfg.seed))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"[model]   {params / 1e6:.2f} M parameters (random init) on {jax.devices()[0].platform}")
    forward = make_forward(model)
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
