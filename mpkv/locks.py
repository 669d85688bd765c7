"""The cross-process writer lock.

The writer lock is ``flock(LOCK_EX)`` on ``.mpkv/lock``, taken with ``fcntl`` on a
descriptor held open for the store's life: about 1 µs a cycle, against ~90 µs for a
fresh ``filelock.FileLock``. It is the same kind of lock ``filelock`` takes on Unix, so
an outside tool holding ``filelock.FileLock(".mpkv/lock")`` excludes mpkv writers.
The OS drops it when its holder dies, so a killed writer never blocks the others.
"""

from __future__ import annotations

import fcntl
import os
import time

from .errors import LockTimeout
from .files import open_regular


class WriterLock:
    """Exclusive across processes; counts nested acquisitions of one thread (callers
    serialise threads with their own mutex first)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        self.depth = 0

    def acquire(self) -> None:
        if self.depth == 0:
            if self.timeout is None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                self._acquire_within(self.timeout)
        self.depth += 1

    def _acquire_within(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(
                        f"{self.path}: writer lock not acquired within {timeout} s"
                    ) from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.01)

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)
