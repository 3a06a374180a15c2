"""STTS pruning vs an independent numpy reference (selection, rescale, key bias, pairing, temporal loss).

The reference below is written from STTS_SPEC.md sections 3-6 and the pruning API contract, with plain loops and
float64 arithmetic; it shares no code with `stts_jax.stts` (not even the window layout helper, which is
re-derived here and only cross-checked against `window_patch_ids`).

The reference works on ONE batch row (a flat frame list in the test's layout). The library is called batch-major
with B = 2 rows holding different random inputs, and each row is checked against the reference on its own
(which also shows that rows do not interact).
"""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.geometry import window_patch_ids
from stts_jax.geometry import FrameLayout, protected_frames, prune_count
from stts_jax.stts.selection import key_bias, rescale_scores, select_windows
from stts_jax.stts.temporal import evs_scores, pair_with_previous, temporal_loss

FLOOR = math.exp(-2)
ATOL = 1e-5
LOSS_RTOL = 1e-4
B = 2  # batch rows per library call, each with its own random inputs

# Rows of several videos of different lengths, some with images mixed in (a row's frame order).
LAYOUTS = [
    (("video", 4),),
    (("video", 3), ("video", 5)),
    (("video", 1), ("video", 6), ("video", 2)),
    (("video", 3), ("image", 1), ("video", 4)),
    (("image", 1), ("video", 2), ("image", 1), ("video", 5)),
]
LAYOUT_IDS = ["v4", "v3-v5", "v1-v6-v2", "v3-img-v4", "img-v2-img-v5"]
RATIOS = [0.0, 0.3, 0.5, 0.8]
PFFS = [0, 2]
GRIDS = [(9, 3), (8, 3), (7, 3)]  # 8 and 7 need padding to a multiple of 3 (W = 9 in all three)
SCOPES = ["frame", "row"]


# ----------------------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------------------

def ref_windows(grid, pool):
    """[W, pool*pool] patch ids per window, -1 for padding slots (symmetric padding, floor(pad/2) before)."""
    pad = (-grid) % pool
    before = pad // 2
    side = (grid + pad) // pool
    out = np.full((side * side, pool * pool), -1, np.int64)
    for wr in range(side):
        for wc in range(side):
            for i in range(pool):
                for j in range(pool):
                    r, c = wr * pool + i - before, wc * pool + j - before
                    if 0 <= r < grid and 0 <= c < grid:
                        out[wr * side + wc, i * pool + j] = r * grid + c
    return out


def ref_groups(groups):
    """Yields (kind, first frame of the row, number of frames) per group."""
    start = 0
    for kind, n in groups:
        yield kind, start, n
        start += n


def ref_protected(T, pff):
    return min(T, max(1, pff))


def ref_prune_count(T, W, ratio, pff=0):
    if not 0 <= ratio < 1:
        raise ValueError(ratio)
    k = math.floor(W * Fraction(repr(float(ratio))) * (T - pff))  # exact, on the decimal the user wrote
    k = max(k, 0)
    return min(k, W * (T - ref_protected(T, pff)))


def ref_select(scores, groups, ratio, pff):
    F, W = scores.shape
    keep = np.ones((F, W), bool)
    for kind, start, T in ref_groups(groups):
        if kind != "video":
            continue
        K = ref_prune_count(T, W, ratio, pff)
        if K == 0:
            continue
        P = ref_protected(T, pff)
        cand = [(float(scores[start + t, w]), t * W + w, t, w) for t in range(P, T) for w in range(W)]
        cand.sort(key=lambda x: (x[0], x[1]))  # lowest score first, ties: lower flat index first
        for _, _, t, w in cand[:K]:
            keep[start + t, w] = False
    return keep


def ref_rescale(scores, groups, grid, pool, ratio, pff, scope, floor=FLOOR):
    scores = np.asarray(scores, np.float64)
    F, W = scores.shape
    win = ref_windows(grid, pool)
    assert win.shape[0] == W
    out = np.ones((F, grid * grid))
    for kind, start, T in ref_groups(groups):
        if kind != "video" or ref_prune_count(T, W, ratio, pff) == 0:
            continue
        for t in range(ref_protected(T, pff), T):
            f = start + t
            patch = np.full(grid * grid, np.nan)
            for w in range(W):
                for pid in win[w]:
                    if pid >= 0:
                        patch[pid] = scores[f, w]
            assert not np.isnan(patch).any()
            if scope == "frame":
                mn, mx = patch.min(), patch.max()
                out[f] = floor + (patch - mn) * (1 - floor) / (mx - mn + 1e-6)
            else:
                rows = patch.reshape(grid, grid)
                for r in range(grid):
                    mn, mx = rows[r].min(), rows[r].max()
                    out[f, r * grid:(r + 1) * grid] = floor + (rows[r] - mn) * (1 - floor) / (mx - mn + 1e-6)
    return out


def ref_pair(z, groups, pairing):
    z = np.asarray(z, np.float64)
    F = z.shape[0]
    prev = np.zeros_like(z)
    if pairing == "flat":
        for f in range(1, F):
            prev[f] = z[f - 1]
    else:
        for _, start, T in ref_groups(groups):
            for t in range(1, T):
                prev[start + t] = z[start + t - 1]
    return np.concatenate([prev, z], axis=-1)


def ref_window_vectors(hidden, grid, pool):
    hidden = np.asarray(hidden, np.float64)
    F, N, D = hidden.shape
    assert N == grid * grid
    win = ref_windows(grid, pool)
    vec = np.zeros((F, win.shape[0], pool * pool * D))
    for f in range(F):
        for w in range(win.shape[0]):
            for slot, pid in enumerate(win[w]):
                if pid >= 0:
                    vec[f, w, slot * D:(slot + 1) * D] = hidden[f, pid]
    return vec


def ref_cos(a, b):
    return float(a @ b) / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8))


def ref_loss_pairs(groups, W, ratio, pff, pairing):
    """Flat indices f of the current frame of every (f-1, f) pair in the loss."""
    pairs = []
    for kind, start, T in ref_groups(groups):
        if kind != "video" or ref_prune_count(T, W, ratio, pff) == 0:
            continue
        if pairing == "flat":
            pairs += [f for f in range(start, start + T) if f >= 1]
        else:
            pairs += list(range(start + 1, start + T))
    return pairs


def ref_temporal_loss(scores, hidden, groups, grid, pool, ratio, pff, pairing, return_parts=False):
    scores = np.asarray(scores, np.float64)
    F, W = scores.shape
    vec = ref_window_vectors(hidden, grid, pool)
    pairs = ref_loss_pairs(groups, W, ratio, pff, pairing)
    total, n, resid = 0.0, 0, {}
    for f in pairs:
        for w in range(W):
            c = ref_cos(vec[f - 1, w], vec[f, w])
            resid[f, w] = scores[f, w] - (1.0 - c)
            total += resid[f, w] ** 2
            n += 1
    loss = total / n if n else 0.0
    return (loss, resid, n) if return_parts else loss


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def make_layout(groups):
    layout = FrameLayout(tuple(groups))
    assert layout.num_frames == sum(n for _, n in groups)
    return layout


def random_scores(rng, F, W, ties=False):
    """float32 scores in (0, 1); with ties, values from {0.1, ..., 0.9} so many repeat exactly."""
    if ties:
        s = rng.integers(1, 10, size=(F, W)) / 10.0
    else:
        s = rng.uniform(0.01, 0.99, size=(F, W))
    return s.astype(np.float32)


def batch_scores(rng, F, W, ties=False):
    """float32 scores [B, F, W]: `random_scores` drawn independently for every row."""
    return np.stack([random_scores(rng, F, W, ties) for _ in range(B)])


def cases(*lists):
    return list(itertools.product(*lists))


# ----------------------------------------------------------------------------------------------------------------
# the reference's own sanity (no implementation involved)
# ----------------------------------------------------------------------------------------------------------------

def test_reference_self_check():
    # window layout on a 7x7 grid, pool 3: one padding row/col before and after
    win = ref_windows(7, 3)
    assert win.shape == (9, 9)
    assert win[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 7, 8]
    assert win[4].tolist() == [16, 17, 18, 23, 24, 25, 30, 31, 32]
    assert sorted(win[win >= 0].tolist()) == list(range(49))
    # grid 8, pool 3: pad 1 = 0 before, 1 after
    win = ref_windows(8, 3)
    assert win[0].tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18] and win[8].tolist()[-3:] == [-1, -1, -1]
    # K examples worked by hand
    assert ref_prune_count(10, 81, 0.3) == 243 and ref_prune_count(10, 81, 0.3, 1) == 218
    assert ref_prune_count(1, 81, 0.5) == 0 and ref_prune_count(4, 81, 0.8) == 243  # capped at W*(T-1)
    # tie order: lower flat index dropped first
    keep = ref_select(np.array([[0.1, 0.1], [0.5, 0.5], [0.5, 0.5]]), (("video", 3),), 0.5, 0)
    assert keep.tolist() == [[True, True], [False, False], [False, True]]


@pytest.mark.parametrize("grid,pool", [(9, 3), (8, 3), (7, 3), (6, 3), (5, 2), (4, 2), (27, 3), (6, 4)])
def test_window_layout_matches_adapter(grid, pool):
    np.testing.assert_array_equal(np.asarray(window_patch_ids(grid, pool)), ref_windows(grid, pool))


# ----------------------------------------------------------------------------------------------------------------
# counts
# ----------------------------------------------------------------------------------------------------------------

def test_prune_count_and_protected_frames_match_reference():
    for T, W, ratio, pff in itertools.product(range(0, 13), [1, 4, 9, 81],
                                              [0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
                                              [0, 1, 2, 5, 20]):
        if T == 0:
            continue
        assert protected_frames(T, pff) == ref_protected(T, pff), (T, pff)
        k = prune_count(T, W, ratio, pff)
        assert isinstance(k, int) and not isinstance(k, bool), type(k)
        assert k == ref_prune_count(T, W, ratio, pff), (T, W, ratio, pff, k)


def test_prune_count_exact_decimal_math():
    # float arithmetic gets these wrong in one direction or the other; exact math must not
    assert prune_count(10, 81, 0.3) == 243
    assert prune_count(10, 81, 0.3, 1) == 218  # floor(218.7)
    assert prune_count(10, 10, 0.7) == 70
    assert prune_count(100, 81, 0.7) == 5670
    assert prune_count(128, 81, 0.5) == 5184
    assert prune_count(3, 81, 0.0) == 0
    assert prune_count(1, 81, 0.5) == 0  # a 1-frame video is never pruned (first frame kept)
    assert prune_count(4, 81, 0.8) == 243  # cap W*(T-1) binds: floor(259.2) > 243
    assert prune_count(3, 9, 0.5, 5) == 0  # T < prune_from_frame -> 0, not negative


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_prune_count_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        prune_count(8, 81, ratio)


@pytest.mark.parametrize("groups,W,ratio,pff", [
    ((("video", 10),), 81, 0.3, 0),
    ((("video", 10),), 81, 0.3, 1),
    ((("video", 4),), 81, 0.8, 0),
    ((("video", 1), ("image", 1), ("video", 7)), 81, 0.5, 0),
    ((("video", 2), ("video", 9), ("image", 1), ("image", 1)), 16, 0.8, 2),
    ((("video", 5), ("video", 3)), 9, 0.99, 0),
    ((("image", 1), ("video", 6)), 4, 0.7, 3),
])
@pytest.mark.parametrize("ties", [False, True])
def test_select_exact_counts(groups, W, ratio, pff, ties):
    rng = np.random.default_rng(17)
    layout = make_layout(groups)
    scores = batch_scores(rng, layout.num_frames, W, ties)
    keep = np.asarray(select_windows(jnp.asarray(scores), layout, ratio=ratio, prune_from_frame=pff))
    assert keep.shape == scores.shape and keep.dtype == np.bool_
    for b, (kind, start, T) in itertools.product(range(B), ref_groups(groups)):
        block = keep[b, start:start + T]
        if kind == "image":
            assert block.all()
            continue
        K = ref_prune_count(T, W, ratio, pff)
        assert int(block.sum()) == W * T - K, (b, kind, start, T, K)
        assert block[0].all(), "first frame must keep all windows"
        assert block[:ref_protected(T, pff)].all(), "protected frames must keep all windows"


# ----------------------------------------------------------------------------------------------------------------
# selection vs reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("pff", PFFS)
def test_select_matches_reference(groups, ratio, pff):
    layout = make_layout(groups)
    F = layout.num_frames
    variants = [(9, False), (9, True)] + ([(4, True)] if pff == 0 else [])  # W=4: a second window count
    for seed, (W, ties) in enumerate(variants):
        rng = np.random.default_rng(1000 * seed + F)
        scores = batch_scores(rng, F, W, ties)
        got = np.asarray(select_windows(jnp.asarray(scores), layout, ratio=ratio, prune_from_frame=pff))
        assert got.shape == (B, F, W)
        for b in range(B):
            want = ref_select(scores[b], groups, ratio, pff)
            np.testing.assert_array_equal(got[b], want, err_msg=f"row {b} W={W} ties={ties}\nscores=\n{scores[b]}")


def test_select_ties_all_equal():
    # every score equal (row 0): drop order is purely flat index order inside the video (frame-major,
    # window-minor); row 1 holds random scores and must not disturb row 0
    groups = (("video", 2), ("video", 4))
    layout = make_layout(groups)
    scores = np.stack([np.full((6, 9), 0.5, np.float32), random_scores(np.random.default_rng(0), 6, 9)])
    got = np.asarray(select_windows(jnp.asarray(scores), layout, ratio=0.5, prune_from_frame=0))
    for b in range(B):
        np.testing.assert_array_equal(got[b], ref_select(scores[b], groups, 0.5, 0), err_msg=f"row {b}")
    # video 2 (T=4): K = floor(9*0.5*4) = 18 -> frames 1 and 2 dropped entirely, frame 3 intact
    row = got[0]
    assert not row[3].any() and not row[4].any() and row[5].all() and row[2].all()


def test_select_ignores_low_scores_on_protected_frames():
    groups = (("video", 4),)
    layout = make_layout(groups)
    scores = np.full((B, 4, 9), 0.9, np.float32)
    scores[0, 0] = scores[0, 1] = 0.01  # row 0: the lowest scores sit on frames 0 and 1
    scores[1, 0] = scores[1, 2] = 0.01  # row 1: on frames 0 and 2
    for pff in (0, 1, 2):
        got = np.asarray(select_windows(jnp.asarray(scores), layout, ratio=0.5, prune_from_frame=pff))
        for b in range(B):
            np.testing.assert_array_equal(got[b], ref_select(scores[b], groups, 0.5, pff), err_msg=f"row {b}")
            assert got[b, :max(1, pff)].all()


# ----------------------------------------------------------------------------------------------------------------
# rescale + key bias vs reference
# ----------------------------------------------------------------------------------------------------------------

RESCALE_CASES = [(g, r, p, GRIDS[i % 3], SCOPES[(i // 3) % 2], bool(i % 2))
                 for i, (g, r, p) in enumerate(cases(LAYOUTS, RATIOS, PFFS))]


@pytest.mark.parametrize("groups,ratio,pff,gp,scope,ties", RESCALE_CASES)
def test_rescale_and_key_bias_match_reference(groups, ratio, pff, gp, scope, ties):
    grid, pool = gp
    layout = make_layout(groups)
    W = math.ceil(grid / pool) ** 2
    rng = np.random.default_rng(len(RESCALE_CASES) + grid + 7 * layout.num_frames)
    scores = batch_scores(rng, layout.num_frames, W, ties)
    got = np.asarray(rescale_scores(jnp.asarray(scores), layout, grid=grid, pool=pool, ratio=ratio,
                                    prune_from_frame=pff, scope=scope))
    assert got.shape == (B, layout.num_frames, grid * grid)
    bias = np.asarray(key_bias(jnp.asarray(got)))
    for b in range(B):
        want = ref_rescale(scores[b], groups, grid, pool, ratio, pff, scope)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=ATOL, err_msg=f"row {b}")
        np.testing.assert_allclose(bias[b], np.log(want), rtol=0, atol=ATOL / FLOOR, err_msg=f"row {b}")
        assert (bias[b] <= 0).all()
        # exactly 0 where s~ = 1 by rule (protected frames, images, K = 0 videos)
        np.testing.assert_array_equal(bias[b][want == 1.0], 0.0)
        np.testing.assert_array_equal(got[b][want == 1.0], 1.0)


@pytest.mark.parametrize("gp", GRIDS + [(27, 3), (5, 2)])
@pytest.mark.parametrize("scope", SCOPES)
def test_rescale_floor_and_unit_rules(gp, scope):
    grid, pool = gp
    W = math.ceil(grid / pool) ** 2
    groups = (("video", 3), ("image", 1), ("video", 1), ("video", 4))
    layout = make_layout(groups)
    rng = np.random.default_rng(grid * 10 + pool)
    scores = batch_scores(rng, layout.num_frames, W)
    scores[:, 8] = 0.4  # a constant prunable frame maps to the floor everywhere
    s_rows = np.asarray(rescale_scores(jnp.asarray(scores), layout, grid=grid, pool=pool, ratio=0.5,
                                       prune_from_frame=0, scope=scope))
    bias_rows = np.asarray(key_bias(jnp.asarray(s_rows)))
    for b in range(B):
        s, bias = s_rows[b], bias_rows[b]
        np.testing.assert_allclose(s, ref_rescale(scores[b], groups, grid, pool, 0.5, 0, scope), rtol=0, atol=ATOL)
        unit = [0, 3, 4, 5]  # first frames of videos, the image, the 1-frame video (K = 0)
        np.testing.assert_array_equal(bias[unit], 0.0)
        assert (bias <= 0).all()
        np.testing.assert_allclose(s[8], FLOOR, rtol=0, atol=1e-6)
        for f in (1, 2, 6, 7):  # prunable, non-constant frames
            if scope == "frame":
                assert abs(s[f].min() - FLOOR) < 1e-6, (b, f, s[f].min())
                assert s[f].max() <= 1.0 and s[f].max() > 1 - 1e-4
            else:
                rows = s[f].reshape(grid, grid)
                assert np.all(np.abs(rows.min(axis=1) - FLOOR) < 1e-6)


def test_rescale_custom_floor_and_ratio_zero():
    groups = (("video", 3), ("video", 2))
    layout = make_layout(groups)
    rng = np.random.default_rng(5)
    scores = batch_scores(rng, 5, 9)
    s = np.asarray(rescale_scores(jnp.asarray(scores), layout, grid=9, pool=3, ratio=0.5, floor=0.25))
    for b in range(B):
        np.testing.assert_allclose(s[b], ref_rescale(scores[b], groups, 9, 3, 0.5, 0, "frame", floor=0.25), atol=ATOL)
    s0 = np.asarray(rescale_scores(jnp.asarray(scores), layout, grid=9, pool=3, ratio=0.0))
    np.testing.assert_array_equal(s0, 1.0)  # ratio 0 is exactly the unpruned model
    np.testing.assert_array_equal(np.asarray(key_bias(jnp.asarray(s0))), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# pairing
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("pairing", ["per-video", "flat"])
def test_pair_with_previous_matches_reference(groups, pairing):
    layout = make_layout(groups)
    rng = np.random.default_rng(layout.num_frames)
    z = rng.normal(size=(B, layout.num_frames, 9, 5)).astype(np.float32)
    got = np.asarray(pair_with_previous(jnp.asarray(z), layout, pairing=pairing))
    assert got.shape == (B, layout.num_frames, 9, 10)
    for b in range(B):  # the first frame of a row never pairs with the previous row's last frame
        np.testing.assert_array_equal(got[b], ref_pair(z[b], groups, pairing).astype(np.float32), err_msg=f"row {b}")


def test_pair_with_previous_default_is_per_video():
    groups = (("video", 2), ("video", 3))
    layout = make_layout(groups)
    z = np.arange(B * 5 * 2 * 3, dtype=np.float32).reshape(B, 5, 2, 3) + 1
    got = np.asarray(pair_with_previous(jnp.asarray(z), layout))
    for b in range(B):
        np.testing.assert_array_equal(got[b], ref_pair(z[b], groups, "per-video"))
        assert (got[b, 2, :, :3] == 0).all()  # first frame of the second video is paired with zeros
        assert (got[b, 0, :, :3] == 0).all()  # and the row's first frame too


# ----------------------------------------------------------------------------------------------------------------
# temporal auxiliary loss
# ----------------------------------------------------------------------------------------------------------------

LOSS_CASES = [(g, pairing, r, p, GRIDS[i % 3])
              for i, (g, pairing, (r, p)) in enumerate(cases(LAYOUTS, ["per-video", "flat"],
                                                              [(0.0, 0), (0.3, 0), (0.5, 2), (0.8, 2)]))]


def check_loss_rows(scores, hidden, layout, want_rows, **kw):
    """Asserts temporal_loss on scores [B, F, W] / hidden [B, F, N, D] against the per-row reference losses:
    the batch gives their mean (every row has the same pairs), each row run alone gives its own, and with
    frame_mask emptying row 1 the batch gives row 0's. Returns the batch loss."""
    s, h = jnp.asarray(scores), jnp.asarray(hidden)
    got = float(temporal_loss(s, h, layout, **kw))
    alone = [float(temporal_loss(s[b:b + 1], h[b:b + 1], layout, **kw)) for b in range(B)]
    mask = np.ones(scores.shape[:2], np.int32)
    mask[1] = 0
    row0 = float(temporal_loss(s, h, layout, frame_mask=jnp.asarray(mask), **kw))
    if all(w == 0.0 for w in want_rows):
        assert got == 0.0 and alone == [0.0] * B and row0 == 0.0
        return got
    np.testing.assert_allclose(got, np.mean(want_rows), rtol=LOSS_RTOL, atol=0)
    np.testing.assert_allclose(alone, want_rows, rtol=LOSS_RTOL, atol=0)
    np.testing.assert_allclose(row0, want_rows[0], rtol=LOSS_RTOL, atol=0)
    return got


@pytest.mark.parametrize("groups,pairing,ratio,pff,gp", LOSS_CASES)
def test_temporal_loss_matches_reference(groups, pairing, ratio, pff, gp):
    grid, pool = gp
    layout = make_layout(groups)
    F, W, D = layout.num_frames, math.ceil(grid / pool) ** 2, 4
    rng = np.random.default_rng(31 * F + grid)
    scores = batch_scores(rng, F, W)
    hidden = rng.normal(size=(B, F, grid * grid, D)).astype(np.float32)
    # correlate neighbouring frames a little so cosines are spread out, and zero one whole window (norm clamp)
    hidden[:, 1:] = (0.7 * hidden[:, :-1] + 0.3 * hidden[:, 1:]).astype(np.float32)
    for b, window in enumerate((4, 2)):  # a different window per row
        ids = ref_windows(grid, pool)[window]
        hidden[b, -1, ids[ids >= 0]] = 0.0
    want = [ref_temporal_loss(scores[b], hidden[b], groups, grid, pool, ratio, pff, pairing) for b in range(B)]
    check_loss_rows(scores, hidden, layout, want, grid=grid, pool=pool, ratio=ratio, prune_from_frame=pff,
                    pairing=pairing)


def test_temporal_loss_padding_slots_count_as_zeros():
    # grid 7 / pool 3: corner windows have 4 real patches; the cosine is over the 9*D vector with zero padding,
    # which equals the cosine over the real patches only. Make frames identical -> c = 1 -> loss = mean(s^2).
    groups = (("video", 3),)
    layout = make_layout(groups)
    rng = np.random.default_rng(3)
    h0 = rng.normal(size=(1, 49, 3)).astype(np.float32)
    hidden = np.stack([np.concatenate([h0, h0, -h0]),  # row 0: frame 2 = -frame 1 -> c = -1 -> target 2
                       rng.normal(size=(3, 49, 3)).astype(np.float32)])  # row 1: anything
    scores = batch_scores(rng, 3, 9)
    s = scores[0].astype(np.float64)
    by_hand = (np.sum(s[1] ** 2) + np.sum((s[2] - 2.0) ** 2)) / 18
    want = [ref_temporal_loss(scores[b], hidden[b], groups, 7, 3, 0.5, 0, "per-video") for b in range(B)]
    np.testing.assert_allclose(want[0], by_hand, rtol=1e-12)
    check_loss_rows(scores, hidden, layout, want, grid=7, pool=3, ratio=0.5)
    row0 = float(temporal_loss(jnp.asarray(scores[:1]), jnp.asarray(hidden[:1]), layout, grid=7, pool=3, ratio=0.5))
    np.testing.assert_allclose(row0, by_hand, rtol=LOSS_RTOL)


@pytest.mark.parametrize("groups,ratio", [((("video", 1), ("image", 1), ("video", 1)), 0.5),
                                          ((("video", 3), ("video", 2)), 0.0),
                                          ((("image", 1), ("image", 1)), 0.8)])
@pytest.mark.parametrize("pairing", ["per-video", "flat"])
def test_temporal_loss_no_pairs_is_zero(groups, ratio, pairing):
    layout = make_layout(groups)
    F = layout.num_frames
    rng = np.random.default_rng(F)
    scores = batch_scores(rng, F, 9)
    hidden = rng.normal(size=(B, F, 81, 2)).astype(np.float32)
    got = temporal_loss(jnp.asarray(scores), jnp.asarray(hidden), layout, grid=9, pool=3, ratio=ratio,
                        pairing=pairing)
    for b in range(B):
        assert ref_temporal_loss(scores[b], hidden[b], groups, 9, 3, ratio, 0, pairing) == 0.0
    assert float(got) == 0.0 and np.isfinite(float(got))


def _grad_setup():
    groups = (("video", 3), ("image", 1), ("video", 4))
    layout = make_layout(groups)
    rng = np.random.default_rng(11)
    scores = batch_scores(rng, 8, 9)
    hidden = rng.normal(size=(B, 8, 64, 3)).astype(np.float32)
    return groups, layout, scores, hidden


@pytest.mark.parametrize("pairing", ["per-video", "flat"])
def test_temporal_loss_gradients(pairing):
    groups, layout, scores, hidden = _grad_setup()
    kw = dict(grid=8, pool=3, ratio=0.5, prune_from_frame=0, pairing=pairing)

    def loss(s, h, target_grad):
        return temporal_loss(s, h, layout, target_grad=target_grad, **kw)

    s, h = jnp.asarray(scores), jnp.asarray(hidden)
    v_stop, v_pass = float(loss(s, h, "stop")), float(loss(s, h, "pass"))
    parts = [ref_temporal_loss(scores[b], hidden[b], groups, 8, 3, 0.5, 0, pairing, return_parts=True)
             for b in range(B)]
    n = sum(part[2] for part in parts)  # the batch loss is the mean over every row's (pair, window) terms
    want = sum(part[0] * part[2] for part in parts) / n
    np.testing.assert_allclose([v_stop, v_pass], [want, want], rtol=LOSS_RTOL)  # target_grad: value unchanged

    gh_stop = np.asarray(jax.grad(loss, argnums=1)(s, h, "stop"))
    gh_pass = np.asarray(jax.grad(loss, argnums=1)(s, h, "pass"))
    assert np.all(gh_stop == 0.0), "target_grad='stop' must pass no gradient to hidden"
    for b in range(B):
        assert np.abs(gh_pass[b]).max() > 1e-4, f"target_grad='pass' must pass gradient to hidden (row {b})"
    assert np.all(np.isfinite(gh_pass))

    # d/ds[b, f, w] = 2 * (s - (1 - c)) / n on paired frames, 0 elsewhere; identical for both target_grad modes
    want_gs = np.zeros_like(scores, dtype=np.float64)
    for b, (_, resid, _) in enumerate(parts):
        for (f, w), r in resid.items():
            want_gs[b, f, w] = 2 * r / n
    for mode in ("stop", "pass"):
        gs = np.asarray(jax.grad(loss, argnums=0)(s, h, mode))
        np.testing.assert_allclose(gs, want_gs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target_grad", ["stop", "pass"])
def test_temporal_loss_zero_window_has_finite_gradients(target_grad):
    """A window whose hidden states are all zero (e.g. black padding) gives finite gradients in every mode, and
    every patch outside it gets exactly the gradient it gets when that window holds anything else (its term is the
    only one that reads it)."""
    groups, layout, scores, hidden = _grad_setup()
    grid, pool = 8, 3
    kw = dict(grid=grid, pool=pool, ratio=0.5, prune_from_frame=0, pairing="per-video", target_grad=target_grad)
    patches = np.zeros((grid, grid), bool)
    patches[:pool, :pool] = True  # window 0
    zero = hidden.copy()
    zero[0, 5][patches.reshape(-1)] = 0.0  # row 0, frame 5 (second video), window 0

    def grads(h):
        return np.asarray(jax.grad(lambda s, h: temporal_loss(s, h, layout, **kw), argnums=(0, 1))(
            jnp.asarray(scores), jnp.asarray(h))[1])

    g_zero, g_other = grads(zero), grads(hidden)
    assert np.all(np.isfinite(g_zero))
    outside = np.ones(hidden.shape[:3], bool)
    outside[0, 4:7, patches.reshape(-1)] = False  # that window in frame 5 and its neighbours 4 and 6
    np.testing.assert_allclose(g_zero[outside], g_other[outside], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# EVS (training-free baseline): 1 - cos to the same window of the previous frame of the video
# ----------------------------------------------------------------------------------------------------------------

def ref_evs_scores(hidden, groups, grid, pool):
    """[F, W] float64: 1 - cos(window f, window f-1) inside each group; 1 on every group's first frame."""
    vec = ref_window_vectors(hidden, grid, pool)
    scores = np.ones(vec.shape[:2])
    for _, start, T in ref_groups(groups):
        for f in range(start + 1, start + T):
            for w in range(vec.shape[1]):
                scores[f, w] = 1.0 - ref_cos(vec[f - 1, w], vec[f, w])
    return scores


@pytest.mark.parametrize("groups,ratio,gp", [(g, r, GRIDS[i % 3]) for i, (g, r) in
                                             enumerate(cases(LAYOUTS, [0.5, 0.8]))])
def test_evs_scores_and_selection_match_reference(groups, ratio, gp):
    grid, pool = gp
    layout = make_layout(groups)
    F, W = layout.num_frames, math.ceil(grid / pool) ** 2
    rng = np.random.default_rng(7 * F + grid)
    hidden = rng.normal(size=(B, F, grid * grid, 4)).astype(np.float32)
    hidden[:, 1:] = (0.8 * hidden[:, :-1] + 0.2 * hidden[:, 1:]).astype(np.float32)  # similar neighbours
    got = np.asarray(evs_scores(jnp.asarray(hidden), layout, grid=grid, pool=pool))
    keep = np.asarray(select_windows(jnp.asarray(got), layout, ratio=ratio))
    for b in range(B):
        want = ref_evs_scores(hidden[b], groups, grid, pool)
        np.testing.assert_allclose(got[b], want, atol=ATOL, err_msg=f"row {b}")
        np.testing.assert_array_equal(keep[b], ref_select(got[b], groups, ratio, 0), err_msg=f"row {b}")
        for kind, start, T in ref_groups(groups):  # exact counts; the first frame of a video stays whole
            if kind == "video":
                assert keep[b, start].all()
                assert keep[b, start:start + T].sum() == W * T - ref_prune_count(T, W, ratio)
