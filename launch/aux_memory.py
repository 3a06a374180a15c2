"""Compiled memory of the STTS temporal auxiliary loss (value + gradient) vs frames, at Molmo2 shapes.

  python launch/aux_memory.py [--frames=32,64,128] [--gram]

Reads XLA's compiled memory analysis (no execution). Ours pairs adjacent frames only and reduces patch
products a few pairs at a time: temp memory O(F * N) on top of the inputs. --gram adds, for contrast, the
release's all-windows Gram matrix, O((W F)^2).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from stts_jax import cli, geometry
from stts_jax.stts import temporal

_FRAMES = cli.frames([32, 64, 128], "Frame counts (one video each).")
_GRAM = flags.DEFINE_bool("gram", False, "Also compile the full-Gram variant of the release, for contrast.")
_WIDTH = flags.DEFINE_integer("width", 1152, "ViT width D.")
GRID, POOL = 27, 3


def ours(scores, hidden, layout):
    """Returns the library's temporal loss for scores [1, F, W] and hidden [1, F, N, D] (one row)."""
    return temporal.temporal_loss(scores, hidden, layout, grid=GRID, pool=POOL, ratio=0.5)


def gram(scores, hidden, layout):
    """The release's formulation: cosine of every window against every window, then read adjacent pairs."""
    scores, hidden = scores[0], hidden[0]  # the one row: [F, W], [F, N, D]
    win = temporal.window_features(hidden, GRID, POOL)
    f, w = win.shape[:2]
    flat = win.reshape(f * w, -1)
    flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-8)
    sim = flat @ flat.T  # [(W F), (W F)]
    idx = jnp.arange(w, f * w)
    c = sim[idx - w, idx].reshape(f - 1, w)
    return jnp.mean(jnp.square(scores[1:] - (1 - c)))


def peak_bytes(fn, frames, width):
    layout = geometry.FrameLayout.videos(frames)  # one row holding one video
    w = geometry.window_patch_ids(GRID, POOL).shape[0]
    args = (jax.ShapeDtypeStruct((1, frames, w), jnp.float32),
            jax.ShapeDtypeStruct((1, frames, GRID * GRID, width), jnp.float32))
    step = jax.jit(jax.value_and_grad(lambda s, h: fn(s, h, layout)))
    mem = step.lower(*args).compile().memory_analysis()
    return mem.temp_size_in_bytes, mem.argument_size_in_bytes


def main(argv):
    del argv
    print(f"{'frames':>6} {'variant':>8} {'temp MiB':>10} {'temp/frame MiB':>15} {'inputs MiB':>11}")
    for frames in _FRAMES.value:
        for name, fn in [("pairs", ours)] + ([("gram", gram)] if _GRAM.value else []):
            temp, arg = peak_bytes(fn, frames, _WIDTH.value)
            print(f"{frames:>6} {name:>8} {temp / 2**20:>10.1f} {temp / frames / 2**20:>15.2f} {arg / 2**20:>11.1f}")


if __name__ == "__main__":
    app.run(main)
