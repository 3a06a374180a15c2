"""Evaluation: multiple-choice accuracy by answer-letter likelihood or generation, pruned vs unpruned, sharded over
a mesh (`evaluate.py`), and the per-benchmark scoring and aggregation (`scoring.py`). Imports model, data and
interop; training imports it for in-loop evaluation, never the reverse."""
