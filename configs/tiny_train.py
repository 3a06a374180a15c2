"""Tiny random-data training run on CPU (smoke test of the sharded trainer, checkpoints and resume).

  python launch/train.py --config=configs/tiny_train.py --workdir=/tmp/tiny_train
  python launch/train.py --config=configs/tiny_train.py:none --workdir=/tmp/tiny_unpruned   # STTS off
"""

import ml_collections

# rows of 2 video slots with ~half of the slots empty, anywhere in a row (the two-process dummy-video test)
EMPTY_SLOTS_DATA = dict(videos_per_batch=16, rows=8, seq_len=96, empty_slots=0.5)

from stts_jax.config import stts_config, tiny_model_config, train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` = STTS method (scorer | random | none), default scorer."""
    model = tiny_model_config()
    model.stts = stts_config(method=arg or "scorer", prune_at=0, prune_ratio=0.5, execution="packed")
    cfg = train_config(model)
    cfg.data.update(num_frames=4, videos_per_batch=8, rows=8, seq_len=48, answer_len=4)
    cfg.optim.update(lr_vit=1e-3, lr_adapter=1e-3, lr_llm=1e-3, lr_scorer=1e-3, warmup_steps=2)
    cfg.train.update(steps=20, log_every=1, ckpt_every=5, keep_ckpts=2)
    return cfg
