"""Write a Molmo2VLM as a Hugging Face directory that `Molmo2ForConditionalGeneration.from_pretrained` loads.

Directory layout (the native transformers layout, which the released-layout loader also reads back):

  config.json                        Molmo2Config (vision_config / adapter_config / text_config + token ids)
  generation_config.json             bos / eos / pad ids when known
  model-0000i-of-0000n.safetensors   `model.vision_tower.*`, `model.multi_modal_projector.*`,
  model.safetensors.index.json       `model.language_model.*`, `lm_head.weight` (torch layout: Linear [out, in])
  stts_scorer.safetensors            the STTS scorer (torch layout), only when the model has one
  stts_config.json                   the STTS knobs, every special-token id and the model's shapes

Every tensor name is the inverse of `hf_import.RULES` (native part): the exporter asks the importer's own
rule for each name it writes and refuses a name that would not load back into the same parameter.

Streaming: shards are planned from the parameter shapes first, then each tensor is fetched from its device,
converted (dtype, transpose) and written with the rest of its shard; at most one shard's worth of host copies
exists at a time (`max_shard_bytes`, default 2 GB), never two full copies of the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from stts_jax import paths
from stts_jax.config import MOLMO2_TOKENS, ConfigError, model_config, stts_config, validate_model_config
from stts_jax.geometry import tokens_per_frame
from stts_jax.interop import hf_import

STTS_CONFIG_FILE = "stts_config.json"
STTS_SCORER_FILE = "stts_scorer.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
EXPORT_DTYPES = ("float32", "bfloat16")
# Qwen3 tokenizer ids of the released Molmo2 (bos = eos = <|im_end|>, pad = <|endoftext|>)
QWEN_GENERATION_IDS = dict(bos_token_id=151645, eos_token_id=151645, pad_token_id=151643)


class ExportError(ValueError):
    """The model / config / directory cannot be exported; the message names the culprit."""


# ------------------------------------------------------------------------------------------- config

def config_template() -> ml_collections.ConfigDict:
    """Returns a full model config (STTS section included): the fields an exportable config must have."""
    return model_config(stts=stts_config())


def check_config_fields(cfg, template: ml_collections.ConfigDict | None = None, prefix: str = "",
                        error=ExportError) -> None:
    """Raises `error` naming the first field of `template` that `cfg` lacks (recursively)."""
    template = config_template() if template is None else template
    for key, value in template.items():
        name = f"{prefix}{key}"
        if key not in cfg:
            raise error(f"config field `{name}` is missing (a complete model config has it; see "
                        f"stts_jax.config.model_config)")
        if isinstance(value, ml_collections.ConfigDict):
            if not isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
                raise error(f"config field `{name}` must be a section, got {type(cfg[key]).__name__}")
            check_config_fields(cfg[key], value, name + ".", error)


def config_from_dict(data: dict, error=ExportError) -> ml_collections.ConfigDict:
    """Returns a model config rebuilt from a JSON dict (tuples restored), naming any missing field."""
    template = config_template()
    check_config_fields(data, template, error=error)

    def fill(tmpl: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
        out = {}
        for key, default in tmpl.items():
            value = values[key]
            if isinstance(default, ml_collections.ConfigDict):
                value = fill(default, value)
            elif isinstance(default, tuple):
                value = tuple(value)
            out[key] = value
        return ml_collections.ConfigDict(out)

    return fill(template, data)


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Returns a JSON-ready dict of a model config."""
    return json.loads(cfg.to_json())


def hf_config_dict(cfg: ml_collections.ConfigDict, dtype: str = "float32") -> dict:
    """Returns config.json contents for transformers' Molmo2Config describing `cfg` (native key names)."""
    vit, ad, llm, tok = cfg.vit, cfg.adapter, cfg.llm, cfg.tokens
    rope = {"rope_type": llm.rope_type, "rope_theta": float(llm.rope_theta)}
    if llm.rope_type == "linear":
        rope["factor"] = float(llm.rope_factor)
    scaling_layers = list(llm.rope_scaling_layers) if len(llm.rope_scaling_layers) else list(range(llm.num_layers))
    return {
        "architectures": ["Molmo2ForConditionalGeneration"],
        "model_type": "molmo2",
        "dtype": dtype,
        "vision_config": {
            "model_type": "molmo2_vision", "hidden_size": vit.hidden_size, "intermediate_size": vit.mlp_dim,
            "num_hidden_layers": vit.num_layers, "num_attention_heads": vit.num_heads,
            "num_key_value_heads": vit.num_heads, "head_dim": vit.head_dim, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": vit.layer_norm_eps, "image_size": [vit.image_size, vit.image_size],
            "patch_size": vit.patch_size, "num_position_embeddings": (vit.image_size // vit.patch_size) ** 2,
            "num_channels": vit.num_channels, "attention_bias": True, "attention_dropout": 0.0,
        },
        "adapter_config": {
            "model_type": "molmo2_adapter", "vision_feature_layer": [int(l) for l in ad.feature_layers],
            "hidden_size": vit.hidden_size, "num_attention_heads": ad.num_heads, "num_key_value_heads": ad.num_heads,
            "head_dim": ad.head_dim, "intermediate_size": ad.mlp_dim, "text_hidden_size": llm.hidden_size,
            "hidden_act": "silu", "attention_bias": True, "mlp_bias": False, "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "molmo2_text", "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
            "head_dim": llm.head_dim, "intermediate_size": llm.mlp_dim, "vocab_size": llm.vocab_size,
            "additional_vocab_size": llm.additional_vocab_size, "rms_norm_eps": llm.rms_norm_eps,
            "qk_norm_type": llm.qk_norm_type, "norm_after": bool(llm.norm_after), "rope_parameters": rope,
            "rope_scaling_layers": scaling_layers, "attention_bias": False, "hidden_act": "silu",
            "tie_word_embeddings": False, "use_cache": True,
        },
        "image_start_token_id": tok.image_start_id,
        "low_res_image_start_token_id": tok.low_res_image_start_id,
        "image_end_token_id": tok.image_end_id,
        "image_patch_id": tok.image_patch_id,
        "frame_start_token_id": tok.frame_start_id,
        "frame_end_token_id": tok.frame_end_id,
        "tie_word_embeddings": False,
    }


def check_hf_expressible(cfg: ml_collections.ConfigDict) -> None:
    """Raises ExportError if transformers' Molmo2 cannot express `cfg` (e.g. a pool size other than 3)."""
    if cfg.adapter.pool_size != 3:
        raise ExportError(f"config field `adapter.pool_size` = {cfg.adapter.pool_size}: transformers' Molmo2 "
                          f"pools video frames 3x3 only")
    if cfg.vit.num_channels != 3:
        raise ExportError("config field `vit.num_channels` must be 3")


# ---------------------------------------------------------------------------------------- key names

def _linear(name: str):
    return name, True


def _same(name: str):
    return name, False


# (regex over our dotted parameter path) -> (torch tensor name template, transpose?)
_EXPORT_RULES: list[tuple[str, tuple[str, bool]]] = [
    (r"vit\.patch_embedding\.kernel", _linear("model.vision_tower.patch_embedding.weight")),
    (r"vit\.patch_embedding\.bias", _same("model.vision_tower.patch_embedding.bias")),
    (r"vit\.position_embedding", _same("model.vision_tower.positional_embedding")),
    (r"vit\.blocks\.(\d+)\.norm([12])\.scale", _same("model.vision_tower.layers.{0}.layer_norm{1}.weight")),
    (r"vit\.blocks\.(\d+)\.norm([12])\.bias", _same("model.vision_tower.layers.{0}.layer_norm{1}.bias")),
    (r"vit\.blocks\.(\d+)\.attn\.([qkvo])\.kernel", _linear("model.vision_tower.layers.{0}.self_attn.{1}_proj.weight")),
    (r"vit\.blocks\.(\d+)\.attn\.([qkvo])\.bias", _same("model.vision_tower.layers.{0}.self_attn.{1}_proj.bias")),
    (r"vit\.blocks\.(\d+)\.(fc[12])\.kernel", _linear("model.vision_tower.layers.{0}.mlp.{1}.weight")),
    (r"vit\.blocks\.(\d+)\.(fc[12])\.bias", _same("model.vision_tower.layers.{0}.mlp.{1}.bias")),
    (r"adapter\.pooling\.([qkvo])\.kernel", _linear("model.multi_modal_projector.image_pooling_2d.{0}_proj.weight")),
    (r"adapter\.pooling\.([qkvo])\.bias", _same("model.multi_modal_projector.image_pooling_2d.{0}_proj.bias")),
    (r"adapter\.(gate|up|down)\.kernel", _linear("model.multi_modal_projector.image_projector.{0}_proj.weight")),
    (r"llm\.embedding", _same("model.language_model.embed_tokens.weight")),
    (r"llm\.layers\.(\d+)\.attn_norm\.scale", _same("model.language_model.layers.{0}.input_layernorm.weight")),
    (r"llm\.layers\.(\d+)\.mlp_norm\.scale", _same("model.language_model.layers.{0}.post_attention_layernorm.weight")),
    (r"llm\.layers\.(\d+)\.([qkvo])\.kernel", _linear("model.language_model.layers.{0}.self_attn.{1}_proj.weight")),
    (r"llm\.layers\.(\d+)\.([qk])_norm\.scale", _same("model.language_model.layers.{0}.self_attn.{1}_norm.weight")),
    (r"llm\.layers\.(\d+)\.(gate|up|down)\.kernel", _linear("model.language_model.layers.{0}.mlp.{1}_proj.weight")),
    (r"llm\.final_norm\.scale", _same("model.language_model.norm.weight")),
    (r"llm\.lm_head\.kernel", _linear("lm_head.weight")),
]
# the scorer, in stts_scorer.safetensors (torch layout, names of torch_stts.TemporalTokenScorer)
_SCORER_RULES: list[tuple[str, tuple[str, bool]]] = [
    (r"scorer\.pooling\.([qkvo])\.kernel", _linear("pooling.{0}_proj.weight")),
    (r"scorer\.pooling\.([qkvo])\.bias", _same("pooling.{0}_proj.bias")),
    (r"scorer\.(fc[123])\.kernel", _linear("{0}.weight")),
    (r"scorer\.(fc[123])\.bias", _same("{0}.bias")),
]
_COMPILED_EXPORT = [(re.compile(p + "$"), t) for p, t in _EXPORT_RULES]
_COMPILED_SCORER = [(re.compile(p + "$"), t) for p, t in _SCORER_RULES]


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def torch_name(path_str: str, scorer: bool = False) -> tuple[str, bool] | None:
    """Returns (tensor name, transpose) for one of our parameter paths, or None if no rule knows it."""
    for pattern, (template, transpose) in (_COMPILED_SCORER if scorer else _COMPILED_EXPORT):
        m = pattern.match(path_str)
        if m:
            return template.format(*m.groups()), transpose
    return None


def scorer_path(name: str) -> tuple | None:
    """Returns our parameter path (tuple) of a stts_scorer.safetensors tensor name, or None."""
    inverse = [
        (r"pooling\.([qkvo])_proj\.weight", "scorer.pooling.{0}.kernel"),
        (r"pooling\.([qkvo])_proj\.bias", "scorer.pooling.{0}.bias"),
        (r"(fc[123])\.weight", "scorer.{0}.kernel"),
        (r"(fc[123])\.bias", "scorer.{0}.bias"),
    ]
    for pattern, template in inverse:
        m = re.fullmatch(pattern, name)
        if m:
            return tuple(template.format(*m.groups()).split("."))
    return None


# ---------------------------------------------------------------------------------------- writing

@dataclass
class ExportReport:
    """What the exporter wrote."""
    out_dir: str
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_written: int = 0
    scorer_tensors: int = 0
    dtype: str = "float32"
    copied: list[str] = field(default_factory=list)  # tokenizer / processor files copied alongside


def _parse_size(size) -> int:
    """Returns bytes for an int or a string like '5GB', '200MB', '20KB'."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ExportError(f"cannot read the shard size {size!r}; use e.g. 5GB, 200MB or a byte count")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3}[unit])


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Creates `out_dir`, refusing a non-empty one unless `overwrite` (then only our files are removed)."""
    where = paths.as_path(out_dir)
    if where.exists() and not where.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    entries = list(where.iterdir()) if where.is_dir() else []
    if entries:
        if not overwrite:
            raise ExportError(f"{out_dir} is not empty ({len(entries)} entries); pass "
                              f"overwrite=True (--overwrite) to replace an earlier export")
        for entry in entries:
            if entry.name.endswith(".safetensors") or entry.name in (INDEX_FILE, "config.json",
                                                                     "generation_config.json", STTS_CONFIG_FILE):
                entry.unlink()
    paths.makedirs(out_dir)


def _flat_params(state) -> list[tuple[str, object]]:
    """Returns [(dotted path, variable value)] of every nnx.Param in `state` (a model or an nnx.State)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var[...] if isinstance(var, nnx.Variable) else var
        out.append((_path_str(path), value))
    return out


def _host(value, dtype, transpose: bool) -> np.ndarray:
    """Returns one tensor on the host in `dtype`, torch layout, contiguous (the only host copy made)."""
    array = np.asarray(jax.device_get(value))
    array = array.astype(np.dtype(jax.numpy.dtype(dtype)), copy=False)
    return np.ascontiguousarray(array.T if transpose else array)


def _plan(entries: list[tuple[str, str, bool, tuple, object]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Returns shards as lists of entry indices, each at most max_bytes (a bigger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for i, (_, _, _, shape, _) in enumerate(entries):
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def export_hf(model_or_state, cfg: ml_collections.ConfigDict, out_dir: str, *, dtype: str = "float32",
              overwrite: bool = False, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
              generation: dict | None = None) -> ExportReport:
    """Returns an ExportReport after writing `model_or_state` (Molmo2VLM or its nnx.State) to `out_dir`.

    `generation` holds generation_config.json ids (bos/eos/pad_token_id); by default the Qwen3 ids when the
    vocabulary is Qwen's (151,936 rows), else none.
    """
    check_config_fields(cfg)
    try:
        validate_model_config(cfg)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    check_hf_expressible(cfg)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    max_bytes = _parse_size(max_shard_bytes)
    params = _flat_params(model_or_state)
    entries, scorer_entries, unknown = [], [], []
    for path, value in params:
        is_scorer = path.startswith("scorer.")
        named = torch_name(path, scorer=is_scorer)
        if named is None:
            unknown.append(path)
            continue
        name, transpose = named
        shape = tuple(value.shape)[::-1] if transpose else tuple(value.shape)
        if not is_scorer:
            _check_inverse(name, path, cfg)
        (scorer_entries if is_scorer else entries).append((path, name, transpose, shape, value))
    if unknown:
        raise ExportError(f"{len(unknown)} parameters have no Hugging Face name: {unknown[:10]}")
    if cfg.stts.method == "scorer" and not scorer_entries:
        raise ExportError("cfg.stts.method is 'scorer' but the state holds no scorer parameters")

    prepare_out_dir(out_dir, overwrite)
    report = ExportReport(out_dir=out_dir, dtype=dtype)
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    shards = _plan(entries, itemsize, max_bytes)
    weight_map, total = {}, 0
    for s, indices in enumerate(shards):
        fname = (f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors")
        tensors = {}
        for i in indices:
            _, name, transpose, _, value = entries[i]
            tensors[name] = _host(value, dtype, transpose)
            weight_map[name] = fname
        _save_tensors(tensors, out_dir, fname)
        total += sum(t.nbytes for t in tensors.values())
        report.shards.append(fname)
        report.tensors += len(tensors)
        del tensors  # this shard's host copies go before the next shard is fetched
    _write_json(out_dir, INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    if scorer_entries:
        tensors = {name: _host(value, dtype, transpose) for _, name, transpose, _, value in scorer_entries}
        _save_tensors(tensors, out_dir, STTS_SCORER_FILE)
        total += sum(t.nbytes for t in tensors.values())
        report.scorer_tensors = len(tensors)
    report.bytes_written = total
    _write_json(out_dir, "config.json", hf_config_dict(cfg, dtype))
    if generation is None:
        generation = dict(QWEN_GENERATION_IDS) if cfg.llm.vocab_size == 151936 else {}
    _write_json(out_dir, "generation_config.json", {"_from_model_config": False, **generation})
    _write_json(out_dir, STTS_CONFIG_FILE, stts_config_dict(cfg, has_scorer=bool(scorer_entries)))
    return report


def _write_json(out_dir: str, name: str, data: dict) -> None:
    paths.write_text(paths.join(out_dir, name), json.dumps(data, indent=2))


def _save_tensors(tensors: dict, out_dir: str, fname: str) -> None:
    """Writes one safetensors file (to gs:// through a local temporary file, removed once uploaded)."""
    from safetensors.numpy import save_file

    with paths.staged_dir(out_dir) if paths.is_remote(out_dir) else contextlib.nullcontext(out_dir) as local:
        save_file(tensors, os.path.join(local, fname), metadata={"format": "pt"})


def _check_inverse(name: str, path: str, cfg) -> None:
    """Raises ExportError unless the importer's rule maps tensor `name` back onto parameter `path`."""
    convert = hf_import.converter_for(name, cfg)
    if convert is None:
        raise ExportError(f"exported name {name} (from {path}) is unknown to the importer")
    probe = np.zeros((1, 1), np.float32)
    got = [_path_str(p) for p, _ in convert(probe)]
    if got != [path]:
        raise ExportError(f"exported name {name} would import into {got}, not {path}")


def stts_config_dict(cfg: ml_collections.ConfigDict, has_scorer: bool) -> dict:
    """Returns stts_config.json contents: STTS knobs, all special tokens and the shapes the twin needs."""
    return {
        "format_version": FORMAT_VERSION,
        "stts": json.loads(cfg.stts.to_json()),
        "has_scorer": has_scorer,
        "tokens": {k: int(v) for k, v in cfg.tokens.items()},
        "grid": cfg.vit.image_size // cfg.vit.patch_size,
        "pool_size": cfg.adapter.pool_size,
        "windows_per_frame": tokens_per_frame(cfg),
        "vit_hidden_size": cfg.vit.hidden_size,
        "vit_num_heads": cfg.vit.num_heads,
        "vit_head_dim": cfg.vit.head_dim,
        "vit_mlp_dim": cfg.vit.mlp_dim,
        "model_config": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------- reading back

def read_config(hf_dir: str) -> ml_collections.ConfigDict:
    """Returns our model config of an exported (or any Molmo2) directory: config.json + stts_config.json."""
    cfg_path = paths.as_path(paths.join(hf_dir, "config.json"))
    if not cfg_path.exists():
        raise hf_import.CheckpointError(f"{hf_dir}: config.json is missing")
    cfg = hf_import.config_from_hf(json.loads(cfg_path.read_text()))
    stts_path = paths.as_path(paths.join(hf_dir, STTS_CONFIG_FILE))
    if stts_path.exists():
        extra = json.loads(stts_path.read_text())
        stts = stts_config()
        for key, value in extra.get("stts", {}).items():
            if key in stts:
                stts[key] = value
        cfg.stts = stts
        tokens = dict(MOLMO2_TOKENS)
        tokens.update({k: int(v) for k, v in cfg.tokens.items()})
        tokens.update({k: int(v) for k, v in extra.get("tokens", {}).items()})
        cfg.tokens = ml_collections.ConfigDict(tokens)
    return cfg


def iter_scorer_tensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, tensor) of stts_scorer.safetensors one at a time."""
    from safetensors import SafetensorError, safe_open

    with paths.local_file(paths.join(hf_dir, STTS_SCORER_FILE)) as path:
        try:
            handle = safe_open(path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise hf_import.CheckpointError(f"{STTS_SCORER_FILE}: not a readable safetensors file ({e})") from None
        with handle as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_scorer(model, hf_dir: str) -> int:
    """Loads stts_scorer.safetensors into `model.scorer` (shapes checked); returns the tensors read."""
    if model.scorer is None:
        raise hf_import.CheckpointError(f"{hf_dir} holds {STTS_SCORER_FILE} but the model has no scorer "
                                        f"(cfg.stts.method={model.cfg.stts.method!r})")
    targets = {_path_str(("scorer",) + tuple(p)): v for p, v in nnx.to_flat_state(nnx.state(model.scorer, nnx.Param))}
    seen = set()
    for name, tensor in iter_scorer_tensors(hf_dir):
        path = scorer_path(name)
        if path is None or _path_str(path) not in targets:
            raise hf_import.CheckpointError(f"{STTS_SCORER_FILE}: unexpected tensor {name}")
        var = targets[_path_str(path)]
        hf_import.check_weight_dtype(f"{STTS_SCORER_FILE}: {name}", tensor.dtype)
        array = tensor.T if path[-1] == "kernel" else tensor
        if tuple(array.shape) != tuple(var.shape):
            raise hf_import.CheckpointError(
                f"{STTS_SCORER_FILE}: tensor {name} has shape {tuple(tensor.shape)} but the model's "
                f"{_path_str(path)} needs {tuple(var.shape)} (torch layout {tuple(var.shape)[::-1] if path[-1] == 'kernel' else tuple(var.shape)}; "
                f"check config.json / stts_config.json)")
        var.set_value(jax.numpy.asarray(np.asarray(array, dtype=var.dtype)))
        seen.add(_path_str(path))
    missing = sorted(set(targets) - seen)
    if missing:
        raise hf_import.CheckpointError(f"{STTS_SCORER_FILE} lacks {len(missing)} scorer tensors: {missing[:5]}")
    return len(seen)


def load_exported(hf_dir: str, cfg: ml_collections.ConfigDict | None = None, **kwargs):
    """Returns (model, report) of a Molmo2 directory: weights via hf_import, the scorer from stts_scorer.safetensors.

    Without stts_scorer.safetensors a scorer the config asks for is initialised fresh (as `load_molmo2`).
    """
    cfg = read_config(hf_dir) if cfg is None else cfg
    model, report = hf_import.load_molmo2(hf_dir, cfg, **kwargs)
    if paths.as_path(paths.join(hf_dir, STTS_SCORER_FILE)).exists() and model.scorer is not None:
        load_scorer(model, hf_dir)
        report.fresh = [name for name in report.fresh if name != "scorer"]
    return model, report


def copy_extra_files(src_dir: str, out_dir: str, names=("tokenizer.json", "tokenizer_config.json",
                                                        "special_tokens_map.json", "chat_template.jinja",
                                                        "preprocessor_config.json", "processor_config.json")) -> list[str]:
    """Copies tokenizer / processor files that exist in `src_dir` into `out_dir`; returns their names."""
    copied = []
    for name in names:
        src = paths.join(src_dir, name)
        if paths.as_path(src).exists():
            paths.copy_file(src, paths.join(out_dir, name))
            copied.append(name)
    return copied
