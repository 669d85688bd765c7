"""The commit point every process of a store shares, in a small memory-mapped file.

Writers publish ``(segment, end offset)`` after each commit; readers compare one
counter with the value they last saw, a memory load instead of a system call, and
read the log only up to the published point, so they never see half of a commit.
The file is a cache of what the segments say: it is never fsynced, and a reboot (a
different boot id) or a missing file makes it untrusted until a writer rewrites it.
"""

from __future__ import annotations

import mmap
import os
import time
import zlib

from .files import open_regular

MAGIC = 0x314D48534B56504D  # b"MPVKSHM1" as a little-endian integer
SIZE = 64
# Slots of unsigned 64-bit integers.
_MAGIC, _BOOT, SEQ, _SEG, _END, _INFLIGHT = range(6)


def _boot_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return zlib.crc32(f.read()) + 1
    except OSError:
        return 1


BOOT_ID = _boot_id()


class SharedState:
    """``seq`` is a seqlock: odd while a writer updates ``(seg, end)``, +2 per commit."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self._mm: mmap.mmap | None = None
        #: False when there is no file to map (a readonly open of a store whose shared
        #: state is missing): then nothing signals changes and readers must look.
        self.backed = False
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY)
        except FileNotFoundError:
            self.slots = memoryview(bytearray(SIZE)).cast("Q")  # no file: never trusted
            return
        try:
            if writable and os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            if os.fstat(fd).st_size < SIZE:
                self.slots = memoryview(bytearray(SIZE)).cast("Q")
                return
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(fd, SIZE, access=access)
        finally:
            os.close(fd)
        #: the slots as unsigned 64-bit integers; ``slots[SEQ]`` is the fast-path read
        self.slots = memoryview(self._mm).cast("Q")
        self.backed = True

    @property
    def seq(self) -> int:
        return self.slots[SEQ]

    @property
    def trusted(self) -> bool:
        return self.slots[_MAGIC] == MAGIC and self.slots[_BOOT] == BOOT_ID

    @property
    def inflight(self) -> bool:
        """True when a writer started changing files and has not published: maybe it died."""
        return bool(self.slots[_INFLIGHT])

    def writer_may_trust(self) -> bool:
        """For a writer holding the lock: the published point is the true end of the log
        (trusted state, and the last writer finished rather than died mid-write)."""
        q = self.slots
        return q[_MAGIC] == MAGIC and q[_BOOT] == BOOT_ID and not q[_INFLIGHT]

    def snapshot(self) -> tuple[int, int, int] | None:
        """A consistent ``(seq, segment, end)``, or None when untrusted."""
        q = self.slots
        for attempt in range(10000):
            seq = q[SEQ]
            if seq & 1:
                if attempt > 100:
                    time.sleep(0.0001)  # a writer mid-publish (or one that died there)
                continue
            seg, end = q[_SEG], q[_END]
            if q[SEQ] == seq:
                return (seq, seg, end) if self.trusted else None
        return None

    def begin(self) -> None:
        self.slots[_INFLIGHT] = 1

    def publish(self, segment: int, end: int) -> int:
        """Make ``(segment, end)`` the commit point; return the new seq. Writer lock held."""
        q = self.slots
        if not self.trusted:
            q[_MAGIC], q[_BOOT] = MAGIC, BOOT_ID
        seq = q[SEQ] | 1  # odd: update in progress
        q[SEQ] = seq
        q[_SEG], q[_END] = segment, end
        q[SEQ] = seq + 1
        q[_INFLIGHT] = 0
        return seq + 1

    def close(self) -> None:
        self.slots.release()
        if self._mm is not None:
            self._mm.close()
