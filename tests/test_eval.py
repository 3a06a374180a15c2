"""Multiple-choice evaluation, weight transplants and fine-tuning from our own checkpoints.

Oracles: a model whose logits are all zero picks option A (argmax's first index), so its accuracy is the
share of answers that are A in the JSONL; and the pipeline's batched answer logits equal the logits of the
model run on each example alone (built by ExampleBuilder, no packing, no padding).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from stts_jax.config import stts_config, tiny_model_config
from stts_jax.data.examples import ExampleBuilder
from stts_jax.data.processor import normalize_pixels
from stts_jax.data.synthetic import ClipSpec, make_flash_clip, write_benchmark
from stts_jax.data.tfds_builders.video_qa import VideoQa
from stts_jax.eval import evaluate as ev
from stts_jax.geometry import FrameLayout, placeholders_per_frame
from stts_jax.interop import params_io
from stts_jax.model.vlm import Molmo2VLM

T = 8


def model(method="scorer", ratio=0.5, seed=0):
    cfg = tiny_model_config()
    cfg.stts = stts_config(method=method, prune_ratio=ratio, prune_at=0)
    return Molmo2VLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def flash_set(tmp_path_factory):
    """6 + 10 transient-event clips (flash_colour, shuffled options), prepared as tfds; returns (dir, records, tok)."""
    root = tmp_path_factory.mktemp("flash")
    manual, data_dir = str(root / "manual"), str(root / "tfds")
    spec = ClipSpec(num_frames=32, event_frames=5, object_radius=12)
    records = write_benchmark(manual, 6, spec, validation_clips=10, kinds=("flash_colour",))
    VideoQa(data_dir=data_dir).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return data_dir, records, os.path.join(manual, "tokenizer.json")


def test_flash_clip_shows_the_answer_colour_only_during_the_flash():
    frames, (q,), scene = make_flash_clip(3, ClipSpec(num_frames=32, event_frames=5, object_radius=12))
    start, end = scene["flash"]
    assert end - start == 5 and 0 < start and end < 32
    changed = np.abs(np.diff(frames.astype(int), axis=0)).sum(axis=(1, 2, 3)) > 0
    assert changed.nonzero()[0].tolist() == [start - 1, end - 1]  # the flash's on and off are the only changes
    assert q.answer == scene["flasher"].split()[0] and sorted(q.options) == sorted(["red", "green", "blue", "yellow"])


def test_zero_logits_pick_option_a(flash_set):
    data_dir, records, tok = flash_set
    m = model("none")
    m.llm.lm_head.kernel.set_value(jnp.zeros_like(m.llm.lm_head.kernel[...]))  # every logit 0: argmax picks A
    result = ev.evaluate(m, data_dir, tokenizer=tok, method="none", ratio=0.0, frames=T, rows=4, progress=False)
    answers = [r["answer_index"] for r in records["validation"]]
    assert result.count["all"] == len(answers) == 10
    assert result.correct["all"] == sum(a == 0 for a in answers)
    assert result.vision_tokens == result.vision_tokens_unpruned == 9 * T


@pytest.mark.parametrize("method,ratio", [("none", 0.0), ("scorer", 0.5)])
def test_batched_answer_logits_equal_each_example_alone(flash_set, method, ratio):
    data_dir, records, tok = flash_set
    m = ev.with_stts(model("scorer"), method, ratio)
    result = ev.evaluate(m, data_dir, tokenizer=tok, method=method, ratio=ratio, frames=T, rows=3, progress=False)
    cfg = m.cfg
    builder = ExampleBuilder(tok, image_size=cfg.vit.image_size, patch_size=cfg.vit.patch_size, num_frames=T,
                             placeholders_per_frame=placeholders_per_frame(cfg, T))
    source = {int(r["index"]): r for r in (dict(x) for x in _source(data_dir))}
    assert len(result.predictions) == 10
    for index, pred, answer in result.predictions:
        ex = builder(source[index])
        n = len(ex["input_ids"])
        batch = dict(input_ids=ex["input_ids"][None], segment_ids=np.ones((1, n), np.int32),
                     positions=np.arange(n, dtype=np.int32)[None],
                     pixel_values=normalize_pixels(ex["frames"])[None])  # one row: [1, T, N, P]
        logits = np.asarray(m(batch, FrameLayout.videos(T)))[0]
        first = int(np.argmax(ex["loss_mask"]))
        letters = [builder.encoder.ids(c)[0] for c in "ABCD"]
        assert pred == int(np.argmax(logits[first, letters])), index
        assert answer == records["validation"][index]["answer_index"]


def test_random_pruning_scores_every_example_once(flash_set):
    """Random keeps depend on the row's place in the batch, so no per-example logits to compare: every
    validation example is answered once, against its own answer, at the pruned token count."""
    data_dir, records, tok = flash_set
    m = ev.with_stts(model("scorer"), "random", 0.5)
    result = ev.evaluate(m, data_dir, tokenizer=tok, method="random", ratio=0.5, frames=T, rows=3, progress=False)
    assert sorted(i for i, _, _ in result.predictions) == list(range(10))
    assert all(answer == records["validation"][i]["answer_index"] for i, _, answer in result.predictions)
    assert result.vision_tokens == 9 * T // 2 and result.count["all"] == 10


def _source(data_dir):
    from stts_jax.data.pipeline import open_source

    src = open_source(data_dir, "validation")
    return [src[i] for i in range(len(src))]


def test_test_time_scaling_doubles_frames_at_the_unpruned_budget(flash_set):
    data_dir, _, tok = flash_set
    m = model("scorer", 0.5)
    result = ev.evaluate(m, data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=2 * T, max_fps=4.0,
                         rows=4, progress=False)
    assert result.frames == 2 * T and result.vision_tokens == 9 * T == result.vision_tokens_unpruned // 2
    assert result.count["all"] == 10


def test_scorer_method_needs_a_scorer_and_transplant_names_what_is_missing(tmp_path):
    plain = model("none")
    with pytest.raises(ev.EvalError, match="trained with the STTS scorer"):
        ev.with_stts(plain, "scorer", 0.5)
    cfg = tiny_model_config()
    cfg.stts = stts_config(method="scorer", prune_ratio=0.5, prune_at=0)
    with pytest.raises(params_io.ParamsCheckpointError, match="scorer"):
        params_io.transplant(plain, cfg)
    moved, fresh = params_io.transplant(plain, cfg, seed=1, fresh=("scorer",))
    assert fresh and all(p.startswith("scorer/") for p in fresh)
    np.testing.assert_array_equal(moved.llm.lm_head.kernel[...], plain.llm.lm_head.kernel[...])
    wide = tiny_model_config()
    wide.llm.mlp_dim = 128
    with pytest.raises(params_io.ParamsCheckpointError, match="shape"):
        params_io.transplant(plain, wide)


def test_fine_tune_starts_from_a_training_workdir(tmp_path):
    """init_from = an unpruned run's workdir: the STTS run starts with its weights and a fresh scorer."""

    from configs import tiny_train

    from stts_jax.train.trainer import load_own_init, train

    base = tiny_train.get_config("none")
    base.train.update(steps=2, ckpt_every=2, log_every=1)
    base.data.seq_len = 64  # unpruned: 36 placeholders
    train(base, str(tmp_path / "base"))
    saved = params_io.load_train_checkpoint(str(tmp_path / "base"))[0]
    cfg = tiny_train.get_config("scorer")
    cfg.train.update(steps=2, ckpt_every=2, log_every=1, init_from=str(tmp_path / "base"))
    start = load_own_init(cfg)
    assert start.scorer is not None
    np.testing.assert_array_equal(start.vit.patch_embedding.kernel[...], saved.vit.patch_embedding.kernel[...])
    records = train(cfg, str(tmp_path / "stts"))
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
    meta = params_io.saved_train_config(str(tmp_path / "stts"))
    assert meta["train"]["init_from"] == str(tmp_path / "base") and json.dumps(meta)


def test_sharded_eval_on_eight_devices_equals_one_device(flash_set, tmp_path):
    """Rows over an 8-device (data x fsdp) mesh, parameters restored onto it: the same prediction per example,
    and the same counts, as one device."""
    from stts_jax.train import sharding

    data_dir, _, tok = flash_set
    m = ev.with_stts(model("scorer"), "scorer", 0.5)
    one = ev.evaluate(m, data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=T, rows=8, progress=False)
    mesh = sharding.make_mesh(4, 2, 1)
    params_io.save_model(str(tmp_path / "ckpt"), m)
    on_mesh = params_io.load_model(str(tmp_path / "ckpt"), mesh=mesh)  # restored onto the mesh, trainer's rules
    assert len(on_mesh.llm.lm_head.kernel[...].sharding.device_set) == 8
    many = ev.evaluate(on_mesh, data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=T, rows=8,
                       progress=False, mesh=mesh)
    assert sorted(many.predictions) == sorted(one.predictions) and len(one.predictions) == 10
    assert many.correct == one.correct and many.count == one.count


def test_generation_scoring_reads_the_greedy_answer(flash_set):
    """scoring='generate': each row's first generated token is the argmax over the whole vocabulary at the answer
    position (the model run on the example alone), generation stops at <|im_end|> or max_new_tokens, and the
    prediction is what parse_choice reads in the decoded text; both scorings give one prediction per example."""
    from tokenizers import Tokenizer

    from stts_jax.eval.scoring import parse_choice

    data_dir, records, tok = flash_set
    m = ev.with_stts(model("scorer"), "evs", 0.5)
    gen = ev.evaluate(m, data_dir, tokenizer=tok, method="evs", ratio=0.5, frames=T, rows=4, progress=False,
                      scoring="generate", max_new_tokens=3)
    logit = ev.evaluate(m, data_dir, tokenizer=tok, method="evs", ratio=0.5, frames=T, rows=4, progress=False)
    assert gen.scoring == "generate" and gen.count["all"] == logit.count["all"] == 10
    assert all(r["scoring"] == "generate" for r in gen.rows())
    cfg = m.cfg
    builder = ExampleBuilder(tok, image_size=cfg.vit.image_size, patch_size=cfg.vit.patch_size, num_frames=T,
                             placeholders_per_frame=placeholders_per_frame(cfg, T))
    source = {int(r["index"]): r for r in (dict(x) for x in _source(data_dir))}
    eos = Tokenizer.from_file(tok).token_to_id("<|im_end|>")
    options = {i: r["options"] for i, r in enumerate(records["validation"])}
    for (index, pred, _), ex in zip(gen.predictions, gen.examples):
        e = builder(source[index])
        first = int(np.argmax(e["loss_mask"]))
        n = first + 1  # the prompt alone
        batch = dict(input_ids=e["input_ids"][None, :n], segment_ids=np.ones((1, n), np.int32),
                     positions=np.arange(n, dtype=np.int32)[None], pixel_values=normalize_pixels(e["frames"])[None])
        logits = np.asarray(m.forward(batch, FrameLayout.videos(T))[0])[0, first]
        assert ex["tokens"][0] == int(np.argmax(logits)), index
        assert 1 <= len(ex["tokens"]) <= 3 and (len(ex["tokens"]) == 3 or ex["tokens"][-1] == eos)
        assert pred == ex["pred"] == parse_choice(ex["text"], options[index])


def test_evs_needs_no_scorer_and_prunes_at_eval(flash_set):
    """EVS on an unpruned checkpoint (no scorer): STTS's token counts, every example scored once."""
    data_dir, records, tok = flash_set
    m = model("none")
    result = ev.evaluate(m, data_dir, tokenizer=tok, method="evs", ratio=0.5, frames=T, rows=4, progress=False)
    assert result.vision_tokens == 9 * T - 9 * T // 2 and result.count["all"] == 10
    assert sorted(i for i, _, _ in result.predictions) == list(range(10))
    summary = result.summary()
    assert summary["overall"]["count"] == 10 and summary["per_task"]["flash_colour"]["count"] == 10


def test_benchmark_end_to_end_scores_like_the_always_a_oracle(tmp_path, bikes_mp4):
    """A Video-MME parquet in the upstream layout -> prepare_benchmark -> video_qa -> evaluate with a model whose
    logits are all zero (it always answers A): per duration, per task and overall accuracy equal the fixture's
    share of A answers, questions on one video are one cluster, and the prompt is Molmo2's Video-MME wording."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenizers import Tokenizer

    from stts_jax.data import benchmarks
    from stts_jax.data.processor import format_question
    from stts_jax.data.tokenizer import build_word_tokenizer, words_of

    videos = tmp_path / "videos"
    videos.mkdir()
    for v in ("vA", "vB", "vC"):
        shutil.copy(bikes_mp4, videos / f"{v}.mp4")
    answers = {"vA": "ABAC", "vB": "DA", "vC": "BBA"}  # 4 + 2 + 3 questions, A in 2 / 1 / 1 of them
    duration = {"vA": "short", "vB": "short", "vC": "long"}
    rows = [dict(video_id=f"{i:03d}", duration=duration[v], domain="Sports", sub_category="Cycling", videoID=v,
                 question_id=f"{v}-{j}", task_type=("Counting" if j % 2 else "Action Recognition"),
                 question=f"What happens in part {j}?",
                 options=[f"{letter}. bikes {letter.lower()}" for letter in "ABCD"], answer=a)
            for i, v in enumerate(answers) for j, a in enumerate(answers[v])]
    ann = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    ann.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), ann)
    out = tmp_path / "out"
    read = benchmarks.prepare_benchmark("videomme", str(ann.parent), str(videos), str(out))
    assert len(read.records) == 9 and not read.refused
    VideoQa(data_dir=str(out / "tfds"), video_roots=(str(videos),)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
    cfg = tiny_model_config()
    texts = [format_question(r["question"], [o[3:] for o in r["options"]], "videomme") for r in rows]
    tok = str(tmp_path / "tokenizer.json")
    build_word_tokenizer(words_of(texts + ["0 1 2 3 4 5 6 7 8 9 . user assistant"]), dict(cfg.tokens)).save(tok)
    m = model("none")
    m.llm.lm_head.kernel.set_value(jnp.zeros_like(m.llm.lm_head.kernel[...]))
    result = ev.evaluate(m, str(out / "tfds"), tokenizer=tok, method="none", ratio=0.0, frames=4, rows=4,
                         progress=False)
    s = result.summary()
    share = lambda rs: sum(r["answer"] == "A" for r in rs) / len(rs)  # noqa: E731
    assert s["headline"] == "micro" and s["overall"]["accuracy"] == pytest.approx(share(rows))
    for group in ("short", "long"):
        assert s["per_duration"][group]["accuracy"] == pytest.approx(share([r for r in rows if r["duration"] == group]))
    for task in ("Counting", "Action Recognition"):
        assert s["per_task"][task]["accuracy"] == pytest.approx(share([r for r in rows if r["task_type"] == task]))
    assert s["overall"]["clusters"] == 3 and s["per_duration"]["short"]["clusters"] == 2
    builder = ExampleBuilder(tok, image_size=cfg.vit.image_size, patch_size=cfg.vit.patch_size, num_frames=4,
                             placeholders_per_frame=placeholders_per_frame(cfg, 4))
    record = dict(_source(str(out / "tfds"))[0])
    text = Tokenizer.from_file(tok).decode([int(i) for i in builder(record)["input_ids"]], skip_special_tokens=False)
    assert "Select the best answer" in text and "D . bikes d The best answer is : <|im_end|>" in text


def test_eval_during_training_equals_evaluating_the_saved_checkpoints(flash_set, tmp_path, monkeypatch):
    """train.eval_every=2 on 4 steps (8-device mesh): eval.jsonl holds steps 2 and 4, each the accuracy that
    evaluating that step's saved checkpoint gives on one device; the train step still compiles once. A split that
    does not exist is refused before any work."""

    from configs import demo as demo_config

    from stts_jax.config import ConfigError
    from stts_jax.train.trainer import train

    data_dir, _, tok = flash_set
    seen = {}  # the trainer's own evaluations, per example
    evaluate = ev.evaluate

    def spy(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        seen[len(seen)] = result
        return result

    monkeypatch.setattr(ev, "evaluate", spy)
    cfg = demo_config.get_config("scorer,r0.5")
    cfg.data.update(path=data_dir, tokenizer=tok)
    cfg.train.update(steps=4, log_every=1, ckpt_every=2, keep_ckpts=2, eval_every=2)
    workdir = str(tmp_path / "run")
    records = train(cfg, workdir)
    assert records[-1]["step"] == 4 and records[-1]["compilations"] == 1
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [2, 4] and all(r["examples"] == 10 for r in logged)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    assert len(seen) == 2
    for i, r in enumerate(logged):
        saved, step = params_io.load_train_checkpoint(workdir, step=r["step"])
        assert step == r["step"]
        again = ev.evaluate(saved, data_dir, tokenizer=tok, method="scorer", ratio=0.5, frames=cfg.data.num_frames,
                            rows=8, progress=False)
        assert sorted(seen[i].predictions) == sorted(again.predictions)  # the same answer per example
        assert r["accuracy"] == again.accuracy() and r["accuracy_flash_colour"] == again.accuracy("flash_colour")
    cfg.train.eval_split = "test"
    with pytest.raises(ConfigError, match="train.eval_split.*'test'"):
        train(cfg, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")  # refused before the workdir was made
