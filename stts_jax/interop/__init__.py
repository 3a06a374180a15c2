"""Interop with transformers / PyTorch checkpoints (no torch import here)."""
