"""`packed` execution: equal to `masked` on every kept token for random and adversarial keep patterns
(batch-major: several batch rows with different patterns; one overflowing row sends the batch to `masked`)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax import geometry
from stts_jax.config import stts_config, tiny_model_config
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.stts import selection, token_packing

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


def keep_rows(count_rows, rng):
    """A batch-major keep mask [B, F, W] from per-row frame counts (random window places)."""
    return np.stack([keep_from_counts(c, rng) for c in count_rows])


PATTERNS = {
    "random_half": lambda rng: [81] + list(rng.integers(20, 62, size=7)),
    "all_41": lambda rng: [41] * 8,
    "one_full_rest_nearly_none": lambda rng: [81, 1, 0, 2, 1, 0, 1, 3],
    "ratio_0.8": lambda rng: [81] + list(rng.integers(5, 28, size=7)),
    "single_frame_videos": lambda rng: [81] * 8,
    "empty_frames": lambda rng: [81, 0, 0, 80, 0, 1, 0, 0],
}


def later_outputs(model, x, keep, execution, num_rows):
    """Returns the outputs [B, F, N, D] of ViT blocks 3 and 4 after blocks 2..4 ran on keep [B, F, W]."""
    return model.later_blocks(x, jnp.asarray(keep), [2, 3, 4], [3, 4], execution, num_rows)


def assert_packed_equals_masked(model, x, keep, num_rows):
    """Runs both executions on x [B, F, N, D] / keep [B, F, W]; asserts equality on every kept token of every
    row (and zeros at pruned positions unless some row overflowed). Returns (the plan's overflow [B],
    masked outputs, packed outputs)."""
    plan = token_packing.plan_packing(jnp.asarray(keep), num_rows)
    overflow = np.asarray(plan.overflow)
    assert overflow.shape == (keep.shape[0],)
    with jax.default_matmul_precision("highest"):
        masked = later_outputs(model, x, keep, "masked", num_rows)
        packed = later_outputs(model, x, keep, "packed", num_rows)
    kept = np.asarray(selection.windows_to_patches(jnp.asarray(keep), GRID, POOL))  # [B, F, N]
    for m, p in zip(masked, packed):
        m, p = np.asarray(m), np.asarray(p)
        assert p.shape == m.shape == x.shape
        for b in range(keep.shape[0]):
            np.testing.assert_allclose(p[b][kept[b]], m[b][kept[b]], atol=1e-5, rtol=0, err_msg=f"row {b}")
        assert np.all(p[~kept] == 0) or overflow.any()
    return overflow, masked, packed


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("slack", [0.05, 1.0])
def test_packed_equals_masked_on_kept_tokens(model, name, slack):
    """Row 0 holds the named pattern, row 1 the same frame counts shuffled over frames at other windows
    (same kept total, so the same budget and the same fit)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()) % 1000)  # str hash() differs between processes
    counts = PATTERNS[name](rng)
    keep = keep_rows([counts, rng.permutation(counts)], rng)
    x = jnp.asarray(rng.normal(size=(*keep.shape[:2], GRID * GRID, 32)).astype(np.float32))
    num_rows = token_packing.packed_row_budget(int(keep[0].sum()), W, slack)
    overflow, _, _ = assert_packed_equals_masked(model, x, keep, num_rows)
    assert overflow[0] == overflow[1]
    if name == "all_41":  # 8 frames of 41 windows need 8 rows: overflow at slack 0.05, packed at 1.0
        assert overflow.all() == (slack == 0.05)
    elif slack == 1.0:
        assert not overflow.any()


def test_one_overflowing_row_sends_the_whole_batch_to_masked(model):
    """Row 0 (all 41) cannot fit the budget, rows 1 and 2 can: the batch takes the exact masked branch, so
    every row equals masked everywhere (pruned positions included, where packing would leave zeros); the
    same fitting rows without row 0 take the packed branch."""
    rng = np.random.default_rng(7)
    fitting = [[81, 20, 30, 25, 40, 35, 20, 30], [81, 2, 60, 5, 0, 41, 33, 9]]
    keep = keep_rows([[41] * 8] + fitting, rng)
    num_rows = token_packing.packed_row_budget(41 * 8, W, 0.05)  # 5 rows of 81 windows; 8 frames of 41 need 8
    x = jnp.asarray(rng.normal(size=(*keep.shape[:2], GRID * GRID, 32)).astype(np.float32))
    overflow, masked, packed = assert_packed_equals_masked(model, x, keep, num_rows)
    assert overflow.tolist() == [True, False, False]
    for m, p in zip(masked, packed):
        np.testing.assert_allclose(np.asarray(p), np.asarray(m), atol=1e-5, rtol=0)
    kept = np.asarray(selection.windows_to_patches(jnp.asarray(keep[1:]), GRID, POOL))
    overflow, _, packed = assert_packed_equals_masked(model, x[1:], keep[1:], num_rows)
    assert not overflow.any()
    assert all(np.all(np.asarray(p)[~kept] == 0) for p in packed), "fitting rows alone must take the packed branch"


def test_plan_keeps_every_window_exactly_once():
    rng = np.random.default_rng(3)
    for _ in range(20):
        keep = keep_rows([[81] + list(rng.integers(0, 82, size=11)) for _ in range(3)], rng)  # [3, 12, W]
        num_rows = token_packing.packed_row_budget(int(keep.sum((1, 2)).max()), W, 1.0)
        plan = token_packing.plan_packing(jnp.asarray(keep), num_rows)
        src, overflow = np.asarray(plan.source_window), np.asarray(plan.overflow)
        assert src.shape == (3, num_rows, W)
        for b in range(keep.shape[0]):
            alone = token_packing.plan_packing(jnp.asarray(keep[b:b + 1]), num_rows)  # rows are planned independently
            np.testing.assert_array_equal(np.asarray(alone.source_window)[0], src[b])
            assert bool(alone.overflow[0]) == overflow[b]
            if overflow[b]:
                continue
            placed = np.sort(src[b][src[b] >= 0])
            np.testing.assert_array_equal(placed, np.nonzero(keep[b].reshape(-1))[0])
            for row in src[b]:  # a frame never spans two rows
                frames = set((row[row >= 0] // W).tolist())
                for f in frames:
                    assert (src[b] // W == f).any(axis=1).sum() == 1


def test_gradients_agree(model):
    rng = np.random.default_rng(5)
    counts = [81, 40, 30, 45, 20, 41, 35, 39]
    keep = keep_rows([counts, [81, 35, 39, 20, 45, 30, 41, 40]], rng)  # two rows, different patterns
    x = jnp.asarray(rng.normal(size=(2, 8, GRID * GRID, 32)).astype(np.float32))
    kept = jnp.asarray(selection.windows_to_patches(jnp.asarray(keep), GRID, POOL))
    num_rows = token_packing.packed_row_budget(sum(counts), W, 0.05)
    assert not np.asarray(token_packing.plan_packing(jnp.asarray(keep), num_rows).overflow).any()  # packed is exercised
    graphdef, state = nnx.split(model)

    def loss(state, x, execution):
        m = nnx.merge(graphdef, state)
        outs = m.later_blocks(x, jnp.asarray(keep), [2, 3, 4], [3, 4], execution, num_rows)
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
    layout = geometry.FrameLayout.videos(3, 2)

    @jax.jit
    def forward_p(state, batch):
        return nnx.merge(graphdef, state).forward(batch, layout)

    with jax.default_matmul_precision("highest"):
        for seed in range(3):
            batch, batch_layout = stts_batch(cfg_packed, [3, 2], seed=seed)  # row i fills slot i
            assert batch_layout == layout
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            logits_p, aux_p = forward_p(state, batch)
            logits_m, aux_m = model_m.forward(batch, layout)
            assert aux_p["keep"].shape == (2, 5, W)
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


def test_peer_benchmark_matches_transformers_and_reports_both(tmp_path):
    """--peer: our random model exported, loaded by transformers, logits checked equal, both timed."""
    import csv
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "launch/benchmark.py", "--config=configs/bench_cpu.py", "--peer",
                          "--frames=2", "--notrain", "--repeats=1", "--warmup=0", f"--csv={tmp_path / 'p.csv'}"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert float(row["logits_diff"]) <= 1e-4
    assert float(row["ratio"]) == 0.5
    for key in ("hf_fwd_s", "fwd_s", "fwd_p_s", "matmul_gflops"):
        assert float(row[key]) > 0, key
    assert 0 < float(row["fwd_p_flops"]) < float(row["fwd_flops"])
