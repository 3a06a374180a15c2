"""Core model (batch-major rows): one compilation per shape, sharded == single device on several meshes,
config validation, per-row batch checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.config import ConfigError, tiny_model_config, validate_model_config
from stts_jax.geometry import window_patch_ids
from stts_jax.model.vlm import Molmo2VLM, check_batch, make_forward
from stts_jax.train import sharding


def random_batch(cfg, rng, batch=4, frames_per_example=2, length=48, empty=()):
    """A batch of `batch` rows, each one video of `frames_per_example` frame slots + text (numpy, batch-major).

    `empty`: (row, frame) slots left empty (frame_mask 0, zero pixels, no placeholder block); with any,
    the batch carries a frame_mask, else it relies on the default (all real).
    """
    per_frame = 9
    ids = rng.integers(0, 100, size=(batch, length)).astype(np.int32)
    for b in range(batch):
        pos = 2
        for f in range(frames_per_example):
            if (b, f) not in empty:
                ids[b, pos] = cfg.tokens.frame_start_id
                ids[b, pos + 1: pos + 1 + per_frame] = cfg.tokens.image_patch_id
                ids[b, pos + 1 + per_frame] = cfg.tokens.frame_end_id
            pos += per_frame + 4
    seg = np.ones_like(ids)
    seg[1, -5:] = 0
    pixels = rng.uniform(-1, 1, size=(batch, frames_per_example, 81, 588)).astype(np.float32)  # [B, F, N, P]
    out = dict(input_ids=ids, segment_ids=seg, positions=np.broadcast_to(np.arange(length), ids.shape).astype(np.int32),
               pixel_values=pixels)
    if empty:
        mask = np.ones((batch, frames_per_example), np.int32)
        for b, f in empty:
            mask[b, f] = 0
            pixels[b, f] = 0.0
        out["frame_mask"] = mask
    return out


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


@pytest.mark.parametrize("axes", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=lambda a: "x".join(map(str, a)))
def test_sharded_forward_matches_single_device(axes):
    cfg = tiny_model_config()
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(1))
    batch = random_batch(cfg, np.random.default_rng(1), batch=8, empty=((3, 1), (6, 0)))
    check_batch(batch, cfg)
    with jax.default_matmul_precision("highest"):
        single = np.asarray(make_forward(model).apply(make_forward(model).state, batch))
        mesh = sharding.make_mesh(*axes)
        with jax.set_mesh(mesh):
            sharding.shard_model(model, mesh)
            forward = make_forward(model, mesh)
            placed = sharding.to_global(batch, mesh)
            out = forward.apply(forward.state, placed)
    kernel = model.llm.layers[0].gate.kernel[...]
    assert len(kernel.sharding.device_set) == mesh.size
    if axes[1] * axes[2] > 1:  # parameters split over fsdp / tensor
        assert not kernel.sharding.is_fully_replicated
    rows = lambda sh: (*sh.spec, None)[0]  # the rows axis' mesh axes (an empty spec: replicated)
    rows_spec = rows(sharding.batch_sharding(mesh, out.shape))
    assert rows(out.sharding) == rows_spec and rows(placed["pixel_values"].sharding) == rows_spec
    assert (rows_spec is None) == (axes[0] * axes[1] == 1)  # rows over data x fsdp
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
    check_batch(batch, cfg)
    ids = batch["input_ids"].copy()
    ids[1, np.flatnonzero(ids[1] == cfg.tokens.image_patch_id)[0]] = 5  # one placeholder too few in row 1
    with pytest.raises(ValueError, match=r"^row 1 holds 17 image-patch placeholders but its real frames give 18 "
                                         r"vision tokens; rows with a mismatch: \[1\]$"):
        check_batch(dict(batch, input_ids=ids), cfg)
    mask = np.ones((4, 2), np.int32)
    mask[2, 1] = 0  # row 2's second frame marked empty, its placeholders still there
    with pytest.raises(ValueError, match=r"^row 2 holds 18 image-patch placeholders but its real frames give 9 "):
        check_batch(dict(batch, frame_mask=mask), cfg)
    check_batch(random_batch(cfg, np.random.default_rng(2), empty=((2, 1),)), cfg)  # empty slot, no placeholders
    with pytest.raises(ValueError, match="frame_mask"):
        check_batch(dict(batch, frame_mask=mask[:, :1]), cfg)
    with pytest.raises(ValueError, match="pixel_values"):
        check_batch(dict(batch, pixel_values=batch["pixel_values"][:, :, :80]), cfg)
    with pytest.raises(ValueError, match="batch-major"):
        check_batch(dict(batch, pixel_values=batch["pixel_values"].reshape(8, 1, 81, 588)), cfg)
    with pytest.raises(ValueError, match="missing"):
        check_batch({k: v for k, v in batch.items() if k != "positions"}, cfg)


@pytest.mark.parametrize("chunk", [3, 8, 1024])
def test_attention_matches_a_numpy_softmax_reference_with_query_chunks(chunk):
    """Grouped-query attention with a mask and a key bias, attended `chunk` queries at a time (values and
    gradients), equals float64 numpy softmax attention."""
    from stts_jax.model.layers import dot_product_attention

    rng = np.random.default_rng(0)
    b, lq, lk, h, hkv, d = 2, 13, 11, 4, 2, 8
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, d)])
    mask = rng.random((b, lq, lk)) < 0.7
    mask[:, :, 0] = True
    bias = rng.normal(size=(b, lk)).astype(np.float32)

    def ref(q, k, v):
        out = np.zeros((b, lq, h, d))
        for i in range(b):
            for j in range(h):
                kv = j // (h // hkv)
                logits = q[i, :, j].astype(np.float64) @ k[i, :, kv].T / np.sqrt(d) + bias[i][None]
                logits = np.where(mask[i], logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                out[i, :, j] = (p / p.sum(-1, keepdims=True)) @ v[i, :, kv]
        return out

    attend = lambda q, k, v: dot_product_attention(q, k, v, mask=jnp.asarray(mask), key_bias=jnp.asarray(bias),  # noqa: E731
                                                   query_chunk=chunk)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(attend)(q, k, v))
        np.testing.assert_allclose(got, ref(q, k, v), rtol=1e-5, atol=1e-5)
        weights = rng.normal(size=(b, lq, h, d))
        grads = jax.grad(lambda *a: (attend(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
        whole = jax.grad(lambda *a: (dot_product_attention(*a, mask=jnp.asarray(mask), key_bias=jnp.asarray(bias),
                                                           query_chunk=10 ** 6) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, whole):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_attention_tiles_stay_on_their_shard_and_every_tile_is_counted():
    """Row tiles on an 8-device mesh: the same values as one device, no row gathered across devices; and
    `counted_flops` sees every tile (XLA's cost analysis of the compiled loop counts its body once)."""
    from stts_jax.model import layers
    from stts_jax.estimate import counted_flops, flops_of
    from stts_jax.train.sharding import batch_sharding, make_mesh

    rng = np.random.default_rng(3)
    b, l, h, d = 16, 40, 2, 8  # 16 rows (frames) over 8 devices: 2 per device, attended one at a time
    q, k, v = (rng.normal(size=(b, l, h, d)).astype(np.float32) for _ in range(3))
    bias = rng.normal(size=(b, l)).astype(np.float32)
    attend = jax.jit(lambda q, k, v, bias: layers.dot_product_attention(q, k, v, key_bias=bias))
    mesh = make_mesh(8, 1, 1)
    with jax.default_matmul_precision("highest"):
        single = np.asarray(attend(q, k, v, bias))
        with jax.set_mesh(mesh):
            args = [jax.device_put(x, batch_sharding(mesh, x.shape)) for x in (q, k, v, bias)]
            compiled = attend.lower(*args).compile()
            got = compiled(*args)
    np.testing.assert_allclose(np.asarray(got), single, rtol=1e-5, atol=1e-6)
    assert got.sharding.spec[0] is not None, "the output lost the batch sharding"
    hlo = compiled.as_text()
    assert "while" in hlo, "expected the rows to be attended in a loop"
    assert "all-gather" not in hlo and "all-to-all" not in hlo, "rows moved between devices"
    matmuls = 4 * b * h * l * l * d  # q k^T and p v
    looped = flops_of(jax.jit(lambda *a: layers.dot_product_attention(*a)).lower(q, k, v).compile().cost_analysis())
    assert looped < matmuls / 4  # the loop body (one row) counted once
    counted = counted_flops(lambda *a: layers.dot_product_attention(*a), q, k, v)
    assert matmuls <= counted < 1.5 * matmuls


def test_chunked_lm_loss_equals_the_whole_sequence_loss_and_its_gradient():
    """The training loss formed `chunk` positions at a time (logits rematerialised) equals the one-shot loss."""
    from stts_jax.model.vlm import lm_loss, lm_loss_from_hidden

    rng = np.random.default_rng(1)
    b, length, h, vocab = 2, 37, 16, 50
    hidden = rng.normal(size=(b, length, h)).astype(np.float32)
    kernel = rng.normal(size=(h, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab + 5, size=(b, length)).astype(np.int32)  # some special ids (>= vocab)
    loss_mask = ((rng.random((b, length)) < 0.5) & (targets < vocab)).astype(np.int32)
    # numpy closed form: mean over masked positions of -log softmax(hidden @ kernel)[target]
    logits = hidden.astype(np.float64) @ kernel
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.minimum(targets, vocab - 1)[..., None], -1)[..., 0][loss_mask > 0].mean()
    with jax.default_matmul_precision("highest"):
        for chunk in (5, 16, 1024):
            loss = lambda x, k: lm_loss_from_hidden(lambda y: y @ k, x, targets, loss_mask, chunk=chunk)  # noqa: E731
            np.testing.assert_allclose(float(jax.jit(loss)(hidden, kernel)), want, rtol=1e-5)
            got = jax.grad(loss, argnums=(0, 1))(hidden, kernel)
            whole = jax.grad(lambda x, k: lm_loss(x @ k, targets, loss_mask), argnums=(0, 1))(hidden, kernel)
            for g, w in zip(got, whole):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
