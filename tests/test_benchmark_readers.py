"""Benchmark readers (stts_jax/data/benchmarks.py) and launch/prepare_benchmark.py on tiny fixtures written in each
benchmark's upstream file type, columns and answer encoding: exactly which rows are refused and why, and a
known-answer oracle (the "always A" predictor's accuracy per task and macro from the written JSONL equals the share
of first-option answers computed from the upstream-format data), clips cut from a real video, and an end-to-end run
that builds the ArrayRecord dataset."""

import dataclasses
import fractions
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stts_jax.data import benchmarks
from stts_jax.data.benchmarks import BenchmarkFormatError, Refused
from stts_jax.data.video import decode_frames, probe_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Fixture:
    """A benchmark written in its upstream layout: where, and what the test knows independently of the reader."""

    annotations: str
    videos: str
    valid: list = dataclasses.field(default_factory=list)  # (id, task, the answer is the first option)
    refused: list = dataclasses.field(default_factory=list)  # (id, reason)


def _touch(path) -> None:
    """A stand-in video file (the readers only check that it exists; the builder is not run on these)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not decoded in reader tests")


def _parquet(rows: list, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _json(data, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


# ------------------------------------------------------------------------------------------------ fixtures


def videomme(root, bikes) -> Fixture:
    """A folder holding one parquet shard; options "A. ...", the answer a letter; one video in DIR/data/."""
    rng, fx = random.Random(1), Fixture(str(root / "videomme"), str(root / "videos"))
    tasks, rows = ["Temporal Perception", "Counting Problem", "OCR Problems"], []

    def row(qid, vid, task, answer, question=None, options=None):
        return dict(video_id=qid[:3], duration=["short", "medium", "long"][int(qid[:3]) % 3], domain="Knowledge",
                    sub_category="Humanity", url="https://example.invalid", videoID=vid, question_id=qid,
                    task_type=task, question=question if question is not None else f"What happens in {qid}?",
                    options=options or [f"{letter}. option {letter} of {qid}" for letter in "ABCD"], answer=answer)

    for k in range(10):
        vid = f"yt{k:02d}"
        _touch(os.path.join(fx.videos, "data" if k == 0 else "", vid + ".mp4"))
        for j in range(3):
            qid, task, letter = f"{k:03d}-{j + 1}", tasks[(k + j) % 3], rng.choice("ABCD")
            rows.append(row(qid, vid, task, letter))
            fx.valid.append((f"videomme/{qid}", task, letter == "A"))
    bad = [(row("100-1", "yt01", tasks[0], "E"), "letter_not_in_options"),
           (row("100-2", "yt01", tasks[0], "2"), "bad_answer"),
           (row("100-3", "yt01", tasks[0], "A", question="  "), "empty_question"),
           (row("100-4", "yt01", tasks[0], "A", options=["A. x", "y", "C. z", "D. w"]), "bad_options"),
           (row("100-5", "gone", tasks[0], "A"), "missing_video"),
           (row("000-1", "yt00", tasks[0], "B"), "duplicate_id")]
    for r, reason in bad:
        rows.append(r)
        fx.refused.append((f"videomme/{r['question_id']}", reason))
    _parquet(rows, os.path.join(fx.annotations, "test-00000-of-00001.parquet"))
    return fx


def mvbench(root, bikes) -> Fixture:
    """A folder of per-task JSON lists; answers are candidate texts; action_sequence rows carry start/end (clips of
    a real video under the upstream star/Charades_v1_480/), my_task's videos in DIR/my_task/ or DIR/."""
    rng, fx = random.Random(2), Fixture(str(root / "json"), str(root / "video"))
    shutil.copy(bikes, os.path.join(_mkdir(fx.videos, "star/Charades_v1_480"), "v1.mp4"))
    tasks = {}

    def entry(task, video, answer_at, n=4, **extra):
        candidates = [f"{task} choice {i} ({len(tasks.get(task, []))})" for i in range(n)]
        return dict(video=video, question=f"In {video}, what?", candidates=candidates,
                    answer=candidates[answer_at], **extra)

    def add(task, e, reason=None):
        tasks.setdefault(task, []).append(e)
        ident = f"mvbench/{task}/{len(tasks[task]) - 1}"
        if reason:
            fx.refused.append((ident, reason))
        else:
            fx.valid.append((ident, task, e["answer"] == e["candidates"][0]))

    for start, end in [(0, 1), (0, 1), (2, 3), (5, 6.5)]:  # the first two share one clip
        add("action_sequence", entry("action_sequence", "v1.mp4", rng.randrange(4), start=start, end=end))
    add("action_sequence", entry("action_sequence", "v1.mp4", 0, start=3, end=3), "bad_interval")
    add("action_sequence", entry("action_sequence", "v1.mp4", 0, start=12, end=13), "bad_interval")
    for i in range(7):
        _touch(os.path.join(fx.videos, "ssv2_video", f"{i}.webm"))
        add("action_antonym", entry("action_antonym", f"{i}.webm", rng.randrange(3), n=3))
    e = entry("action_antonym", "1.webm", 0, n=3)
    add("action_antonym", dict(e, answer="not a candidate"), "answer_not_in_options")
    add("action_antonym", dict(e, candidates=["walk", "run", "walk"], answer="walk"), "ambiguous_answer")
    for i in range(5):  # not in the upstream table: DIR/<task>/<video>, or DIR/<video>
        path = os.path.join(fx.videos, *(["my_task"] if i % 2 else []), f"m{i}.mp4")
        _touch(path)
        add("my_task", entry("my_task", f"m{i}.mp4", rng.randrange(5), n=5))
    add("my_task", entry("my_task", "absent.mp4", 0), "missing_video")
    add("my_task", {k: v for k, v in entry("my_task", "m0.mp4", 0).items() if k != "question"}, "bad_row")
    _mkdir(fx.videos, "tvqa/frames_fps3_hq/s01e01_seg02_clip_00")  # upstream ships frame folders for this task
    add("episodic_reasoning", entry("episodic_reasoning", "s01e01_seg02_clip_00", 0, start=1, end=2),
        "video_is_folder")
    for task, entries in tasks.items():
        _json(entries, os.path.join(fx.annotations, f"{task}.json"))
    return fx


def _mkdir(*parts) -> str:
    path = os.path.join(*parts)
    os.makedirs(path, exist_ok=True)
    return path


def nextqa(root, bikes) -> Fixture:
    """val.csv (+ a train.csv the validation split must not read) and map_vid_vidorID.json; answer = index text."""
    rng, fx = random.Random(3), Fixture(str(root / "nextqa"), str(root / "NExTVideo"))
    header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4".split(",")
    rows, vmap = [], {}
    for k in range(6):
        vid = str(3238737531 + k)
        vmap[vid] = f"11{k % 2}/{vid}"
        _touch(os.path.join(fx.videos, vmap[vid] + ".mp4"))
        for qid, kind in enumerate(["CW", "TN", "DC"]):
            answer = rng.randrange(5)
            rows.append([vid, 300, 640, 480, f"why did it {qid}", answer, qid, kind,
                         *[f"answer {i} for {vid}" for i in range(5)]])
            fx.valid.append((f"nextqa/{vid}_{qid}", kind, str(answer) == "0"))
    vmap["999"] = "112/999"  # in the map, file absent
    for vid, answer, qid, reason in [("3238737531", 5, 7, "index_out_of_range"), ("3238737531", "A", 8, "bad_answer"),
                                     ("12345", 1, 0, "video_not_in_map"), ("999", 1, 0, "missing_video")]:
        rows.append([vid, 300, 640, 480, "what?", answer, qid, "CW", "a", "b", "c", "d", "e"])
        fx.refused.append((f"nextqa/{vid}_{qid}", reason))
    _csv([header] + rows, os.path.join(fx.annotations, "val.csv"))
    _csv([header, ["1", 1, 1, 1, "q", 0, 0, "CW", "a", "b", "c", "d", "e"]], os.path.join(fx.annotations, "train.csv"))
    _json(vmap, os.path.join(fx.annotations, "map_vid_vidorID.json"))
    return fx


def _csv(rows, path) -> None:
    import csv

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def egoschema(root, bikes) -> Fixture:
    """One parquet file (passed as the file); 5 options "A. ...", answer "0"-"4" as a string; a .MP4 video."""
    rng, fx = random.Random(4), Fixture(str(root / "egoschema" / "Subset" / "test-00000-of-00001.parquet"),
                                       str(root / "ego_videos"))
    rows = []

    def row(q, v, answer, n=5):
        return dict(question_idx=q, question=f"What is c doing in {v}?", video_idx=v,
                    option=[f"{'ABCDE'[i]}. c does thing {i}" for i in range(n)], answer=answer)

    for k in range(9):
        v = f"0074f737-11cb-497d-8d07-77c3a8127{k:03d}"
        _touch(os.path.join(fx.videos, v + (".MP4" if k == 0 else ".mp4")))
        answer = str(rng.randrange(5))
        rows.append(row(f"q{k}", v, answer))
        fx.valid.append((f"egoschema/q{k}", "", answer == "0"))
    v = "0074f737-11cb-497d-8d07-77c3a8127001"
    for q, answer, n, reason in [("q90", "", 5, "no_answer"), ("q91", "7", 5, "index_out_of_range"),
                                 ("q92", "B", 5, "bad_answer"), ("q93", "0", 1, "too_few_options")]:
        rows.append(row(q, v, answer, n))
        fx.refused.append((f"egoschema/{q}", reason))
    _parquet(rows, fx.annotations)
    return fx


def perceptiontest(root, bikes) -> Fixture:
    """Two parquet shards of the val split: answer_id an int in one, a string in the other (both releases)."""
    rng, fx = random.Random(5), Fixture(str(root / "pt"), str(root / "pt_videos"))
    areas = ["memory", "physics", "semantics", "abstraction"]
    for shard, as_str in enumerate([False, True]):
        rows = []
        for k in range(8):
            name = f"video_{shard}{k:03d}"
            _touch(os.path.join(fx.videos, name + ".mp4"))
            answer, area = rng.randrange(3), areas[(k + shard) % 4]
            rows.append(dict(video_name=name, question_id=k % 2, question="How many?", options=["1", "2", "3"],
                             answer_id=str(answer) if as_str else answer, area=area, reasoning="counterfactual",
                             tag=["counting"]))
            fx.valid.append((f"perceptiontest/{name}/{k % 2}", area, answer == 0))
        bad = [(3, "index_out_of_range")] if not as_str else [("x", "bad_answer"), ("-1", "bad_answer")]
        for i, (answer, reason) in enumerate(bad):
            rows.append(dict(rows[0], question_id=10 + i, answer_id=answer))
            fx.refused.append((f"perceptiontest/{rows[0]['video_name']}/{10 + i}", reason))
        _parquet(rows, os.path.join(fx.annotations, f"mc_question_val-0000{shard}-of-00002.parquet"))
    return fx


def longvideobench(root, bikes) -> Fixture:
    """lvb_val.json (+ lvb_test_wo_gt.json, not read for validation); correct_choice an int, 4-5 candidates."""
    rng, fx = random.Random(6), Fixture(str(root / "LongVideoBench"), str(root / "LongVideoBench" / "videos"))
    cats, rows = ["T3O", "S2E", "E2O"], []
    for k in range(12):
        n, vid = 4 + k % 2, f"86CxyhFV9M{k}"
        _touch(os.path.join(fx.videos, vid + ".mp4"))
        choice, cat = rng.randrange(n), cats[k % 3]
        rows.append(dict(id=f"{vid}_0", video_id=vid, video_path=vid + ".mp4", question="Which?",
                         candidates=[f"c{i}" for i in range(n)], correct_choice=choice, duration=float(100 + k),
                         duration_group=[15, 60, 600, 3600][k % 4], level="L2-Relation", question_category=cat,
                         subtitle_path=vid + "_en.json", starting_timestamp_for_subtitles=0))
        fx.valid.append((f"longvideobench/{vid}_0", cat, choice == 0))
    for ident, change, reason in [("s1", dict(correct_choice="1"), "bad_answer"),
                                  ("s2", dict(correct_choice=9), "index_out_of_range"),
                                  (rows[0]["id"], {}, "duplicate_id"), ("s3", dict(video_path="nope.mp4"),
                                                                        "missing_video")]:
        rows.append(dict(rows[1], id=ident, **change))
        fx.refused.append((f"longvideobench/{ident}", reason))
    rows.append({k: v for k, v in rows[2].items() if k != "correct_choice"} | dict(id="s4"))
    fx.refused.append(("longvideobench/s4", "bad_row"))
    _json(rows, os.path.join(fx.annotations, "lvb_val.json"))
    _json([dict(rows[0], id="test_only")], os.path.join(fx.annotations, "lvb_test_wo_gt.json"))
    return fx


def mlvu(root, bikes) -> Fixture:
    """MLVU dev: json/<task>.json lists, answers are candidate texts, videos in DIR/<task>/."""
    rng, fx = random.Random(7), Fixture(str(root / "MLVU" / "json"), str(root / "MLVU" / "video"))
    for task in ["1_plotQA", "4_count"]:
        entries = []
        for k in range(6 if task == "1_plotQA" else 9):
            _touch(os.path.join(fx.videos, task, f"{task}_{k}.mp4"))
            candidates = [f"{task} answer {i}" for i in range(4)]
            entries.append(dict(video=f"{task}_{k}.mp4", duration=420.5, question="What?", candidates=candidates,
                                answer=candidates[rng.randrange(4)], question_type=task.split("_")[1]))
            fx.valid.append((f"mlvu/{task}/{k}", task, entries[-1]["answer"] == candidates[0]))
        for change, reason in [(dict(answer="nothing"), "answer_not_in_options"),
                               (dict(candidates=["only"], answer="only"), "too_few_options")]:
            entries.append(dict(entries[0], **change))
            fx.refused.append((f"mlvu/{task}/{len(entries) - 1}", reason))
        _json(entries, os.path.join(fx.annotations, f"{task}.json"))
    return fx


FIXTURES = dict(videomme=videomme, mvbench=mvbench, nextqa=nextqa, egoschema=egoschema,
                perceptiontest=perceptiontest, longvideobench=longvideobench, mlvu=mlvu)


def _accuracy(pairs) -> tuple[dict, fractions.Fraction]:
    """Returns ({task: accuracy}, macro mean over tasks) of (task, correct) pairs, exactly (fractions)."""
    tasks = {}
    for task, correct in pairs:
        tasks.setdefault(task, []).append(bool(correct))
    per_task = {t: fractions.Fraction(sum(v), len(v)) for t, v in tasks.items()}
    return per_task, sum(per_task.values()) / len(per_task)


# ------------------------------------------------------------------------------------------------ tests


def test_all_benchmarks_have_a_fixture():
    assert sorted(FIXTURES) == sorted(benchmarks.BENCHMARKS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reader_refusals_and_always_a_oracle(name, tmp_path, bikes_mp4):
    fx = FIXTURES[name](tmp_path, bikes_mp4)
    out = str(tmp_path / "out")
    result = benchmarks.prepare_benchmark(name, fx.annotations, fx.videos, out)
    assert result.rows == len(fx.valid) + len(fx.refused)
    refused = [json.loads(line) for line in open(os.path.join(out, "refused.jsonl"))]
    assert sorted((r["id"], r["reason"]) for r in refused) == sorted(fx.refused)
    assert all(r["stage"] == "read" and r["error"].startswith(r["source"] + ": ") for r in refused)
    assert all(os.path.basename(r["source"].split(":")[0]) in r["error"] for r in refused)  # names the file
    records = [json.loads(line) for line in open(os.path.join(out, "validation.jsonl"))]
    assert sorted(r["id"] for r in records) == sorted(ident for ident, _, _ in fx.valid)
    for r in records:
        assert r["benchmark"] == name and r["kind"] == r["task"] and r["answer"] == r["options"][r["answer_index"]]
        assert not any(o[:3] in ("A. ", "B. ") for o in r["options"])
        video = r["video"] if os.path.isabs(r["video"]) else os.path.join(out, r["video"])
        assert os.path.isfile(video)
    got_tasks, got_macro = _accuracy((r["task"], r["answer_index"] == 0) for r in records)
    want_tasks, want_macro = _accuracy((task, first) for _, task, first in fx.valid)
    assert got_tasks == want_tasks and got_macro == want_macro
    assert len(want_tasks) == 1 or len(set(want_tasks.values())) > 1  # the fixture's tasks differ


def test_videomme_record_fields(tmp_path, bikes_mp4):
    fx = videomme(tmp_path, bikes_mp4)
    result = benchmarks.prepare_benchmark("videomme", fx.annotations, fx.videos, str(tmp_path / "out"))
    first = result.records[0]
    assert first["options"] == [f"option {letter} of 000-1" for letter in "ABCD"]
    assert first["video"] == os.path.join(fx.videos, "data", "yt00.mp4")  # the second rule: DIR/data/<id>.mp4
    assert (first["duration_group"], first["video_id"], first["task"]) == ("short", "yt00", "Temporal Perception")
    assert "_videos" not in open(tmp_path / "out" / "validation.jsonl").read()  # internal keys stay internal


def test_mvbench_clips_are_cut_once_per_interval(tmp_path, bikes_mp4):
    fx = mvbench(tmp_path, bikes_mp4)
    out = str(tmp_path / "out")
    result = benchmarks.prepare_benchmark("mvbench", fx.annotations, fx.videos, out)
    clipped = [r for r in result.records if "clip" in r]
    assert [r["clip"] for r in clipped] == [[0, 1], [0, 1], [2, 3], [5, 6.5]]
    assert clipped[0]["video"] == clipped[1]["video"] and len(os.listdir(os.path.join(out, "clips"))) == 3
    frames = [probe_video(os.path.join(out, r["video"])).num_frames for r in clipped[1:]]
    assert frames == [26, 26, 38]  # t in [start, end] at 25 fps, both ends included
    assert all(r["source_video"].endswith("star/Charades_v1_480/v1.mp4") for r in clipped)
    errors = {r["id"]: r["error"] for r in result.refused}
    assert "outside the video (10.000 s long, 250 frames at 25 fps)" in errors["mvbench/action_sequence/5"]
    assert "my_task/absent.mp4" in errors["mvbench/my_task/5"] and "video/absent.mp4" in errors["mvbench/my_task/5"]


def test_cut_clip_matches_the_interval(tmp_path, bikes_mp4):
    path = str(tmp_path / "clip.mp4")
    assert benchmarks.cut_clip(bikes_mp4, 2.0, 3.0, path) == 26
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (26, 25.0, 640, 272)
    assert abs(info.duration - (3.0 - 2.0 + 1 / 25)) < 1e-9  # 26 frames of 1/25 s
    source, _ = decode_frames(bikes_mp4, max_frames=80)
    clip, _ = decode_frames(path)
    diffs = [np.abs(clip[0].astype(int) - source[i]).mean() for i in range(80)]
    assert int(np.argmin(diffs)) == 50 and diffs[50] < 3.0  # its first frame is the source's frame at t = 2 s
    last = [np.abs(clip[-1].astype(int) - source[i]).mean() for i in range(80)]
    assert int(np.argmin(last)) == 75


class _LateSeek:
    """A PyAV input container whose seeks to a stream position land 3 s late (an inaccurate index)."""

    def __init__(self, container):
        self._container, self.seeks = container, []

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def seek(self, offset, **kw):
        self.seeks.append(offset)
        late = 3 * int(1 / self._container.streams.video[0].time_base) if "stream" in kw else 0
        return self._container.seek(offset + late, **kw)


def test_cut_clip_decodes_from_the_start_when_a_seek_lands_late(tmp_path, bikes_mp4, monkeypatch):
    import av

    real_open, opened = av.open, []

    def fake_open(path, *args, **kw):
        container = real_open(path, *args, **kw)
        if args or kw:  # the output file
            return container
        opened.append(_LateSeek(container))
        return opened[-1]

    monkeypatch.setattr(av, "open", fake_open)
    assert benchmarks.cut_clip(bikes_mp4, 2.0, 3.0, str(tmp_path / "clip.mp4")) == 26
    assert len(opened[-1].seeks) == 2 and opened[-1].seeks[1] == 0  # the seek, then decoding from the start
    monkeypatch.undo()
    clip, _ = decode_frames(str(tmp_path / "clip.mp4"))
    source, _ = decode_frames(bikes_mp4, max_frames=52)
    assert np.abs(clip[0].astype(int) - source[50]).mean() < 3.0


@pytest.mark.parametrize("start,end,fragment", [(3.0, 3.0, "empty or negative"), (-1.0, 1.0, "empty or negative"),
                                                (10.0, 11.0, "outside the video"), (9.0, 10.5, "outside the video")])
def test_bad_intervals_are_refused(start, end, fragment):
    with pytest.raises(Refused, match=fragment) as info:
        benchmarks.check_interval(start, end, num_frames=250, fps=25.0)
    assert info.value.reason == "bad_interval"
    benchmarks.check_interval(9.0, 10.04, num_frames=250, fps=25.0)  # one frame past the end: allowed


def test_answer_encodings():
    options = ["a", "b", "c"]
    assert benchmarks.answer_index("C", options, "letter") == 2
    assert benchmarks.answer_index("b", options, "text") == 1
    assert benchmarks.answer_index(np.int64(2), options, "index") == 2
    assert benchmarks.answer_index(" 1", options, "index_str") == 1
    assert benchmarks.answer_index("0", options, "index_any") == benchmarks.answer_index(0, options, "index_any")
    for answer, encoding, reason in [("D", "letter", "letter_not_in_options"), ("c.", "letter", "bad_answer"),
                                     (1, "letter", "bad_answer"), ("1", "index", "bad_answer"),
                                     (True, "index", "bad_answer"), (1.0, "index_any", "bad_answer"),
                                     (1, "index_str", "bad_answer"), ("3", "index_str", "index_out_of_range"),
                                     (-1, "index", "index_out_of_range"), ("B", "text", "answer_not_in_options"),
                                     (None, "text", "no_answer"), (" ", "letter", "no_answer")]:
        with pytest.raises(Refused) as info:
            benchmarks.answer_index(answer, options, encoding)
        assert info.value.reason == reason, (answer, encoding)
    with pytest.raises(Refused, match="ambiguous_answer"):
        benchmarks.answer_index("a", ["a", "b", "a"], "text")


def test_letter_prefixes():
    assert benchmarks.strip_letter_prefixes(["A. x", "B) y", "(C) z", "D: w"]) == ["x", "y", "z", "w"]
    assert benchmarks.strip_letter_prefixes(["A man", "B movie"]) == ["A man", "B movie"]
    with pytest.raises(Refused, match="bad_options"):
        benchmarks.strip_letter_prefixes(["B. x", "A. y"])


def test_numpy_list_columns(tmp_path):
    """Rows read with pandas carry list columns as numpy arrays and scalars as numpy types."""
    _touch(str(tmp_path / "v.mp4"))
    row = dict(duration="long", videoID=np.str_("v"), question_id="001-1", task_type="OCR Problems", question="Q?",
               options=np.array(["A. one", "B. two", "C. three", "D. four"], dtype=object), answer=np.str_("C"))
    result = benchmarks.read_rows("videomme", [("frame:row 0", "", row)], str(tmp_path))
    assert result.refused == [] and result.records[0]["options"] == ["one", "two", "three", "four"]
    assert result.records[0]["answer_index"] == 2


def test_file_level_errors_name_the_file(tmp_path):
    path = str(tmp_path / "videomme.parquet")
    _parquet([dict(videoID="v", question="Q?")], path)
    with pytest.raises(BenchmarkFormatError, match=f"^{path}: missing column.*'answer'"):
        benchmarks.read_benchmark("videomme", path, str(tmp_path))
    _json({"not": "a list"}, str(tmp_path / "lvb" / "lvb_val.json"))
    with pytest.raises(BenchmarkFormatError, match="lvb_val.json: expected a JSON list"):
        benchmarks.read_benchmark("longvideobench", str(tmp_path / "lvb"), str(tmp_path))
    _json([], str(tmp_path / "two" / "a.json"))
    _json([], str(tmp_path / "two" / "b.json"))
    with pytest.raises(BenchmarkFormatError, match="several \\*.json files"):
        benchmarks.read_benchmark("longvideobench", str(tmp_path / "two"), str(tmp_path))
    with pytest.raises(BenchmarkFormatError, match="no such annotation file"):
        benchmarks.read_benchmark("mvbench", str(tmp_path / "nowhere"), str(tmp_path))


def test_prepare_benchmark_script_builds_the_dataset(tmp_path, bikes_mp4):
    """MVBench layout: a clipped row, a plain one, a missing video (refused up front) and a corrupt one (the
    builder skips it): the dataset holds the rest and the report counts both bad videos."""
    videos, ann = tmp_path / "video", tmp_path / "json"
    shutil.copy(bikes_mp4, _mkdir(str(videos), "star/Charades_v1_480") + "/v1.mp4")
    shutil.copy(bikes_mp4, _mkdir(str(videos), "perception/videos") + "/v2.mp4")
    (videos / "perception" / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 40)
    cands = ["left", "right", "up"]
    _json([dict(video="v1.mp4", question="Which way?", candidates=cands, answer="right", start=1, end=2)],
          str(ann / "action_sequence.json"))
    _json([dict(video=v, question="Where is it?", candidates=cands, answer="left")
           for v in ("v2.mp4", "missing.mp4", "corrupt.mp4")], str(ann / "object_shuffle.json"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "launch/prepare_benchmark.py", "--benchmark=mvbench", f"--annotations={ann}",
                           f"--videos={videos}", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 rows read, 3 written, 1 refused (missing_video: 1), 2 videos missing/unreadable" in proc.stdout
    report = json.load(open(out / "prepare_report.json"))
    assert (report["rows_read"], report["written"], report["examples"]) == (4, 3, 2)
    assert (report["videos_missing"], report["videos_unreadable"], report["builder_skipped_by_kind"]) == (
        1, 1, {"corrupt": 1})
    refused = {r["id"]: (r["reason"], r["stage"]) for r in map(json.loads, open(out / "refused.jsonl"))}
    assert refused == {"mvbench/object_shuffle/1": ("missing_video", "read"),
                       "mvbench/object_shuffle/2": ("unreadable_video", "build")}
    from stts_jax.data.pipeline import open_source

    source = open_source(str(out / "tfds"), "validation")
    got = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    assert sorted(got) == ["mvbench/action_sequence/0", "mvbench/object_shuffle/0"]
    clip = got["mvbench/action_sequence/0"]
    assert (clip["num_frames"], clip["answer_index"], clip["kind"].decode()) == (26, 1, "action_sequence")
    assert [clip[f].decode() for f in ("benchmark", "task", "duration_group", "video_id")] == [
        "mvbench", "action_sequence", "", "star/Charades_v1_480/v1.mp4"]
    assert clip["video_path"].decode().startswith(str(out / "clips"))
    assert got["mvbench/object_shuffle/0"]["num_frames"] == 250


def test_prompt_templates_use_molmo2s_wording():
    """allenai/molmo2 olmo/data/academic_video_datasets.py: Video-MME's question_template, MVBench's qa_template;
    everything else keeps our default (Molmo2's MLVU wording)."""
    from stts_jax.data.processor import MC_INSTRUCTION, format_question, template_for

    opts = ["run", "walk", "jump", "sit"]
    assert format_question("What?", opts, "videomme") == (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\nWhat?\nA. run\nB. walk\nC. jump\nD. sit\n"
        "The best answer is:")
    assert format_question("What?", opts[:3], "mvbench") == (
        "What?\nA. run\nB. walk\nC. jump\nPlease respond with only the letter of the correct answer.")
    assert format_question("What?", opts[:2]) == f"What?\nA. run\nB. walk\n{MC_INSTRUCTION}"
    assert format_question("What?", None, "videomme") == "What?"  # open questions: the question alone
    assert [template_for(b) for b in ("videomme", "mvbench", "mlvu", "")] == ["videomme", "mvbench", "default",
                                                                               "default"]
    with pytest.raises(ValueError, match="prompt template"):
        format_question("What?", opts, "lmms")
