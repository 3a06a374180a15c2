"""Decoding in a child process with a per-example timeout and a memory cap: a hang or crash costs one example.

FFmpeg runs native code on untrusted files. `IsolatedDecoder` sends each example's decode + resize + patchify
to a long-lived child process (started with `subprocess`, so it also works inside Grain's daemonic worker
processes, which may not fork multiprocessing children) and waits for the patches with a timeout. The child caps
its own address space (RLIMIT_AS, on top of what it holds after start-up). A decode that runs past the timeout
or a child that dies (out of memory, a crash in native code) becomes a VideoDecodeError of kind "timeout" /
"crashed" naming the file, the child is replaced, and the next example goes on.

Only the uint8 patches cross the pipe ([T, N, patch*patch*3]: a few MB per clip), not the decoded frames.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import threading
from typing import Any

from stts_jax.data.video import VideoDecodeError

STARTUP_TIMEOUT_S = 120.0
READY = b"R"


class IsolatedDecoder:
    """Callable: decode_patches(**request) in the child, within `timeout_s` and `memory_bytes` beyond start-up."""

    def __init__(self, timeout_s: float, memory_bytes: int):
        if timeout_s <= 0 or memory_bytes <= 0:
            raise ValueError(f"timeout_s and memory_bytes must be > 0, got {timeout_s}, {memory_bytes}")
        self.timeout_s, self.memory_bytes = float(timeout_s), int(memory_bytes)
        self._child: subprocess.Popen | None = None
        # one request in flight per child: Grain's prefetch threads (two iterators over one dataset, e.g. after a
        # state restore) share this object, and interleaved requests on one pipe deadlock
        self._lock = threading.Lock()

    def __getstate__(self):  # a copy (e.g. in a Grain worker) starts its own child
        return dict(timeout_s=self.timeout_s, memory_bytes=self.memory_bytes, _child=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        """Returns the running child, starting one (and waiting for it to be ready: start-up is not timed)."""
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen([sys.executable, "-m", "stts_jax.data.isolated", str(self.memory_bytes)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            ready, _, _ = select.select([self._child.stdout], [], [], STARTUP_TIMEOUT_S)
            if not ready or self._child.stdout.read(1) != READY:
                self._stop()
                raise RuntimeError(f"the decoder process did not start within {STARTUP_TIMEOUT_S} s")
        return self._child

    def _stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None

    def __call__(self, name: str, **request) -> Any:
        """Returns decode_patches(name=name, **request) computed in the child, or raises VideoDecodeError."""
        with self._lock:
            return self._call(name, request)

    def _call(self, name: str, request: dict) -> Any:
        child = self._start()
        try:
            pickle.dump(dict(request, name=name), child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
            ready, _, _ = select.select([child.stdout], [], [], self.timeout_s)
            if not ready:
                self._stop()
                raise VideoDecodeError(name, "timeout", f"decoding took longer than {self.timeout_s:g} s "
                                       "(the decoder process was stopped)")
            status, value = pickle.load(child.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            code = child.wait()
            self._child = None
            raise VideoDecodeError(name, "crashed", f"the decoder process died (exit code {code}) while decoding it; "
                                   f"over the memory cap of {self.memory_bytes / 2**30:.2f} GiB or a crash in "
                                   "native code") from None
        if status == "error":  # a failed decode may leave the child near its cap (or with a bad decoder): replace it
            self._stop()
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass


def decode_patches(name: str, src, num_frames: int, max_fps, sampler: str, threads: int, image_size: int,
                   patch_size: int):
    """Returns (patches uint8 [T, N, P], timestamps) of one clip: decode_clip + preprocess_frames."""
    from stts_jax.data.processor import preprocess_frames
    from stts_jax.data.video import decode_clip

    clip = decode_clip(src, num_frames, max_fps=max_fps, sampler=sampler, name=name, threads=threads)
    return preprocess_frames(clip.frames, image_size, patch_size), clip.timestamps


def _peak_bytes() -> int:
    """Returns this process's peak address-space size (VmPeak: what RLIMIT_AS limits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    return 0


def _serve(memory_bytes: int) -> None:
    """The child: caps its address space, then answers pickled requests on stdin until it closes."""
    import resource

    import numpy  # noqa: F401  (imported before the cap is measured)
    import av  # noqa: F401

    import stts_jax.data.processor  # noqa: F401

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = held + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # replies go to a private copy of fd 1; anything a library prints to stdout goes to stderr instead
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    stdout.write(READY)
    stdout.flush()
    while True:
        try:
            request = pickle.load(stdin)
        except EOFError:
            return
        over_cap = VideoDecodeError(request["name"], "too_large", "decoding it needs more memory than the cap "
                                    f"of {memory_bytes / 2**30:.2f} GiB")
        try:
            reply = ("ok", decode_patches(**request))
        except MemoryError:
            reply = ("error", over_cap)
        except Exception as e:  # this example's error, not the job's
            if not isinstance(e, VideoDecodeError):
                e = VideoDecodeError(request["name"], "corrupt", f"{type(e).__name__}: {e}")
            # FFmpeg reports a failed allocation as many things (EAGAIN, invalid data ...): near the cap it is that
            reply = ("error", over_cap if _peak_bytes() > cap - memory_bytes // 10 else e)
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
