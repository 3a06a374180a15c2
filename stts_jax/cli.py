"""What the entry points in launch/ share: the absl flags defined once (frames, prune ratios, checkpoint, config,
multihost)
and the way a refused input ends a run (`refusals`).

Each returns the FlagHolder of one flag with the scripts' own default; list flags parse to numbers and refuse a
bad value with absl's usage error naming the flag (`--frames=0,abc` stops before any work). Import in launch/
scripts only: defining a flag is a side effect.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import flags

flags.disclaim_key_flags()  # the flags defined here belong to the calling script (its --helpshort lists them)


class _NumberListParser(flags.ArgumentParser):
    """Comma-separated numbers of one kind within [lower, upper) (upper None: no bound)."""

    def __init__(self, kind: type, lower: float, upper: float | None):
        self.kind, self.lower, self.upper = kind, lower, upper

    def parse(self, argument):
        items = argument if isinstance(argument, (list, tuple)) else [a for a in str(argument).split(",") if a.strip()]
        try:
            values = [self.kind(x) for x in items]
        except ValueError:
            raise ValueError(f"expected comma-separated {self.kind.__name__}s, got {argument!r}") from None
        bound = f"[{self.lower}, {self.upper})" if self.upper is not None else f">= {self.lower}"
        for v in values:
            if v < self.lower or (self.upper is not None and v >= self.upper):
                raise ValueError(f"{v} is outside {bound}")
        return values

    def flag_type(self):
        return f"comma-separated {self.kind.__name__}s"


def _number_list(name: str, default, help: str, kind: type, lower: float, upper: float | None = None):
    return flags.DEFINE(_NumberListParser(kind, lower, upper), name, default, help,
                        serializer=flags.CsvListSerializer(","))


def frames(default, help: str = "Frames per video."):
    """--frames: one int >= 1 when `default` is an int, else a comma-separated list of ints >= 1 (None: unset)."""
    if isinstance(default, int):
        return flags.DEFINE_integer("frames", default, help, lower_bound=1)
    return _number_list("frames", default, help, int, 1)


def ratios(default, help: str = "Prune ratios (0 = unpruned)."):
    """--ratios: prune ratios in [0, 1)."""
    return _number_list("ratios", default, help, float, 0.0, 1.0)


def checkpoint(many: bool = False, help: str | None = None, required: bool = False):
    """--checkpoint: what `params_io.load_checkpoint` reads (params checkpoint, training workdir or Hugging Face
    directory); `many`: a comma-separated list of them."""
    help = help or ("Checkpoint(s): training workdir, params checkpoint or Hugging Face directory." if many else
                    "Checkpoint: training workdir, params checkpoint or Hugging Face directory.")
    define = flags.DEFINE_list if many else flags.DEFINE_string
    return define("checkpoint", None, help, required=required)


def multihost(help: str = "Call jax.distributed.initialize() (TPU pods: run the same command on every host)."):
    """--multihost; `start_jax(flag)` acts on it."""
    return flags.DEFINE_bool("multihost", False, help)


def start_jax(multihost_flag):
    """Returns jax, with jax.distributed initialised first when --multihost is set (before any other jax call)."""
    import jax

    if multihost_flag.value:
        jax.distributed.initialize()
    return jax


def config(default: str | None = None, help: str = "Experiment config file (path[:arg]).", lock: bool = True):
    """--config: an ml_collections config file (`configs/<name>.py[:variant]`); --config.<field>=... overrides
    (locked, as ml_collections' default: an override may change a field, not add one)."""
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file("config", default, help, lock_config=lock)


@contextlib.contextmanager
def refusals(*errors: type[Exception]):
    """Ends the program with exit status 2 and the message alone (no traceback: the message names the culprit)
    on any of `errors`: `with cli.refusals(ExportError): run(...)`."""
    try:
        yield
    except errors as e:
        print(f"{os.path.splitext(os.path.basename(sys.argv[0]))[0]}: {e}", file=sys.stderr)
        sys.exit(2)
