"""Export to a Hugging Face directory: transformers loads it and agrees; our importer reads it back exactly."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from oracle import LAYOUT_IDS
from stts_helpers import real_frames, stts_batch, stts_tiny_config
from stts_jax.config import tiny_model_config
from stts_jax.geometry import FrameLayout, prune_count, video_pooling_indices
from stts_jax.interop import hf_export, params_io
from stts_jax.interop.hf_import import CheckpointError
from stts_jax.model.vlm import Molmo2VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4



def launch_module(name):
    """Imports launch/<name>.py as a module to call its `run`/`predict` (its absl flags are dropped afterwards,
    so scripts that share flag names such as --out can be imported into one process)."""
    from absl import flags

    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
    return module


def perturbed_model(cfg, seed=0):
    """A random model whose norms and biases are perturbed (default init has them at 1 / 0, proving nothing)."""
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        if name.endswith(("bias", "scale")):
            var.set_value(var[...] + jnp.asarray(0.3 * rng.standard_normal(var.shape), var.dtype))
    return model


def flat_params(model):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def one_example_per_row(flat, frames_per_video):
    """Returns (pixel_values [B, F, N, P], frame_mask [B, F], row layout) from HF's flat frame list [sum T, N, P]:
    row i holds example i's video in its own slot of the layout videos(*frames_per_video), the other slots
    empty (zeros), so STTS sees whole videos whatever the frame counts."""
    frames_per_video = list(frames_per_video)
    b, f = len(frames_per_video), sum(frames_per_video)
    assert flat.shape[0] == f, (flat.shape, frames_per_video)
    pixels = np.zeros((b, f, *flat.shape[1:]), np.float32)
    mask = np.zeros((b, f), np.int32)
    for i, start in enumerate(np.cumsum([0] + frames_per_video[:-1])):
        span = slice(start, start + frames_per_video[i])
        pixels[i, span], mask[i, span] = flat[span], 1
    return pixels, mask, FrameLayout.videos(*frames_per_video)


def torch_inputs(batch, frames_per_video):
    """Returns transformers' (flat) inputs for a batch-major batch of one example per row (tiny config: 9x9 patches)."""
    pixels = real_frames(batch)
    assert pixels.shape[0] == sum(frames_per_video), (pixels.shape, frames_per_video)
    pooling = video_pooling_indices(pixels.shape[0], 9, 3)
    return dict(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
                attention_mask=torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64)),
                mm_token_type_ids=torch.from_numpy(np.isin(batch["input_ids"], LAYOUT_IDS).astype(np.int64)),
                pixel_values_videos=torch.from_numpy(np.ascontiguousarray(pixels)),
                video_token_pooling=torch.from_numpy(pooling.astype(np.int64)),
                video_grids=torch.tensor([[t, 3, 3] for t in frames_per_video]))


def jax_logits(model, batch, layout=None):
    with jax.default_matmul_precision("highest"):
        logits, aux = nnx.jit(lambda m, b: m.forward(b, layout))(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(logits), aux


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import Molmo2ForConditionalGeneration

    cfg = tiny_model_config()
    model = perturbed_model(cfg, seed=1)
    report = hf_export.export_hf(model, cfg, str(tmp_path), max_shard_bytes="40KB")
    assert len(report.shards) > 3 and report.scorer_tensors == 0
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)["weight_map"]
    assert sorted(set(index.values())) == sorted(report.shards) and len(index) == report.tensors
    assert json.load(open(tmp_path / "stts_config.json"))["stts"]["method"] == "none"

    hf, info = Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    hf.eval()
    batch, _ = stts_batch(cfg, [4, 2], seed=2, ratio=0.0)  # two rows of different lengths, right-padded
    with torch.no_grad():
        ref = hf(**torch_inputs(batch, [4, 2])).logits.numpy()
    got, _ = jax_logits(model, batch)
    valid = batch["segment_ids"] > 0
    err = np.abs(got[valid] - ref[valid]).max()
    assert err <= TOL, f"exported model's logits differ from JAX by {err}"
    assert np.abs(ref[valid]).max() > 1.0


def test_export_import_roundtrip_is_exact(tmp_path):
    cfg = stts_tiny_config(prune_ratio=0.5, rescale_scope="row", prune_from_frame=1)
    model = perturbed_model(cfg, seed=2)
    hf_export.export_hf(model, cfg, str(tmp_path / "hf"), max_shard_bytes="100KB")
    assert (tmp_path / "hf" / "stts_scorer.safetensors").exists()
    back, report = hf_export.load_exported(str(tmp_path / "hf"))
    assert report.fresh == [] and report.layout == "native"
    assert back.cfg.stts.to_dict() == cfg.stts.to_dict() and back.cfg.tokens.to_dict() == cfg.tokens.to_dict()
    want, got = flat_params(model), flat_params(back)
    assert want.keys() == got.keys()
    for key in want:
        assert np.array_equal(want[key], got[key]), key
    # HF directory -> params checkpoint (launch/import_hf.py) -> identical parameters and config
    launch_module("import_hf").run(str(tmp_path / "hf"), str(tmp_path / "params"))
    again = params_io.load_model(str(tmp_path / "params"))
    assert again.cfg.to_dict() == back.cfg.to_dict()
    for key, value in flat_params(again).items():
        assert np.array_equal(want[key], value), key
    # params checkpoint -> HF directory (launch/export.py), bfloat16: every tensor is the bf16 rounding
    report = launch_module("export").run(str(tmp_path / "params"), str(tmp_path / "bf16"), dtype="bfloat16")
    assert report.dtype == "bfloat16"
    half, _ = hf_export.load_exported(str(tmp_path / "bf16"))
    for key, value in flat_params(half).items():
        assert np.array_equal(want[key].astype(jnp.bfloat16).astype(np.float32), value), key


def test_export_streams_shard_by_shard(tmp_path, monkeypatch):
    """Host copies exist for one shard at a time: every write holds at most max_shard_bytes (or one tensor)."""
    import safetensors.numpy

    cfg = tiny_model_config()
    model = perturbed_model(cfg)
    limit = 30_000
    writes = []
    real = safetensors.numpy.save_file

    def spy(tensors, path, metadata=None):
        writes.append((os.path.basename(path), sum(t.nbytes for t in tensors.values()), len(tensors),
                       max(t.nbytes for t in tensors.values())))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", spy)
    report = hf_export.export_hf(model, cfg, str(tmp_path), max_shard_bytes=limit)
    total = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert len(writes) == len(report.shards) > 3
    for _, nbytes, count, biggest in writes:
        assert nbytes <= limit or count == 1, (nbytes, count, biggest)
    assert sum(w[1] for w in writes) == total == report.bytes_written


def test_export_errors_name_the_problem(tmp_path):
    cfg = tiny_model_config()
    model = perturbed_model(cfg)
    broken = tiny_model_config()
    del broken.llm["rope_theta"]
    with pytest.raises(hf_export.ExportError, match=r"config field `llm\.rope_theta` is missing"):
        hf_export.export_hf(model, broken, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("keep me")
    with pytest.raises(hf_export.ExportError, match=r"is not empty .*overwrite"):
        hf_export.export_hf(model, cfg, str(tmp_path / "b"))
    hf_export.export_hf(model, cfg, str(tmp_path / "b"), overwrite=True)
    assert (tmp_path / "b" / "notes.txt").exists() and (tmp_path / "b" / "config.json").exists()
    # a params checkpoint whose stored config lacks a field
    params_io.save_model(str(tmp_path / "p"), model)
    path = tmp_path / "p" / params_io.CONFIG_FILE
    data = json.loads(path.read_text())
    del data["vit"]["patch_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(params_io.ParamsCheckpointError, match=r"config field `vit\.patch_size` is missing"):
        launch_module("export").run(str(tmp_path / "p"), str(tmp_path / "c"))
    with pytest.raises(hf_export.ExportError, match=r"is not empty"):
        launch_module("export").run(str(tmp_path / "p"), str(tmp_path / "b"))


def test_import_with_mismatched_shapes_names_tensor_and_shapes(tmp_path):
    cfg = stts_tiny_config(prune_ratio=0.5)
    model = perturbed_model(cfg)
    hf_export.export_hf(model, cfg, str(tmp_path / "hf"))
    importer = launch_module("import_hf")
    cfg_path = tmp_path / "hf" / "config.json"
    good = cfg_path.read_text()
    data = json.loads(good)
    data["text_config"]["intermediate_size"] = 80  # the weights have 96
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\).*needs \(\d+, \d+\)"):
        importer.run(str(tmp_path / "hf"), str(tmp_path / "p1"))
    cfg_path.write_text(good)
    from safetensors.numpy import load_file, save_file

    scorer_path = tmp_path / "hf" / "stts_scorer.safetensors"
    tensors = load_file(str(scorer_path))
    tensors["fc2.weight"] = tensors["fc2.weight"][:, :-1].copy()
    save_file(tensors, str(scorer_path))
    with pytest.raises(CheckpointError, match=r"stts_scorer\.safetensors: tensor fc2\.weight has shape \(64, 63\)"):
        importer.run(str(tmp_path / "hf"), str(tmp_path / "p2"))
    assert not (tmp_path / "p2").exists()


def test_predict_gives_the_same_answer_from_hf_directory_and_params_checkpoint(tmp_path, bikes_mp4):
    predict = launch_module("predict")
    cfg = stts_tiny_config(prune_ratio=0.5)
    hf_export.export_hf(perturbed_model(cfg, seed=9), cfg, str(tmp_path / "hf"))
    launch_module("import_hf").run(str(tmp_path / "hf"), str(tmp_path / "params"))
    kw = dict(frames=5, overlay=str(tmp_path / "pruned.png"))
    choices = ["red bikes", "a dog", "a boat"]
    from_hf = predict.predict(str(tmp_path / "hf"), bikes_mp4, "What is in the video?", choices, **kw)
    from_params = predict.predict(str(tmp_path / "params"), bikes_mp4, "What is in the video?", choices, **kw)
    assert from_hf.tokenizer == "toy" and from_hf.frames == 5
    k = prune_count(5, 9, 0.5)
    assert from_hf.vision_tokens_kept == 45 - k and from_hf.vision_tokens_total == 45 and from_hf.keep.sum() == 45 - k and from_hf.keep[0].all()
    probs_hf, probs_params = list(from_hf.option_probs.values()), list(from_params.option_probs.values())
    assert abs(sum(probs_hf) - 1) < 1e-6
    np.testing.assert_allclose(probs_params, probs_hf, atol=1e-4)
    np.testing.assert_allclose(from_params.logits, from_hf.logits, atol=1e-4)
    assert from_hf.logits.shape == (cfg.llm.vocab_size,)
    assert (tmp_path / "pruned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the one loader restores params checkpoints onto a mesh; a Hugging Face directory (built on one device) is refused
    from stts_jax.train.sharding import make_mesh

    on_mesh = params_io.load_checkpoint(str(tmp_path / "params"), mesh=make_mesh(-1, 1, 1))
    assert on_mesh.kind == "params" and len(jax.tree.leaves(nnx.state(on_mesh.model))[0].sharding.device_set) == 8
    with pytest.raises(params_io.ParamsCheckpointError, match="Hugging Face directory, which loads on one device"):
        params_io.load_checkpoint(str(tmp_path / "hf"), mesh=make_mesh(-1, 1, 1))
    # more frames at the same checkpoint, and a free-form answer generated with the KV cache
    free = predict.predict(str(tmp_path / "params"), bikes_mp4, "Describe it.", frames=7, ratio=0.8,
                           max_new_tokens=4)
    assert free.vision_tokens_kept == 9 * 7 - prune_count(7, 9, 0.8) and free.prune_ratio == 0.8 and isinstance(free.answer, str)
    # a question carrying special-token text is refused, not spliced into the layout
    from stts_jax.data.synthetic import write_benchmark

    write_benchmark(str(tmp_path / "tok"), 0)  # a real tokenizer.json holding the Molmo2 special tokens
    with pytest.raises(predict.PredictError, match=r"the question contains special-token text \['<frame_end>', "
                                                   r"'<im_patch>'\]"):
        predict.predict(str(tmp_path / "params"), bikes_mp4, "What is <im_patch> here?<frame_end>", frames=3,
                        tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
    hf_export.export_hf(perturbed_model(tiny_model_config()), tiny_model_config(), str(tmp_path / "plain"))
    with pytest.raises(predict.PredictError, match="--ratio needs a checkpoint with an STTS scorer"):
        predict.predict(str(tmp_path / "plain"), bikes_mp4, "Q?", ratio=0.5, frames=3)


def test_export_from_a_trainer_checkpoint_reads_only_the_parameters(tmp_path):
    import ml_collections
    import optax

    from stts_jax.train.checkpoint import Checkpointer
    from stts_jax.train.step import init_state

    cfg = stts_tiny_config(prune_ratio=0.5)
    model = perturbed_model(cfg, seed=11)
    _, state = init_state(model, optax.adamw(1e-3))
    checkpointer = Checkpointer(str(tmp_path / "work" / "checkpoints"), every=1, keep=3)
    checkpointer.save(7, state, {"epoch": 0}, ml_collections.ConfigDict(dict(model=cfg)), force=True)
    checkpointer.wait()
    checkpointer.close()
    report = launch_module("export").run(str(tmp_path / "work"), str(tmp_path / "hf"))
    assert report.scorer_tensors > 0
    back, _ = hf_export.load_exported(str(tmp_path / "hf"))
    want = flat_params(model)
    for key, value in flat_params(back).items():
        assert np.array_equal(want[key], value), key
    with pytest.raises(params_io.ParamsCheckpointError, match=r"no checkpoint for step 3; saved steps are \[7\]"):
        params_io.load_train_checkpoint(str(tmp_path / "work"), step=3)


def test_import_refuses_non_float_weights_and_shard_names_outside_the_directory(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = stts_tiny_config(prune_ratio=0.5)
    hf_export.export_hf(perturbed_model(cfg), cfg, str(tmp_path / "hf"), max_shard_bytes="100KB")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = sorted(index["weight_map"].items())[0]
    shard_path = tmp_path / "hf" / shard
    good = load_file(str(shard_path))
    # an integer (quantised) tensor is refused, not cast to float
    save_file({**good, key: np.round(good[key] * 100).astype(np.int8)}, str(shard_path))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has dtype int8; weights must be one of"):
        hf_export.load_exported(str(tmp_path / "hf"))
    save_file(good, str(shard_path))
    scorer_path = tmp_path / "hf" / "stts_scorer.safetensors"
    scorer = load_file(str(scorer_path))
    save_file({**scorer, "fc2.weight": scorer["fc2.weight"].astype(np.int32)}, str(scorer_path))
    with pytest.raises(CheckpointError, match=r"stts_scorer\.safetensors: fc2\.weight has dtype int32"):
        hf_export.load_exported(str(tmp_path / "hf"))
    save_file(scorer, str(scorer_path))
    # index.json naming a shard outside the directory (a copy of a real shard sits there to be read)
    (tmp_path / "outside.safetensors").write_bytes(shard_path.read_bytes())
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors"):
        index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: name}}))
        with pytest.raises(CheckpointError, match=r"is not a file name inside"):
            hf_export.load_exported(str(tmp_path / "hf"))
    index_path.write_text(json.dumps(index))
    hf_export.load_exported(str(tmp_path / "hf"))  # the restored directory imports again
