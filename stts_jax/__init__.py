"""stts_jax."""
