"""tfds builder -> ArrayRecord -> Grain pipeline on the synthetic benchmark: round trip, packing invariants,
row fill at STTS ratio 0.5, checkpointable iterator state, per-host slices, global arrays, every packed row's
frames agreeing with its placeholders, and the tiny model consuming a packed batch exactly as it consumes its
examples one by one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from stts_jax.config import data_config, stts_config, tiny_model_config
from stts_jax.data.examples import ExampleBuilder
from stts_jax.geometry import FrameLayout, placeholders_per_frame, prune_count, tokens_per_frame
from stts_jax.data.pipeline import (BATCH_KEYS, ExampleTooLongError, TooManyBadExamples, make_pipeline,
                                   open_source)
from stts_jax.data.processor import normalize_pixels
from stts_jax.data.synthetic import ClipSpec, write_benchmark
from stts_jax.data.tfds_builders.video_qa import VideoQa
from stts_jax.model import vlm
from stts_jax.model.vlm import Molmo2VLM
from stts_jax.train.sharding import make_mesh, to_global

T = 16
NUM_CLIPS = 12  # x 4 question kinds = 48 examples


def model_config(ratio=0.5):
    cfg = tiny_model_config()
    cfg.stts = stts_config(method="scorer", prune_ratio=ratio, prune_at=0) if ratio else stts_config(method="none")
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Writes the synthetic benchmark and prepares it with the tfds builder; returns (data_dir, records, tokenizer)."""
    root = tmp_path_factory.mktemp("synthetic")
    manual, data_dir = str(root / "manual"), str(root / "tfds")
    records = write_benchmark(manual, NUM_CLIPS, ClipSpec(), validation_clips=2)
    builder = VideoQa(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    assert builder.skipped == []
    return data_dir, records, os.path.join(manual, "tokenizer.json")


def pipeline(dataset, ratio=0.5, **overrides):
    data_dir, _, tokenizer = dataset
    kw = dict(kind="video", path=data_dir, tokenizer=tokenizer, num_frames=T, seq_len=1024, rows=2,
              videos_per_batch=16, num_epochs=1)
    kw.update(overrides)
    return make_pipeline(data_config(**kw), model_config(ratio), process_index=0, process_count=1)


def test_tfds_round_trip(dataset):
    data_dir, records, _ = dataset
    for split in ("train", "validation"):
        source = open_source(data_dir, split)
        assert len(source) == len(records[split])
        by_id = {r["id"]: r for r in records[split]}
        for i in range(len(source)):
            got = source[i]
            want = by_id[got["id"].decode()]
            assert got["question"].decode() == want["question"]
            assert [o.decode() for o in got["options"]] == want["options"]
            assert got["answer_index"] == want["answer_index"] and got["answer"].decode() == want["answer"]
            assert got["kind"].decode() == want["kind"]
            assert got["num_frames"] == 64 and got["fps"] == 8.0 and got["width"] == got["height"] == 128
            with open(got["video_path"].decode(), "rb") as f:
                assert got["video"] == f.read()  # the mp4 bytes are embedded
    line = json.loads(open(os.path.join(os.path.dirname(data_dir), "manual", "train.jsonl")).readline())
    assert set(line) >= {"id", "video", "question", "options", "answer_index", "answer", "kind"}


def _examples(dataset, ratio=0.5):
    """Returns {record index: example} built directly from the source (no Grain, no packing)."""
    data_dir, _, tokenizer = dataset
    cfg = model_config(ratio)
    builder = ExampleBuilder(tokenizer, image_size=cfg.vit.image_size, patch_size=cfg.vit.patch_size, num_frames=T,
                             placeholders_per_frame=placeholders_per_frame(cfg, T))
    source = open_source(data_dir, "train")
    return {int(source[i]["index"]): builder(source[i]) for i in range(len(source))}


def test_packing_keeps_every_example_whole(dataset):
    cfg = model_config(0.5)
    tok = cfg.tokens
    w = tokens_per_frame(cfg)
    kept = w * T - prune_count(T, w, 0.5)  # 72 placeholders per video at ratio 0.5
    examples = _examples(dataset)
    seen = []
    for batch in pipeline(dataset, shuffle=False):
        vids = 0
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            n = int(seg.max())
            np.testing.assert_array_equal(batch["frame_mask"][r], np.arange(8 * T) < n * T)  # videos first
            assert np.all(batch["pixel_values"][r, n * T:] == 0)  # empty slots hold zeros
            assert np.all(seg[: np.count_nonzero(seg)] > 0) and np.all(seg[np.count_nonzero(seg):] == 0)  # pad last
            assert n == batch["row_videos"][r]
            for s in range(1, n + 1):
                record = int(batch["record"][r, s - 1])
                ex, where = examples[record], seg == s
                assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous: never split
                for key in ("input_ids", "targets", "loss_mask"):
                    np.testing.assert_array_equal(batch[key][r][where], ex[key])
                np.testing.assert_array_equal(batch["positions"][r][where], np.arange(where.sum()))
                ids = ex["input_ids"]
                assert np.sum(ids == tok.image_patch_id) == kept
                starts, ends = np.flatnonzero(ids == tok.frame_start_id), np.flatnonzero(ids == tok.frame_end_id)
                assert len(starts) == len(ends) == T and np.all(ids[ends - 1] == tok.image_patch_id)
                vision = np.isin(ids, [tok.image_patch_id, tok.frame_start_id, tok.frame_end_id])
                assert not np.any(ex["loss_mask"].astype(bool) & vision)  # loss only on answer tokens
                assert ex["loss_mask"].sum() == 2  # the option letter and <|im_end|>
                frames = batch["pixel_values"][r, (s - 1) * T: s * T]
                np.testing.assert_array_equal(frames, normalize_pixels(ex["frames"]))  # row's videos in sequence order
                vids += 1
                seen.append(record)
            assert np.sum(batch["input_ids"][r] == tok.image_patch_id) == n * kept
        assert batch["num_videos"] == vids
    assert sorted(seen) == sorted(examples)  # nothing lost, nothing twice


def test_rows_are_at_least_90_percent_full(dataset):
    """Token fill of packed rows at STTS ratio 0.5 (T=16, tiny shapes: ~200 tokens per example, seq_len 1024)."""
    it = iter(pipeline(dataset, num_epochs=None))
    fill = np.mean([(next(it)["segment_ids"] > 0).mean() for _ in range(8)])
    it.close()
    print(f"\nrow fill at ratio 0.5: {fill:.1%}")
    assert fill >= 0.9


@pytest.mark.parametrize("workers", [0, 2])
def test_restoring_iterator_state_reproduces_batches(dataset, workers):
    p = pipeline(dataset, num_epochs=None, workers=workers, seq_len=512, videos_per_batch=8)
    it = iter(p)
    for _ in range(3):
        next(it)
    state = json.dumps(it.get_state())  # the trainer checkpoints it with Orbax's JsonSave
    want = [next(it) for _ in range(3)]
    it.close()
    restored = iter(p)
    restored.set_state(json.loads(state))
    got = [next(restored) for _ in range(3)]
    restored.close()
    for a, b in zip(want, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_example_longer_than_a_row_is_an_error_naming_it(dataset):
    """on_bad_video="fail": the first over-long example raises, named; "skip": each is a counted skip, and a dataset
    where every example is too long stops at the skip budget instead of looping."""
    with pytest.raises(ExampleTooLongError, match=r"bad example 'clip_\d+_\w+': record \d+ has \d+ tokens.*seq_len=64"):
        next(iter(pipeline(dataset, seq_len=64, on_bad_video="fail")))
    with pytest.raises(TooManyBadExamples, match=r"stopping: 4 consecutive bad examples; skipped 4 bad examples "
                                                   r"\(too_long: 4\)"):
        next(iter(pipeline(dataset, seq_len=64, num_epochs=None, max_consecutive_bad=4)))


def test_host_slices_partition_the_data(dataset):
    data_dir, records, tokenizer = dataset
    seen = []
    for host in range(2):
        data = data_config(kind="video", path=data_dir, tokenizer=tokenizer, num_frames=4, seq_len=512, rows=4,
                           videos_per_batch=16, num_epochs=1)
        p = make_pipeline(data, model_config(0.5), process_index=host, process_count=2)
        assert p.geometry.rows == 2 and p.layout == FrameLayout.video_slots(4, 4)  # one row: 4 videos x T
        host_seen = [int(i) for b in p for i in b["record"][b["record"] >= 0]]
        assert len(host_seen) == len(set(host_seen))
        seen.append(set(host_seen))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(records["train"])


def test_global_batch_on_the_mesh(dataset):
    """sharding.to_global turns a host batch into global arrays whose rows (pixels and frame mask included)
    are split over the 8 simulated devices when they divide, else replicated."""
    mesh = make_mesh()  # 8 simulated devices on the data axis
    for rows, sharded in ((8, True), (2, False)):
        p = pipeline(dataset, num_frames=4, seq_len=256, rows=rows, videos_per_batch=2 * rows)
        it = iter(p)
        batch = next(it)
        it.close()
        assert set(BATCH_KEYS) <= set(batch) and "pooling_idx" not in batch
        assert batch["pixel_values"].shape[:2] == batch["frame_mask"].shape == (rows, 2 * 4)
        arrays = to_global({k: batch[k] for k in BATCH_KEYS}, mesh)
        assert set(arrays) == set(BATCH_KEYS)
        for key, value in arrays.items():
            np.testing.assert_array_equal(np.asarray(value), batch[key], err_msg=key)
            local_rows = {shard.data.shape[0] for shard in value.addressable_shards}
            assert local_rows == {rows // 8 if sharded else rows}, key


def _batches(p):
    """Returns every host batch of a (finite) pipeline."""
    it = iter(p)
    out = list(it)
    it.close()
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_packed_rows_frames_agree_with_their_placeholders(dataset, ratio):
    """Every row of every batch (rows with empty video slots, and the empty rows padding the last batch): its
    image-patch placeholders are exactly the vision tokens the model makes of its real frames, its empty slots
    hold zeros, and vlm.check_batch accepts the batch, unpruned and with STTS at 0.5."""
    cfg = model_config(ratio)
    p = pipeline(dataset, ratio, shuffle=False, num_frames=4, seq_len=300, rows=3, videos_per_batch=12)
    layout = p.layout
    assert layout == FrameLayout.video_slots(4, 4)
    empty_slots = empty_rows = 0
    for batch in _batches(p):
        mask = batch["frame_mask"]
        placeholders = (batch["input_ids"] == cfg.tokens.image_patch_id).sum(1)
        np.testing.assert_array_equal(placeholders, vlm.expected_row_tokens(cfg, layout, mask))
        np.testing.assert_array_equal(placeholders, batch["row_videos"] * sum(placeholders_per_frame(cfg, 4)))
        vlm.check_batch(batch, cfg, layout)
        assert np.all(batch["pixel_values"][mask == 0] == 0)
        assert np.all(np.abs(batch["pixel_values"][mask == 1]).max(axis=(1, 2)) > 0)  # real frames are not zeros
        np.testing.assert_array_equal(mask.reshape(3, 4, 4).min(2), mask.reshape(3, 4, 4).max(2))  # whole videos
        empty_slots += int((mask == 0).sum())
        empty_rows += int((mask.sum(1) == 0).sum())
    assert empty_slots and empty_rows  # the case this test is about actually happens


def test_tiny_model_sees_the_same_example_packed_or_alone(dataset):
    """Logits of an example inside a packed batch (several videos a row, empty slots, STTS at 0.5) equal its logits
    when it is alone in the batch: frames are in sequence order and nothing leaks between examples."""
    cfg = model_config(0.5)
    model = Molmo2VLM(cfg, rngs=nnx.Rngs(0))
    keys = ("input_ids", "segment_ids", "positions", "pixel_values", "frame_mask")
    packed_pipe = pipeline(dataset, shuffle=False, num_frames=4, seq_len=300, rows=2, videos_per_batch=8)
    alone_pipe = pipeline(dataset, shuffle=False, num_frames=4, seq_len=128, rows=1, videos_per_batch=1)

    graphdef, state = nnx.split(model)
    compiled = {}

    def logits(batch, layout):
        if layout not in compiled:
            compiled[layout] = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, layout))
        with jax.default_matmul_precision("highest"):
            return np.asarray(compiled[layout](state, {k: jnp.asarray(batch[k]) for k in keys}))

    it = iter(packed_pipe)
    packed = next(it)
    it.close()
    assert 0 < packed["num_videos"] < packed_pipe.geometry.videos_per_batch  # some empty video slots
    packed_logits = logits(packed, packed_pipe.layout)
    slots = [(r, s) for r in range(2) for s in range(1, packed["row_videos"][r] + 1)][:3]
    wanted = {int(packed["record"][r, s - 1]): (r, s) for r, s in slots}
    it = iter(alone_pipe)
    for single in it:
        record = int(single["record"][0, 0])
        if record not in wanted:
            continue
        r, s = wanted.pop(record)
        where = packed["segment_ids"][r] == s
        want = logits(single, alone_pipe.layout)[0, : int(where.sum())]
        np.testing.assert_allclose(packed_logits[r][where], want, atol=2e-4, rtol=1e-4)
        if not wanted:
            break
    it.close()
    assert not wanted


def test_trainer_runs_on_the_video_pipeline(dataset, tmp_path):
    """The trainer's `data.kind="video"` input (`make_train_iterator`): train steps on packed synthetic batches."""

    from stts_jax.train.trainer import train

    from configs import tiny_train

    data_dir, _, tokenizer = dataset
    cfg = tiny_train.get_config("none")
    cfg.data.update(kind="video", path=data_dir, num_frames=4, videos_per_batch=8, rows=4, seq_len=192)
    cfg.data.tokenizer = tokenizer  # optional key; default: a tokenizer.json in data.path or its parents
    cfg.train.update(steps=2, log_every=1, ckpt_every=100)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    records = train(cfg, str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2] and records[-1]["compilations"] == 1
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(r["skipped_examples"] == 0 for r in records)  # the pipeline's skip count, logged with every record
