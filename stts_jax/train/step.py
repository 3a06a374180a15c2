"""The jitted train step: gradient accumulation over micro-batches, per-group AdamW, donated state."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stts_jax.geometry import FrameLayout
from stts_jax.model.vlm import Molmo2VLM, total_loss
from stts_jax.train import sharding


def init_state(model: Molmo2VLM, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, dict]:
    """Returns (graphdef, state) with state = {params, opt_state, step}; optimizer state follows param shardings."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt_shape = jax.eval_shape(optimizer.init, params)
    mesh = jax.tree.leaves(params)[0].sharding.mesh if hasattr(jax.tree.leaves(params)[0].sharding, "mesh") else None
    if mesh is not None:  # AdamW moments sharded like their parameters (jit alone would replicate them)
        opt_state = jax.jit(optimizer.init, out_shardings=sharding.like_params(opt_shape, params, mesh))(params)
    else:
        opt_state = jax.jit(optimizer.init)(params)
    return graphdef, dict(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, layout: FrameLayout, *,
                    seed: int, state_shardings=None) -> Callable:
    """Returns jitted step(state, batch) -> (state, metrics); batch arrays carry a leading micro-batch axis.

    The state is donated. Randomness (random pruning) is fold_in(seed, step), so a resumed run repeats an
    uninterrupted one exactly.
    """

    def loss_fn(params, batch, rng):
        return total_loss(nnx.merge(graphdef, params), batch, layout, rng)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(grads, mb):
            (_, metrics), g = grad_fn(state["params"], mb, rng)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, metrics = jax.lax.scan(micro, zeros, batch)
        accum = jax.tree.leaves(batch)[0].shape[0]
        grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if hasattr(opt_state, "notfinite_count"):  # optax.apply_if_finite: skipped updates, in a row and in all
            metrics["nonfinite_streak"] = opt_state.notfinite_count
            metrics["skipped_updates"] = opt_state.total_notfinite
        return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics

    kwargs = {}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, donate_argnums=0, **kwargs)


def shardings_of(tree):
    """Returns the tree of shardings of a tree of jax.Arrays."""
    return jax.tree.map(lambda x: x.sharding, tree)
