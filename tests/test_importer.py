"""Importer: both layouts load; bad checkpoints fail with a message naming the culprit."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from oracle import tiny_hf_model
from stts_jax.interop.hf_import import CheckpointError, config_from_hf, load_molmo2


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(seed=5)


def save_sharded(model, path, **kw):
    model.save_pretrained(path, max_shard_size="20KB", **kw)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 3 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return shards


@pytest.mark.parametrize("native", [True, False])
def test_sharded_checkpoint_loads(tmp_path, hf_model, native):
    save_sharded(hf_model, tmp_path, **({"save_original_format": False} if native else {}))
    model, report = load_molmo2(str(tmp_path))
    assert report.layout == ("native" if native else "released")
    want = hf_model.model.language_model.layers[1].mlp.gate_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(model.llm.layers[1].gate.kernel[...]), want)
    want = hf_model.model.vision_tower.layers[2].self_attn.k_proj.bias.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.vit.blocks[2].attn.k.bias[...]), want)


def test_truncated_shard_is_named(tmp_path, hf_model):
    shards = save_sharded(hf_model, tmp_path)
    victim = os.path.join(tmp_path, shards[1])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=shards[1]):
        load_molmo2(str(tmp_path))


def test_missing_shard_is_named(tmp_path, hf_model):
    shards = save_sharded(hf_model, tmp_path)
    os.remove(os.path.join(tmp_path, shards[2]))
    with pytest.raises(CheckpointError, match=f"shard {shards[2]} .* missing"):
        load_molmo2(str(tmp_path))


def test_config_shape_disagreement_names_tensor_and_shapes(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, save_original_format=False)
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["text_config"]["intermediate_size"] = 80  # weights have 96
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \((96, 64|64, 96)\).*needs \((64, 80|80, 64)\)"):
        load_molmo2(str(tmp_path))


def test_missing_and_unexpected_tensors_are_named(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, save_original_format=False)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.language_model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 model parameters: \['llm\.layers\.1\.q_norm\.scale'\]"):
        load_molmo2(str(tmp_path))
    tensors["model.language_model.layers.1.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    tensors["model.language_model.layers.1.self_attn.extra.weight"] = np.ones(3, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*self_attn\.extra\.weight"):
        load_molmo2(str(tmp_path))


def test_legacy_vit_config_trims_unused_blocks_like_transformers():
    from transformers import Molmo2Config

    hf = {"vit_config": {"num_hidden_layers": 27, "image_default_input_size": [378, 378]},
          "adapter_config": {"vit_layers": [-3, -9]}, "text_config": {}}
    ref = Molmo2Config(**json.loads(json.dumps(hf)))
    cfg = config_from_hf(hf)
    assert list(cfg.adapter.feature_layers) == list(ref.adapter_config.vision_feature_layer)
    assert cfg.vit.num_layers == ref.vision_config.num_hidden_layers
    assert cfg.vit.image_size == ref.vision_config.image_size[0]


def test_scorer_is_initialised_fresh_and_logged(tmp_path, hf_model, caplog):
    from absl import logging as absl_logging

    from stts_jax.config import stts_config

    hf_model.save_pretrained(tmp_path, save_original_format=False)
    with open(os.path.join(tmp_path, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    cfg.stts = stts_config(prune_at=0)
    absl_logging.set_verbosity(absl_logging.INFO)
    with caplog.at_level("INFO"):
        model, report = load_molmo2(str(tmp_path), cfg)
    assert report.fresh == ["scorer"]
    assert any("initialised fresh" in r.getMessage() and "scorer" in r.getMessage() for r in caplog.records)
    kernel = np.asarray(model.scorer.fc1.kernel[...])
    assert kernel.std() == pytest.approx(np.sqrt(1 / kernel.shape[0]), rel=0.2)  # truncated normal, fan-in scale
    assert np.all(np.asarray(model.scorer.fc1.bias[...]) == 0)
    want = hf_model.model.vision_tower.layers[0].mlp.fc1.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(model.vit.blocks[0].fc1.kernel[...]), want)
