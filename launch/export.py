"""Export a checkpoint to a Hugging Face Molmo2 directory (+ the STTS scorer and its knobs).

  python launch/export.py --params=/ckpt/params --out=/export/molmo2-stts [--dtype=bfloat16] \\
      [--max_shard_size=5GB] [--overwrite] [--copy_tokenizer_from=/path/to/Molmo2-4B]
  python launch/export.py --params=/workdir [--step=6250] --out=/export/molmo2-stts     # a training run

--params is a params checkpoint (launch/import_hf.py, params_io.save_model) or a trainer checkpoint (a
workdir, its checkpoints/ or one step directory; the latest step unless --step; only the parameters are
read, never the optimizer state).

The directory loads with `transformers.Molmo2ForConditionalGeneration.from_pretrained(out)` (native key
layout, sharded safetensors + index, config.json, generation_config.json) and, with pruning, with
`stts_jax.interop.torch_stts.STTSMolmo2.from_pretrained(out)`, which reads stts_scorer.safetensors and
stts_config.json as well. Tensors are converted and written one shard at a time (see hf_export.py).
A live model exports with `stts_jax.interop.hf_export.export_hf(model, model.cfg, out)`.
"""

import time

from absl import app, flags, logging

from stts_jax import cli, paths

_PARAMS = flags.DEFINE_string("params", None, "Params checkpoint (state/ + model_config.json).")
_OUT = flags.DEFINE_string("out", None, "Output directory (must be empty unless --overwrite).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the exported tensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "2GB", "Largest shard (e.g. 5GB, 200MB).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")
_STEP = flags.DEFINE_integer("step", None, "Trainer checkpoint step (default: the latest).")
_TOKENIZER_FROM = flags.DEFINE_string("copy_tokenizer_from", None, "Copy tokenizer/processor files from here.")


def run(params: str, out: str, *, dtype: str = "float32", max_shard_size="2GB", overwrite: bool = False,
        copy_tokenizer_from: str | None = None, step: int | None = None):
    """Returns the ExportReport of exporting params or trainer checkpoint `params` to `out`."""
    from stts_jax.interop import hf_export, params_io

    if paths.as_path(out).is_dir() and any(paths.as_path(out).iterdir()) and not overwrite:  # fail before loading anything
        raise hf_export.ExportError(f"{out} is not empty; pass --overwrite to replace an earlier export")
    kinds = ("params", "train")
    if params_io.checkpoint_kind(params, kinds) == "params":  # refuse fields HF cannot hold before loading weights
        hf_export.check_config_fields(params_io.load_model_config(params))
    model = params_io.load_checkpoint(params, kinds=kinds, step=step).model
    cfg = model.cfg
    report = hf_export.export_hf(model, cfg, out, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_size)
    if copy_tokenizer_from:
        report.copied = hf_export.copy_extra_files(copy_tokenizer_from, out)
    return report


def main(argv):
    del argv
    from stts_jax.interop.hf_export import ExportError
    from stts_jax.interop.params_io import ParamsCheckpointError

    t0 = time.perf_counter()
    with cli.refusals(ExportError, ParamsCheckpointError):
        report = run(_PARAMS.value, _OUT.value, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD.value,
                     overwrite=_OVERWRITE.value, copy_tokenizer_from=_TOKENIZER_FROM.value, step=_STEP.value)
    print(f"exported {report.tensors} tensors in {len(report.shards)} shard(s) + {report.scorer_tensors} scorer "
          f"tensors, {report.bytes_written / 1e6:.1f} MB {report.dtype}, to {report.out_dir} in "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    flags.mark_flags_as_required(["params", "out"])
    logging.set_verbosity(logging.WARNING)
    app.run(main)
