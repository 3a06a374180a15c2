"""The PyTorch twin of STTS (stts_jax/interop/torch_stts.py) computes what the JAX model computes."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from stts_helpers import stts_batch, stts_tiny_config
from stts_jax import geometry
from stts_jax.config import vit_config
from stts_jax.geometry import video_pooling_indices
from stts_jax.interop import hf_export
from stts_jax.interop.torch_stts import STTSMolmo2, placeholder_counts, select_windows
from stts_jax.model.generate import Generator, pad_prompts
from stts_jax.stts import selection
from test_export import ROOT, jax_logits, one_example_per_row, perturbed_model, torch_inputs

TOL = 1e-4
W = 9


def deeper_config():
    """4 ViT blocks, bias in block 2, blocks 3 kept-token only; compat knobs and a protected second frame."""
    cfg = stts_tiny_config(prune_ratio=0.5, prune_at=1, rescale_scope="row", pairing="flat", prune_from_frame=2)
    cfg.vit = vit_config(hidden_size=32, num_layers=4, num_heads=2, head_dim=16, mlp_dim=64, image_size=126)
    cfg.adapter.feature_layers = (3, 0)
    return cfg


@pytest.mark.parametrize("make_cfg", [lambda: stts_tiny_config(prune_ratio=0.5), deeper_config],
                         ids=["tiny", "deeper-compat"])
def test_twin_matches_jax_keep_masks_and_logits(tmp_path, make_cfg):
    cfg = make_cfg()
    model = perturbed_model(cfg, seed=3)
    hf_export.export_hf(model, cfg, str(tmp_path))
    twin = STTSMolmo2.from_pretrained(str(tmp_path))
    frames = [4, 3]
    batch, layout = stts_batch(cfg, frames, seed=4)  # one example per row, each in its own video slot
    want, aux = jax_logits(model, batch, layout)
    out = twin(**{k: v for k, v in torch_inputs(batch, frames).items() if k != "mm_token_type_ids"})
    real = batch["frame_mask"].astype(bool)  # [B, F]: the twin's flat frame list is each row's real frames
    keep = np.asarray(aux["keep"])[real]  # [sum T, W]
    assert keep.sum() < keep.size, "nothing was pruned"
    np.testing.assert_array_equal(out.keep.numpy(), keep)
    # flat pairing never crosses rows here: the first frame of a later row's video pairs with its row's empty
    # slot, in the twin (HF's one flat frame list) with the previous video's last frame. That frame is
    # protected (never pruned, never biased), so keep and logits agree; its score alone is not compared.
    compared = np.ones(len(keep), bool)
    if cfg.stts.pairing == "flat":
        compared[np.cumsum(frames)[:-1]] = False
    np.testing.assert_allclose(out.scores.numpy()[compared], np.asarray(aux["scores"])[real][compared], atol=1e-5)
    valid = batch["segment_ids"] > 0
    err = np.abs(out.logits.numpy()[valid] - want[valid]).max()
    assert err <= TOL, f"twin logits differ from JAX by {err}"
    # the soft bias in block prune_at+1 matters: without it the twin's logits move well past the tolerance
    twin.stts["score_bias"] = False
    off = twin(**{k: v for k, v in torch_inputs(batch, frames).items() if k != "mm_token_type_ids"})
    assert np.abs(off.logits.numpy()[valid] - want[valid]).max() > 100 * TOL
    # a prompt that does not reserve W*T - K placeholders per video is refused
    twin.stts["method"] = "none"
    with pytest.raises(ValueError, match=r"video 0 \(4 frames\) has \d+ <im_patch> placeholders"):
        twin(**{k: v for k, v in torch_inputs(batch, frames).items() if k != "mm_token_type_ids"})


def test_twin_generate_equals_jax_pruned_generation(tmp_path):
    """Greedy decoding of the pruned model: JAX's KV-cache generator vs transformers' generate via the twin."""
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = perturbed_model(cfg, seed=5)
    hf_export.export_hf(model, cfg, str(tmp_path))
    twin = STTSMolmo2.from_pretrained(str(tmp_path))
    frames = [3, 2]
    rng = np.random.default_rng(6)
    t = cfg.tokens
    prompts = []
    for n, q in zip(frames, [3, 8]):
        ids = [int(rng.integers(0, 100))]
        for c in placeholder_counts(n, W, 0.5):
            ids += [int(x) for x in rng.integers(0, 100, 2)] + [t.frame_start_id] + [t.image_patch_id] * c + [t.frame_end_id]
        prompts.append(ids + [int(x) for x in rng.integers(0, 100, q)])
    batch = pad_prompts(prompts, side="left")
    flat = rng.uniform(-1, 1, (sum(frames), 81, 588)).astype(np.float32)
    batch["pixel_values"], batch["frame_mask"], layout = one_example_per_row(flat, frames)
    with jax.default_matmul_precision("highest"):
        ours = Generator(model, layout).generate(batch, 6)
    inputs = torch_inputs(batch, frames)
    inputs.pop("mm_token_type_ids")
    ref = twin.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours.tokens, ref[:, batch["input_ids"].shape[1]:].numpy())


def test_twin_on_real_mp4_keeps_exact_counts_and_first_frames(tmp_path, bikes_mp4):
    from stts_jax.data.processor import patchify, resize_frames
    from stts_jax.data.video import decode_frames, uniform_frame_indices

    cfg = stts_tiny_config(prune_ratio=0.5)
    hf_export.export_hf(perturbed_model(cfg, seed=7), cfg, str(tmp_path))
    twin = STTSMolmo2.from_pretrained(str(tmp_path))
    video, _ = decode_frames(bikes_mp4, max_frames=100)
    frames = [6, 3]
    clips = [patchify(resize_frames(video[uniform_frame_indices(len(video) - 10, n) + 10 * i], 126), 14)
             for i, n in enumerate(frames)]
    pixels = np.concatenate(clips).astype(np.float32)
    rng = np.random.default_rng(8)
    t = cfg.tokens
    prompts = []
    for n in frames:  # an unpruned Molmo2 prompt; reserve_placeholders cuts it to W*T - K per video
        ids = [1]
        for _ in range(n):
            ids += [int(x) for x in rng.integers(0, 100, 2)] + [t.frame_start_id] + [t.image_patch_id] * W + [t.frame_end_id]
        prompts.append(ids + [int(x) for x in rng.integers(0, 100, 5)])
    full = pad_prompts(prompts, side="left")
    grids = torch.tensor([[n, 3, 3] for n in frames])
    ids, mask = twin.reserve_placeholders(torch.from_numpy(full["input_ids"]).long(),
                                          torch.from_numpy(full["segment_ids"]).long(), grids)
    out = twin(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.from_numpy(pixels),
               video_token_pooling=torch.from_numpy(video_pooling_indices(sum(frames), 9, 3)), video_grids=grids)
    keep = out.keep.numpy()
    start = 0
    for n in frames:
        k = geometry.prune_count(n, W, 0.5)
        assert keep[start:start + n].sum() == W * n - k and k > 0
        assert keep[start].all(), "the first frame must be kept whole"
        start += n
    # the LLM sequence holds each frame's kept windows between its <frame_start> and <frame_end>
    relaid = out.input_ids.numpy()
    counts = []
    for row in relaid:
        starts, ends = np.nonzero(row == t.frame_start_id)[0], np.nonzero(row == t.frame_end_id)[0]
        counts += [e - s - 1 for s, e in zip(starts, ends)]
    assert counts == keep.sum(-1).tolist()
    assert np.isfinite(out.logits.numpy()).all()


def test_selection_ties_drop_the_lower_index_like_jax_top_k():
    scores = np.full((3, W), 0.5, np.float32)
    scores[1, 4] = 0.1
    layout = geometry.FrameLayout.videos(3)
    want = np.asarray(selection.select_windows(jnp.asarray(scores)[None], layout, ratio=0.5))[0]  # one row
    got = select_windows(torch.from_numpy(scores), [3], 0.5).numpy()
    np.testing.assert_array_equal(got, want)


def test_twin_imports_without_jax():
    code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None; "
            "import stts_jax.interop.torch_stts as t; print(t.prune_count(64, 81, 0.5))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(geometry.prune_count(64, 81, 0.5))
