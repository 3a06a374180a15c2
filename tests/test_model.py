"""Core model: one compilation per shape, sharded == single device, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.config import ConfigError, tiny_model_config, validate_model_config
from stts_jax.model.adapter import video_pooling_indices, window_patch_ids
from stts_jax.model.vlm import Molmo2VLM, check_batch, make_forward
from stts_jax.train import sharding


def random_batch(cfg, rng, batch=4, frames_per_example=2, length=48):
    """A batch of `batch` examples, each one video of `frames_per_example` frames + text (numpy)."""
    per_frame = 9
    ids = rng.integers(0, 100, size=(batch, length)).astype(np.int32)
    for b in range(batch):
        pos = 2
        for _ in range(frames_per_example):
            ids[b, pos] = cfg.tokens.frame_start_id
            ids[b, pos + 1: pos + 1 + per_frame] = cfg.tokens.image_patch_id
            ids[b, pos + 1 + per_frame] = cfg.tokens.frame_end_id
            pos += per_frame + 4
    seg = np.ones_like(ids)
    seg[1, -5:] = 0
    frames = batch * frames_per_example
    return dict(input_ids=ids, segment_ids=seg, positions=np.broadcast_to(np.arange(length), ids.shape).astype(np.int32),
                pixel_values=rng.uniform(-1, 1, size=(frames, 81, 588)).astype(np.float32),
                pooling_idx=video_pooling_indices(frames, 9, 3).astype(np.int32))


def test_forward_compiles_once_per_shape():
    cfg = tiny_model_config()
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(0))
    forward = make_forward(model)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = random_batch(cfg, rng)
        check_batch(batch, cfg)
        forward.apply(forward.state, batch)
    assert forward.apply._cache_size() == 1
    forward.apply(forward.state, random_batch(cfg, rng, length=64))  # a new shape compiles once more
    assert forward.apply._cache_size() == 2


def test_sharded_forward_matches_single_device():
    cfg = tiny_model_config()
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(1))
    batch = random_batch(cfg, np.random.default_rng(1))
    with jax.default_matmul_precision("highest"):
        single = np.asarray(make_forward(model).apply(make_forward(model).state, batch))
        mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
        with jax.set_mesh(mesh):
            sharding.shard_model(model, mesh)
            forward = make_forward(model, mesh)
            placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, np.ndim(v)))
                      for k, v in batch.items() if k != "pooling_idx"}
            placed["pooling_idx"] = jax.device_put(batch["pooling_idx"], sharding.replicated(mesh))
            out = forward.apply(forward.state, placed)
    kernel = model.llm.layers[0].gate.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


def test_pooling_layout_pads_symmetrically():
    ids = window_patch_ids(8, 3)  # pad 1: nothing before, one row/col after
    assert ids.shape == (9, 9)
    assert ids[0].tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]
    assert ids[2].tolist() == [6, 7, -1, 14, 15, -1, 22, 23, -1]
    ids = window_patch_ids(7, 3)  # pad 2: one before, one after
    assert ids[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 7, 8]


@pytest.mark.parametrize("field,value,needle", [
    ("vit.image_size", 130, "vit.image_size"),
    ("adapter.feature_layers", (5, 1), "adapter.feature_layers"),
    ("llm.num_kv_heads", 3, "llm.num_kv_heads"),
    ("llm.rope_type", "dynamic", "llm.rope_type"),
    ("tokens.image_patch_id", 500, "tokens.image_patch_id"),
    ("dtype", "float16", "dtype"),
])
def test_bad_config_is_refused_naming_the_field(field, value, needle):
    cfg = tiny_model_config()
    section, _, name = field.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_model_config(cfg)
    with pytest.raises(ConfigError):
        Molmo2VLM(cfg, rngs=nnx.Rngs(0))


def test_check_batch_names_the_problem():
    cfg = tiny_model_config()
    batch = random_batch(cfg, np.random.default_rng(2))
    bad = dict(batch, pooling_idx=batch["pooling_idx"][:-1])
    with pytest.raises(ValueError, match="placeholders"):
        check_batch(bad, cfg)
    with pytest.raises(ValueError, match="pixel_values"):
        check_batch(dict(batch, pixel_values=batch["pixel_values"][:, :80]), cfg)
    with pytest.raises(ValueError, match="missing"):
        check_batch({k: v for k, v in batch.items() if k != "positions"}, cfg)
