"""Change feeds: :class:`Change`, positions, and the log watcher of the file backend.

A position names a change's place in the log (docs/protocol.md, "Positions"):
``SSSSSSSSSSSS-OOOOOOOOOOOO-IIIIIIIIII-NNNNNNNNNN``, the segment and byte offset where
the change's atomic unit starts, the change's index in the unit and the unit's number
of changes, all zero-padded decimal, so tokens of one store sort as strings in commit
order. ``N-000000000000-0000000000-0000000000`` (no change) stands just before segment
N's first change.

Every watcher reads the log itself from its own position with its own cursor, so a
watcher never holds more than one segment's changes in memory, whether it is iterated
or not; it tells compaction which segment it still needs in ``.mpkv/readers/``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NoReturn

from .codec import ops_of
from .errors import ClosedError, CompactedError, Error
from .segments import (
    AUX,
    RETAINED,
    Cursor,
    Limit,
    NeedReload,
    Start,
    UnitPos,
    list_log,
    list_segments,
    parse_name,
    read_horizon,
    register_reader,
    unregister_reader,
)

if TYPE_CHECKING:
    from .view import LogView

_TOKEN = re.compile(r"^(\d{12})-(\d{12})-(\d{10})-(\d{10})$")
#: A parsed position: (segment, unit start offset, index in the unit, changes in the unit).
Pos = tuple[int, int, int, int]
_names = itertools.count()
READ_CHUNK = 1 << 20  # bytes of log a watcher decodes at a time while catching up
#: The position before every change of any store (the start of segment 1).
BEFORE_ALL = "000000000001-000000000000-0000000000-0000000000"


class Change(tuple[str, Any]):
    """One change from ``watch()``: unpacks as ``(key, value)`` (value None for a
    delete); ``deleted`` tells a delete apart from a stored None (JSON values);
    ``position`` is the opaque token to resume after it (``watch(since=...)``)."""

    deleted: bool
    position: str

    def __new__(cls, key: str, value: Any, *, deleted: bool | None = None,
                position: str = "") -> Change:
        self = super().__new__(cls, (key, value))
        self.deleted = value is None if deleted is None else bool(deleted)
        self.position = position
        return self

    @property
    def key(self) -> str:
        return self[0]

    @property
    def value(self) -> Any:
        return self[1]

    def __repr__(self) -> str:
        return (f"Change(key={self[0]!r}, value={self[1]!r}, deleted={self.deleted!r}, "
                f"position={self.position!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return _change, (self[0], self[1], self.deleted, self.position)


def _change(key: str, value: Any, deleted: bool, position: str) -> Change:
    return Change(key, value, deleted=deleted, position=position)


def format_position(segment: int, offset: int, index: int, count: int) -> str:
    return f"{segment:012d}-{offset:012d}-{index:010d}-{count:010d}"


def unit_token(pos: UnitPos) -> str:
    """The position of the last change of a cursor's last unit (or its boundary)."""
    segment, offset, count = pos
    return format_position(segment, offset, max(count - 1, 0), count)


def parse_position(token: object) -> Pos:
    """ValueError unless ``token`` is a position this version writes."""
    m = _TOKEN.match(token) if isinstance(token, str) else None
    if m is None:
        raise ValueError(f"since: not an mpkv position: {token!r} (expected a token from "
                         "Change.position or store.position())")
    segment, offset, index, count = (int(g) for g in m.groups())
    if (count and index >= count) or (not count and (index or offset)):
        raise ValueError(f"since: not an mpkv position: {token!r} (index out of its unit)")
    return segment, offset, index, count


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, not {timeout!r}")
    return float(timeout)


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    return prefix


def _release(path: str, name: str | None, cursor: Cursor) -> None:
    """Drop a watcher's registration and descriptors (close, GC or interpreter exit)."""
    if name is not None:
        unregister_reader_quietly(path, name)
    cursor.close()


class LogWatcher(Iterator[Change]):
    """The iterator ``Store.watch`` returns: reads the log from its position with its own
    cursor. One thread at a time may iterate it (like a generator).

    Its registration in ``.mpkv/readers/`` (the segment it is in) makes compaction keep
    the segments it has not read, in ``.mpkv/retained/``. It is dropped by ``close()``,
    when the iterator is garbage-collected, and when the store closes. A watcher that
    cannot write ``.mpkv/readers/`` reads unregistered and raises CompactedError if
    compaction removes a segment before it has read it."""

    def __init__(self, store: LogView, prefix: str, since: Pos | None,
                 timeout: float | None) -> None:
        self._store = store
        self._prefix = prefix
        self._timeout = timeout
        self._pid = os.getpid()
        self._name: str | None = f"{self._pid}-w{next(_names)}-{id(self):x}"
        cursor = Cursor(store.path, store._codec, False, store._dirlock, store.meta.max_file_bytes)
        cursor.retained = True
        self._cursor = cursor
        self._finalizer = weakref.finalize(self, _release, store.path, self._name, cursor)
        # Guarded by being iterated by one thread at a time:
        self._buffer: deque[Change] = deque()
        self._skip: tuple[int, int, int] | None = None  # changes up to here were seen
        self._seen_seq = -1
        self._span = 1  # segments one read may cover (grows past a unit spanning several)
        self._registered = -1  # segment number in .mpkv/readers/ (-1: none)
        self._closed = False
        try:
            if since is None:
                self._start_now()
            else:
                self._start_at(since)
        except BaseException:
            self._finalizer()
            raise

    # --- the starting point ---------------------------------------------------------

    def _register(self, number: int) -> None:
        """Say "I still need segments from ``number`` on"; unregistered on failure (a
        directory this process cannot write)."""
        if self._name is None or number == self._registered:
            return
        try:
            register_reader(self._store.path, self._name, number)
            self._registered = number
        except OSError:
            unregister_reader_quietly(self._store.path, self._name)
            self._name = None
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _release, self._store.path, None,
                                               self._cursor)

    def _locked(self) -> AbstractContextManager[None]:
        return self._store._dirlock.shared()

    def _start_now(self) -> None:
        """From the store's current end: every change committed after this call."""
        store = self._store
        with self._locked():  # a compaction's switch reads registrations exclusively
            self._register(max(store._cursor.number, 1))
        with store._tail_mutex:
            store._catch_up(store._reader_limit())
            cur = store._cursor
            if cur.name is None:
                start = (1, 0)
            elif cur.part:
                start = (cur.number + 1, 0)
            else:
                start = (cur.number, cur.offset)
            self._seen_seq = -1
        self._pending: tuple[int, int] | None = start
        self._register(start[0])

    def _start_at(self, since: Pos) -> None:
        """After the change ``since``: re-read its unit from its start, skip up to it."""
        segment, offset, index, count = since
        if segment < 1:
            segment, offset, index, count = 1, 0, 0, 0
        with self._locked():
            self._register(segment)
            where = self._where(segment)
            resume = self._past_horizon(since) if where == "compacted" else None
            if resume is not None and resume > segment:  # only changes up to `since`
                segment, offset, count = resume, 0, 0
                self._register(segment)
            elif where == "compacted":
                raise CompactedError(f"{self._store.path}: changes after position "
                                     f"{format_position(*since)} were compacted away; "
                                     "reread the state and take a fresh position")
            if where == "future":
                raise ValueError(f"since: position {format_position(*since)} is past the "
                                 f"end of the log of {self._store.path}")
            if where == "present":
                size = self._segment_size(segment)
                if size is not None and offset > size:
                    raise ValueError(f"since: position {format_position(*since)} is past "
                                     f"the end of segment {segment} ({size} bytes)")
        self._pending = (segment, offset)
        self._skip = (segment, offset, index) if count else None

    def _past_horizon(self, since: Pos) -> int | None:
        """The segment to resume at when compaction removed only changes up to ``since``
        (it is at or after the last change compaction removed), else None."""
        horizon = read_horizon(self._store.path)
        if horizon is None or format_position(*since) < unit_token(horizon[1]):
            return None
        return horizon[0] + 1

    def _segment_size(self, number: int) -> int | None:
        for folder in (self._store.path, os.path.join(self._store.path, AUX, RETAINED)):
            try:
                return os.path.getsize(os.path.join(folder, f"{number:012d}.seg"))
            except OSError:
                continue
        return None

    def _where(self, number: int) -> str:
        """Is appended segment ``number`` "present" (log or retained), "compacted",
        "next" (not written yet: the log ends before it) or "future" (beyond that)?"""
        kept = os.path.join(self._store.path, AUX, RETAINED)
        with self._store._dirlock.shared():  # never a compaction's switch halfway (a gap)
            names = list_log(self._store.path)
            if os.path.isdir(kept):
                names += list_segments(kept)
        parsed = [p for p in map(parse_name, names) if p is not None]
        if (number, 0) in parsed:
            return "present"
        if any(n >= number for n, _ in parsed):
            return "compacted"
        last = max((n for n, _ in parsed), default=0)
        return "next" if number <= last + 1 else "future"

    def _enter_start(self) -> bool:
        """Open the starting segment once it exists; CompactedError if it is gone."""
        assert self._pending is not None
        segment, offset = self._pending
        with self._locked():
            if self._cursor.seek(segment, offset):
                self._pending = None
                return True
            if self._where(segment) == "compacted":
                resume = self._past_horizon((segment, offset, 0, 0))
                if resume is None or resume <= segment:
                    raise self._gap(f"segment {segment}")
                self._pending = (resume, 0)
        return False

    def _gap(self, what: str) -> CompactedError:
        self.close()
        return CompactedError(f"{self._store.path}: {what} was compacted away before this "
                              "watcher read it (a watcher that cannot write .mpkv/readers/ "
                              "cannot hold compaction back); reread the state and watch "
                              "from a fresh position")

    # --- iteration --------------------------------------------------------------------

    def __iter__(self) -> LogWatcher:
        return self

    def __next__(self) -> Change:
        if self._buffer:
            return self._buffer.popleft()
        if self._store._epoch == -1:
            self._store_gone()
        if self._closed:
            raise StopIteration
        if os.getpid() != self._pid:
            raise Error("this watch() iterator belongs to the process that created it; "
                        "call watch() again in this one")
        store = self._store
        idle_since = time.monotonic()
        pause = 0.0005
        while True:
            if store._epoch == -1:
                self._store_gone()
            shm = store._shm
            if self._pending is not None or shm.seq != self._seen_seq or not shm.backed:
                more = self._read()
                if self._buffer:
                    return self._buffer.popleft()
                if more:
                    continue
                pause = 0.0005
            if self._timeout is not None and time.monotonic() - idle_since >= self._timeout:
                self.close()
                raise StopIteration
            time.sleep(pause)
            # Poll every 5 ms at most while changes keep coming, every 10 ms after a
            # quiet second: an idle watcher then costs half the wake-ups.
            quiet = time.monotonic() - idle_since > 1.0
            pause = min(pause * 2, 0.010 if quiet else 0.005)

    def _read(self) -> bool:
        """Read the next stretch of the log into the buffer; True when more is there to
        read at once. A catch-up reads ``READ_CHUNK`` bytes at a time, so a watcher holds
        a bounded number of changes however far behind it is."""
        store = self._store
        if self._pending is not None and not self._enter_start():
            return False
        look = store._reader_limit()
        seq, limit = look.seq, look.limit
        cursor = self._cursor
        bound: Limit | None = limit
        if limit is not None and cursor.fd >= 0:
            room = READ_CHUNK * self._span
            if os.fstat(cursor.fd).st_size - cursor.offset > room:
                bound = (cursor.number, cursor.offset + room)
            else:  # the rest of this segment, then the start of the next one(s)
                bound = (cursor.number + self._span, 0)
            if bound >= limit:
                bound = limit
        before = (cursor.number, cursor.offset)
        starts: list[Start] = []
        mark = cursor.mark()
        try:
            batches, torn = cursor.read(bound, starts)
            if look.check is not None and store._changed(look.check):
                # A writer published while this read went to the end of the files: what
                # it read past the commit point may be dropped (docs/protocol.md).
                cursor.restore(mark)
                return True
        except NeedReload:
            # Files this unregistered watcher had yet to read were compacted away: fine
            # only if every change they held was delivered already.
            done = cursor.position
            resume = self._past_horizon((done[0], done[1], max(done[2] - 1, 0), done[2]))
            if resume is None or resume <= cursor.number:
                raise self._gap(f"a segment after {cursor.name}") from None
            self._pending = (resume, 0)
            return True
        self._deliver(batches, starts)
        self._register(cursor.number)
        if bound is limit:
            self._span = 1
            self._seen_seq = seq
            return False
        if torn is not None and (cursor.number, cursor.offset) == before:
            self._span *= 2  # a record or unit runs past the bound: read further at once
        else:
            self._span = 1
        return True

    def _deliver(self, batches: list[Any], starts: list[Start]) -> None:
        prefix, skip, buffer = self._prefix, self._skip, self._buffer
        serializer = getattr(self._store, "_serializer", None)
        decode = serializer.decode if serializer is not None else None
        new = tuple.__new__  # the hot loop of a catch-up: Change.__new__ inlined
        for batch, (segment, part, offset) in zip(batches, starts, strict=True):
            if part:  # a compaction output: the state, not changes
                raise self._gap(f"the log before segment {segment + 1}")
            ops = ops_of(batch)
            unit = f"{segment:012d}-{offset:012d}-"
            size = f"-{len(ops):010d}"
            for index, (key, value) in enumerate(ops):
                if skip is not None:
                    if (segment, offset, index) <= skip:
                        continue
                    self._skip = skip = None
                if key.startswith(prefix):
                    deleted = value is None
                    if decode is not None and not deleted:
                        value = decode(value)
                    change = new(Change, (key, value))
                    change.deleted = deleted
                    change.position = f"{unit}{index:010d}{size}"
                    buffer.append(change)

    def close(self) -> None:
        """Stop: release the registration (so compaction need not keep segments for
        this watcher) and the descriptors. Iterating afterwards ends at once."""
        self._closed = True
        self._buffer.clear()
        self._finalizer()

    def _store_gone(self) -> NoReturn:
        """Iterating a watcher whose store was closed is a use after close: it raises
        (ending quietly would look like a log with no more changes)."""
        self.close()
        raise ClosedError(f"{self._store.path}: store is closed")

    def _store_closed(self) -> None:
        """The store is closing: drop the registration now; descriptors go when this
        iterator's own thread notices (it may be reading through them right now)."""
        if self._name is not None:
            unregister_reader_quietly(self._store.path, self._name)


def unregister_reader_quietly(path: str, name: str) -> None:
    try:
        unregister_reader(path, name)
    except OSError:
        pass




