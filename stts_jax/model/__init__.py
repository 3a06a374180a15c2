"""The Molmo2 model in Flax NNX: ViT, adapter, LLM, the VLM that joins them (and calls stts_jax.stts where
STTS prunes), generation with a static KV cache, and the activation-sharding helpers (partitioning)."""
