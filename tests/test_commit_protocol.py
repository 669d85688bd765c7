"""The commit protocol under crashes, damage and a full disk.

- A write in flight when its process died is decided once, the same way by every
  process: readers, a writable store that has not written yet, and the next writer.
- Every read path stops at an unfinished text transaction.
- ``.mpkv/txn`` is never obeyed blindly; ``.mpkv/shm`` full of garbage is untrusted.
- A failed write (disk full) leaves the log exactly as it was.
- The directory lock excludes threads of one process from each other.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mpkv
from mpkv.segments import AUX, INTENT, SHM, list_segments

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _put_forever(path: str, log_fd: int, **options: object) -> None:
    """Child body: put k = 0, 1, 2, ... forever, logging each acknowledged value."""
    try:
        store = mpkv.Store(path, **options)  # type: ignore[arg-type]
        os.write(log_fd, b"open\n")
        i = 0
        while True:
            store["k"] = str(i)
            os.write(log_fd, f"{i}\n".encode())
            i += 1
    finally:
        os._exit(1)


def _acked(log: str) -> int:
    with open(log, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    values = [int(x) for x in lines if x.isdigit()]
    return max(values, default=-1)


def _kill_round(path: str, log: str, rng: random.Random, **options: object) -> int:
    """Run a putting child, SIGKILL it at a random moment; return its last ack."""
    open(log, "wb").close()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    pid = os.fork()
    if pid == 0:
        _put_forever(path, log_fd, **options)
    os.close(log_fd)
    deadline = time.monotonic() + 30
    while b"open" not in open(log, "rb").read():
        assert time.monotonic() < deadline, "child never opened the store"
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.01))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return _acked(log)


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_write_in_flight_at_a_kill_never_flips_after_being_observed(tmp_path, fmt):
    """A put killed after its pwrite but before publishing used to be invisible to
    readers and then adopted by the next writer: a value everyone had read changed
    with nobody writing it."""
    path = str(tmp_path / "s")
    log = str(tmp_path / "log")
    rng = random.Random(f"flip-{fmt}")
    mpkv.Store(path, format=fmt, max_segment_bytes=2000).close()
    old_reader = mpkv.Store(path, readonly=True)
    flips, lost = [], []
    for r in range(40):
        acked = _kill_round(path, log, rng, fsync="never", auto_compact=False)
        seen = {"old reader": old_reader.get("k")}
        with mpkv.Store(path, readonly=True) as ro:
            seen["readonly"] = ro.get("k")
        with mpkv.Store(path) as idle:  # writable, has not written yet
            seen["idle writable"] = idle.get("k")
            with mpkv.Store(path) as writer:
                writer["other"] = str(r)
                seen["writer after its write"] = writer.get("k")
            seen["idle writable after the write"] = idle.get("k")
        seen["old reader after the write"] = old_reader.get("k")
        with mpkv.Store(path, readonly=True) as ro:
            seen["reopened"] = ro.get("k")
        if len(set(seen.values())) != 1:
            flips.append((r, acked, seen))
        final = int(seen["reopened"] or -1)
        if final < acked:
            lost.append((r, acked, final))
    old_reader.close()
    assert not flips, flips
    assert not lost, lost
    assert mpkv.verify(path).ok
