"""Bad videos: corrupt, truncated, zero-frame, audio-only and unreadable files raise errors naming the file;
the tfds builder and the Grain pipeline count and report them (skip by default, `fail` on request) and never
stop mid-epoch."""

import json
import os

import av
import numpy as np
import pytest

from stts_jax.config import stts_config, tiny_model_config
from stts_jax.data.pipeline import BadExampleError, data_config, make_pipeline
from stts_jax.data.synthetic import write_benchmark, write_mp4
from stts_jax.data.video import VideoDecodeError, decode_clip, probe_video

SPEC_FRAMES = 8


def _good_mp4(path, seed=0, frames=24):
    clip = np.random.default_rng(seed).integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
    return write_mp4(str(path), clip, fps=8, codec="libx264")


def _audio_only(path):
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Returns {case: (path, expected kind, expected message fragment)}."""
    d = tmp_path_factory.mktemp("bad")
    good = open(_good_mp4(d / "good.mp4"), "rb").read()  # moov atom first (faststart): truncation keeps the header
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    mdat = good.find(b"mdat")  # zero-frame: a valid header whose every frame is gone
    (d / "zero_frames.mp4").write_bytes(good[: mdat + 4] + b"\x00" * (len(good) - mdat - 4))
    (d / "empty.mp4").write_bytes(b"")
    return {
        "corrupt": (str(d / "corrupt.mp4"), "corrupt", "not a readable video container"),
        "truncated": (str(d / "truncated.mp4"), "truncated", "truncated: the container declares 24 frames but only"),
        "zero_frames": (str(d / "zero_frames.mp4"), "no_frames", "declares 24 frames but none decodes"),
        "empty": (str(d / "empty.mp4"), "corrupt", "empty file"),
        "audio_only": (_audio_only(d / "audio_only.m4a"), "no_video_stream", "no video stream (streams found: audio"),
        "missing": (str(d / "missing.mp4"), "unreadable", "cannot read the file: no such file"),
        "directory": (str(d), "unreadable", "cannot read the file: it is a directory"),
    }


CASES = ["corrupt", "truncated", "zero_frames", "empty", "audio_only", "missing", "directory"]


@pytest.mark.parametrize("case", CASES)
def test_decode_error_names_the_file(case, bad_files):
    path, kind, fragment = bad_files[case]
    with pytest.raises(VideoDecodeError) as info:
        decode_clip(path, SPEC_FRAMES)
    assert str(info.value).startswith(path + ": ") and fragment in str(info.value)
    assert info.value.kind == kind
    if case not in ("truncated", "zero_frames"):  # those two are only found by decoding
        with pytest.raises(VideoDecodeError, match="^" + path):
            probe_video(path)
    data = open(path, "rb").read() if os.path.isfile(path) else None
    if data is not None:  # from bytes, with the name given by the caller
        with pytest.raises(VideoDecodeError, match="^named.mp4: "):
            decode_clip(data, SPEC_FRAMES, name="named.mp4")


def _records(paths):
    """Returns video_qa-style records (as the tfds source yields them) for video paths."""
    out = []
    for i, path in enumerate(paths):
        data = open(path, "rb").read() if os.path.isfile(path) else b""
        out.append(dict(index=i, id=f"ex{i}".encode(), video=data, video_path=path.encode(),
                        question=b"Which direction does the red circle move?", answer=b"left",
                        options=[b"left", b"right"], answer_index=0, kind=b"direction"))
    return out


def _pipeline(records, tokenizer, on_error="skip", workers=0):
    cfg = tiny_model_config()
    cfg.stts = stts_config(method="scorer", prune_ratio=0.5, prune_at=0)
    data = data_config(tokenizer=tokenizer, num_frames=SPEC_FRAMES, seq_len=512, rows=2, videos_per_row=4,
                       shuffle=False, on_error=on_error, num_workers=workers)
    return make_pipeline(data, cfg, source=records, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_benchmark(str(d), 0)  # just the tokenizer.json of the benchmark vocabulary
    return str(d / "tokenizer.json")


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_skips_counts_and_reports(workers, bad_files, tokenizer, tmp_path):
    goods = [_good_mp4(tmp_path / f"g{i}.mp4", seed=i) for i in range(5)]
    bads = [bad_files[c][0] for c in CASES]
    paths = [p for pair in zip(goods + goods[:2], bads) for p in pair]  # interleaved: bad ones mid-epoch
    pipeline = _pipeline(_records(paths), tokenizer, workers=workers)
    it = iter(pipeline)
    seen = []
    for batch in it:
        seen += batch["record"][batch["record"] >= 0].tolist()
    it.close()
    good_index = sorted(i for i, p in enumerate(paths) if p in goods)
    assert sorted(seen) == good_index  # every good example arrived once; the epoch completed
    report = pipeline.report
    assert report.total == len(bads)
    assert dict(report.counts) == {"corrupt": 2, "truncated": 1, "no_frames": 1, "no_video_stream": 1, "unreadable": 2}
    for path in bads:
        assert any(m.startswith(path + ": ") for m in report.messages), path
    assert "skipped 7 bad examples" in report.summary()


def test_pipeline_fail_mode_raises_naming_the_file(bad_files, tokenizer, tmp_path):
    path = bad_files["truncated"][0]
    records = _records([_good_mp4(tmp_path / "g.mp4"), path])
    with pytest.raises(BadExampleError, match=f"bad example 'ex1': {path}: truncated"):
        for _ in _pipeline(records, tokenizer, on_error="fail"):
            pass


def test_builder_skips_and_reports_bad_videos(bad_files, tmp_path):
    from stts_jax.data.pipeline import open_source
    from stts_jax.data.tfds_builders.video_qa import VideoQa
    import tensorflow_datasets as tfds

    manual = tmp_path / "manual"
    manual.mkdir()
    good = _good_mp4(manual / "good.mp4")
    lines = [dict(id="good", video="good.mp4", question="q?", answer="a")]
    for case in ("corrupt", "empty", "audio_only", "missing"):
        lines.append(dict(id=case, video=bad_files[case][0], question="q?", answer="a"))
    (manual / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    builder = VideoQa(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert [s["id"] for s in builder.skipped] == ["corrupt", "empty", "audio_only", "missing"]
    assert all(s["error"].startswith(bad_files[s["id"]][0]) for s in builder.skipped)
    source = open_source(str(tmp_path / "tfds"), "train")
    assert len(source) == 1 and source[0]["video_path"].decode() == os.path.abspath(good)

    failing = VideoQa(data_dir=str(tmp_path / "tfds_fail"), on_error="fail")
    with pytest.raises(VideoDecodeError, match=bad_files["corrupt"][0] + ".*example 'corrupt'"):
        failing.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
