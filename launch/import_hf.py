"""Import a Molmo2 (or Molmo2-Lite / STTS export) directory into a params checkpoint ready to train.

  python launch/import_hf.py --hf_dir=/path/to/Molmo2-4B --out=/ckpt/params [--stts] [--prune_ratio=0.5] \\
      [--prune_at=3] [--overwrite]

Weights load one tensor at a time (native or released layout, `hf_import.load_molmo2`). The STTS settings
come from the directory's stts_config.json when present (an export of this project), else STTS is off unless
--stts turns the scorer on. Scorer weights come from stts_scorer.safetensors when present, else they are
initialised fresh (truncated normal, as the spec says) and listed. Writes PATH/state (Orbax) and
PATH/model_config.json (`stts_jax.interop.params_io`).
"""

import time

from absl import app, flags, logging

from stts_jax import cli, paths

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face Molmo2 directory.")
_OUT = flags.DEFINE_string("out", None, "Params checkpoint directory to write.")
_STTS = flags.DEFINE_bool("stts", False, "Turn the STTS scorer on (when the directory has no stts_config.json).")
_RATIO = flags.DEFINE_float("prune_ratio", None, "Override stts.prune_ratio.")
_PRUNE_AT = flags.DEFINE_integer("prune_at", None, "Override stts.prune_at.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --out.")


def run(hf_dir: str, out: str, *, stts: bool = False, prune_ratio: float | None = None,
        prune_at: int | None = None, overwrite: bool = False):
    """Returns (model, ImportReport) after writing the params checkpoint of `hf_dir` to `out`."""
    from stts_jax.config import stts_config, validate_model_config
    from stts_jax.interop import hf_export, params_io

    if paths.as_path(out).is_dir() and any(paths.as_path(out).iterdir()) and not overwrite:  # fail before reading any weights
        raise params_io.ParamsCheckpointError(f"{out} is not empty; pass --overwrite to replace it")
    cfg = hf_export.read_config(hf_dir)
    if stts and cfg.stts.method == "none":
        cfg.stts = stts_config(**({} if prune_at is None else {"prune_at": prune_at}))
    if prune_ratio is not None:
        cfg.stts.prune_ratio = prune_ratio
    if prune_at is not None:
        cfg.stts.prune_at = prune_at
    validate_model_config(cfg)
    model, report = hf_export.load_exported(hf_dir, cfg)
    params_io.save_model(out, model, cfg, overwrite=overwrite)
    return model, report


def main(argv):
    del argv
    from stts_jax.config import ConfigError
    from stts_jax.interop.hf_import import CheckpointError
    from stts_jax.interop.params_io import ParamsCheckpointError

    t0 = time.perf_counter()
    with cli.refusals(CheckpointError, ParamsCheckpointError, ConfigError):
        model, report = run(_HF_DIR.value, _OUT.value, stts=_STTS.value, prune_ratio=_RATIO.value,
                            prune_at=_PRUNE_AT.value, overwrite=_OVERWRITE.value)
    st = model.cfg.stts
    print(f"imported {report.loaded} tensors ({report.layout} layout) from {_HF_DIR.value} -> {_OUT.value} in "
          f"{time.perf_counter() - t0:.1f} s; STTS {st.method}"
          + (f" (ratio {st.prune_ratio}, prune_at {st.prune_at})" if st.method != "none" else "")
          + (f"; initialised fresh: {', '.join(report.fresh)}" if report.fresh else ""))


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out"])
    logging.set_verbosity(logging.WARNING)
    app.run(main)
