"""The CPU demo: a small Molmo2-shaped VLM trained from scratch on the synthetic temporal video-QA set.

  python launch/demo.py                      # everything: data, the runs below, evaluation, the table
  python launch/train.py --config=configs/demo.py:scorer,r0.5 --workdir=demo_out/runs/seed0/stts_0.5 \\
      --config.data.path=demo_out/data/tfds

Variants by argument (comma-separated, as configs/common.py): scorer | evs | random | none, r<ratio>,
noaux, nobias. 126 px frames (9x9 patches, 9 windows = 9 LLM tokens per frame), 8 frames per clip (Molmo2's
2 fps sampling of the 4 s clips), 8 videos per step on the host's CPU cores.
"""

import ml_collections

from configs.common import apply_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the demo config; `arg` picks the STTS variant (default scorer at ratio 0.5)."""
    from stts_jax.config import adapter_config, llm_config, model_config, stts_config, tiny_model_config, train_config
    from stts_jax.config import vit_config

    tiny = tiny_model_config()
    model = model_config(
        vit=vit_config(hidden_size=64, num_layers=4, num_heads=4, head_dim=16, mlp_dim=128, image_size=126),
        adapter=adapter_config(feature_layers=(3, 1), num_heads=4, head_dim=16, mlp_dim=128),
        llm=llm_config(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256,
                       vocab_size=100, additional_vocab_size=16, rope_theta=10000.0),
        stts=stts_config(method="scorer", prune_ratio=0.5, prune_at=1, execution="packed"),
        tokens=tiny.tokens,
    )
    cfg = train_config(model)
    cfg.data.update(kind="video", path="demo_out/data/tfds", num_frames=8, videos_per_batch=8, rows=8, workers=0)
    cfg.data.max_fps = 2.0
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.optim.update(lr_vit=1e-3, lr_adapter=1e-3, lr_llm=1e-3, lr_scorer=1e-3, warmup_steps=30,
                     final_lr_fraction=0.05, weight_decay=0.01)
    cfg.train.update(steps=300, log_every=25, ckpt_every=100, keep_ckpts=1, seed=0)
    cfg = apply_variant(cfg, arg)
    cfg.data.seq_len = seq_len(cfg.model, cfg.data.num_frames)
    return cfg


def seq_len(model: ml_collections.ConfigDict, frames: int, text_tokens: int = 48) -> int:
    """Returns a row length that fits one example: its vision tokens, 5 tokens of timestamp and frame markers
    per frame and `text_tokens` of question, options and answer (the benchmark needs at most 44 + 5 per frame).

    Pruned runs get shorter rows, so the LLM's savings show up under static shapes too.
    """
    from stts_jax.data.processor import prompt_overhead_tokens
    from stts_jax.eval.evaluate import vision_tokens_per_example

    st = model.stts
    vision = vision_tokens_per_example(model, frames, st.method, st.prune_ratio)
    return -(-(vision + prompt_overhead_tokens(frames, stamp_tokens=3) + text_tokens) // 8) * 8
