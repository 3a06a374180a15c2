"""AdamW with parameter groups (ViT / adapter / LLM / scorer), warm-up + cosine, global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from stts_jax.config import PARAM_GROUPS


def group_labels(params: nnx.State):
    """Returns a tree like `params` labelling each leaf with its group (the top-level module name)."""
    def label(path, _):
        name = str(getattr(path[0], "key", path[0]))
        if name not in PARAM_GROUPS:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} belongs to no optimizer group {PARAM_GROUPS}")
        return name
    return jax.tree_util.tree_map_with_path(label, params)


def schedule(peak: float, optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Returns linear warm-up to `peak`, then cosine decay to final_lr_fraction * peak at total_steps."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=peak * optim.final_lr_fraction)


# optax.apply_if_finite applies a non-finite update after this many in a row; the trainer stops long before
NEVER_APPLY_NONFINITE = 2**31 - 1


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """Returns clip -> per-group AdamW (frozen groups get zero updates), skipping any update whose gradient is not
    finite (parameters and AdamW moments unchanged; the state counts the streak and the total)."""
    transforms = {}
    for group in PARAM_GROUPS:
        if group in tuple(optim.freeze):
            transforms[group] = optax.set_to_zero()
        else:
            transforms[group] = optax.adamw(schedule(optim[f"lr_{group}"], optim, total_steps), b1=optim.b1,
                                            b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                                             optax.multi_transform(transforms, group_labels(params))),
                                 max_consecutive_errors=NEVER_APPLY_NONFINITE)
