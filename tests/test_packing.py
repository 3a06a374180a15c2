"""`packed` execution: equal to `masked` on every kept token for random and adversarial keep patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.config import stts_config, tiny_model_config
from stts_jax.model import pruning
from stts_jax.model.vlm import Molmo2VLM

GRID, POOL, W = 27, 3, 81  # the real token geometry at a tiny width


def geometry_config(**stts):
    cfg = tiny_model_config()
    cfg.vit.image_size = 378  # 27 x 27 patches, 81 windows per frame
    cfg.vit.num_layers = 5
    cfg.adapter.feature_layers = (4, 3)
    cfg.stts = stts_config(**{"prune_at": 0, "execution": "packed", **stts})
    return cfg


@pytest.fixture(scope="module")
def model():
    return Molmo2VLM(geometry_config(), rngs=nnx.Rngs(0))


def keep_from_counts(counts, rng):
    """A keep mask [F, W] with counts[f] kept windows at random places."""
    keep = np.zeros((len(counts), W), bool)
    for f, k in enumerate(counts):
        keep[f, rng.choice(W, size=k, replace=False)] = True
    return keep


PATTERNS = {
    "random_half": lambda rng: [81] + list(rng.integers(20, 62, size=7)),
    "all_41": lambda rng: [41] * 8,
    "one_full_rest_nearly_none": lambda rng: [81, 1, 0, 2, 1, 0, 1, 3],
    "ratio_0.8": lambda rng: [81] + list(rng.integers(5, 28, size=7)),
    "single_frame_videos": lambda rng: [81] * 8,
    "empty_frames": lambda rng: [81, 0, 0, 80, 0, 1, 0, 0],
}


def later_outputs(model, x, keep, execution, slack):
    later, wanted = [2, 3, 4], [3, 4]
    rows = pruning.pack_rows(int(keep.sum()), W, slack)
    return model.later_blocks(x, jnp.asarray(keep), later, wanted, execution, rows)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("slack", [0.05, 1.0])
def test_packed_equals_masked_on_kept_tokens(model, name, slack):
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    keep = keep_from_counts(PATTERNS[name](rng), rng)
    x = jnp.asarray(rng.normal(size=(keep.shape[0], GRID * GRID, 32)).astype(np.float32))
    plan = pruning.plan_packing(jnp.asarray(keep), pruning.pack_rows(int(keep.sum()), W, slack))
    with jax.default_matmul_precision("highest"):
        masked = later_outputs(model, x, keep, "masked", slack)
        packed = later_outputs(model, x, keep, "packed", slack)
    kept = np.asarray(pruning.windows_to_patches(jnp.asarray(keep), GRID, POOL))
    for m, p in zip(masked, packed):
        np.testing.assert_allclose(np.asarray(p)[kept], np.asarray(m)[kept], atol=1e-5, rtol=0)
        assert np.all(np.asarray(p)[~kept] == 0) or bool(plan.overflow)
    if name == "all_41":  # 8 frames of 41 windows need 8 rows: overflow at slack 0.05, packed at 1.0
        assert bool(plan.overflow) == (slack == 0.05)
    elif slack == 1.0:
        assert not bool(plan.overflow)


def test_plan_keeps_every_window_exactly_once():
    rng = np.random.default_rng(3)
    for _ in range(20):
        counts = [81] + list(rng.integers(0, 82, size=11))
        keep = keep_from_counts(counts, rng)
        rows = pruning.pack_rows(int(keep.sum()), W, 1.0)
        plan = pruning.plan_packing(jnp.asarray(keep), rows)
        src = np.asarray(plan.source_window)
        if bool(plan.overflow):
            continue
        placed = np.sort(src[src >= 0])
        np.testing.assert_array_equal(placed, np.nonzero(keep.reshape(-1))[0])
        for row in src:  # a frame never spans two rows
            frames = set((row[row >= 0] // W).tolist())
            for f in frames:
                assert (src // W == f).any(axis=1).sum() == 1


def test_gradients_agree(model):
    rng = np.random.default_rng(5)
    keep = keep_from_counts([81, 40, 30, 45, 20, 41, 35, 39], rng)
    x = jnp.asarray(rng.normal(size=(8, GRID * GRID, 32)).astype(np.float32))
    kept = jnp.asarray(pruning.windows_to_patches(jnp.asarray(keep), GRID, POOL))
    graphdef, state = nnx.split(model)

    def loss(state, x, execution):
        m = nnx.merge(graphdef, state)
        outs = m.later_blocks(x, jnp.asarray(keep), [2, 3, 4], [3, 4], execution,
                              pruning.pack_rows(int(keep.sum()), W, 0.05))
        return sum(jnp.sum(jnp.where(kept[..., None], jnp.sin(o), 0.0)) for o in outs)

    with jax.default_matmul_precision("highest"):
        gm = jax.grad(loss, argnums=(0, 1))(state, x, "masked")
        gp = jax.grad(loss, argnums=(0, 1))(state, x, "packed")
    np.testing.assert_allclose(np.asarray(gp[1]), np.asarray(gm[1]), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(gp[0]["vit"]), jax.tree.leaves(gm[0]["vit"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)


def test_full_model_packed_equals_masked_and_compiles_once():
    from stts_helpers import stts_batch

    cfg_packed = geometry_config(prune_ratio=0.5)
    cfg_masked = geometry_config(prune_ratio=0.5, execution="masked")
    model_p = Molmo2VLM(cfg_packed, rngs=nnx.Rngs(1))
    model_m = Molmo2VLM(cfg_masked, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model_p)
    layout = pruning.FrameLayout.videos(3, 2)

    @jax.jit
    def forward_p(state, batch):
        return nnx.merge(graphdef, state).forward(batch, layout)

    with jax.default_matmul_precision("highest"):
        for seed in range(3):
            batch, _ = stts_batch(cfg_packed, [3, 2], seed=seed)
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            logits_p, aux_p = forward_p(state, batch)
            logits_m, aux_m = model_m.forward(batch, layout)
            np.testing.assert_array_equal(np.asarray(aux_p["keep"]), np.asarray(aux_m["keep"]))
            np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_m), atol=1e-5, rtol=0)
    assert forward_p._cache_size() == 1


def test_benchmark_script_reports_ratios(tmp_path):
    import csv
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "launch/benchmark.py", "--config=configs/bench_cpu.py", "--frames=4",
                          "--ratios=0,0.5", "--flops_only", "--notrain", f"--csv={tmp_path / 'b.csv'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [float(r["ratio"]) for r in rows] == [0.0, 0.5]
    half = rows[1]
    assert float(half["pruned_fwd_flops"]) < float(half["unpruned_fwd_flops"])
    assert float(half["pruned_llm_flops"]) < float(half["unpruned_llm_flops"])
    assert float(rows[0]["pruned_fwd_flops"]) == float(rows[0]["unpruned_fwd_flops"])  # ratio 0 = unpruned
