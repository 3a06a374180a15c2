"""Evaluation: multiple-choice accuracy by answer-letter likelihood or generation, pruned vs unpruned, sharded over
a mesh (`evaluate.py`), the per-benchmark scoring and aggregation (`scoring.py`) and one-video prediction
(`predict.py`). Imports model, data, interop and the mesh layer (train/sharding.py); the trainer imports it for
in-loop evaluation."""
