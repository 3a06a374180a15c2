"""Tiny CPU config: 126 px frames (9x9 patches, 9 tokens per frame), a 3-block ViT and a 2-layer LLM.

Runs in seconds on a laptop:
  python launch/forward_demo.py --config=configs/tiny.py
"""

import ml_collections

from stts_jax.config import tiny_model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the tiny experiment config (`arg` unused)."""
    del arg
    cfg = ml_collections.ConfigDict()
    cfg.model = tiny_model_config()
    cfg.seed = 0
    cfg.frames = 4
    return cfg
