"""GPU-sized benchmark of pruned vs unpruned, side by side: the real token geometry (378 px, 27x27 patches,
81 windows per frame), the real SigLIP2-so400m ViT as Molmo2 runs it (1152 wide, 16 x 72 heads, MLP 4304, 25
blocks, adapter layers (24, 18)), a Qwen3-0.6B-like text model (1024 wide, 28 layers, 16 query / 8 KV heads x
128, SwiGLU 3072) with a small vocabulary (1000 + 128, as bench_cpu) so the embeddings stay small, STTS at the
paper's prune_at 3 with `packed` execution, bf16 compute over float32 weights (as configs/molmo2_4b_stts.py).

Every ViT block / LLM layer is rematerialised in the training step (`remat`), which 64+ frames need to fit an
80 GB GPU (the attention logits of every block would be kept otherwise); the forward is unaffected.

  python launch/benchmark.py --config=configs/bench_gpu.py --frames=16,32,64,128 --ratios=0.5 \\
      --csv=/tmp/bench_gpu.csv --png=/tmp/bench_gpu.png

Arguments after the colon, comma-separated: `noremat` (no rematerialisation), `bf16params` (bf16 weights too).
"""

import ml_collections

from stts_jax.config import adapter_config, llm_config, model_config, stts_config, vit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the GPU benchmark config; `arg` takes the options above."""
    options = set(filter(None, (arg or "").split(",")))
    unknown = options - {"noremat", "bf16params"}
    if unknown:
        raise ValueError(f"unknown bench_gpu options {sorted(unknown)}; known: noremat, bf16params")
    cfg = ml_collections.ConfigDict()
    cfg.model = model_config(
        vit=vit_config(),  # 1152 wide, 25 blocks, 16 x 72 heads, MLP 4304, 378 px, patch 14
        adapter=adapter_config(feature_layers=(24, 18), num_heads=16, head_dim=72, mlp_dim=3072, pool_size=3),
        llm=llm_config(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
                       vocab_size=1000, additional_vocab_size=128, rope_theta=1_000_000.0),
        stts=stts_config(prune_ratio=0.5, prune_at=3, execution="packed"),  # the paper's STTS settings
        dtype="bfloat16",
        param_dtype="bfloat16" if "bf16params" in options else "float32",
        remat="noremat" not in options,
    )
    cfg.model.tokens = ml_collections.ConfigDict({k: v - 151936 + 1000 for k, v in cfg.model.tokens.items()})
    cfg.question_len = 32
    cfg.seed = 0
    return cfg
