"""Prefill time and KV-cache size of generation, pruned vs unpruned, side by side in one process.

  python launch/generate_bench.py --config=configs/bench_cpu.py --frames=16,32 --ratio=0.5 --batch=2

For each frame count: one batch of `--batch` videos (each with a question of a different length) through
`stts_jax.model.generate.Generator` twice, with the same ViT / adapter / LLM weights: STTS off (W*T vision
tokens per video) and STTS on at --ratio (W*T - K). Prints the prompt length, the median prefill wall-clock
over --repeats runs after a warm-up (compilation excluded), the decode time per token, and the KV-cache bytes
for --max_new_tokens new tokens, with pruned/unpruned ratios. Weights are random (shapes and time only).
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from stts_jax import cli, geometry
from stts_jax.config import stts_config, validate_model_config
from stts_jax.data.processor import random_video_prompt
from stts_jax.model.generate import Generator, pad_prompts
from stts_jax.model.vlm import Molmo2VLM

_CONFIG = cli.config("configs/bench_cpu.py", "Model config file (cfg.model).")
_FRAMES = cli.frames([16, 32])
_RATIO = flags.DEFINE_float("ratio", 0.5, "Prune ratio of the pruned run.")
_BATCH = flags.DEFINE_integer("batch", 2, "Videos (rows) per batch; question lengths differ per row.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "New tokens per row (decode steps + 1).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed prefills (median reported).")


def make_batch(cfg, frames: int, batch: int, seed: int = 0) -> dict:
    """Returns a left-padded batch-major batch: `batch` rows of one video of `frames` frames each (pixel_values
    [batch, frames, N, P]; W*T or, with STTS, W*T - K placeholders), questions of 16, 24, ... tokens."""
    rng = np.random.default_rng(seed)
    vocab = min(cfg.llm.vocab_size, 1000)
    prompts = []
    for row in range(batch):
        prompts.append(random_video_prompt(cfg, rng, frames) + [int(x) for x in rng.integers(0, vocab, 16 + 8 * row)])
    out = pad_prompts(prompts, side="left")
    shape = (batch, frames, geometry.patches_per_frame(cfg), geometry.patch_dim(cfg))
    out["pixel_values"] = rng.uniform(-1, 1, shape).astype(np.float32)
    return out


def measure(model, layout, batch, max_new: int, repeats: int) -> dict:
    """Returns prompt length, median prefill seconds, decode seconds per token and cache bytes."""
    gen = Generator(model, layout)
    gen.generate(batch, max_new)  # compile prefill and step
    prefill, decode = [], []
    for _ in range(repeats):
        out = gen.generate(batch, max_new)
        prefill.append(out.prefill_seconds)
        decode.append(out.decode_seconds / max(1, out.tokens.shape[1] - 1))
    return dict(length=out.prompt_length, prefill=statistics.median(prefill), decode=statistics.median(decode),
                cache=out.cache_bytes, compiles=gen.step._cache_size())


def main(argv):
    del argv
    cfg = validate_model_config(_CONFIG.value.model)
    pruned_cfg = cfg.copy_and_resolve_references()
    pruned_cfg.stts = stts_config(**{**cfg.stts.to_dict(), "method": "scorer", "prune_ratio": _RATIO.value})
    plain_cfg = cfg.copy_and_resolve_references()
    plain_cfg.stts = stts_config(method="none")
    pruned = Molmo2VLM(pruned_cfg, rngs=nnx.Rngs(0))
    plain = Molmo2VLM(plain_cfg, rngs=nnx.Rngs(1))
    for name in ("vit", "adapter", "llm"):  # the same weights in both
        nnx.update(getattr(plain, name), nnx.state(getattr(pruned, name)))
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); batch {_BATCH.value}, "
          f"{_MAX_NEW.value} new tokens, ratio {_RATIO.value}, execution {pruned_cfg.stts.execution}")
    header = (f"{'frames':>6} {'L unpr':>7} {'L pru':>6} {'prefill unpr ms':>16} {'prefill pru ms':>15} {'speedup':>8} "
              f"{'cache unpr MB':>14} {'cache pru MB':>13} {'cache ratio':>12} {'decode unpr ms/tok':>19} "
              f"{'decode pru ms/tok':>18}")
    print(header)
    for frames in _FRAMES.value:
        t0 = time.perf_counter()
        layout = geometry.FrameLayout.videos(frames)  # every row: one video of `frames` frames
        a = measure(plain, layout, make_batch(plain_cfg, frames, _BATCH.value), _MAX_NEW.value, _REPEATS.value)
        b = measure(pruned, layout, make_batch(pruned_cfg, frames, _BATCH.value), _MAX_NEW.value, _REPEATS.value)
        assert a["compiles"] == b["compiles"] == 1
        print(f"{frames:>6} {a['length']:>7} {b['length']:>6} {a['prefill'] * 1e3:>16.1f} {b['prefill'] * 1e3:>15.1f} "
              f"{a['prefill'] / b['prefill']:>7.2f}x {a['cache'] / 1e6:>14.2f} {b['cache'] / 1e6:>13.2f} "
              f"{b['cache'] / a['cache']:>12.3f} {a['decode'] * 1e3:>19.2f} {b['decode'] * 1e3:>18.2f}"
              f"   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
