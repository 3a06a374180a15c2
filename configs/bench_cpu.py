"""Reduced-width model with the real token geometry (378 px, 27x27 patches, 81 windows per frame), for CPU
wall-clock benchmarks of pruned vs unpruned side by side, and for the CPU weak-scaling check of the sharded
train step (8 vs 64 simulated devices, one video per device):

  python launch/benchmark.py --config=configs/bench_cpu.py --frames=16,32,64 --csv=/tmp/bench.csv --png=/tmp/bench.png
  python launch/estimate.py --config=configs/bench_cpu.py --platform=cpu --chips=8,64 --nopacked_flops
"""

import ml_collections

from stts_jax.config import adapter_config, llm_config, model_config, stts_config, train_config, vit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the benchmark config (`arg` unused)."""
    del arg
    cfg = train_config(model_config(
        vit=vit_config(hidden_size=128, num_layers=12, num_heads=4, head_dim=32, mlp_dim=512),
        adapter=adapter_config(feature_layers=(11, 8), num_heads=4, head_dim=32, mlp_dim=512),
        llm=llm_config(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768,
                       vocab_size=1000, additional_vocab_size=128),
        stts=stts_config(prune_at=3, execution="packed"),
    ))
    cfg.data.update(num_frames=16, videos_per_batch=8, rows=8, seq_len=2048)
    cfg.model.tokens = ml_collections.ConfigDict({k: v - 151936 + 1000 for k, v in cfg.model.tokens.items()})
    cfg.question_len = 32
    cfg.seed = 0
    return cfg
