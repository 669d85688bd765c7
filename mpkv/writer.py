"""The log writer: the cursor-side work of appending to the log.

It appends encoded records at a cursor: where a unit starts (its position), when to
rotate to a new segment, one write per segment for a unit chained over several, the
intent file around a text commit, the append at the published end without reading
first (append-behind), and putting the log back as it was when a write fails. It knows
nothing of the view, transactions or readers: the store (store.py) holds the locks,
applies what was appended to its view and publishes the new commit point.

Every method runs with the write mutex, the writer lock and the tail mutex held
(docs/protocol.md, "Locks"): one writing thread of one process at a time.
"""

from __future__ import annotations

import os

from .codec import Codec, Op
from .durability import Durability
from .segments import (
    Cursor,
    Mark,
    NeedReload,
    clear_intent,
    parse_name,
    truncate_log,
    write_intent,
)
from .shm import SharedState


class LogWriter:
    """Appends to the log of one store for one process."""

    def __init__(self, path: str, format: str, codec: Codec, max_segment_bytes: int,
                 shm: SharedState, durability: Durability) -> None:
        self.path = path
        self.format = format  # "binary" or "text"; fixed
        self.max_segment_bytes = max_segment_bytes  # the rotation rule; fixed
        self._codec = codec
        self._shm = shm
        self._durability = durability
        #: Has this process's writer checked the log's tail once (and not failed to undo
        #: a write since)? Until then a write does not trust the shared state.
        #: Guarded by the writer lock (with the write mutex).
        self.verified = False
        #: Bytes of the segments this process sealed or saw sealed: when the store checks
        #: for garbage. Guarded by the writer lock; read without it (an int).
        self.sealed_bytes = 0

    def encode(self, ops: list[Op]) -> list[tuple[bytes, int]]:
        """The records of one unit; ValueError (nothing written) if one cannot fit."""
        records = self._codec.encode(ops, self.max_segment_bytes)
        for _, units in records:
            if units > self.max_segment_bytes:
                raise ValueError(f"a record of {units} {self._units_name()} cannot fit in a "
                                 f"segment of max_segment_bytes={self.max_segment_bytes}")
        return records

    def _units_name(self) -> str:
        return "characters" if self.format == "text" else "bytes"

    def rotate(self, cursor: Cursor) -> None:
        """Seal the cursor's segment (fsynced) and move to a new one."""
        self.sealed_bytes += cursor.offset
        self._durability.seal(cursor)
        self._durability.follow(cursor)

    def seal(self, cursor: Cursor) -> int:
        """Seal the active segment, even if empty, and publish the new one's start;
        returns the shared counter published. On failure the log is put back."""
        start = cursor.mark()
        self._shm.begin()
        try:
            self.rotate(cursor)
        except BaseException:
            self.undo(cursor, start, start[2])
            raise
        return self._shm.publish(cursor.number, 0)

    def append(self, cursor: Cursor, records: list[tuple[bytes, int]], ops: int) -> None:
        """Write the records of one unit of ``ops`` operations at the cursor, rotating as
        needed, and set the cursor's position to the unit's. Publishing is the caller's,
        once its view holds the unit. If writing fails (a full disk), the log is put back
        as it was and the shared state shows no write in flight."""
        start = cursor.mark()
        self._shm.begin()
        try:
            self._durability.follow(cursor)
            # Where the unit starts: a reader computes the same position (watch.py).
            first_units = records[0][1]
            if cursor.name is None or (cursor.units and
                                       cursor.units + first_units > self.max_segment_bytes):
                begun = (cursor.number + 1, 0)
            else:
                begun = (cursor.number, cursor.offset)
            if len(records) == 1:  # the common case, kept short
                data, units = records[0]
                if cursor.name is None or (
                        cursor.units and cursor.units + units > self.max_segment_bytes):
                    self.rotate(cursor)
                cursor.append(data, units)
            else:
                self._append_records(cursor, records)
        except BaseException:
            self.undo(cursor, start, start[2])
            raise
        self._durability.appended += 1
        if self.format == "text":  # no framing: every line is a unit of its own
            cursor.position = (cursor.number, cursor.offset - len(records[-1][0]), 1)
        else:
            cursor.position = (*begun, ops)

    def _append_records(self, cursor: Cursor, records: list[tuple[bytes, int]]) -> None:
        """Several records (a text commit, or a unit chained over segments): one write
        per segment; a text commit is bracketed by the intent file."""
        intent = self.format == "text"
        always = self._durability.mode == "always"
        if intent:
            write_intent(self.path, cursor.number, cursor.offset,
                         sum(len(data) for data, _ in records), always)
        pending: list[bytes] = []  # records bound for the current segment: one write
        used = cursor.units
        for data, units in records:
            if cursor.name is None or (used and used + units > self.max_segment_bytes):
                if pending:
                    cursor.append(b"".join(pending), used - cursor.units)
                    pending = []
                self.rotate(cursor)
                used = 0
            pending.append(data)
            used += units
        cursor.append(b"".join(pending), used - cursor.units)
        if intent:
            if always:
                self._durability.sync_now(cursor.fd)
            clear_intent(self.path)

    def append_behind(self, cursor: Cursor, records: list[tuple[bytes, int]],
                      seen_seq: int) -> bool:
        """A put while other processes have written since this one last looked (its
        view is at ``seen_seq``): append at the published end of the log without first
        reading their records, so that the writer lock is held only for the write; the
        caller reads them (and this record) after releasing it. False (nothing done)
        unless the shared state is trusted and the record goes into the cursor's own
        segment without rotating: every other case takes the ordinary path. Publishes,
        but the cursor does not move: it is behind the records it has not read."""
        shm = self._shm
        if (shm.seq == seen_seq or len(records) != 1 or self.format != "binary"
                or not self.verified or not shm.writer_may_trust()):
            return False
        snap = shm.snapshot()
        if snap is None:
            return False
        _, segment, end = snap
        data, units = records[0]
        if (cursor.name is None or cursor.part or segment != cursor.number
                or end < cursor.offset or end + units > self.max_segment_bytes):
            return False
        shm.begin()
        try:
            self._durability.follow(cursor)
            written = os.pwrite(cursor.fd, data, end)
            while written < len(data):  # a short write: rare, but legal
                written += os.pwrite(cursor.fd, data[written:], end + written)
        except BaseException:
            self.undo(cursor, cursor.mark(), end)
            raise
        self._durability.appended += 1
        shm.publish(segment, end + len(data))
        return True

    def undo(self, cursor: Cursor, start: Mark, end: int) -> None:
        """Put the log back as it was before a failed write: the cursor at ``start``,
        its segment cut at ``end``, segments started since deleted; then the published
        point is the log's end again. If even that fails, the in-flight flag stays set
        and the next writer drops what is past the published point."""
        number = parse_name(start[0])[0] if start[0] else 0  # type: ignore[index]
        try:
            cursor.restore(start)
            truncate_log(self.path, number, end)
            if self.format == "text":
                clear_intent(self.path)
            self._shm.settle()
        except (OSError, NeedReload):
            self.verified = False
