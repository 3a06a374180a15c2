"""The device mesh and the one table that maps logical axis names onto mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`); activations use `batch`,
`frames`, `tokens`. `LOGICAL_RULES` maps each to mesh axes of a (data, fsdp, tensor) mesh. A dimension
that the mapped mesh axes do not divide is replicated instead (tiny test models on 8 devices).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "frames": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "vocab": ("tensor",),
    "tokens": (),  # top-k and gathers run along the token axis: never shard it
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a (data, fsdp, tensor) mesh (Auto axes: XLA propagates shardings); one axis may be -1 = the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {rest}")
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) > len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} > {len(devices)} devices")
    devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """Returns the PartitionSpec of an array with logical axis `names` (undividable dims replicated)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh,
                      rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> NamedSharding:
    """Returns the NamedSharding of one Variable from its `out_sharding` logical names."""
    names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> nnx.State:
    """Returns a State shaped like `state` whose Variables hold NamedShardings (for jit in/out_shardings)."""
    flat = [(path, var.replace(value=variable_sharding(var, mesh, rules))) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every variable of `model` onto `mesh` according to LOGICAL_RULES (in place); returns it."""
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jax.device_put(var[...], variable_sharding(var, mesh)))
    return model


def like_params(tree, params, mesh: Mesh):
    """Returns shardings for `tree` (e.g. AdamW state): a leaf whose path ends with a parameter's path and has its
    shape gets that parameter's sharding (mu / nu), every other leaf (counts) is replicated."""
    by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, param in by_path.items():
            if key.endswith(suffix) and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Returns the sharding of a batch-major array: leading axis over (data, fsdp), rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def describe(mesh: Mesh) -> str:
    """Returns a one-line description of the mesh."""
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({np.prod(list(mesh.shape.values()))} devices)"
