"""Every lock that mpkv takes across processes, and the order they are taken in.

- compaction lock: ``flock`` exclusive on ``.mpkv/compact.lock``, a descriptor per
  acquisition. One compaction at a time.
- writer lock: ``flock`` exclusive on ``.mpkv/lock``, a descriptor held for the store's
  life (reopened if the file was deleted: see ``WriterLock.acquire``). Guards
  appending, truncating and publishing the commit point.
- directory lock: ``flock`` on ``.mpkv/dirlock``, shared (listing the directory and
  opening the next segment) or exclusive (a compaction's switch), behind an in-process
  reader-writer lock. A reader sees the files before or after a switch, never halfway.

Acquisition order, always: compaction lock -> (write mutex) -> writer lock -> (tail
mutex) -> directory lock. A holder of a later lock never waits for an earlier one, so
there is no deadlock. The mutexes in parentheses are the per-``Store`` threading locks
(docs/protocol.md).

``flock`` belongs to the open file description, so two threads using one descriptor
share one lock: a shared ``flock`` taken by one thread would convert the exclusive one
another thread holds, and its unlock would drop it. The writer lock is only taken by
one thread at a time (the write mutex comes first); the compaction lock opens its own
descriptor each time; the directory lock puts a reader-writer lock of its own in
front of its descriptor, so threads exclude each other as processes do.

All of them are dropped by the kernel when their holder dies, so a killed process
never blocks the others. The writer lock is ``flock(LOCK_EX)`` on a descriptor held
open: about 1 µs a cycle, against ~90 µs for a fresh ``filelock.FileLock``; it is the
same kind of lock ``filelock`` takes on Unix, so an outside tool holding
``filelock.FileLock(".mpkv/lock")`` excludes mpkv writers.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import LockTimeout
from .files import open_regular

#: Writer locks this process holds: lock file (st_dev, st_ino) -> (ident of the thread,
#: the WriterLock holding it). A thread that holds a store's writer lock through one
#: Store asks for it through another: waiting would never end, so it fails at once
#: instead. Guarded by the lock it describes: an entry is set and removed only by the
#: WriterLock holding that file's ``flock``, which excludes every other descriptor of
#: the file, in this process too; each dict operation is atomic (GIL). No mutex: this
#: runs on every commit.
_held: dict[tuple[int, int], tuple[int, WriterLock]] = {}


def _forget_held() -> None:
    """In a forked child: the parent's locks are not this process's."""
    _held.clear()


os.register_at_fork(after_in_child=_forget_held)


def _flock_within(fd: int, path: str, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{path}: {what} not acquired within {timeout} s") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.01)


class WriterLock:
    """Exclusive across processes; counts nested acquisitions of one thread (callers
    serialise threads with their own mutex first)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        st = os.fstat(self.fd)
        self.key = (st.st_dev, st.st_ino)
        self.depth = 0

    def acquire(self) -> None:
        if self.depth == 0:
            me = threading.get_ident()
            holder = _held.get(self.key)
            if holder is not None and holder[0] == me and holder[1] is not self:
                raise LockTimeout(f"{self.path}: writer lock not acquired: this thread "
                                  "already holds it through another Store object (an open "
                                  "transaction), so waiting would never end; write through "
                                  "that transaction")
            while True:
                if self.timeout is None:
                    fcntl.flock(self.fd, fcntl.LOCK_EX)
                else:
                    _flock_within(self.fd, self.path, "writer lock", self.timeout)
                if os.fstat(self.fd).st_nlink:
                    break
                # The lock file was deleted or replaced (someone "unlocking" a store):
                # processes that opened it since lock the new file, so holding the old
                # one excludes no one. Move to the new one.
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._reopen()
            _held[self.key] = (me, self)
        self.depth += 1

    def _reopen(self) -> None:
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        os.close(self.fd)
        self.fd = fd
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            _held.pop(self.key, None)
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class CompactionLock:
    """One compaction at a time, across processes and across threads of one process
    (each acquisition opens its own descriptor)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, wait: bool, create: bool = True) -> bool:
        """Take the lock; with ``wait=False`` give up at once (False) if it is held.
        With ``create=False`` (a reader that must not write) False when the lock file
        does not exist: then no compaction has ever run."""
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY)
        except FileNotFoundError:
            if create:
                raise
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.fstat(fd).st_nlink:  # deleted or replaced: lock the file there now
                os.close(fd)
                return self.acquire(wait, create)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)  # closing the only descriptor of the description drops the flock


class DirLock:
    """Shared or exclusive across processes (``flock`` on ``.mpkv/dirlock``) and across
    the threads of this process (a reader-writer lock in front of the descriptor; a
    waiting exclusive user holds new shared users back, so compaction is not starved).

    ``fd`` is None when the file cannot be opened (a readonly store no writer ever
    created it for): then only threads are excluded."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        try:
            if writable:
                self.fd: int | None = open_regular(path, os.O_RDWR | os.O_CREAT)
            else:
                self.fd = open_regular(path, os.O_RDONLY)
        except FileNotFoundError:  # readonly, and no writer ever created it
            self.fd = None
        except OSError:  # readonly in a directory it may not read: threads only
            self.fd = None
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond: shared holds of this process (a thread may nest them),
        # whether a thread holds it exclusive, and how many wait for exclusive.
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._mine = threading.local()  # this thread's shared depth: nesting never waits

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        with self._cond:
            while not depth and (self._exclusive or self._waiting):
                self._cond.wait()
            if self._shared == 0 and self.fd is not None:
                # Taken while holding the condition's lock: other threads wanting it
                # shared wait for the same flock anyway.
                fcntl.flock(self.fd, fcntl.LOCK_SH)
            self._shared += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._cond:
                self._shared -= 1
                if self._shared == 0:
                    if self.fd is not None:
                        fcntl.flock(self.fd, fcntl.LOCK_UN)
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if self.fd is not None:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
