"""STTS, the method of this project (spec: ../shared/STTS_SPEC.md), in one place.

- `scorer.py`: the learned TemporalTokenScorer (an nnx module: window attention pooling, previous/current pair, MLP).
- `selection.py`: which windows each video keeps (top-k per video), the log-score attention bias of block
  prune_at + 1, and the regrouping of a row's LLM placeholders to its kept counts.
- `temporal.py`: the temporal target (1 - cos of a window with its predecessor), the auxiliary loss, EVS scores.
- `token_packing.py`: packing the kept ViT tokens of a row into fewer rows (`packed` execution).
- `decide.py`: the pruning step itself, method by method (scorer / evs / random), called by the model in one line.

Everything but `scorer.py` is pure functions of arrays and imports only `stts_jax.geometry` (and each other);
`tests/test_layering.py` holds that rule.
"""
