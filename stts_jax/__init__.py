"""stts_jax: STTS (Spatio-Temporal Token Scoring) for Molmo2 video VLMs in JAX / Flax NNX. See README “Layout”."""
