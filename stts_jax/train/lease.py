"""An exclusive lease on a training workdir: one job writes a workdir at a time.

Two jobs pointed at one workdir would race on checkpoint saves and interleave `metrics.jsonl`. The trainer takes
`workdir/LEASE` (process 0 only: the other hosts of the same job share it) before it writes anything, refreshes
its heartbeat every `heartbeat_s` seconds from a daemon thread, and removes it when the run ends. A second job
finds a live lease and is refused with `WorkdirBusy`, naming the holder (host, pid, job start, last heartbeat).

A lease is stale, and taken over with a warning, when its holder cannot still be running: on the same host and in
the same pid namespace (containers sharing a hostname have their own), its pid is gone; on any host, its heartbeat
is older than the larger of the holder's and the newcomer's `stale_s` (a preempted VM whose file was never
removed). Every check-and-write (take, take over, heartbeat, release) runs under an exclusive `flock` on
`LEASE.lock`, and holders are told apart by a random token, so of two jobs racing for a workdir exactly one holds
it. A workdir on Cloud Storage (`gs://`) has no `flock` and no rename: there the lease object is written whole and
read back after `REMOTE_SETTLE_S`, and a job that finds another's token refuses; two jobs starting within that
window of each other are told apart by the last write (Cloud Storage's generation preconditions would close
that window; fsspec does not expose them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from stts_jax import paths

LEASE_FILE = "LEASE"
REMOTE_SETTLE_S = 2.0  # gs://: seconds between writing the lease and reading it back


class WorkdirBusy(RuntimeError):
    """Another live job holds the workdir."""


def _pid_namespace() -> str:
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Lease:
    """Holds `workdir/LEASE` from `acquire()` to `release()` (also a context manager)."""

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        if stale_s <= heartbeat_s:
            raise ValueError(f"stale_s ({stale_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.workdir = os.fspath(workdir)
        self.path = paths.join(workdir, LEASE_FILE)
        self.remote = paths.is_remote(workdir)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), pidns=_pid_namespace(), token=uuid.uuid4().hex,
                       started=time.time(), stale_s=stale_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """Returns the lease file's content (None when there is none; {} when unreadable, e.g. half written)."""
        try:
            return json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale_reason(self, holder: dict) -> str | None:
        """Returns why `holder` cannot be running any more, or None if it may be."""
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)):  # unreadable: judge by the file's age
            beat = os.path.getmtime(self.path) if not self.remote and os.path.exists(self.path) else 0.0
        age = time.time() - beat
        same_namespace = (holder.get("host"), holder.get("pidns")) == (self.me["host"], self.me["pidns"])
        if same_namespace and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        stale = max(self.stale_s, float(holder.get("stale_s") or 0.0))
        if age > stale:
            return f"its last heartbeat is {age:.0f} s old (stale after {stale:.0f} s)"
        return None

    def _mine(self, holder: dict | None) -> bool:
        return bool(holder) and holder.get("token") == self.me["token"]

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive flock on LEASE.lock: no two check-and-writes of the lease interleave (any process); none on
        an object store (see the module docstring)."""
        if self.remote:
            yield
            return
        with open(self.path + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self) -> None:
        """Writes this holder's record with a fresh heartbeat (replaced atomically: readers never see half)."""
        paths.write_text(self.path, json.dumps(dict(self.me, heartbeat=time.time())))

    def acquire(self) -> "Lease":
        """Takes the lease (taking over a stale one) or raises WorkdirBusy naming the live holder."""
        paths.makedirs(self.workdir)
        with self._locked():
            holder = self.holder()
            if holder is not None:
                reason = self.stale_reason(holder)
                if reason is None:
                    self._refuse(holder)
                logging.warning("taking over the stale lease of %s (host %r, pid %s): %s", self.path,
                                holder.get("host"), holder.get("pid"), reason)
            self._write()
        if self.remote:  # no lock on an object store: the last writer holds it; read back once writes settled
            time.sleep(REMOTE_SETTLE_S)
            holder = self.holder()
            if not self._mine(holder):
                self._refuse(holder or {})
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _refuse(self, holder: dict) -> None:
        """Raises WorkdirBusy naming `holder`."""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        beat = time.time() - holder.get("heartbeat", time.time())
        raise WorkdirBusy(
            f"workdir {self.workdir} is in use by another job: host "
            f"{holder.get('host')!r}, pid {holder.get('pid')}, started {started}, last heartbeat "
            f"{beat:.0f} s ago ({self.path}); stop that job or use another --workdir (a lease "
            f"whose holder died is taken over once its heartbeat is "
            f"{max(self.stale_s, float(holder.get('stale_s') or 0.0)):.0f} s old)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._locked():
                    if self._stop.is_set():
                        return
                    holder = self.holder()
                    if holder is not None and not self._mine(holder):
                        self.lost = True
                        logging.error("the lease %s was taken over by host %r pid %s; this job no longer holds "
                                      "it", self.path, holder.get("host"), holder.get("pid"))
                        return
                    self._write()
            except Exception as e:  # a full disk or a Cloud Storage error must not end the heartbeat; the lease ages
                logging.warning("could not refresh the lease %s: %s", self.path, e)

    lost = False  # set when another job took the lease over (our heartbeat had stopped for stale_s)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if this job still holds it."""
        self._stop.set()
        with self._locked():
            if self._mine(self.holder()):
                try:
                    paths.as_path(self.path).unlink()
                except FileNotFoundError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
