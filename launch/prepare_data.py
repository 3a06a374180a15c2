"""Turns a folder of videos + JSONL questions into `video_qa` ArrayRecord shards (tensorflow-datasets, offline).

  python launch/prepare_data.py --manual_dir=/data/my_videos --data_dir=/data/tfds [--on_error=skip|fail]
      [--noembed_videos] [--video_roots=/shared/videos]

The manual dir holds train.jsonl / validation.jsonl / test.jsonl and the videos they name; the JSONL format is
documented in stts_jax/data/tfds_builders/video_qa.py (multiple-choice fields included). Writes
<data_dir>/video_qa/1.0.0/*.array_record-* and prints the examples per split and the refused records by kind
(also listed in <data_dir>/video_qa/1.0.0/skipped.jsonl). Video paths must resolve (symlinks followed) inside
--manual_dir or a --video_roots folder.
"""

import collections
import json
import os
import time

from absl import app, flags, logging

_MANUAL = flags.DEFINE_string("manual_dir", None, "Folder with <split>.jsonl files and the videos.", required=True)
_DATA = flags.DEFINE_string("data_dir", None, "tfds data dir to write to.", required=True)
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "fail"],
                              "What a bad record does (unreadable video, bad annotation, path outside the dataset).")
_EMBED = flags.DEFINE_boolean("embed_videos", True, "Store the video bytes in the records (else only paths).")
_ROOTS = flags.DEFINE_list("video_roots", [], "Folders besides --manual_dir that videos may resolve into (symlinks "
                           "followed), e.g. shared storage that videos/ links to; other paths are refused.")


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    from stts_jax.data.tfds_builders.video_qa import VideoQa

    logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()  # our own bar (with ETA) counts examples per split
    start = time.perf_counter()
    builder = VideoQa(data_dir=_DATA.value, on_error=_ON_ERROR.value, embed_videos=_EMBED.value, progress=True,
                      video_roots=tuple(_ROOTS.value))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL.value))
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    report = os.path.join(os.fspath(builder.data_dir), "skipped.jsonl")
    with open(report, "w") as f:
        for item in builder.skipped:
            f.write(json.dumps(item) + "\n")
    print(f"prepared {builder.data_dir} in {time.perf_counter() - start:.1f} s: {splits}")
    listed = f" (listed in {report})" if builder.skipped else ""
    kinds = collections.Counter(item["kind"] for item in builder.skipped)
    by_kind = f" by kind: {dict(sorted(kinds.items()))}" if kinds else ""
    print(f"skipped {len(builder.skipped)} examples (bad videos, bad annotations, paths outside the dataset, "
          f"repeated ids){by_kind}{listed}")
    for item in builder.skipped[:10]:
        print(f"  {item['id']}: {item['error']}")


if __name__ == "__main__":
    app.run(main)
