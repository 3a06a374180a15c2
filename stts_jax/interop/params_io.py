"""A params checkpoint: the model's parameters (Orbax) and its config (JSON), nothing else.

  PATH/state/              Orbax StandardCheckpointer item: the nnx.State of the model's nnx.Params
  PATH/model_config.json   the model config (stts_jax.config.model_config fields, STTS included)

`save_params` / `load_params` are the Orbax part and take any state pytree (the trainer's checkpoint module
may reuse them); `save_model` / `load_model` add the config so a directory is self-describing.

`load_train_checkpoint` reads the parameters alone out of a trainer checkpoint (stts_jax.train.checkpoint:
WORKDIR/checkpoints/STEP/{state, data, config}) with an Orbax partial restore: the optimizer state is never
read, and the model config comes from the checkpoint's `config` item (its `model` section).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from flax import nnx

from stts_jax import paths
from stts_jax.interop.hf_export import config_from_dict, config_to_dict

STATE_DIR = "state"
CONFIG_FILE = "model_config.json"


class ParamsCheckpointError(ValueError):
    """A params checkpoint cannot be written or read; the message names the path or field."""


def save_params(path: str, state) -> None:
    """Writes `state` (a pytree of arrays, e.g. an nnx.State) with Orbax to `path` (must not exist; local or gs://)."""
    import orbax.checkpoint as ocp

    path = paths.as_path(path)
    if path.exists():
        raise ParamsCheckpointError(f"{path} already exists; Orbax will not overwrite it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()


def load_params(path: str, abstract_state):
    """Returns the state saved at `path`, restored onto the shapes/dtypes/shardings of `abstract_state`."""
    import orbax.checkpoint as ocp

    path = paths.as_path(path)
    if not path.is_dir():
        raise ParamsCheckpointError(f"{path}: no Orbax checkpoint here")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(path, abstract_state)
        except (ValueError, KeyError) as e:
            raise ParamsCheckpointError(f"{path}: the checkpoint does not fit the model ({e})") from None


def save_model(path: str, model, cfg: ml_collections.ConfigDict | None = None, overwrite: bool = False) -> str:
    """Writes a model's params + config to directory `path` (local or gs://); returns `path`."""
    cfg = model.cfg if cfg is None else cfg
    where = paths.as_path(path)
    if where.is_dir() and any(where.iterdir()):
        if not overwrite:
            raise ParamsCheckpointError(f"{path} is not empty; pass overwrite=True (--overwrite) to replace it")
        where.rmtree()
    paths.makedirs(path)
    save_params(paths.join(path, STATE_DIR), nnx.state(model, nnx.Param))
    paths.write_text(paths.join(path, CONFIG_FILE), json.dumps(config_to_dict(cfg), indent=2))
    return path


def load_model_config(path: str) -> ml_collections.ConfigDict:
    """Returns the model config stored in a params checkpoint directory (missing fields are named)."""
    cfg_path = paths.as_path(paths.join(path, CONFIG_FILE))
    if not cfg_path.exists():
        raise ParamsCheckpointError(f"{path}: {CONFIG_FILE} is missing (not a params checkpoint)")
    return config_from_dict(json.loads(cfg_path.read_text()), error=ParamsCheckpointError)


def _train_checkpoints(path: str, step: int | None = None):
    """Returns (Orbax CheckpointManager over the checkpoints, step) of a trainer checkpoint given a workdir, its
    checkpoints/ or one step directory (the latest step unless given); the caller closes the manager."""
    import orbax.checkpoint as ocp

    where = paths.as_path(path)
    if (where / STATE_DIR).is_dir() and (where / "config").is_dir() and where.name.isdigit():  # one step
        root, step = where.parent, int(where.name) if step is None else step
    else:
        root = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    if not root.is_dir():
        raise ParamsCheckpointError(f"{path}: no trainer checkpoint steps found (expected {root}/<step>/state)")
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ParamsCheckpointError(f"{path}: no trainer checkpoint steps found (expected {root}/<step>/state)")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise ParamsCheckpointError(f"{path}: no checkpoint for step {step}; saved steps are {steps}")
    except BaseException:
        manager.close()
        raise
    return manager, step


def train_step_dir(path: str, step: int | None = None) -> str:
    """Returns the step directory of a trainer checkpoint given a workdir, its checkpoints/ or a step directory."""
    manager, step = _train_checkpoints(path, step)
    try:
        return str(manager.directory / str(step))
    finally:
        manager.close()


def saved_train_config(path: str, step: int | None = None) -> dict:
    """Returns the training config (a plain dict) saved with a trainer checkpoint (latest step unless given)."""
    manager, step = _train_checkpoints(path, step)
    try:
        return _saved_config(manager, step, path)
    finally:
        manager.close()


def _saved_config(manager, step: int, path: str) -> dict:
    import orbax.checkpoint as ocp

    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ParamsCheckpointError(f"{path}: checkpoint step {step} has no readable config item ({e})") from None


def _param_shardings(abstract_params, mesh):
    """Returns the NamedShardings of parameters on `mesh` (the trainer's rules), or one device without a mesh."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_params)
    from stts_jax.train import sharding

    return sharding.state_shardings(abstract_params, mesh)


def load_train_checkpoint(path: str, step: int | None = None, mesh=None):
    """Returns (model, step) holding the parameters of a trainer checkpoint (latest step unless given),
    restored straight into their shardings on `mesh` (else onto one device)."""
    import orbax.checkpoint as ocp

    from stts_jax.model.vlm import Molmo2VLM

    manager, step = _train_checkpoints(path, step)  # the step is resolved once: config and params match
    try:
        saved = _saved_config(manager, step, path)
        if "model" not in saved:
            raise ParamsCheckpointError(f"{path}: the saved config has no field `model`")
        cfg = config_from_dict(saved["model"], error=ParamsCheckpointError)
        abstract = nnx.eval_shape(lambda: Molmo2VLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
        item = {"params": abstract_params}
        restore_args = {"params": jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s),
                                               _param_shardings(abstract_params, mesh))}
        try:  # a partial restore of the state item: the optimizer state is never read
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)))["state"]
        except (ValueError, KeyError) as e:
            raise ParamsCheckpointError(f"{path}: step {step}: the parameters do not fit the model config "
                                        f"({e})") from None
    finally:
        manager.close()
    return nnx.merge(graphdef, out["params"], rest), step


def is_params_checkpoint(path: str) -> bool:
    """Returns whether `path` looks like a params checkpoint directory."""
    where = paths.as_path(path)
    return (where / STATE_DIR).is_dir() and (where / CONFIG_FILE).exists()


def load_model(path: str, cfg: ml_collections.ConfigDict | None = None, mesh=None):
    """Returns the Molmo2VLM stored at `path` (config from the checkpoint unless given), restored straight into
    its parameter shardings on `mesh` when one is given."""
    from stts_jax.model.vlm import Molmo2VLM

    cfg = load_model_config(path) if cfg is None else cfg
    abstract = nnx.eval_shape(lambda: Molmo2VLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ParamsCheckpointError("the model holds non-parameter state, which a params checkpoint does not store")
    if mesh is not None:
        shardings = _param_shardings(abstract_params, mesh)
        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       abstract_params, shardings)
    params = load_params(paths.join(path, STATE_DIR), abstract_params)
    return nnx.merge(graphdef, params, rest)


def is_train_workdir(path: str) -> bool:
    """Returns whether `path` holds trainer checkpoints (a workdir, its checkpoints/ or one step directory)."""
    try:
        train_step_dir(path)
        return True
    except ParamsCheckpointError:
        return False


CHECKPOINT_KINDS = ("params", "train", "hf")


def checkpoint_kind(path: str, kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> str:
    """Returns which checkpoint `path` is: `params` (state/ + model_config.json), `train` (a training workdir, its
    checkpoints/ or one step) or `hf` (a Hugging Face directory: config.json + safetensors); only `kinds` count.
    Raises ParamsCheckpointError naming the layouts looked for."""
    if not paths.as_path(path).is_dir():
        raise ParamsCheckpointError(f"{path} is not a directory")
    if "params" in kinds and is_params_checkpoint(path):
        return "params"
    if "train" in kinds and is_train_workdir(path):
        return "train"
    if "hf" in kinds and paths.as_path(paths.join(path, "config.json")).exists():
        return "hf"
    names = dict(params="a params checkpoint (state/ + model_config.json)",
                 train="a training workdir (checkpoints/)", hf="a Hugging Face directory (config.json)")
    raise ParamsCheckpointError(f"{path} is none of: " + "; ".join(names[k] for k in kinds))


def checkpoint_model_config(path: str, kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> ml_collections.ConfigDict:
    """Returns the model config of any checkpoint kind without reading its weights (e.g. to build a mesh)."""
    kind = checkpoint_kind(path, kinds)
    if kind == "params":
        return load_model_config(path)
    if kind == "train":
        return config_from_dict(saved_train_config(path)["model"], error=ParamsCheckpointError)
    from stts_jax.interop.hf_export import read_config

    return read_config(path)


@dataclasses.dataclass
class Checkpoint:
    """What `load_checkpoint` found: the model, the kind, and for a training workdir its step and saved config."""

    model: object  # Molmo2VLM
    kind: str
    step: int | None = None
    train_config: dict | None = None  # the trainer's saved config (plain dict), for `train`


def load_checkpoint(path: str, *, kinds: tuple[str, ...] = CHECKPOINT_KINDS, step: int | None = None,
                    mesh=None) -> Checkpoint:
    """Loads any checkpoint this project reads (see checkpoint_kind) — the one loader of every entry point.

    `params` and `train` restore straight into their parameter shardings on `mesh` (else one device); an `hf`
    directory loads through the importer on one device (its scorer from stts_scorer.safetensors when present), so
    it takes no mesh: import it once (launch/import_hf.py) to restore the params checkpoint onto one. `step` picks a
    training checkpoint (latest by default).
    """
    kind = checkpoint_kind(path, kinds)
    if kind == "hf" and mesh is not None:
        raise ParamsCheckpointError(f"{path} is a Hugging Face directory, which loads on one device; convert it with "
                                    "launch/import_hf.py and restore that params checkpoint onto the mesh")
    if kind == "params":
        return Checkpoint(load_model(path, mesh=mesh), kind)
    if kind == "train":
        model, at = load_train_checkpoint(path, step, mesh=mesh)
        return Checkpoint(model, kind, at, saved_train_config(path, at))
    from absl import logging

    from stts_jax.interop.hf_export import load_exported

    model, report = load_exported(path)
    if report.fresh:
        logging.warning("%s lacks %s: initialised at random", path, report.fresh)
    return Checkpoint(model, kind)


def transplant(model, cfg: ml_collections.ConfigDict, *, seed: int = 0, fresh: tuple[str, ...] = (), mesh=None):
    """Returns (a model of config `cfg` holding `model`'s weights, the paths initialised fresh).

    Every parameter of the new model is taken from `model` by path and must have the same shape; parameters
    `model` lacks are initialised from `seed` if their top-level module is in `fresh` (e.g. ("scorer",) to
    start STTS from an unpruned model), else ParamsCheckpointError names them. Weights are shared, not copied.
    With a mesh, fresh parameters are initialised sharded (one jitted init).
    """
    from stts_jax.model.vlm import Molmo2VLM

    make = lambda: Molmo2VLM(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    if not fresh:
        graphdefs = []

        def build():
            graphdef, state = nnx.split(make())
            graphdefs.append(graphdef)
            return state

        state = jax.eval_shape(build)  # (not nnx.eval_shape: under a mesh it reads logical names as mesh axes)
        graphdef = graphdefs[-1]
    else:
        from stts_jax.train import sharding

        graphdef, state = nnx.split(sharding.init_sharded(make, mesh) if mesh is not None else make())
    source = dict(nnx.to_flat_state(nnx.state(model)))
    flat, new = [], []
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        if path in source:
            if source[path].get_value().shape != var.get_value().shape:
                raise ParamsCheckpointError(f"{name}: shape {source[path].get_value().shape} in the source model, "
                                            f"{var.get_value().shape} in the target config")
            flat.append((path, source[path]))
        elif path[0] in fresh:
            flat.append((path, var))
            new.append(name)
        else:
            raise ParamsCheckpointError(f"the source model has no {name} (its stts.method is "
                                        f"{model.cfg.stts.method!r})")
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), new
