"""The one table mapping logical axis names onto the (data, fsdp, tensor) mesh, and activation constraints.

Parameters carry logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`); activations use `batch` (rows of the
batch), `frames` (frame slots of a row), `tokens` (patches / sequence positions) and `act` (feature axes of
activations, kept whole). `stts_jax.train.sharding` uses the same table for parameters and inputs; the model
calls `constrain` on its activations so every stage stays split over the batch rows.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "frames": (),  # frame slots of one row live on the row's device
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "vocab": ("tensor",),
    "tokens": (),  # top-k and gathers run along the token axis: never shard it
    "act": (),  # activation features: whole on each device
}


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """Returns the PartitionSpec of an array with logical axis `names` (dims the mapped axes do not divide are
    split over the largest prefix of those axes that divides them, else replicated)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh_shape.get(a, 1) > 1) if name else ()
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes = axes[:-1]
        if not axes:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Returns x with a sharding constraint from its logical axis names under the current mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape)))


def batch_shards(rows: int) -> int:
    """Returns how many shards an axis of `rows` batch rows is split into under the current mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec(("batch",), (rows,), dict(mesh.shape))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def under_mesh(jitted: Callable, mesh) -> Callable:
    """Returns `jitted` run under `jax.set_mesh(mesh)` (so `constrain` applies), or `jitted` itself without a mesh;
    the wrapper keeps the jitted function's compilation count (`_cache_size`)."""
    if mesh is None:
        return jitted

    @functools.wraps(jitted)
    def run(*args, **kwargs):
        with jax.set_mesh(mesh):
            return jitted(*args, **kwargs)

    run._cache_size = jitted._cache_size
    return run
