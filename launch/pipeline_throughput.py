"""Input-pipeline throughput: decoded clips/s and tokens/s with 0 and N decoding workers, for T-frame clips,
next to the training steps/s the tiny model consumes (same batch shapes, STTS ratio 0.5).

  python launch/pipeline_throughput.py [--frames=16,64] [--workers=0,2] [--image_size=126] [--seconds=20]

Writes synthetic h264 clips of exactly T frames at 2 fps (so Molmo2's sampler takes every frame: T decoded,
resized and tokenised frames per clip) at --source_size pixels, prepares them with the tfds builder, then
times the full Grain pipeline (decode -> resize -> tokenise -> pack -> host batch) over repeated epochs.
--image_size=126 is the tiny model's frame size (9 tokens per frame); 378 is Molmo2's (81 tokens per frame;
the model column is then skipped). A benchmark prints ratios measured side by side in one process.
"""

import os
import shutil
import tempfile
import time

from absl import app, flags, logging

from stts_jax import cli

_FRAMES = cli.frames([16, 64], "Frames per clip (T).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Decoding worker processes to compare.")
_IMAGE = flags.DEFINE_integer("image_size", 126, "Model frame size: 126 (tiny config) or 378 (Molmo2).")
_SOURCE = flags.DEFINE_integer("source_size", 256, "Side of the synthetic source clips in pixels.")
_CLIPS = flags.DEFINE_integer("clips", 24, "Distinct clips per T (the pipeline repeats them).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Time budget per measurement (after one warm-up batch).")
_ROWS = flags.DEFINE_integer("rows", 2, "Packed rows per batch.")
_VIDEOS = flags.DEFINE_integer("videos_per_row", 4, "Videos per packed row.")
_MODEL = flags.DEFINE_boolean("model", True, "Also time the tiny model's train step on the same batch shapes.")


def _model_config(image_size):
    from stts_jax.config import stts_config, tiny_model_config

    cfg = tiny_model_config()
    cfg.vit.image_size = image_size
    cfg.stts = stts_config(method="scorer", prune_ratio=0.5, prune_at=0)
    return cfg


def _prepare(root, frames):
    import tensorflow_datasets as tfds

    from stts_jax.data import synthetic
    from stts_jax.data.tfds_builders.video_qa import VideoQa

    manual = os.path.join(root, f"T{frames}")
    spec = synthetic.ClipSpec(size=_SOURCE.value, num_frames=frames, fps=2, object_radius=_SOURCE.value // 18)
    synthetic.write_benchmark(manual, _CLIPS.value, spec, seed=frames)
    builder = VideoQa(data_dir=os.path.join(manual, "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return os.path.join(manual, "tfds"), os.path.join(manual, "tokenizer.json")


def _seq_len(data_dir, tokenizer, model_cfg, frames):
    """Returns videos_per_row x the longest of the first examples: rows then fill by tokens and by videos alike."""
    from stts_jax.data.examples import ExampleBuilder
    from stts_jax.data.pipeline import open_source
    from stts_jax.geometry import placeholders_per_frame

    builder = ExampleBuilder(tokenizer, image_size=model_cfg.vit.image_size, patch_size=model_cfg.vit.patch_size,
                             num_frames=frames, placeholders_per_frame=placeholders_per_frame(model_cfg, frames))
    source = open_source(data_dir, "train")
    longest = max(len(builder(source[i])["input_ids"]) for i in range(min(8, len(source))))
    return -(-_VIDEOS.value * longest // 8) * 8


def _time_pipeline(data_dir, tokenizer, model_cfg, frames, workers):
    import numpy as np

    from stts_jax.config import data_config
    from stts_jax.data.pipeline import make_pipeline

    cfg = data_config(kind="video", path=data_dir, tokenizer=tokenizer, num_frames=frames,
                      seq_len=_seq_len(data_dir, tokenizer, model_cfg, frames), rows=_ROWS.value,
                      videos_per_batch=_ROWS.value * _VIDEOS.value, num_epochs=None, workers=workers)
    cpu_before = _cpu_seconds()
    pipeline = make_pipeline(cfg, model_cfg, process_index=0, process_count=1)
    it = iter(pipeline)
    first = next(it)  # warm-up: worker start-up, first decodes
    clips = tokens = batches = 0
    fill = []
    start = time.perf_counter()
    while time.perf_counter() - start < _SECONDS.value:
        batch = next(it)
        clips += int(batch["num_videos"])
        tokens += int((batch["segment_ids"] > 0).sum())
        fill.append((batch["segment_ids"] > 0).mean())
        batches += 1
    elapsed = time.perf_counter() - start
    it.close()  # joins the workers: their CPU time is now in RUSAGE_CHILDREN
    cpu_ms = 1e3 * (_cpu_seconds() - cpu_before) / (clips + int(first["num_videos"]))
    return dict(clips_s=clips / elapsed, tokens_s=tokens / elapsed, batches=batches, fill=float(np.mean(fill)),
                clips_per_batch=clips / max(batches, 1), cpu_ms=cpu_ms), first, pipeline.layout


def _cpu_seconds() -> float:
    """Returns user + system CPU seconds of this process and its finished children (the decoding workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_model(model_cfg, batch, layout, steps=5):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stts_jax.model.vlm import Molmo2VLM, total_loss

    from stts_jax.data.pipeline import BATCH_KEYS

    model = Molmo2VLM(model_cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    device_batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}  # rows [R, ...]; layout: one row's frame slots

    @jax.jit
    def step(state, batch):  # forward + backward: what a train step costs without the optimizer update
        return jax.value_and_grad(lambda s: total_loss(nnx.merge(graphdef, s), batch, layout)[0])(state)

    jax.block_until_ready(step(state, device_batch))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(state, device_batch))
    return steps / (time.perf_counter() - start)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    model_cfg = _model_config(_IMAGE.value)
    root = tempfile.mkdtemp(prefix="throughput_")
    try:
        _run(root, model_cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root, model_cfg):
    from stts_jax.geometry import tokens_per_frame

    print(f"pipeline throughput on {os.cpu_count()} CPU cores: {_SOURCE.value} px h264 sources -> "
          f"{_IMAGE.value} px frames ({tokens_per_frame(model_cfg)} windows/frame), STTS ratio 0.5, "
          f"{_ROWS.value} rows x {_VIDEOS.value} videos per batch, {_SECONDS.value:.0f} s per measurement")
    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share the cores: compare CPU-ms/clip)")
    header = f"{'T':>4} {'workers':>7} {'clips/s':>8} {'tokens/s':>9} {'CPU-ms/clip':>11} {'row fill':>8}"
    header += f" {'clips/batch':>11}"
    header += f" {'model steps/s':>13} {'model clips/s':>13}" if _MODEL.value and _IMAGE.value == 126 else ""
    print(header)
    for frames in _FRAMES.value:
        data_dir, tokenizer = _prepare(root, frames)
        steps_s = None
        for workers in (int(w) for w in _WORKERS.value):
            stats, batch, layout = _time_pipeline(data_dir, tokenizer, model_cfg, frames, workers)
            line = (f"{frames:>4} {workers:>7} {stats['clips_s']:>8.1f} {stats['tokens_s']:>9.0f} "
                    f"{stats['cpu_ms']:>11.0f} {stats['fill']:>8.1%} {stats['clips_per_batch']:>11.1f}")
            if _MODEL.value and _IMAGE.value == 126:
                if steps_s is None:
                    steps_s = _time_model(model_cfg, batch, layout)
                line += f" {steps_s:>13.2f} {steps_s * stats['clips_per_batch']:>13.1f}"
            print(line + f"   (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    app.run(main)
