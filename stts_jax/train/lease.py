"""An exclusive lease on a training workdir: one job writes a workdir at a time.

Two jobs pointed at one workdir would race on checkpoint saves and interleave `metrics.jsonl`. The trainer takes
`workdir/LEASE` (process 0 only: the other hosts of the same job share it) before it writes anything, refreshes
its heartbeat every `heartbeat_s` seconds from a daemon thread, and removes it when the run ends. A second job
finds a live lease and is refused with `WorkdirBusy`, naming the holder (host, pid, job start, last heartbeat).

A lease is stale, and taken over with a warning, when its holder cannot still be running: on the same host, its
pid is gone; on any host, its heartbeat is older than `stale_s` (a preempted VM whose file was never removed).
Creation is atomic (O_CREAT | O_EXCL), so of two jobs starting together exactly one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging

LEASE_FILE = "LEASE"


class WorkdirBusy(RuntimeError):
    """Another live job holds the workdir."""


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
        self.path = os.path.join(workdir, LEASE_FILE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """Returns the lease file's content (None when there is none; {} when unreadable, e.g. half written)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale_reason(self, holder: dict) -> str | None:
        """Returns why `holder` cannot be running any more, or None if it may be."""
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)):
            mtime = os.path.getmtime(self.path) if os.path.exists(self.path) else 0.0
            beat = mtime  # unreadable: judge by the file's age
        age = time.time() - beat
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        if age > self.stale_s:
            return f"its last heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
        return None

    def _write(self, create: bool) -> None:
        record = json.dumps(dict(self.me, heartbeat=time.time()))
        if create:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(record)
        else:  # heartbeat: replace atomically, so readers never see half a file
            tmp = f"{self.path}.{self.me['pid']}.tmp"
            with open(tmp, "w") as f:
                f.write(record)
            os.replace(tmp, self.path)

    def acquire(self) -> "Lease":
        """Takes the lease (taking over a stale one) or raises WorkdirBusy naming the live holder."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):
            try:
                self._write(create=True)
                break
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
                    break  # this process already holds it (train() called twice in one process)
                reason = self.stale_reason(holder)
                if reason is None:
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    beat = time.time() - holder.get("heartbeat", time.time())
                    raise WorkdirBusy(
                        f"workdir {os.path.dirname(self.path)} is in use by another job: host "
                        f"{holder.get('host')!r}, pid {holder.get('pid')}, started {started}, last heartbeat "
                        f"{beat:.0f} s ago ({self.path}); stop that job or use another --workdir (a lease "
                        f"whose holder died is taken over once its heartbeat is {self.stale_s:.0f} s old)")
                logging.warning("taking over the stale lease of %s (host %r, pid %s): %s", self.path,
                                holder.get("host"), holder.get("pid"), reason)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
        else:
            raise WorkdirBusy(f"could not take {self.path}: another job keeps taking it")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self.holder()
            if holder and (holder.get("host"), holder.get("pid")) != (self.me["host"], self.me["pid"]):
                logging.error("the lease %s was taken over by host %r pid %s; this job no longer holds it",
                              self.path, holder.get("host"), holder.get("pid"))
                return
            try:
                self._write(create=False)
            except OSError as e:  # a full disk must not kill training; the lease just ages
                logging.warning("could not refresh the lease %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self.holder()
        if holder and (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
