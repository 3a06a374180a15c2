"""Generation with the static KV cache: token-for-token equal to transformers' generate; one decode compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from oracle import tiny_hf_model, video_example
from stts_helpers import stts_tiny_config
from stts_jax import geometry
from stts_jax.interop.hf_import import load_molmo2
from stts_jax.model.generate import Generator, pad_prompts, sample_tokens
from test_export import one_example_per_row, perturbed_model, torch_inputs

FRAMES = [2, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint, one Generator shared by the tests)."""
    hf = tiny_hf_model(seed=3)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, save_original_format=False)
    ours, _ = load_molmo2(str(path))
    return hf, ours, Generator(ours)


def prompt_batch(side, seed=0, question_lens=(4, 9)):
    rng = np.random.default_rng(seed)
    prompts = [video_example(rng, t, 9, q) for t, q in zip(FRAMES, question_lens)]
    batch = pad_prompts(prompts, side=side)
    flat = rng.uniform(-1, 1, (sum(FRAMES), 81, 588)).astype(np.float32)  # HF's frame list, video by video
    batch["pixel_values"], batch["frame_mask"], _ = one_example_per_row(flat, FRAMES)  # [B, F, N, P], [B, F]
    return batch


def hf_generate(hf, batch, steps, **kwargs):
    inputs = torch_inputs(batch, FRAMES)  # the same frames in transformers' flat format
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].numpy()


def test_greedy_equals_transformers_generate_and_compiles_once(models):
    hf, ours, gen = models
    batch = prompt_batch("left")
    assert len(set((batch["segment_ids"] > 0).sum(1).tolist())) == 2, "prompts must differ in length"
    with jax.default_matmul_precision("highest"):
        out = gen.generate(batch, 12)
        # a second batch of the same shapes reuses both compilations
        again = gen.generate(prompt_batch("left", seed=1), 12, temperature=0.7, top_p=0.9, rng=jax.random.key(3))
    ref = hf_generate(hf, batch, 12)
    np.testing.assert_array_equal(out.tokens, ref)
    assert gen.step._cache_size() == 1 and gen.prefill._cache_size() == 1
    assert again.tokens.shape == (2, 12) and (again.tokens < ours.cfg.llm.vocab_size).all()
    # right padding: positions continue per row, so the tokens are the same
    with jax.default_matmul_precision("highest"):
        right = gen.generate(prompt_batch("right"), 12)
    np.testing.assert_array_equal(right.tokens, ref)
    assert gen.step._cache_size() == 1 and gen.prefill._cache_size() == 1
    # the cache holds L + 12 slots of every layer's keys and values
    cfg = ours.cfg.llm
    assert out.cache_bytes == 2 * cfg.num_layers * 2 * out.cache_length * cfg.num_kv_heads * cfg.head_dim * 4


def test_stop_tokens_end_rows_independently(models):
    hf, ours, gen = models
    batch = prompt_batch("left")
    with jax.default_matmul_precision("highest"):
        full = gen.generate(batch, 12)
    stops = (int(full.tokens[0, 2]), int(full.tokens[1, 4]))
    with jax.default_matmul_precision("highest"):
        out = gen.generate(batch, 12, stop_tokens=stops, pad_id=0)
    ends = []
    for row in range(2):
        hits = np.nonzero(np.isin(full.tokens[row], stops))[0]
        end = int(hits[0]) + 1
        assert end <= 5 and out.lengths[row] == end
        np.testing.assert_array_equal(out.tokens[row, :end], full.tokens[row, :end])
        assert (out.tokens[row, end:] == 0).all()
        ends.append(end)
    assert out.tokens.shape[1] == max(ends) < 12, "the loop stops once every row is done"
    ref = hf_generate(hf, batch, 12, eos_token_id=list(stops))
    np.testing.assert_array_equal(out.tokens[:, : ref.shape[1]], ref)


def test_top_p_sampling():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, jnp.float32(1.0), jnp.float32(0.7)))(keys))
    assert set(draws[:, 0]) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 only
    assert set(draws[:, 1]) == {3}  # 0.8 >= 0.7: the top token alone
    assert abs((draws[:, 0] == 0).mean() - 0.5 / 0.8) < 0.08
    greedy = np.asarray(sample_tokens(logits, keys[0], jnp.float32(0.0), jnp.float32(0.7)))
    np.testing.assert_array_equal(greedy, [0, 3])


def test_pruned_generation_equals_recomputed_forward_and_shrinks_the_cache():
    """With STTS, each cached decode step equals a full forward over prompt + generated tokens (argmax)."""
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = perturbed_model(cfg, seed=4)
    frames = [4, 3]
    rng = np.random.default_rng(5)
    t = cfg.tokens
    prompts = []
    for n, q in zip(frames, [3, 7]):
        ids = [int(rng.integers(0, 100))]
        for c in geometry.placeholder_counts(n, 9, 0.5):
            ids += [5, 6, t.frame_start_id] + [t.image_patch_id] * c + [t.frame_end_id]
        prompts.append(ids + [int(x) for x in rng.integers(0, 100, q)])
    steps = 5
    batch = pad_prompts(prompts, side="right")
    flat = rng.uniform(-1, 1, (sum(frames), 81, 588)).astype(np.float32)
    # one example per row, each in its own video slot of the row layout videos(4, 3) (the other slot empty)
    batch["pixel_values"], batch["frame_mask"], layout = one_example_per_row(flat, frames)
    with jax.default_matmul_precision("highest"):
        out = Generator(model, layout).generate(batch, steps)
        # reference: no cache, the whole sequence again for every new token (right-padded rows, then tokens)
        forward = nnx.jit(lambda m, b: m.forward(b, layout)[0])
        seqs = [list(p) for p in prompts]
        length = max(len(p) for p in prompts) + steps  # one shape: one compilation
        for _ in range(steps):
            ref_batch = dict(pad_prompts(seqs, side="right", length=length), pixel_values=batch["pixel_values"],
                             frame_mask=batch["frame_mask"])
            logits = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in ref_batch.items()}))
            for i, s in enumerate(seqs):
                s.append(int(logits[i, len(s) - 1].argmax()))
    np.testing.assert_array_equal(out.tokens, np.array([s[-steps:] for s in seqs]))
    unpruned = max(len(p) + geometry.prune_count(n, 9, 0.5) for p, n in zip(prompts, frames))  # W*T placeholders
    assert out.cache_length == max(len(p) for p in prompts) + steps < unpruned + steps
    assert out.keep is not None and out.keep.shape == (2, sum(frames), 9)
    real = out.keep[batch["frame_mask"].astype(bool)]  # [sum T, W]: each row's real frames
    assert real.sum() == sum(geometry.kept_tokens(geometry.FrameLayout.videos(n), 9, 0.5) for n in frames)
