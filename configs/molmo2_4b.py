"""Molmo2-4B shapes: SigLIP2-so400m ViT (25 of 27 blocks used), adapter layers (24, 18), 81 tokens per frame,
Qwen3-4B text model (36 layers, 32 query / 8 KV heads x 128, SwiGLU 9728, vocabulary 151,936 + 128).

The importer builds its config from a checkpoint's config.json; this file states the same shapes for
runs that start from scratch or estimate memory. FLOPs of pruned vs unpruned (no weights are allocated):
  python launch/benchmark.py --config=configs/molmo2_4b.py --frames=128 --ratios=0,0.5 --flops_only
"""

import ml_collections

from stts_jax.config import adapter_config, llm_config, model_config, stts_config, vit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Molmo2-4B config (`arg` unused)."""
    del arg
    cfg = ml_collections.ConfigDict()
    cfg.model = model_config(
        vit=vit_config(),  # 1152 wide, 16 x 72 heads, MLP 4304, 378 px, patch 14
        adapter=adapter_config(feature_layers=(24, 18), num_heads=16, head_dim=72, mlp_dim=9728, pool_size=3),
        llm=llm_config(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                       mlp_dim=9728, vocab_size=151936, additional_vocab_size=128, rope_theta=1_000_000.0),
        stts=stts_config(prune_ratio=0.5, prune_at=3, execution="packed"),  # the paper's STTS settings
    )
    cfg.question_len = 32
    cfg.seed = 0
    cfg.frames = 8
    return cfg
