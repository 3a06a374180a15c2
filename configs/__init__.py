"""Experiment configs (`--config=configs/<name>.py[:variant]`), importable as the `configs` package
(`from configs import tiny_train`; the shared variant switches live in `configs.common`). They build on
`stts_jax.config` and never import launch/."""
