"""Model modules (Flax NNX) and pure pruning functions."""
