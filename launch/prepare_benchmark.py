"""Turns a public video-QA benchmark's annotation files into `video_qa` ArrayRecord shards (offline).

  python launch/prepare_benchmark.py --benchmark=mvbench --annotations=/data/MVBench/json \\
      --videos=/data/MVBench/video --out=/data/mvbench_prepared [--split=validation] [--on_error=skip|fail]
      [--data_dir=OUT/tfds] [--video_subdirs=map.json] [--video_map=map_vid_vidorID.json] [--noembed_videos]

--benchmark is one of videomme, mvbench, nextqa, egoschema, perceptiontest, longvideobench, mlvu; --annotations is
the annotation file or the folder of files as the benchmark ships it (per-task benchmarks, MVBench and MLVU: a
folder of one JSON per task). The layouts, the video path rules and the refusal reasons are documented in
stts_jax/data/benchmarks.py. Writes

  OUT/<split>.jsonl          the accepted questions (our annotation JSONL)
  OUT/clips/*.mp4            clips cut where a row gives start/end seconds
  OUT/refused.jsonl          every row left out, with its reason: at read time (stage "read": bad annotation,
                             answer that picks no single option, missing video, bad interval) and by the builder
                             (stage "build": unreadable videos)
  OUT/prepare_report.json    rows read / written / refused (by reason) / videos missing or unreadable / examples
  <data_dir>/video_qa/1.0.0  the ArrayRecord dataset (data_dir defaults to OUT/tfds), built from OUT exactly as
                             launch/prepare_data.py does (videos in --videos allowed), regenerated on every run

and prints "N rows read, M written, K refused (by reason), V videos missing/unreadable". With --on_error=fail the
first refused row stops it (exit status 1) before anything is built.
"""

import json
import os
import time

from absl import app, flags, logging

from stts_jax.data import benchmarks
from stts_jax.data.video import ERROR_KINDS

_BENCHMARK = flags.DEFINE_enum("benchmark", None, list(benchmarks.BENCHMARKS), "Which benchmark.", required=True)
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "The annotation file, or the folder of files as the "
                                   "benchmark ships it.", required=True)
_VIDEOS = flags.DEFINE_string("videos", None, "Folder holding the benchmark's videos.", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write <split>.jsonl, clips/, refused.jsonl and the report to.",
                           required=True)
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"], "Split name to write.")
_DATA = flags.DEFINE_string("data_dir", None, "tfds data dir to write to (default: OUT/tfds).")
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "fail"], "What a refused row or unreadable video does: "
                              "skip it (listed in OUT/refused.jsonl) or stop.")
_VIDEO_MAP = flags.DEFINE_string("video_map", None, "NExT-QA: the video id -> path JSON map (default: "
                                 "map_vid_vidorID.json next to the CSV).")
_SUBDIRS = flags.DEFINE_string("video_subdirs", None, "MVBench / MLVU: JSON object (or a JSON file's path) mapping a "
                               "task (file stem) to its video subfolder of --videos; MVBench defaults to the upstream "
                               "layout (benchmarks.MVBENCH_VIDEO_DIRS).")
_SLACK = flags.DEFINE_float("clip_slack_s", None, "How far (seconds) a clip's end may pass the video's end (default: "
                            "one frame); further is refused.")
_EMBED = flags.DEFINE_boolean("embed_videos", True, "Store the video bytes in the records (else only paths).")
_ROOTS = flags.DEFINE_list("video_roots", [], "Folders besides --videos and --out that videos may resolve into "
                           "(symlinks followed).")


def _build(out: str, data_dir: str, on_error: str):
    """Builds the VideoQa dataset from `out` (as launch/prepare_data.py does); returns the builder."""
    import tensorflow_datasets as tfds

    from stts_jax.data.tfds_builders.video_qa import VideoQa

    tfds.disable_progress_bar()
    builder = VideoQa(data_dir=data_dir, on_error=on_error, embed_videos=_EMBED.value, progress=True,
                      video_roots=(_VIDEOS.value, *_ROOTS.value))
    config = tfds.download.DownloadConfig(manual_dir=out, download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    builder.download_and_prepare(download_config=config)
    return builder


def _finish(out: str, report: dict, lines: list) -> None:
    """Writes OUT/prepare_report.json and prints the summary and the first refused rows."""
    with open(os.path.join(out, "prepare_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(benchmarks.format_summary(report))
    for item in lines[:10]:
        print(f"  {item['id']} [{item['reason']}]: {item['error']}")
    if lines:
        print(f"refused rows are listed in {os.path.join(out, 'refused.jsonl')}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    out, split = os.path.abspath(_OUT.value), _SPLIT.value
    result = benchmarks.prepare_benchmark(_BENCHMARK.value, _ANNOTATIONS.value, _VIDEOS.value, out, split=split,
                                          video_map=_VIDEO_MAP.value, video_subdirs=_SUBDIRS.value,
                                          clip_slack_s=_SLACK.value)
    if not result.records or (result.refused and _ON_ERROR.value == "fail"):
        _finish(out, benchmarks.summarize(result, split=split), result.refused)
        why = "no row was accepted" if not result.records else "--on_error=fail and rows were refused"
        print(f"not building the dataset: {why}")
        return 1
    data_dir = _DATA.value or os.path.join(out, "tfds")
    builder = _build(out, data_dir, _ON_ERROR.value)
    skipped = [s for s in builder.skipped if s["split"] == split]
    sources = {r["id"]: r["source"] for r in result.records}
    built = [dict(id=s["id"], reason="unreadable_video" if s["kind"] in ERROR_KINDS else s["kind"], kind=s["kind"],
                  error=s["error"], source=sources.get(s["id"], ""), video=s["video"], stage="build") for s in skipped]
    with open(os.path.join(out, "refused.jsonl"), "a") as f:
        for item in built:
            f.write(json.dumps(item) + "\n")
    report = benchmarks.summarize(result, split=split, builder_skipped=skipped,
                                  examples=builder.info.splits[split].num_examples)
    report.update(data_dir=os.fspath(builder.data_dir), seconds=round(time.perf_counter() - start, 1))
    _finish(out, report, result.refused + built)
    return 0


if __name__ == "__main__":
    app.run(main)
