"""The commit point every process of a store shares, in a small memory-mapped file.

Writers publish ``(segment, end offset)`` after each commit; readers compare one
counter with the value they last saw, a memory load instead of a system call, and
read the log only up to the published point, so they never see half of a commit.
The file is a cache of what the segments say: it is never fsynced. It is trusted only
when its magic, boot id and identity (the device and inode of the file it was written
in) match: a reboot, a copy of the directory, a missing file or garbage make it
untrusted until a writer rewrites it (docs/protocol.md says what readers do then).
"""

from __future__ import annotations

import mmap
import os
import time
import zlib

from .files import open_regular

MAGIC = 0x314D48534B56504D  # b"MPVKSHM1" read as an integer in the machine's byte order
SIZE = 64
# Slots of unsigned 64-bit integers, in the machine's byte order (the file is never
# shared between machines: it is not even trusted after a reboot).
_MAGIC, _BOOT, SEQ, _SEG, _END, _INFLIGHT, _DEV, _INO = range(8)
_SANE = 1 << 62  # a segment number or an offset at or above this is garbage
_FRESH_SEQ = 2  # the counter a writer restarts from when the old one is garbage


def _boot_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return zlib.crc32(f.read()) + 1
    except OSError:
        return 1


BOOT_ID = _boot_id()


class SharedState:
    """``seq`` is a seqlock: odd while a writer updates ``(seg, end)``, +2 per commit.

    Only the process holding the writer lock writes the slots; everyone reads them."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._mm: mmap.mmap | None = None
        #: A descriptor of the mapped file (-1: none), kept to notice that the file lost
        #: its name (``replaced``).
        self._fd = -1
        self._dev = self._ino = 0
        #: False when there is no file to map (a readonly open of a store whose shared
        #: state is missing): then nothing signals changes and readers must look.
        self.backed = False
        #: the slots as unsigned 64-bit integers; ``slots[SEQ]`` is the fast-path read
        self.slots = memoryview(bytearray(SIZE)).cast("Q")  # no file: never trusted
        self.remap()

    def remap(self) -> bool:
        """Map the file if it was not mapped (it may have appeared since); True when
        this call mapped it."""
        if self.backed:
            return False
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT if self.writable
                              else os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            st = os.fstat(fd)
            if self.writable and st.st_size < SIZE:
                os.ftruncate(fd, SIZE)
            elif st.st_size < SIZE:
                os.close(fd)
                return False
            access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(fd, SIZE, access=access)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._dev, self._ino = st.st_dev, st.st_ino
        # The unbacked slots are left to the garbage collector, not released: a
        # lock-free reader may still be reading them.
        self.slots = memoryview(self._mm).cast("Q")
        self.backed = True
        return True

    def replaced(self) -> bool:
        """Did the mapped file lose its name (someone deleted ``.mpkv/shm``, or put
        another file there)? Processes that opened the store since use the file now at
        the path; a writer still publishing into the old one would not see their
        commits and would write over them. Checked by writers under the writer lock."""
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    def reattach(self) -> None:
        """Map the file now at the path instead (``replaced``). The old slots are left
        to the garbage collector: a lock-free reader may still be reading them."""
        os.close(self._fd)
        self._fd = -1
        self._mm = None
        self.backed = False
        self.slots = memoryview(bytearray(SIZE)).cast("Q")
        self.remap()

    @property
    def seq(self) -> int:
        return self.slots[SEQ]

    @property
    def trusted(self) -> bool:
        """Written by a writer of this store, in this boot, in this very file, with sane
        values. Garbage, a copy of the directory or a stale file from an earlier boot
        is not."""
        q = self.slots
        return (q[_MAGIC] == MAGIC and q[_BOOT] == BOOT_ID and self.backed
                and q[_DEV] == self._dev and q[_INO] == self._ino
                and q[_SEG] < _SANE and q[_END] < _SANE and q[_INFLIGHT] <= 1)

    @property
    def inflight(self) -> bool:
        """True when a writer started changing files and has not published: maybe it died."""
        return bool(self.slots[_INFLIGHT])

    def writer_may_trust(self) -> bool:
        """For a writer holding the lock: the published point is the true end of the log
        (trusted state, and the last writer finished rather than died mid-write)."""
        q = self.slots
        return not q[_INFLIGHT] and not q[SEQ] & 1 and self.trusted

    def published(self) -> tuple[int, int, int] | None:
        """For a writer holding the lock (no publish can be under way): ``(seq, segment,
        end)`` when trusted, None when untrusted or a writer died mid-publish."""
        q = self.slots
        if q[SEQ] & 1 or not self.trusted:
            return None
        return q[SEQ], q[_SEG], q[_END]

    def snapshot(self) -> tuple[int, int, int] | None:
        """A consistent ``(seq, segment, end)``, or None when untrusted, or when ``seq``
        stays odd (a writer died mid-publish, or is descheduled there): then readers
        take the untrusted path, which checks the counter again after reading."""
        q = self.slots
        for attempt in range(300):
            seq = q[SEQ]
            if seq & 1:
                if not self.trusted:
                    return None
                if attempt > 100:
                    time.sleep(0.0001)
                continue
            trusted = self.trusted
            seg, end = q[_SEG], q[_END]
            if q[SEQ] == seq:
                return (seq, seg, end) if trusted else None
        return None

    def look(self) -> tuple[bool, int, bool]:
        """What an untrusted read checks before and after reading: a writer always
        changes this before it writes a record."""
        return self.backed, self.slots[SEQ], self.trusted

    def begin(self) -> None:
        self.slots[_INFLIGHT] = 1

    def settle(self) -> None:
        """A write failed and was undone: the published point is the log's end again."""
        self.slots[_INFLIGHT] = 0

    def publish(self, segment: int, end: int) -> int:
        """Make ``(segment, end)`` the commit point; return the new seq. Writer lock held.
        Untrusted slots are rewritten whole, with a counter that differs from the old one
        (readers compare the counter with the value they last saw)."""
        q = self.slots
        old = q[SEQ]
        seq = old | 1  # odd: update in progress
        q[SEQ] = seq
        if not self.trusted:
            q[_MAGIC], q[_BOOT], q[_DEV], q[_INO] = MAGIC, BOOT_ID, self._dev, self._ino
            if seq + 1 >= _SANE:
                seq = _FRESH_SEQ - 1
                q[SEQ] = seq
        q[_SEG], q[_END] = segment, end
        q[SEQ] = seq + 1
        q[_INFLIGHT] = 0
        return seq + 1

    def close(self) -> None:
        self.slots.release()
        if self._mm is not None:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
