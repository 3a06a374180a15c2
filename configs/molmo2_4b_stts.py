"""The paper's recipe (spec §9): fine-tune Molmo2-4B with STTS at ratio 0.5, prune_at 3, 64 frames per video,
global batch 64, 6,250 steps, AdamW (ViT 5e-6, adapter 5e-6, LLM 1e-5, scorer 1e-4), 200 warm-up steps, cosine to
0.1x, clip 1.0, bf16 compute with float32 master weights, FSDP over the pod (2-D data x fsdp from 256 chips).

  python launch/train.py --config=configs/molmo2_4b_stts.py --workdir=gs://bucket/stts-4b \\
      --config.train.init_from=/path/to/Molmo2-4B --config.data.path=/path/to/prepared_video_qa --multihost

Variants by argument: `:random` (random pruning), `:none` (unpruned baseline), `:noaux` (aux loss off),
`:nobias` (bias path off), `:r0.3` / `:r0.8` (other ratios).
"""

import ml_collections

from configs.common import apply_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the paper-scale config; `arg` picks an ablation variant."""
    from stts_jax.config import adapter_config, llm_config, model_config, stts_config, train_config, vit_config

    model = model_config(
        vit=vit_config(),
        adapter=adapter_config(feature_layers=(24, 18), num_heads=16, head_dim=72, mlp_dim=9728),
        llm=llm_config(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=9728,
                       vocab_size=151936, additional_vocab_size=128, rope_theta=1_000_000.0),
        stts=stts_config(prune_ratio=0.5, prune_at=3, execution="packed"),
        dtype="bfloat16", param_dtype="float32",
    )
    cfg = train_config(model)
    cfg.data.update(kind="video", num_frames=64, videos_per_batch=64, rows=64, seq_len=9728, workers=8)
    cfg.mesh.update(data=-1, fsdp=0, tensor=1)  # fsdp as wide as every embed width divides, data over the rest
    cfg.train.update(steps=6250, grad_accum=1, log_every=10, ckpt_every=250, keep_ckpts=3)
    return apply_variant(cfg, arg)
