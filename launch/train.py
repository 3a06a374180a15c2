"""Train (or resume) an STTS model.

  python launch/train.py --config=configs/tiny_train.py --workdir=/tmp/run [--config.train.steps=100]

The config file's docstring holds the command that runs it. Resumes automatically from --workdir.
"""

import sys

from absl import app, flags, logging

from stts_jax import cli

_CONFIG = cli.config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; a run resumes from here.")
_MULTIHOST = cli.multihost()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.start_jax(_MULTIHOST)
    from stts_jax.config import ConfigError
    from stts_jax.data.pipeline import TooManyBadExamples
    from stts_jax.train.checkpoint import IncompatibleCheckpoint
    from stts_jax.train.lease import WorkdirBusy
    from stts_jax.train.trainer import BadBatchError, NonFiniteUpdates, train

    logging.set_verbosity(logging.INFO)
    try:
        records = train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, IncompatibleCheckpoint, TooManyBadExamples, NonFiniteUpdates, BadBatchError,
            WorkdirBusy) as e:
        sys.exit(f"error: {e}")  # one line naming the cause, exit status 1
    if records:
        last = records[-1]
        print(f"done: step {last['step']}, loss {last['loss']:.4f}, compilations of the train step: "
              f"{last['compilations']}")


if __name__ == "__main__":
    app.run(main)
