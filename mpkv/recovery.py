"""Verify and repair: check every record of every segment; salvage what is valid.

``verify`` only reads. ``repair`` takes the writer lock, copies every damaged byte
range into ``.mpkv/quarantine/`` (nothing is ever deleted), then rewrites each damaged
segment with its valid records only (temporary file, fsync, rename, fsync of the
directory). Run it when no other process has the store open: their cursors point
into the files it rewrites.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import compaction
from .codec import Codec, Puts
from .errors import CorruptionError, FormatError
from .files import fsync_dir, make_dir, open_regular, read_capped, save_new, write_atomically
from .locks import DirLock, WriterLock
from .segments import (
    AUX,
    DIRLOCK,
    INTENT,
    LOCK,
    META,
    QUARANTINE,
    SWITCH,
    SWITCH_MAX_BYTES,
    Meta,
    Switch,
    check_store_dir,
    check_switch,
    check_written,
    gap_message,
    list_segments,
    log_gap,
    log_of,
    parse_name,
    read_intent,
    read_meta,
    read_switch,
    segment_name,
)


@dataclass
class Damage:
    file: str
    offset: int
    length: int
    problem: str
    torn: bool = False  # a torn tail (an append cut short), not damage

    def __str__(self) -> str:
        kind = "torn tail" if self.torn else "damaged"
        return f"{self.file}: {kind} at offset {self.offset} ({self.length} bytes): {self.problem}"


@dataclass
class Report:
    segments: int = 0
    records: int = 0
    bytes: int = 0
    damage: list[Damage] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage (a torn tail is not damage: the next writer cuts it)."""
        return not any(not d.torn for d in self.damage)

    def summary(self) -> str:
        lines = [f"{self.segments} segments, {self.records} records, {self.bytes} bytes"]
        lines += [str(d) for d in self.damage]
        lines += [f"quarantined: {q}" for q in self.quarantined]
        return "\n".join(lines)


def _scan(codec: Codec, file: str, data: bytes, newest: bool
          ) -> tuple[int, list[tuple[int, int]], list[Damage]]:
    """Records, valid byte ranges and damage of one segment's bytes."""
    records, good, damage = 0, [], []
    pos = 0
    while pos < len(data):
        rest = data[pos:]
        dec = codec.decode(rest)
        # a record is one put or delete (what a user wrote), however units pack them
        records += sum(len(b.keys) if isinstance(b, Puts) else len(b) for b in dec.batches)
        if dec.stop:
            good.append((pos, pos + dec.stop))
        pos += dec.stop
        if not dec.problem:
            break
        if newest and dec.torn:
            damage.append(Damage(file, pos, len(data) - pos, dec.problem, torn=True))
            break
        nxt = pos - dec.stop + codec.next_valid(rest, dec.stop)
        damage.append(Damage(file, pos, nxt - pos, dec.problem))
        pos = nxt
    return records, good, damage


def _meta(path: str) -> Meta:
    meta = read_meta(path) if os.path.isdir(path) and check_store_dir(path) else None
    if meta is None:
        raise FormatError(f"{path}: not an mpkv store")
    # Metadata naming the wrong format would make every record look damaged.
    check_written(path, meta.format, os.path.join(path, AUX, META))
    return meta


Progress = Callable[[list[str]], Iterable[str]]


def _examine(path: str, meta: Meta, fix: bool, progress: Progress | None) -> Report:
    """Scan every segment of the log; with ``fix``, quarantine damage and rewrite."""
    report = Report()
    names = list_segments(path)
    log = log_of(path, names, _check_marker(path, names, fix, report))
    report.segments = len(log)
    for i, name in enumerate(progress(log) if progress else log):
        file = os.path.join(path, name)
        with os.fdopen(open_regular(file, os.O_RDONLY), "rb") as f:
            data = f.read()
        records, good, damage = _scan(meta.codec, file, data, newest=i == len(log) - 1)
        report.records += records
        report.bytes += len(data)
        report.damage += damage
        if fix and damage:
            report.quarantined += _quarantine(path, name, data, damage)
            write_atomically(file, b"".join(data[a:b] for a, b in good))
    while (gap := log_gap(log)) is not None:
        report.damage.append(Damage(os.path.join(path, gap[1]), 0, 0, gap_message(path, gap)))
        if not fix or not _bridge(path, meta, log, gap[1]):
            break
        log = log_of(path, list_segments(path), None)
    if meta.format == "text":
        _examine_intent(path, fix, report)
    return report


def _examine_intent(path: str, fix: bool, report: Report) -> None:
    """A ``.mpkv/txn`` that does not match the segments is damage, never an instruction:
    reported, and with ``fix`` moved into the quarantine whole (the log stays as is)."""
    try:
        read_intent(path)
        return
    except (CorruptionError, FormatError) as exc:
        problem = str(exc)
    file = os.path.join(path, AUX, INTENT)
    try:
        data = read_capped(file, 4096) or b""
    except FormatError:  # a link, a special file or a huge one: keep its name only
        data = b""
    report.damage.append(Damage(file, 0, len(data), problem))
    if fix:
        folder = os.path.join(path, AUX, QUARANTINE)
        make_dir(folder)
        report.quarantined.append(save_new(folder, INTENT, ".bad", data))
        os.unlink(file)
        fsync_dir(os.path.join(path, AUX))


def _check_marker(path: str, names: list[str], fix: bool, report: Report) -> Switch | None:
    """The committed compaction switch, if the marker checks out; a marker that does not
    is damage: reported, and with ``fix`` moved into the quarantine (the log is then
    read without it: every input it would have hidden counts again)."""
    marker = os.path.join(path, AUX, SWITCH)
    try:
        switch = read_switch(path, names)
        if switch is not None:
            check_switch(path, switch)
        return switch
    except CorruptionError as exc:
        data = read_capped(marker, SWITCH_MAX_BYTES) or b""
        report.damage.append(Damage(marker, 0, len(data), str(exc)))
        if fix:
            folder = os.path.join(path, AUX, QUARANTINE)
            make_dir(folder)
            report.quarantined.append(save_new(folder, SWITCH, ".bad", data))
            os.unlink(marker)
            fsync_dir(os.path.join(path, AUX))
        return None


def _bridge(path: str, meta: Meta, log: list[str], after: str) -> bool:
    """Make the log whole again across missing segments ending before ``after``: the
    segments before the gap are compacted into outputs that end just before ``after``
    (through a committed switch, as compaction does), so the log reads them, then
    ``after`` on. The missing segments' records are lost. False when ``after`` is a
    compaction output (nothing can continue into it)."""
    number, part = parse_name(after)  # type: ignore[misc]
    bridge = number - 1
    if part or bridge < 1 or os.path.exists(os.path.join(path, segment_name(bridge, 1))):
        return False
    inputs = log[: log.index(after)]
    state = compaction.replay(path, meta.codec, inputs)
    outputs = compaction.write_outputs(path, meta.codec, state, meta.max_segment_bytes)
    dirlock = DirLock(os.path.join(path, AUX, DIRLOCK), writable=True)
    try:
        compaction.switch(path, outputs, bridge, inputs, dirlock)  # records were lost: no horizon
    finally:
        dirlock.close()
    return True


def verify(path: str | os.PathLike[str], *, progress: Progress | None = None) -> Report:
    """Check every record; the report says what is damaged. Changes nothing.
    ``progress`` wraps the list of segment names (for a progress bar)."""
    path = os.fspath(path)
    return _examine(path, _meta(path), False, progress)


def repair(path: str | os.PathLike[str], *, progress: Progress | None = None) -> Report:
    """Salvage every valid record; move damaged bytes aside into ``.mpkv/quarantine/``."""
    path = os.fspath(path)
    meta = _meta(path)
    lock = WriterLock(os.path.join(path, AUX, LOCK), None)
    lock.acquire()
    try:
        return _examine(path, meta, True, progress)
    finally:
        lock.release()
        lock.close()


def _quarantine(path: str, name: str, data: bytes, damage: list[Damage]) -> list[str]:
    folder = os.path.join(path, AUX, QUARANTINE)
    make_dir(folder)
    fsync_dir(os.path.join(path, AUX))
    return [save_new(folder, f"{name}.{d.offset}", ".bad", data[d.offset : d.offset + d.length])
            for d in damage]
