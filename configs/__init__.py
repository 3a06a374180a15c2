"""Experiment configs (`--config=configs/<name>.py[:variant]`), importable as the `configs` package
(`from configs import tiny_train`; the shared variant switches live in `configs.common`). They import only
`stts_jax.config` and each other."""
