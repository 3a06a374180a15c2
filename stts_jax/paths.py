"""Paths that are local or on Cloud Storage (`gs://bucket/...`): the one module that knows the difference.

Every file the package reads or writes (workdirs, checkpoints, metrics, configs, data, tokenizers, export and
import directories, evaluation results) goes through `etils.epath`, whose `gs://` backend is `gcsfs` (fsspec).
What Cloud Storage cannot do the way a disk does is handled here once:

- objects cannot be appended to: `AppendLog` appends to a local file, and rewrites a remote object whole at each
  flush (a log of a few thousand lines);
- libraries that only open local files (safetensors' memory map, `tokenizers`, the JAX profiler's writer): use
  `local_file` (a remote file is downloaded to a temporary directory) and `staged_dir` (written locally, then
  uploaded);
- there is no rename or `flock`: callers that need them (the workdir lease) ask `is_remote`;
- listings are not cached (gcsfs would cache them per process and miss what other processes wrote).

Orbax (and TensorStore under it) reads and writes `gs://` itself; `as_path` gives it an `epath.Path`. Tests point
all of these at a local Cloud Storage emulator (`STORAGE_EMULATOR_HOST` for gcsfs and google-cloud-storage,
`TENSORSTORE_GCS_HTTP_URL` for TensorStore).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import fsspec
from etils import epath

PathLike = str | os.PathLike

# gcsfs caches directory listings per process; another process (a resumed run, another host, an evaluator reading a
# live workdir) may have written since, so gs:// listings always ask the store (set before any filesystem exists).
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL of a remote filesystem (gs://, s3://, ...) rather than a local path."""
    text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: PathLike) -> epath.Path:
    """Returns `path` as an epath.Path: local paths (file:// ones too) made absolute, URLs as they are."""
    if is_remote(path):
        return epath.Path(str(path))
    text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    return epath.Path(os.path.abspath(text[len("file://"):] if text.startswith("file://") else text))


def join(path: PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a URL a URL (returns a str, local paths unchanged)."""
    if is_remote(path):
        return str(epath.Path(str(path)).joinpath(*parts))
    return os.path.join(os.fspath(path), *parts)


def makedirs(path: PathLike) -> None:
    """Creates directory `path` and its parents (a no-op on object stores, which have no directories)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
    return as_path(path).read_text()


def write_text(path: PathLike, text: str) -> None:
    """Writes `text` to `path` (locally through a temporary file + rename, so readers never see half of it)."""
    if is_remote(path):
        as_path(path).write_text(text)
        return
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.fspath(path))


class AppendLog:
    """A text file opened for appending lines: local files in append mode; remote objects (immutable) rewritten
    whole, starting from what the object held when opened (a resumed run keeps its history), at most once every
    `min_interval_s` seconds (Cloud Storage allows about one write a second to one object; each rewrite uploads
    the whole log) and always on close."""

    def __init__(self, path: PathLike, min_interval_s: float = 0.0):
        self.path = path
        self.remote = is_remote(path)
        self.min_interval_s, self._uploaded = min_interval_s, float("-inf")
        if self.remote:
            p = as_path(path)
            self._lines = [p.read_text()] if p.exists() else []
            self._f = None
        else:
            self._f = open(os.fspath(path), "a")

    def write(self, text: str) -> None:
        if self.remote:
            self._lines.append(text)
        else:
            self._f.write(text)

    def flush(self, force: bool = False) -> None:
        if not self.remote:
            self._f.flush()
        elif force or time.monotonic() - self._uploaded >= self.min_interval_s:
            as_path(self.path).write_text("".join(self._lines))
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        elif self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_line(path: PathLike, line: str) -> None:
    """Appends one line (newline added) to the text file at `path`."""
    with AppendLog(path) as log:
        log.write(line + "\n")


@contextlib.contextmanager
def local_file(path: PathLike):
    """Yields a local path holding the file `path` (itself when local; a downloaded copy when remote)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="stts_remote_") as tmp:
        local = os.path.join(tmp, as_path(path).name)
        copy_file(path, local)
        yield local


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two locations (local or remote)."""
    with as_path(src).open("rb") as fin, as_path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


def upload_tree(local_dir: str, dst: PathLike) -> None:
    """Copies the files under `local_dir` to `dst`, keeping their relative paths."""
    for dirpath, _, files in os.walk(local_dir):
        rel = os.path.relpath(dirpath, local_dir)
        for name in files:
            parts = [name] if rel == "." else [*rel.split(os.sep), name]
            copy_file(os.path.join(dirpath, name), join(dst, *parts))


@contextlib.contextmanager
def staged_dir(path: PathLike):
    """Yields a local directory for writers that need one: `path` itself when local (created); a temporary
    directory whose files are uploaded to `path` on a clean exit when remote."""
    if not is_remote(path):
        os.makedirs(os.fspath(path), exist_ok=True)
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="stts_stage_") as tmp:
        yield tmp
        upload_tree(tmp, path)
