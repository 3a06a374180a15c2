"""STTS in the model: counts, masked execution, LLM token layout, gradients, compilation, sharding, and the
batch-major contract: rows are independent, empty slots anywhere, a corrupt row stays in its row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_helpers import slots_batch, stts_batch, stts_tiny_config, take_rows, video_ids
from stts_jax import geometry
from stts_jax.config import ConfigError, tiny_model_config, validate_model_config
from stts_jax.model.vlm import Molmo2VLM, check_batch, make_forward, total_loss
from stts_jax.stts import selection
from stts_jax.train import sharding

W = 9  # tiny config: 9x9 patches, 3x3 windows


def as_jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def core_twin(model):
    """A core (STTS off) model holding the same ViT / adapter / LLM weights as `model`."""
    core = Molmo2VLM(tiny_model_config(), rngs=nnx.Rngs(99))
    for name in ("vit", "adapter", "llm"):
        nnx.update(getattr(core, name), nnx.state(getattr(model, name)))
    return core


@pytest.mark.parametrize("method", ["scorer", "evs", "random", "none"])
def test_ratio_zero_is_the_core_model_exactly(method):
    cfg = stts_tiny_config(method=method, prune_ratio=0.0)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(0))
    batch, layout = stts_batch(cfg, [4, 3])
    check_batch(batch, cfg, layout)
    got = model(as_jnp(batch), layout, jax.random.key(0))
    want = core_twin(model)(as_jnp(batch))
    assert np.array_equal(np.asarray(got), np.asarray(want))


def vision_tokens(model, batch, layout, rng=None):
    """Returns model.vision_tokens on a host batch: (tokens [B, T, H], valid [B, T], aux)."""
    return model.vision_tokens(jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["frame_mask"]).astype(bool),
                               layout, rng)


def test_counts_first_frame_and_images():
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(1))
    batch, layout = stts_batch(cfg, [4, 3])  # row 0: the 4-frame video in slot 0; row 1: the 3-frame one in slot 1
    assert layout == geometry.FrameLayout.videos(4, 3)
    tokens, valid, aux = vision_tokens(model, batch, layout)
    keep = np.asarray(aux["keep"])
    k4, k3 = geometry.prune_count(4, W, 0.5), geometry.prune_count(3, W, 0.5)
    assert (k4, k3) == (18, 13)
    assert keep.shape == (2, 7, W)
    for b in range(2):  # every slot selects its static count, empty or not
        assert keep[b, :4].sum() == W * 4 - k4 and keep[b, 4:].sum() == W * 3 - k3
        assert keep[b, 0].all() and keep[b, 4].all()
    assert tokens.shape == (2, W * 7 - k4 - k3, cfg.llm.hidden_size)
    assert np.asarray(valid).sum(1).tolist() == [W * 4 - k4, W * 3 - k3]  # only the real video's tokens
    # an image between the videos keeps everything (rows with every slot real, different per row)
    full = batch["pixel_values"].sum(0)  # [7, N, P]: both videos in one row
    rows = dict(pixel_values=np.stack([full, full[::-1]]), frame_mask=np.ones((2, 7), np.int32))
    layout = geometry.FrameLayout((("video", 3), ("image", 1), ("video", 3)))
    _, valid, aux = vision_tokens(model, rows, layout)
    keep = np.asarray(aux["keep"])
    for b in range(2):
        assert keep[b, 3].all() and keep[b, 0].all() and keep[b, 4].all()
        assert keep[b, :3].sum() == keep[b, 4:].sum() == W * 3 - k3
    assert np.asarray(valid).sum(1).tolist() == [W * 7 - 2 * k3] * 2


def test_masked_blocks_equal_per_frame_attention_over_kept_tokens():
    """Blocks after prune_at+1: a kept token must see exactly the kept tokens of its own frame."""
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(2))
    batch, layout = stts_batch(cfg, [4, 3], seed=2)
    _, _, aux = vision_tokens(model, batch, layout)
    b, f = batch["pixel_values"].shape[:2]
    pix = jnp.asarray(batch["pixel_values"]).reshape(b * f, 81, -1)  # every frame slot of every row
    keep_patch = np.asarray(selection.windows_to_patches(aux["keep"], 9, 3)).reshape(b * f, 81)
    # reference: rerun blocks 0..1 (no pruning yet) with the same bias, then block 2 per frame on kept tokens only
    st = cfg.stts
    with jax.default_matmul_precision("highest"):
        x = model.vit.embed(pix)
        x = model.vit.blocks[0](x)
        bias = selection.key_bias(selection.rescale_scores(aux["scores"], layout, grid=9, pool=3, ratio=st.prune_ratio))
        bias = bias.reshape(b * f, 81)
        x = model.vit.blocks[1](x, key_bias=bias)
        layer2_ref = []
        for i in range(x.shape[0]):
            kept = np.nonzero(keep_patch[i])[0]
            layer2_ref.append(np.asarray(model.vit.blocks[2](x[i:i + 1, kept]))[0])
        # the model's own layer-2 states at kept positions, read back through the adapter input
        y = model.vit.embed(pix)
        y = model.vit.blocks[0](y)
        y = model.vit.blocks[1](y, key_bias=bias)
        y = model.vit.blocks[2](y, mask=jnp.asarray(keep_patch)[:, None, :])
    for i in range(x.shape[0]):
        kept = np.nonzero(keep_patch[i])[0]
        np.testing.assert_allclose(np.asarray(y)[i, kept], layer2_ref[i], atol=1e-5, rtol=0)


def test_relayout_regroups_placeholders_per_frame():
    """Per row, the k-th end marker closes the row's k-th real frame: empty slots (anywhere, with any count)
    are skipped, and a row never reads another row's counts."""
    cfg = stts_tiny_config(prune_ratio=0.5)
    t = cfg.tokens
    rng = np.random.default_rng(3)
    host_counts = [[9, 5, 4, 4], [9, 4, 1]]
    real_counts = [[9, 0, 9, 4], [9, 5, 0]]
    rows, want_rows = [], []
    for hc, rc in zip(host_counts, real_counts):
        seed = int(rng.integers(1 << 30))
        rows.append(video_ids(cfg, np.random.default_rng(seed), hc, 4))
        want_rows.append(video_ids(cfg, np.random.default_rng(seed), rc, 4))
    length = max(len(r) for r in rows)
    pad = lambda r: r + [0] * (length - len(r))
    ids = np.array([pad(r) for r in rows], np.int32)
    want_rows = np.array([pad(r) for r in want_rows], np.int32)
    # layout videos(4, 3): row 0 fills slot 0 (frames 0..3), row 1 slot 1 (frames 4..6); empty slots hold junk
    keep_counts = np.array([real_counts[0] + [9, 7, 3], [2, 9, 9, 1] + real_counts[1]], np.int32)
    frame_mask = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]], np.int32)
    got = selection.relayout_vision_tokens(jnp.asarray(ids), jnp.asarray(keep_counts), placeholder_id=t.image_patch_id,
                                         end_marker_ids=(t.frame_end_id, t.image_end_id),
                                         frame_mask=jnp.asarray(frame_mask))
    np.testing.assert_array_equal(np.asarray(got), want_rows)
    alone = selection.relayout_vision_tokens(jnp.asarray(ids[1:]), jnp.asarray(keep_counts[1:]),
                                           placeholder_id=t.image_patch_id, end_marker_ids=(t.frame_end_id,),
                                           frame_mask=jnp.asarray(frame_mask[1:]))
    np.testing.assert_array_equal(np.asarray(alone), want_rows[1:])


def test_llm_sequence_holds_kept_tokens_in_their_frames():
    """The placeholder block of frame f holds exactly frame f's kept windows, in window order."""
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(4))
    batch, layout = stts_batch(cfg, [4, 3], seed=4)
    _, _, aux = vision_tokens(model, batch, layout)
    counts = np.asarray(aux["keep"]).sum(-1)  # [B, F]
    ids = np.asarray(selection.relayout_vision_tokens(jnp.asarray(batch["input_ids"]), jnp.asarray(counts),
                                                    placeholder_id=cfg.tokens.image_patch_id,
                                                    end_marker_ids=(cfg.tokens.frame_end_id,),
                                                    frame_mask=jnp.asarray(batch["frame_mask"])))
    for row, row_counts, real in zip(ids, counts, batch["frame_mask"].astype(bool)):
        starts = np.nonzero(row == cfg.tokens.frame_start_id)[0]
        ends = np.nonzero(row == cfg.tokens.frame_end_id)[0]
        blocks = [e - s - 1 for s, e in zip(starts, ends)]
        inside = np.concatenate([np.arange(s + 1, e) for s, e in zip(starts, ends)])
        assert (row[inside] == cfg.tokens.image_patch_id).all()
        assert blocks == row_counts[real].tolist()


def loss_and_grad_fn(model, layout):
    """Returns jitted (state, batch) -> (loss, grads) for total_loss."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def fn(state, batch):
        return jax.value_and_grad(lambda st: total_loss(nnx.merge(graphdef, st), batch, layout)[0])(state)

    return fn


def scorer_grads(cfg, seed=5):
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(seed))
    batch, layout = stts_batch(cfg, [4, 3], seed=seed)
    _, grads = loss_and_grad_fn(model, layout)(nnx.state(model), as_jnp(batch))
    return grads["scorer"]


def norm(tree):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_scorer_gradients_flow_from_lm_via_bias_and_from_aux():
    g = scorer_grads(stts_tiny_config(aux_loss_weight=0.0))
    assert norm(g) > 0, "no LM gradient reached the scorer through the bias path"
    g_off = scorer_grads(stts_tiny_config(aux_loss_weight=0.0, score_bias=False))
    assert norm(g_off) == 0.0, "the LM loss must not reach the scorer without the bias path"
    # aux loss alone (bias path off so the LM contributes nothing)
    g_aux = scorer_grads(stts_tiny_config(aux_loss_weight=0.5, score_bias=False))
    assert norm(g_aux) > 0


def test_evs_trains_as_an_ablation_without_a_scorer():
    """method evs in training (an ablation): no scorer, finite gradients that reach the ViT blocks up to the
    pruning point (EVS selection reads stop-gradient states and passes no gradient of its own)."""
    cfg = stts_tiny_config(method="evs", prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(6))
    batch, layout = stts_batch(cfg, [4, 3], seed=6)
    loss, grads = loss_and_grad_fn(model, layout)(nnx.state(model), as_jnp(batch))
    assert model.scorer is None and "scorer" not in grads and np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    assert norm(grads["vit"]["blocks"][0]) > 0


def test_bias_path_gradient_matches_finite_differences():
    """Directional derivative along the scorer's output bias: shifts every logit, so the ranking (and the
    hard selection) stays fixed while the rescaled bias s~ moves."""
    cfg = stts_tiny_config(aux_loss_weight=0.0)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(6))
    batch, layout = stts_batch(cfg, [4, 3], seed=6)
    batch = as_jnp(batch)
    fn = loss_and_grad_fn(model, layout)
    state = nnx.state(model)

    def shifted(delta):
        return jax.tree.map_with_path(
            lambda path, x: x + delta if "fc3" in str(path) and "bias" in str(path) else x, state)

    with jax.default_matmul_precision("highest"):
        _, grads = fn(state, batch)
        g = float(grads["scorer"]["fc3"]["bias"][...][0])

        def central(eps):
            return (float(fn(shifted(eps), batch)[0]) - float(fn(shifted(-eps), batch)[0])) / (2 * eps)

        # Richardson over eps, 2 eps, 4 eps cancels the eps^2 and eps^4 curvature terms of the central
        # difference (alone 1-17 % off at eps 0.4-1.6). A small eps drowns in float32 rounding: the loss (~5) moves
        # a few ulps (4.8e-7), so D(0.025) = D(0.05) and D(0.1) was 2 % off on one machine and not on another;
        # at eps 0.4 one ulp is 0.3 % of the derivative
        fd = (64 * central(0.4) - 20 * central(0.8) + central(1.6)) / 45
    assert abs(g) > 1e-6
    np.testing.assert_allclose(fd, g, rtol=2e-2)


def test_train_step_compiles_once_and_shards():
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    layout = geometry.FrameLayout.videos(4, 4, 4, 4)

    @jax.jit
    def grad_step(state, batch):
        def f(state):
            return total_loss(nnx.merge(graphdef, state), batch, layout)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(state)
        return metrics, grads

    outs = []
    for seed in range(3):
        batch, batch_layout = stts_batch(cfg, [4, 4, 4, 4], seed=seed)  # 4 rows, row i fills slot i
        assert batch_layout == layout
        outs.append(grad_step(state, as_jnp(batch)))
    assert grad_step._cache_size() == 1
    single_metrics, single_grads = outs[-1]
    with jax.default_matmul_precision("highest"):
        single_metrics, single_grads = grad_step(state, as_jnp(batch))
        mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
        with jax.set_mesh(mesh):
            sharding.shard_model(model, mesh)
            _, sharded_state = nnx.split(model)
            placed = sharding.to_global(batch, mesh)
            assert placed["pixel_values"].sharding.spec[0] == ("data", "fsdp")
            metrics, grads = grad_step(sharded_state, placed)
    for key in ("loss", "lm_loss", "temporal_loss"):
        np.testing.assert_allclose(float(metrics[key]), float(single_metrics[key]), rtol=1e-5)
    g1 = np.asarray(single_grads["scorer"]["fc1"]["kernel"][...])
    g2 = np.asarray(grads["scorer"]["fc1"]["kernel"][...])
    np.testing.assert_allclose(g2, g1, atol=1e-6, rtol=1e-4)


def test_forward_with_layout_compiles_once():
    cfg = stts_tiny_config(prune_ratio=0.3)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(8))
    layout = geometry.FrameLayout.videos(5, 2)
    forward = make_forward(model, layout=layout)
    for seed in range(3):
        batch, _ = stts_batch(cfg, [5, 2], seed=seed)
        check_batch(batch, cfg, layout)
        forward.apply(forward.state, {k: v for k, v in batch.items()})
    assert forward.apply._cache_size() == 1


@pytest.mark.parametrize("field,value", [
    ("prune_ratio", 1.0), ("prune_ratio", -0.1), ("prune_at", 2), ("pool_size", 2), ("method", "tome"),
    ("rescale_scope", "video"), ("pairing", "global"), ("aux_target_grad", "none"), ("execution", "sparse"),
])
def test_bad_stts_knobs_are_refused(field, value):
    cfg = stts_tiny_config()
    cfg.stts[field] = value
    with pytest.raises(ConfigError, match=rf"stts\.{field}"):
        validate_model_config(cfg)


def test_check_batch_wants_exact_placeholders():
    cfg = stts_tiny_config(prune_ratio=0.5)
    batch, layout = stts_batch(cfg, [4, 3], counts=[[9, 9, 9, 9], [9, 9, 9]])  # unpruned placeholder counts
    with pytest.raises(ValueError, match=r"row 0 holds 36 image-patch placeholders but its real frames give 18 "
                                         r".*rows with a mismatch: \[0, 1\]"):
        check_batch(batch, cfg, layout)
    good = geometry.placeholder_counts(4, W, 0.5)
    batch, layout = stts_batch(cfg, [4, 3], counts=[good, [9, 9, 9]])  # only row 1 is wrong
    with pytest.raises(ValueError, match=r"row 1 holds 27 image-patch placeholders but its real frames give 14 "
                                         r".*rows with a mismatch: \[1\]$"):
        check_batch(batch, cfg, layout)
    batch, layout = stts_batch(cfg, [4, 3])
    check_batch(batch, cfg, layout)
    half = dict(batch, frame_mask=batch["frame_mask"].copy())
    half["frame_mask"][1, 6] = 0  # STTS needs whole videos: slot 1 of row 1 is partly empty
    with pytest.raises(ValueError, match=r"rows \[1\]: video slot at frames 4..6 is partly empty"):
        check_batch(half, cfg, layout)
    with pytest.raises(ValueError, match="layout describes 5 frame slots"):
        check_batch(batch, cfg, geometry.FrameLayout.videos(3, 2))


def test_random_method_needs_rng_and_prunes_counts():
    cfg = stts_tiny_config(method="random", prune_ratio=0.8)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(9))
    batch, layout = stts_batch(cfg, [4, 3])
    with pytest.raises(ValueError, match="rng"):
        model(as_jnp(batch), layout)
    _, aux = model.forward(as_jnp(batch), layout, jax.random.key(1))
    keep = np.asarray(aux["keep"])  # [B, F, W]
    assert keep[0, :4].sum() == W * 4 - geometry.prune_count(4, W, 0.8) and keep[0, 0].all()
    assert keep[1, 4:].sum() == W * 3 - geometry.prune_count(3, W, 0.8) and keep[1, 4].all()
    assert model.scorer is None and float(aux["temporal_loss"]) == 0.0


@pytest.mark.parametrize("execution", ["masked", "packed"])
def test_evs_drops_the_windows_that_did_not_change(execution):
    """A video whose frame 1 repeats frame 0 exactly: EVS (no scorer, no rng) drops all of frame 1 first (cos = 1),
    then the least-changed windows of frame 2; the same weights unpruned give the same tokens for kept windows."""
    cfg = stts_tiny_config(method="evs", prune_ratio=0.5, execution=execution)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(4))
    assert model.scorer is None
    batch, layout = stts_batch(cfg, [3])
    batch["pixel_values"][0, 1] = batch["pixel_values"][0, 0]
    check_batch(batch, cfg, layout)
    tokens, valid, aux = vision_tokens(model, batch, layout)  # no rng needed
    keep, scores = np.asarray(aux["keep"])[0], np.asarray(aux["scores"])[0]
    k = geometry.prune_count(3, W, 0.5)  # 13: all 9 windows of frame 1 and the 4 least-changed of frame 2
    assert keep[0].all() and not keep[1].any() and keep[2].sum() == 2 * W - k
    np.testing.assert_allclose(scores[1], 0.0, atol=1e-5)
    assert set(np.flatnonzero(~keep[2])) == set(np.argsort(scores[2], kind="stable")[: k - W])
    assert float(aux["temporal_loss"]) == 0.0 and tokens.shape[1] == 3 * W - k
    _, _, again = vision_tokens(model, batch, layout)
    np.testing.assert_array_equal(np.asarray(again["keep"]), np.asarray(aux["keep"]))  # deterministic


def test_remat_gives_the_same_gradients():
    cfg = stts_tiny_config(prune_ratio=0.5, execution="packed")
    batch, layout = stts_batch(cfg, [4, 3], seed=11)
    grads = []
    for remat in (False, True):
        cfg.remat = remat
        model = Molmo2VLM(cfg, rngs=nnx.Rngs(11))
        grads.append(loss_and_grad_fn(model, layout)(nnx.state(model), as_jnp(batch))[1])
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- batch rows are independent

ROW_METHODS = [("none", "masked"), ("scorer", "masked"), ("scorer", "packed"), ("evs", "packed")]
ROW_TOL = dict(rtol=1e-5, atol=1e-5)


def forward_fn(model, layout):
    """Returns jitted (batch, rng) -> (logits [B, L, V], aux) of `model` (numpy out)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, batch, rng):
        return nnx.merge(graphdef, state).forward(batch, layout, rng)

    def run(batch, rng=None):
        logits, aux = fn(state, as_jnp(batch), jax.random.key(0) if rng is None else rng)
        return np.asarray(logits), jax.tree.map(np.asarray, aux)

    return run


def mixed_rows(cfg, seed=12):
    """Returns (batch, layout): 4 rows in layout videos(3, 2) filling slots {0, 1}, {1}, {0}, {0, 1}."""
    return slots_batch(cfg, [3, 2], [[0, 1], [1], [0], [0, 1]], seed=seed)


@pytest.mark.parametrize("method,execution", ROW_METHODS)
def test_rows_are_independent(method, execution):
    """Permuting the rows permutes the logits (and the kept windows); a row run alone (B=1) gives its logits
    in the batch. Rows mix slot patterns, so the packed plan and the placeholder counts differ per row."""
    cfg = stts_tiny_config(method=method, execution=execution)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(12))
    batch, layout = mixed_rows(cfg)
    check_batch(batch, cfg, layout)
    run = forward_fn(model, layout)
    valid = batch["segment_ids"] > 0
    perm = [2, 0, 3, 1]
    with jax.default_matmul_precision("highest"):
        logits, aux = run(batch)
        permuted, aux_p = run(take_rows(batch, perm))
        alone = [run(take_rows(batch, [r]))[0][0] for r in range(len(valid))]
    for i, r in enumerate(perm):
        np.testing.assert_allclose(permuted[i][valid[r]], logits[r][valid[r]], err_msg=f"row {r}", **ROW_TOL)
        np.testing.assert_allclose(alone[r][valid[r]], logits[r][valid[r]], err_msg=f"row {r} alone", **ROW_TOL)
    if method != "none":
        np.testing.assert_array_equal(aux_p["keep"], aux["keep"][perm])
    assert np.abs(logits[valid]).max() > 0.1  # the comparison is not between zeros


def test_random_rows_keep_their_counts_under_permutation():
    """method random, same rng: which windows a row keeps depends on its place in the batch, how many of its
    real frames' windows it keeps does not (W*T - K per real video)."""
    cfg = stts_tiny_config(method="random", prune_ratio=0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(13))
    batch, layout = mixed_rows(cfg)
    run = forward_fn(model, layout)
    perm = [2, 0, 3, 1]
    rng = jax.random.key(5)
    real = batch["frame_mask"].astype(bool)[..., None]

    def counts(b, rows):
        return (run(take_rows(b, rows), rng)[1]["keep"] & real[rows]).sum((1, 2))

    k3, k2 = geometry.prune_count(3, W, 0.5), geometry.prune_count(2, W, 0.5)
    want = np.array([W * 5 - k3 - k2, W * 2 - k2, W * 3 - k3, W * 5 - k3 - k2])
    np.testing.assert_array_equal(counts(batch, [0, 1, 2, 3]), want)
    np.testing.assert_array_equal(counts(batch, perm), want[perm])
    np.testing.assert_array_equal(counts(batch, [1]), want[[1]])


@pytest.mark.parametrize("method,execution", ROW_METHODS)
def test_empty_slot_before_the_video_changes_nothing(method, execution):
    """A row whose video sits in slot 1 (slot 0 empty) gives the logits (and, with STTS, the kept windows and
    the temporal loss) of the same example in a one-slot layout."""
    cfg = stts_tiny_config(method=method, execution=execution)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(14))
    late, layout = slots_batch(cfg, [2, 3], [[1], [0, 1]], seed=14)  # row 0: slot 0 empty, the video in slot 1
    late = take_rows(late, [0])
    check_batch(late, cfg, layout)
    alone = dict(late, pixel_values=late["pixel_values"][:, 2:], frame_mask=late["frame_mask"][:, 2:])
    single = geometry.FrameLayout.videos(3)
    check_batch(alone, cfg, single)
    valid = late["segment_ids"] > 0
    with jax.default_matmul_precision("highest"):
        got, aux = forward_fn(model, layout)(late)
        want, aux_1 = forward_fn(model, single)(alone)
    np.testing.assert_allclose(got[valid], want[valid], **ROW_TOL)
    if method != "none":
        np.testing.assert_array_equal(aux["keep"][:, 2:], aux_1["keep"])
        np.testing.assert_allclose(aux["temporal_loss"], aux_1["temporal_loss"], rtol=1e-5)
        assert (float(aux_1["temporal_loss"]) > 0) == (method == "scorer")  # only the scorer has the aux loss


@pytest.mark.parametrize("method,execution", ROW_METHODS)
def test_corrupt_row_is_refused_and_stays_in_its_row(method, execution):
    """One extra placeholder early in row 1: check_batch names row 1 (only); run anyway, rows 0 and 2 give
    the logits of the clean batch (nothing shifts across rows)."""
    cfg = stts_tiny_config(method=method, execution=execution)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(15))
    batch, layout = stts_batch(cfg, [3, 2, 3], seed=15)
    check_batch(batch, cfg, layout)
    bad = dict(batch, input_ids=batch["input_ids"].copy())
    assert bad["input_ids"][1, 1] < 100  # a timestamp token before the first frame
    bad["input_ids"][1, 1] = cfg.tokens.image_patch_id
    with pytest.raises(ValueError, match=r"^row 1 holds .*rows with a mismatch: \[1\]$"):
        check_batch(bad, cfg, layout)
    run = forward_fn(model, layout)
    valid = batch["segment_ids"] > 0
    with jax.default_matmul_precision("highest"):
        clean, _ = run(batch)
        dirty, _ = run(bad)
    for r in (0, 2):
        np.testing.assert_allclose(dirty[r][valid[r]], clean[r][valid[r]], err_msg=f"row {r}", **ROW_TOL)
    assert np.abs(dirty[1][valid[1]] - clean[1][valid[1]]).max() > 1e-3  # the corruption does act on row 1
