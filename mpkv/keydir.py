"""Where the out-of-line values are: one copy of the data, in the page cache.

The view (store.py) maps each key to its value when the value is small, and to a
*handle* (an int) when it is larger than ``INLINE_MAX`` encoded bytes: the value then
stays in its segment file and a ``get`` reads it through a shared read-only map of the
file, so every process reads the same page-cache pages instead of holding a private
copy. A handle is ``file id << 32 | index``: the file id names a :class:`ValueFile`
(one segment file) and the index an entry of its table (offset, length, CRC-32 of the
value's bytes, and whether the value is str or bytes). Tables are plain arrays: 17
bytes per value and no Python object.

Every read checks the value's CRC-32, taken when the record was read (its own record
checksum was verified then) or stored in a hint file: a byte flipped since is a
CorruptionError, never wrong data.

A segment that a compaction removed stays readable through a map this process already
holds (an unlinked file lives while it is mapped); without one, the read raises
:class:`Moved` and the store catches up with the log (moving to the new files) and
looks again. File ids are never reused, so a handle of a view that was replaced never
reads another file's bytes: it is unknown (``read`` returns None) and the reader looks
again.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import zlib
from array import array
from collections import deque
from collections.abc import Iterable

from .codec import STR_VALUE, Value
from .errors import CorruptionError
from .files import open_regular

#: Values of more encoded bytes than this stay in the segment files. A value left there
#: costs a handle and a table entry (about 50 bytes) instead of a str or bytes object
#: (about 40 bytes plus the value), so from about 16 bytes on it saves memory; but a
#: read through a map (finding the entry, slicing, checking the CRC) is about five
#: times slower than a dict lookup. At 128 bytes the small records most programs keep
#: (counters, short JSON, ids) stay as fast as a dict, and every larger value lives
#: once, in the page cache.
INLINE_MAX = 128
#: At most this many segment files are mapped by one store at a time (each map holds a
#: descriptor); the oldest map is dropped first and made again when needed.
MAX_MAPPED = 64
#: A view that must not move but on ``refresh()`` (``max_staleness=None``) keeps a
#: descriptor of each segment file it holds values in, so that a file a compaction
#: removed stays readable; at most this many (past them, files are reopened by name).
MAX_KEPT = 256

_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
#: A handle is ``file id << INDEX_BITS | index`` (for code reading many at once).
INDEX_BITS, INDEX_MASK = _INDEX_BITS, _INDEX_MASK
#: File ids of every ValueFile of the process: a handle never outlives its meaning.
_file_ids = itertools.count(1)


class Moved(Exception):
    """Internal: a value's segment file is gone from the log (compacted) or replaced,
    and this process holds no map of it: catch up with the log and look again."""


class ValueFile:
    """The out-of-line values of one segment file: entry ``i`` is ``lengths[i]`` bytes
    at ``offsets[i]``, with CRC-32 ``crcs[i]``, a str (``STR_VALUE``) or bytes per
    ``kinds[i]``. Entries are appended by the thread that reads the log (tail mutex
    held) and read by any thread without a lock (array reads are atomic under the GIL;
    an entry is complete before its handle is in the view)."""

    __slots__ = (
        "_registry",
        "crcs",
        "fid",
        "file",
        "inline_max",
        "ino",
        "kept",
        "kinds",
        "lengths",
        "map",
        "offsets",
        "source",
    )

    def __init__(self, registry: ValueFiles, file: str, ino: tuple[int, int],
                 source: int) -> None:
        self.fid = next(_file_ids)
        self.file = file
        self.ino = ino  # (st_dev, st_ino) when first read: a file put in its place is not it
        self.inline_max = registry.inline_max
        self.offsets = array("Q")
        self.lengths = array("I")
        self.crcs = array("I")
        self.kinds = bytearray()
        #: A read-only map of the file (as long as it was then), or None. Replaced under
        #: the registry's mutex; read without a lock (a reader keeps the object it got
        #: alive, even if the registry drops it meanwhile).
        self.map: mmap.mmap | _Pread | None = None
        #: The descriptor the file is read from while entries are added (the cursor's:
        #: entries are added only while the cursor is in this file).
        self.source = source
        #: A descriptor of the file this table owns (registry with ``keep``), or -1.
        #: Set and closed under the registry's mutex, used only under it.
        self.kept = -1
        self._registry = registry

    def add(self, offset: int, length: int, crc: int, kind: int) -> int:
        """Record a value at ``offset`` of the file; its handle."""
        index = len(self.lengths)
        if not index:
            self._registry.register(self)
        self.offsets.append(offset)
        self.lengths.append(length)
        self.crcs.append(crc)
        self.kinds.append(kind)
        return self.fid << _INDEX_BITS | index

    def next_handle(self) -> int:
        """The handle the next value recorded gets."""
        return self.fid << _INDEX_BITS | len(self.lengths)

    def extend(self, offsets: Iterable[int], lengths: Iterable[int], crcs: Iterable[int],
               kinds: bytes) -> range:
        """Record many values at once; their handles, in order."""
        index = len(self.lengths)
        if not index and kinds:
            self._registry.register(self)
        self.offsets.extend(offsets)
        self.lengths.extend(lengths)
        self.crcs.extend(crcs)
        self.kinds.extend(kinds)
        assert len(self.offsets) == len(self.lengths) == len(self.crcs) == len(self.kinds), \
            "one entry per value in every column"
        base = self.fid << _INDEX_BITS
        return range(base + index, base + index + len(kinds))


class _Pread:
    """What stands for a map where a file system cannot map files: slices read with
    ``pread`` from a descriptor it owns, closed when the last reader lets go of it."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, where: slice) -> bytes:
        start, stop = where.start, where.stop
        data = os.pread(self._fd, stop - start, start)
        if len(data) != stop - start:
            return data + bytes(stop - start - len(data))  # cut short: fails its CRC
        return data

    def __del__(self) -> None:
        os.close(self._fd)


class ValueFiles:
    """The value files of one view. A store replaces it with the view when it rebuilds
    the view from scratch (after a compaction); the old one's maps close when the last
    reader holding them lets go."""

    def __init__(self, inline_max: int = INLINE_MAX, keep: bool = False) -> None:
        self.inline_max = inline_max
        #: Keep a descriptor of each file with entries (``MAX_KEPT``): its values stay
        #: readable after a compaction removed it, so the view never has to move.
        self.keep = keep
        #: Files holding a descriptor (``ValueFile.kept``); guarded by ``_mutex``.
        self._kept: list[ValueFile] = []
        #: file id -> ValueFile with at least one entry. Added to by the tailing thread
        #: (tail mutex); read without a lock.
        self.files: dict[int, ValueFile] = {}
        #: Files that have a map, oldest first; guarded by ``_mutex``.
        self._mapped: deque[ValueFile] = deque()
        self._mutex = threading.Lock()
        #: Every file a table was made for (each segment file the view's cursor read,
        #: values or not) -> the ``(st_dev, st_ino)`` it had: compaction takes its
        #: state from the view only if those among its inputs are still these files
        #: (compaction.py, ``from_view``). Written by the tailing thread (tail mutex).
        self.entered: dict[str, tuple[int, int]] = {}

    def new_file(self, file: str, fd: int) -> ValueFile:
        """A table for the segment file ``file``, open at ``fd`` (the caller's)."""
        st = os.fstat(fd)
        self.entered[file] = (st.st_dev, st.st_ino)
        return ValueFile(self, file, (st.st_dev, st.st_ino), fd)

    def register(self, vf: ValueFile) -> None:
        """``vf`` got its first entry (tail mutex held, its source descriptor open)."""
        if self.keep:
            with self._mutex:
                if len(self._kept) < MAX_KEPT:
                    vf.kept = os.dup(vf.source)
                    self._kept.append(vf)
        self.files[vf.fid] = vf

    def read(self, handle: int) -> Value | None:
        """The value of ``handle``; None when its file is not one of this view's (the
        view was replaced meanwhile: look the key up again). CorruptionError when the
        bytes do not match their checksum; Moved when the file is gone and not mapped."""
        vf = self.files.get(handle >> _INDEX_BITS)
        if vf is None:
            return None
        i = handle & _INDEX_MASK
        offset = vf.offsets[i]
        end = offset + vf.lengths[i]
        m = vf.map
        if m is None or end > len(m):
            m = self._map(vf, end)
        data = m[offset:end]
        if zlib.crc32(data) != vf.crcs[i]:
            raise CorruptionError(f"{vf.file}: damaged value at offset {offset} "
                                  f"({end - offset} bytes): checksum mismatch", vf.file, offset)
        if vf.kinds[i] == STR_VALUE:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:  # only a CRC collision gets here
                raise CorruptionError(f"{vf.file}: damaged value at offset {offset}: "
                                      "not UTF-8", vf.file, offset) from None
        return data

    def size(self, handle: int) -> int:
        """Encoded bytes of the value of ``handle`` (0 if unknown)."""
        vf = self.files.get(handle >> _INDEX_BITS)
        return 0 if vf is None else vf.lengths[handle & _INDEX_MASK]

    def entry(self, handle: int) -> tuple[int, int, int] | None:
        """``(length, crc, kind)`` of a handle's value, None if unknown: enough to tell
        whether two handles hold the same value (to count what a rebuild changed)."""
        vf = self.files.get(handle >> _INDEX_BITS)
        if vf is None:
            return None
        i = handle & _INDEX_MASK
        return vf.lengths[i], vf.crcs[i], vf.kinds[i]

    def _map(self, vf: ValueFile, end: int) -> mmap.mmap | _Pread:
        """Map ``vf``'s file as long as it is now (it must reach ``end``), from the
        descriptor it keeps or reopening it by name: Moved when it is gone or another
        file is in its place."""
        with self._mutex:
            m = vf.map
            if m is not None and end <= len(m):
                return m  # another thread mapped it meanwhile
            if vf.kept >= 0:
                fd = os.dup(vf.kept)
            else:
                try:
                    fd = open_regular(vf.file, os.O_RDONLY)
                except FileNotFoundError:
                    raise Moved(vf.file) from None
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != vf.ino:
                    raise Moved(vf.file)
                if st.st_size < end:
                    raise CorruptionError(f"{vf.file}: a value at offset {end} lies past "
                                          f"the end of the file ({st.st_size} bytes)",
                                          vf.file, st.st_size)
                try:
                    m = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
                except OSError:  # a file system that cannot map files: read instead
                    m, fd = _Pread(fd, st.st_size), -1  # it owns the descriptor now
            finally:
                if fd >= 0:
                    os.close(fd)
            if vf.map is None:
                self._mapped.append(vf)
                if len(self._mapped) > MAX_MAPPED:
                    # Dropped, not closed: a reader may be slicing it right now; the
                    # map closes when the last reference goes.
                    self._mapped.popleft().map = None
            vf.map = m
            return m

    def forget(self, files: set[str]) -> None:
        """Drop the tables of these files (the view holds no handle into them any more:
        a compaction removed them and moved the view's values to its outputs), their
        maps (they close once no reader holds them) and kept descriptors. A reader still
        holding one of their handles finds it unknown and looks again. Tail mutex held."""
        for file in files:
            self.entered.pop(file, None)
        with self._mutex:
            for fid, vf in list(self.files.items()):
                if vf.file not in files:
                    continue
                del self.files[fid]
                if vf.map is not None:
                    self._mapped.remove(vf)
                    vf.map = None
                if vf.kept >= 0:
                    self._kept.remove(vf)
                    os.close(vf.kept)
                    vf.kept = -1

    def close(self) -> None:
        """Drop every map (they close once no reader holds them) and close the kept
        descriptors."""
        with self._mutex:
            for vf in self._mapped:
                vf.map = None
            self._mapped.clear()
            for vf in self._kept:
                os.close(vf.kept)
                vf.kept = -1
            self._kept.clear()

    def forked(self) -> None:
        """In a forked child, before ``close``: the mutex may be held by a thread of the
        parent, which does not exist here."""
        self._mutex = threading.Lock()

    def __del__(self) -> None:
        # A view dropped without close(): nobody can use it, so no lock is needed (and
        # one inherited through fork may be held for ever).
        for vf in self._kept:
            if vf.kept >= 0:
                os.close(vf.kept)
                vf.kept = -1
