"""The device mesh, parameter shardings and global input arrays.

Parameters carry logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`); activations use `batch`,
`frames`, `tokens`. `LOGICAL_RULES` (stts_jax.model.partitioning, the one table) maps each to mesh axes of a
(data, fsdp, tensor) mesh. A dimension that the mapped mesh axes do not divide is split over the largest
prefix of them that divides it, else replicated (tiny test models on 8 devices).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from stts_jax.model.partitioning import LOGICAL_RULES, MESH_AXES, logical_to_spec  # noqa: F401 (the one table)

def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              embed_dims: Sequence[int] = (), slices: int = 1) -> Mesh:
    """Returns a (data, fsdp, tensor) mesh (Auto axes: XLA propagates shardings); one axis may be -1 = the rest.

    `fsdp=0` picks the fsdp size: the largest divisor of the devices left by `tensor` (within one slice) that
    divides every `embed_dims` size (see `embed_dims_of`), so no parameter is replicated for want of
    divisibility (the ViT width 1152 does not divide by 256); `data` then takes the rest.

    `slices > 1` (multi-slice): the data axis spans `slices` slices joined by the data-center network (DCN), and
    fsdp and tensor stay inside a slice (`mesh_utils.create_hybrid_device_mesh`), so only the gradient reduction
    crosses DCN. A slice is the devices' `slice_index` on TPU, else their process (CPU tests, GPU hosts).
    Devices spread over several TPU slices need `slices` set to their count (`slice_count`).
    """
    devices = list(devices if devices is not None else jax.devices())
    granule = _granule(devices)
    found = len({getattr(d, granule, 0) for d in devices})  # (one-slice topology descriptions have none)
    if slices < 1 or len(devices) % slices:
        raise ValueError(f"mesh: slices={slices} must be >= 1 and divide the {len(devices)} devices")
    if slices > 1 and found != slices:
        raise ValueError(f"mesh: slices={slices}, but the {len(devices)} devices form {found} "
                         f"{'TPU slice(s)' if granule == 'slice_index' else 'process(es), each taken as a slice'}")
    if slices == 1 and granule == "slice_index" and found > 1:
        raise ValueError(f"mesh: the devices span {found} TPU slices; set mesh.slices={found} (the data axis then "
                         "crosses slices, fsdp and tensor stay inside one)")
    if fsdp == 0:
        if tensor < 1 or (len(devices) // slices) % tensor:
            raise ValueError(f"mesh: fsdp=0 (auto) needs a fixed tensor size dividing {len(devices) // slices} "
                             "devices (per slice)")
        fsdp = auto_fsdp(len(devices) // slices // tensor, embed_dims)
        data = -1
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
    if slices == 1:
        devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    if math.prod(sizes) != len(devices) or sizes[0] % slices:
        raise ValueError(f"mesh: with slices={slices} the mesh takes every device and data must be a multiple of "
                         f"slices (fsdp and tensor stay inside a slice); got data={sizes[0]}, fsdp={sizes[1]}, "
                         f"tensor={sizes[2]} on {len(devices)} devices")
    return Mesh(hybrid_grid(tuple(sizes), slices, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def hybrid_grid(sizes: tuple[int, int, int], slices: int, devices: Sequence) -> np.ndarray:
    """Returns the [data, fsdp, tensor] device array of a multi-slice mesh: slice i's devices fill data rows
    i*data/slices .. (i+1)*data/slices - 1 (`mesh_utils.create_hybrid_device_mesh`, DCN shape (slices, 1, 1))."""
    return mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices,
                                                process_is_granule=_granule(devices) == "process_index")


def _granule(devices: Sequence) -> str:
    """The device attribute that tells slices apart: `slice_index` on TPU, else `process_index` (CPU and GPU
    devices of a multi-process run carry a slice_index of 0: each process is taken as a slice)."""
    return "slice_index" if devices[0].platform == "tpu" else "process_index"


def slice_count(devices: Sequence | None = None) -> int:
    """Returns the TPU slices the devices span (1 off TPU): the `slices` a mesh over all of them needs."""
    devices = list(devices if devices is not None else jax.devices())
    return len({getattr(d, "slice_index", 0) for d in devices}) if _granule(devices) == "slice_index" else 1


def auto_fsdp(devices: int, embed_dims: Sequence[int]) -> int:
    """Returns the largest divisor of `devices` that divides every size in `embed_dims` (1 if none does)."""
    for size in range(devices, 0, -1):
        if devices % size == 0 and all(d % size == 0 for d in embed_dims):
            return size
    return 1


def embed_dims_of(state: nnx.State) -> tuple[int, ...]:
    """Returns the sizes of every parameter dimension named `embed` (the axis fsdp splits), sorted and unique."""
    dims = set()
    for _, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding") or ()
        dims.update(size for name, size in zip(names, var.shape) if name == "embed")
    return tuple(sorted(dims))


def variable_sharding(variable: nnx.Variable, mesh: Mesh,
                      rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> NamedSharding:
    """Returns the NamedSharding of one Variable from its `out_sharding` logical names."""
    names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, dict(mesh.shape), rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> nnx.State:
    """Returns a State shaped like `state` whose Variables hold NamedShardings (for jit in/out_shardings)."""
    flat = [(path, var.replace(value=variable_sharding(var, mesh, rules))) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def init_sharded(make, mesh: Mesh) -> nnx.Module:
    """Returns the module `make()` builds, every variable created by one jitted init directly in its sharding on
    `mesh` (never built whole on one device)."""
    graphdefs = []

    def build():
        graphdef, state = nnx.split(make())
        graphdefs.append(graphdef)  # static structure, the same on every trace
        return state

    abstract = jax.eval_shape(build)  # (not nnx.eval_shape: under a mesh it reads logical names as mesh axes)
    state = jax.jit(build, out_shardings=state_shardings(abstract, mesh))()
    return nnx.merge(graphdefs[-1], state)


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


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_axis: int = 0) -> NamedSharding:
    """Returns the sharding of a batch-major array: axis `batch_axis` (rows) over (data, fsdp) as far as it
    divides (the rules table's `batch`), every other axis whole."""
    names = [None] * len(shape)
    names[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def to_global(batch: dict, mesh: Mesh, *, batch_axis: int = 0) -> dict:
    """Returns global jax.Arrays on `mesh` from this process's rows of a batch-major batch (numpy).

    Every array's axis `batch_axis` holds rows (axis 1 when a micro-batch axis leads); each process passes its
    own rows, and the global array concatenates them in process order, sharded over (data, fsdp). Arrays
    without that axis (per-batch scalars such as `num_videos`) are dropped. The one place where host batches
    become device arrays: trainer, evaluation, estimate and benchmarks call it.
    """
    n = jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim <= batch_axis:
            continue
        global_shape = list(value.shape)
        global_shape[batch_axis] *= n
        if n > 1 and global_shape[batch_axis] % shards:
            raise ValueError(f"batch[{key!r}] has {global_shape[batch_axis]} rows globally, not divisible by the "
                             f"{shards} data*fsdp shards; multi-host batches must divide evenly")
        sharding = batch_sharding(mesh, global_shape, batch_axis)
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(global_shape))
    return out


def describe(mesh: Mesh) -> str:
    """Returns a one-line description of the mesh."""
    devices = list(mesh.devices.flat)
    slices = slice_count(devices)
    processes = len({d.process_index for d in devices})
    span = (f", {slices} slices" if slices > 1 else "") + (f", {processes} processes" if processes > 1 else "")
    return (" x ".join(f"{name}={size}" for name, size in mesh.shape.items())
            + f" ({np.prod(list(mesh.shape.values()))} devices{span})")
