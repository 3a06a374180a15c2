"""Read a Molmo2 checkpoint directory (safetensors + config.json) into a Molmo2VLM.

Accepts both tensor layouts:
  native    what `save_pretrained(d, save_original_format=False)` writes: model.vision_tower.*,
            model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  released  the layout of the released checkpoints (and of plain `save_pretrained(d)`):
            model.vision_backbone.*, model.transformer.* with fused att_proj [q; k; v] and ff_proj [up; gate]

Tensors are read one at a time (safetensors `safe_open`), converted, checked against the model's shapes
and placed (optionally straight onto their mesh sharding) before the next is read; the one exception is
the released embedding, whose two halves are copied into one preallocated table.
Parameters the checkpoint lacks are an error unless their path starts with an allowed prefix (the STTS
scorer): those are initialised fresh and listed in a log line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from stts_jax import paths
from stts_jax.config import MOLMO2_TOKENS, adapter_config, llm_config, model_config, vit_config

FRESH_OK_DEFAULT = ("scorer",)


class CheckpointError(ValueError):
    """A checkpoint cannot be read into the model; the message names the file, tensor or key."""


# ----------------------------------------------------------------------------------------------- config

def _norm_layer(layer: int, num_layers: int) -> int:
    return layer % num_layers


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Returns our model config for a transformers Molmo2 config.json dict (native or legacy key names)."""
    if not ("vision_config" in hf or "vit_config" in hf) or "adapter_config" not in hf or "text_config" not in hf:
        raise CheckpointError("config.json: needs vision_config (or vit_config), adapter_config and text_config")
    vis = dict(hf.get("vision_config") or hf.get("vit_config") or {})
    legacy_vit = "vision_config" not in hf and "vit_config" in hf
    ad = dict(hf.get("adapter_config") or {})
    txt = dict(hf.get("text_config") or {})
    image_size = vis.get("image_size", vis.get("image_default_input_size", [378, 378]))
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    num_vit = vis.get("num_hidden_layers", 25)
    layers = [_norm_layer(l, num_vit) for l in ad.get("vision_feature_layer", ad.get("vit_layers", [24, 18]))]
    if legacy_vit:  # transformers trims the ViT after the deepest layer the adapter reads
        num_vit = max(layers) + 1
    if vis.get("num_key_value_heads", vis.get("num_attention_heads")) != vis.get("num_attention_heads"):
        raise CheckpointError("config.json: vision_config.num_key_value_heads != num_attention_heads is unsupported")
    rope = dict(txt.get("rope_parameters") or txt.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", txt.get("rope_theta", 1_000_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    num_text = txt.get("num_hidden_layers", 36)
    scaling_layers = txt.get("rope_scaling_layers")
    scaling_layers = () if scaling_layers is None or len(scaling_layers) == num_text else tuple(scaling_layers)
    cfg = model_config(
        vit=vit_config(
            hidden_size=vis.get("hidden_size", 1152), num_layers=num_vit,
            num_heads=vis.get("num_attention_heads", 16), head_dim=vis.get("head_dim", 72),
            mlp_dim=vis.get("intermediate_size", 4304), patch_size=vis.get("patch_size", vis.get("image_patch_size", 14)),
            image_size=image_size, layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
        ),
        adapter=adapter_config(
            feature_layers=tuple(layers), num_heads=ad.get("num_attention_heads", 16),
            head_dim=ad.get("head_dim", 72), mlp_dim=ad.get("intermediate_size", 9728),
        ),
        llm=llm_config(
            hidden_size=txt.get("hidden_size", 2560), num_layers=num_text,
            num_heads=txt.get("num_attention_heads", 32), num_kv_heads=txt.get("num_key_value_heads", 8),
            head_dim=txt.get("head_dim", 128), mlp_dim=txt.get("intermediate_size", 9728),
            vocab_size=txt.get("vocab_size", 151936), additional_vocab_size=txt.get("additional_vocab_size", 128),
            rms_norm_eps=txt.get("rms_norm_eps", txt.get("layer_norm_eps", 1e-6)),
            qk_norm_type=txt.get("qk_norm_type", "qwen3"), norm_after=bool(txt.get("norm_after", False)),
            rope_theta=float(rope_theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
            rope_scaling_layers=scaling_layers,
        ),
    )
    # Special tokens: those config.json names, the rest at Molmo2's offsets from <im_start>.
    start = hf.get("image_start_token_id", MOLMO2_TOKENS["image_start_id"])
    tokens = {k: v - MOLMO2_TOKENS["image_start_id"] + start for k, v in MOLMO2_TOKENS.items()}
    for ours, theirs in (("image_end_id", "image_end_token_id"), ("image_patch_id", "image_patch_id"),
                         ("low_res_image_start_id", "low_res_image_start_token_id"),
                         ("frame_start_id", "frame_start_token_id"), ("frame_end_id", "frame_end_token_id")):
        if theirs in hf:
            tokens[ours] = hf[theirs]
    cfg.tokens = ml_collections.ConfigDict(tokens)
    return cfg


# --------------------------------------------------------------------------------------- key mapping

Path = tuple  # an nnx state path, e.g. ("vit", "blocks", 3, "attn", "q", "kernel")
Convert = Callable[[np.ndarray], list[tuple[Path, np.ndarray]]]


def _path(template: str, m: re.Match) -> Path:
    parts = template.format(*m.groups()).split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _linear(template: str) -> Callable[[re.Match, dict], Convert]:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return lambda m, cfg: (lambda t: [(_path(template, m), t.T)])


def _same(template: str) -> Callable[[re.Match, dict], Convert]:
    return lambda m, cfg: (lambda t: [(_path(template, m), t)])


def _fused_qkv(prefix: str) -> Callable[[re.Match, dict], Convert]:
    def make(m, cfg):
        llm = cfg.llm
        q_rows, kv_rows = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
        base = _path(prefix, m)
        def convert(t):
            if t.shape[0] != q_rows + 2 * kv_rows:
                raise CheckpointError(f"fused att_proj has {t.shape[0]} rows, config needs q {q_rows} + k {kv_rows} "
                                      f"+ v {kv_rows} = {q_rows + 2 * kv_rows} (shape {t.shape})")
            q, k, v = np.split(t, [q_rows, q_rows + kv_rows])
            return [(base + ("q", "kernel"), q.T), (base + ("k", "kernel"), k.T), (base + ("v", "kernel"), v.T)]
        return convert
    return make


def _fused_up_gate(prefix: str) -> Callable[[re.Match, dict], Convert]:
    def make(m, cfg):
        base = _path(prefix, m)
        def convert(t):
            if t.shape[0] % 2:
                raise CheckpointError(f"fused ff_proj has an odd number of rows {t.shape[0]} (shape {t.shape})")
            up, gate = np.split(t, 2)
            return [(base + ("up", "kernel"), up.T), (base + ("gate", "kernel"), gate.T)]
        return convert
    return make


_VIT_NATIVE = r"model\.vision_tower\."
_VIT_LEGACY = r"model\.vision_backbone\.image_vit\."
_BLOCK_LEGACY = _VIT_LEGACY + r"transformer\.resblocks\.(\d+)\."
_LLM_LEGACY = r"model\.transformer\.blocks\.(\d+)\."

RULES: list[tuple[str, Callable]] = [
    # ---- native layout (transformers' own names)
    (_VIT_NATIVE + r"patch_embedding\.weight", _linear("vit.patch_embedding.kernel")),
    (_VIT_NATIVE + r"patch_embedding\.bias", _same("vit.patch_embedding.bias")),
    (_VIT_NATIVE + r"positional_embedding", _same("vit.position_embedding")),
    (_VIT_NATIVE + r"layers\.(\d+)\.layer_norm([12])\.weight", _same("vit.blocks.{0}.norm{1}.scale")),
    (_VIT_NATIVE + r"layers\.(\d+)\.layer_norm([12])\.bias", _same("vit.blocks.{0}.norm{1}.bias")),
    (_VIT_NATIVE + r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", _linear("vit.blocks.{0}.attn.{1}.kernel")),
    (_VIT_NATIVE + r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", _same("vit.blocks.{0}.attn.{1}.bias")),
    (_VIT_NATIVE + r"layers\.(\d+)\.mlp\.(fc[12])\.weight", _linear("vit.blocks.{0}.{1}.kernel")),
    (_VIT_NATIVE + r"layers\.(\d+)\.mlp\.(fc[12])\.bias", _same("vit.blocks.{0}.{1}.bias")),
    (r"model\.multi_modal_projector\.image_pooling_2d\.([qkvo])_proj\.weight", _linear("adapter.pooling.{0}.kernel")),
    (r"model\.multi_modal_projector\.image_pooling_2d\.([qkvo])_proj\.bias", _same("adapter.pooling.{0}.bias")),
    (r"model\.multi_modal_projector\.image_projector\.(gate|up|down)_proj\.weight", _linear("adapter.{0}.kernel")),
    (r"model\.language_model\.embed_tokens\.weight", _same("llm.embedding")),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.weight", _same("llm.layers.{0}.attn_norm.scale")),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", _same("llm.layers.{0}.mlp_norm.scale")),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", _linear("llm.layers.{0}.{1}.kernel")),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", _same("llm.layers.{0}.{1}_norm.scale")),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", _linear("llm.layers.{0}.{1}.kernel")),
    (r"model\.language_model\.norm\.weight", _same("llm.final_norm.scale")),
    (r"lm_head\.weight", _linear("llm.lm_head.kernel")),
    # ---- released (legacy) layout
    (_VIT_LEGACY + r"patch_embedding\.weight", _linear("vit.patch_embedding.kernel")),
    (_VIT_LEGACY + r"patch_embedding\.bias", _same("vit.patch_embedding.bias")),
    (_VIT_LEGACY + r"positional_embedding", _same("vit.position_embedding")),
    (_BLOCK_LEGACY + r"attention_norm\.weight", _same("vit.blocks.{0}.norm1.scale")),
    (_BLOCK_LEGACY + r"attention_norm\.bias", _same("vit.blocks.{0}.norm1.bias")),
    (_BLOCK_LEGACY + r"ffn_norm\.weight", _same("vit.blocks.{0}.norm2.scale")),
    (_BLOCK_LEGACY + r"ffn_norm\.bias", _same("vit.blocks.{0}.norm2.bias")),
    (_BLOCK_LEGACY + r"attention\.w([qkvo])\.weight", _linear("vit.blocks.{0}.attn.{1}.kernel")),
    (_BLOCK_LEGACY + r"attention\.w([qkvo])\.bias", _same("vit.blocks.{0}.attn.{1}.bias")),
    (_BLOCK_LEGACY + r"feed_forward\.w([12])\.weight", _linear("vit.blocks.{0}.fc{1}.kernel")),
    (_BLOCK_LEGACY + r"feed_forward\.w([12])\.bias", _same("vit.blocks.{0}.fc{1}.bias")),
    (r"model\.vision_backbone\.image_pooling_2d\.w([qkvo])\.weight", _linear("adapter.pooling.{0}.kernel")),
    (r"model\.vision_backbone\.image_pooling_2d\.w([qkvo])\.bias", _same("adapter.pooling.{0}.bias")),
    (r"model\.vision_backbone\.image_projector\.w1\.weight", _linear("adapter.gate.kernel")),
    (r"model\.vision_backbone\.image_projector\.w2\.weight", _linear("adapter.down.kernel")),
    (r"model\.vision_backbone\.image_projector\.w3\.weight", _linear("adapter.up.kernel")),
    (_LLM_LEGACY + r"attn_norm\.weight", _same("llm.layers.{0}.attn_norm.scale")),
    (_LLM_LEGACY + r"ff_norm\.weight", _same("llm.layers.{0}.mlp_norm.scale")),
    (_LLM_LEGACY + r"self_attn\.att_proj\.weight", _fused_qkv("llm.layers.{0}")),
    (_LLM_LEGACY + r"self_attn\.attn_out\.weight", _linear("llm.layers.{0}.o.kernel")),
    (_LLM_LEGACY + r"self_attn\.([qk])_norm\.weight", _same("llm.layers.{0}.{1}_norm.scale")),
    (_LLM_LEGACY + r"mlp\.ff_proj\.weight", _fused_up_gate("llm.layers.{0}")),
    (_LLM_LEGACY + r"mlp\.ff_out\.weight", _linear("llm.layers.{0}.down.kernel")),
    (r"model\.transformer\.ln_f\.weight", _same("llm.final_norm.scale")),
]
_COMPILED = [(re.compile(pattern + r"$"), make) for pattern, make in RULES]
_EMBED_PARTS = ("model.transformer.wte.embedding", "model.transformer.wte.new_embedding")


def converter_for(key: str, cfg) -> Convert | None:
    """Returns the converter of a checkpoint tensor name, or None if no rule knows it."""
    for pattern, make in _COMPILED:
        m = pattern.match(key)
        if m:
            return make(m, cfg)
    return None


# ------------------------------------------------------------------------------------------- reading

WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_weight_dtype(source: str, dtype) -> None:
    """Raises CheckpointError unless `dtype` is a floating-point weight type (integer or fp8 tensors would be cast
    to float silently: a quantised checkpoint is not something this importer understands)."""
    if np.dtype(dtype).name not in WEIGHT_DTYPES:
        raise CheckpointError(f"tensor {source} has dtype {np.dtype(dtype).name}; weights must be one of "
                              f"{', '.join(WEIGHT_DTYPES)} (a quantised or integer checkpoint cannot be imported)")


def _weight_files(ckpt_dir: str) -> dict[str, list[str]]:
    """Returns {file name: [tensor names]} from the index, or the single model.safetensors."""
    index_path = paths.as_path(paths.join(ckpt_dir, "model.safetensors.index.json"))
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or fname in ("", ".", "..") or os.path.basename(fname) != fname \
                    or (os.altsep and os.altsep in fname):
                raise CheckpointError(f"model.safetensors.index.json assigns {key} to {fname!r}, which is not a "
                                      f"file name inside {ckpt_dir} (shards are plain names such as "
                                      "model-00001-of-00002.safetensors)")
            files.setdefault(fname, []).append(key)
        for fname, keys in files.items():
            if not paths.as_path(paths.join(ckpt_dir, fname)).exists():
                raise CheckpointError(f"shard {fname} listed in model.safetensors.index.json is missing from "
                                      f"{ckpt_dir} ({len(keys)} tensors, e.g. {keys[0]})")
        return files
    if paths.as_path(paths.join(ckpt_dir, "model.safetensors")).exists():
        return {"model.safetensors": []}
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors.index.json and no model.safetensors")


def iter_tensors(ckpt_dir: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yields (file, name, tensor) one tensor at a time, raising CheckpointError naming a bad file (a shard on
    gs:// is downloaded to a temporary file first, one shard at a time: safetensors memory-maps local files)."""
    for fname, listed in _weight_files(ckpt_dir).items():
        with paths.local_file(paths.join(ckpt_dir, fname)) as path:
            yield from _shard_tensors(fname, path, listed)


def _shard_tensors(fname: str, path: str, listed: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"shard {fname}: not a readable safetensors file ({e})") from None
    with handle as f:
        keys = list(f.keys())
        absent = sorted(set(listed) - set(keys))
        if absent:
            raise CheckpointError(f"shard {fname} lacks tensors the index assigns to it: {absent[:5]}")
        for key in keys:
            try:
                tensor = f.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"shard {fname}: tensor {key} cannot be read ({e})") from None
            yield fname, key, tensor


@dataclass
class ImportReport:
    """What the importer did: the layout it saw and the parameters it initialised fresh."""
    layout: str = "unknown"
    loaded: int = 0
    fresh: list[str] = field(default_factory=list)


def _path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def load_molmo2(ckpt_dir: str, cfg: ml_collections.ConfigDict | None = None, *, model_cls=None,
                shardings=None, fresh_ok: tuple[str, ...] = FRESH_OK_DEFAULT, seed: int = 0):
    """Returns (model, report): a model built from `cfg` (default: config.json) holding the checkpoint's weights.

    `shardings` (optional) is a function path -> jax.sharding.Sharding used to place each tensor as it is read.
    """
    from stts_jax.model.vlm import Molmo2VLM

    model_cls = model_cls or Molmo2VLM
    if cfg is None:
        cfg_path = paths.as_path(paths.join(ckpt_dir, "config.json"))
        if not cfg_path.exists():
            raise CheckpointError(f"{ckpt_dir}: config.json is missing")
        cfg = config_from_hf(json.loads(cfg_path.read_text()))
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    targets = {path: var for path, var in nnx.to_flat_state(abstract_state)}
    values: dict[Path, jax.Array] = {}
    report = ImportReport()
    unexpected: list[str] = []
    embed_parts: dict[str, np.ndarray] = {}

    def place(path: Path, array: np.ndarray, source: str) -> None:
        if path not in targets:
            unexpected.append(f"{source} -> {_path_str(path)}")
            return
        want = targets[path]
        check_weight_dtype(source, array.dtype)
        if tuple(array.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {source} has shape {tuple(array.shape)} but the model's "
                                  f"{_path_str(path)} needs {tuple(want.shape)} (check config.json)")
        if path in values:
            raise CheckpointError(f"tensor {source} writes {_path_str(path)}, which another tensor already set")
        array = np.asarray(array, dtype=want.dtype)
        values[path] = jax.device_put(array, shardings(path)) if shardings else jnp.asarray(array)
        report.loaded += 1

    for fname, key, tensor in iter_tensors(ckpt_dir):
        if key in _EMBED_PARTS:
            report.layout = "released"
            embed_parts[key] = tensor
            continue
        convert = converter_for(key, cfg)
        if convert is None:
            unexpected.append(key)
            continue
        if key.startswith(("model.vision_tower", "model.language_model", "model.multi_modal_projector")):
            report.layout = "native"
        elif key.startswith(("model.transformer", "model.vision_backbone")):
            report.layout = "released"
        for path, array in convert(tensor):
            place(path, array, key)
        del tensor
    if embed_parts:
        if len(embed_parts) != 2:
            raise CheckpointError(f"released embedding needs both {_EMBED_PARTS}, found only {sorted(embed_parts)}")
        place(("llm", "embedding"), np.concatenate([embed_parts[k] for k in _EMBED_PARTS]), " + ".join(_EMBED_PARTS))
        embed_parts.clear()
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensors the model does not know: "
                              f"{unexpected[:10]}")
    missing = [p for p in targets if p not in values]
    not_ok = [_path_str(p) for p in missing if not _path_str(p).startswith(fresh_ok)]
    if not_ok:
        raise CheckpointError(f"checkpoint lacks {len(not_ok)} model parameters: {not_ok[:10]}")
    if missing:
        fresh = _fresh_init(model_cls, cfg, seed, missing)
        for path in missing:
            values[path] = jax.device_put(fresh[path], shardings(path)) if shardings else fresh[path]
        report.fresh = sorted({_path_str(p[:1]) for p in missing})
        logging.info("initialised fresh (absent from the checkpoint): %s (%d tensors)",
                     ", ".join(report.fresh), len(missing))
    for path, var in targets.items():
        var.set_value(values[path])
    model = nnx.merge(graphdef, nnx.from_flat_state(list(targets.items())))
    logging.info("imported %d tensors from %s (%s layout)", report.loaded, ckpt_dir, report.layout)
    return model, report


def _fresh_init(model_cls, cfg, seed: int, paths: list[Path]) -> dict[Path, jax.Array]:
    """Returns fresh initial values of `paths` only (jit drops the initialisers of everything else)."""
    def init():
        state = nnx.state(model_cls(cfg, rngs=nnx.Rngs(seed)))
        flat = dict(nnx.to_flat_state(state))
        return {_path_str(p): flat[p][...] for p in paths}
    out = jax.jit(init)()
    return {p: out[_path_str(p)] for p in paths}
