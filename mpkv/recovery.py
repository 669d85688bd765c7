"""Verify and repair: check every record of every segment; salvage what is valid.

``verify`` only reads. ``repair`` takes the writer lock, copies every damaged byte
range into ``.mpkv/quarantine/`` (nothing is ever deleted), then rewrites each damaged
segment with its valid records only (temporary file, fsync, rename, fsync of the
directory). Run it when no other process has the store open: their cursors point
into the files it rewrites.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import compaction, hints
from .codec import BYTES_VALUE, STR_VALUE, Codec, Puts, ops_of
from .errors import CorruptionError, Error, FormatError
from .files import (
    fsync_dir,
    make_dir,
    open_regular,
    place_new,
    read_capped,
    save_new,
    write_atomically,
)
from .locks import CompactionLock, DirLock, WriterLock
from .segments import (
    AUX,
    COMPACT_LOCK,
    DIRLOCK,
    INTENT,
    LOCK,
    META,
    QUARANTINE,
    SIDE_FILE_CAP,
    SWITCH,
    SWITCH_MAX_BYTES,
    Meta,
    Switch,
    check_store_dir,
    check_switch,
    check_written,
    clear_intent,
    gap_message,
    list_log,
    list_segments,
    log_gap,
    log_of,
    parse_name,
    read_intent,
    read_meta,
    read_switch,
    segment_name,
    truncate_log,
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
    #: what repair changed, one sentence each (files rewritten, cut, removed)
    actions: list[str] = field(default_factory=list)
    #: harmless findings, one sentence each: hints that describe another file than
    #: their output (it was rewritten or copied): readers ignore them and replay
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage (a torn tail is not damage: the next writer cuts it)."""
        return not any(not d.torn for d in self.damage)

    def summary(self) -> str:
        lines = [f"{self.segments} segments, {self.records} records, {self.bytes} bytes"]
        lines += [str(d) for d in self.damage]
        lines += [f"quarantined: {q}" for q in self.quarantined]
        lines += self.notes
        lines += self.actions
        return "\n".join(lines)


@dataclass
class _Segment:
    """What scanning one segment found."""

    name: str
    file: str
    #: ``(start, end, closes_unit)`` of every valid record, in order
    pieces: list[tuple[int, int, bool]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    #: the byte ranges a repair keeps: records of atomic units that are whole
    keep: list[tuple[int, int]] = field(default_factory=list)


def _scan(codec: Codec, seg: _Segment, data: bytes, newest: bool) -> int:
    """Fill ``seg`` with the valid records and the damage of its bytes; return the
    number of records (puts and deletes, however units pack them)."""
    records = 0
    pos = 0
    while pos < len(data):
        rest = data[pos:]
        dec = codec.decode(rest)
        records += sum(len(b.keys) if isinstance(b, Puts) else len(b) for b in dec.batches)
        prev = pos
        for end, more in zip(dec.ends, dec.more, strict=True):
            seg.pieces.append((prev, pos + end, not more))
            prev = pos + end
        pos += dec.stop
        assert prev == pos, "a decoder stops at a record boundary"
        if not dec.problem:
            break
        if newest and dec.torn:
            seg.damage.append(Damage(seg.file, pos, len(data) - pos, dec.problem, torn=True))
            break
        nxt = pos - dec.stop + codec.next_valid(rest, dec.stop)
        seg.damage.append(Damage(seg.file, pos, nxt - pos, dec.problem))
        pos = nxt
    return records


def _whole_units(segments: list[_Segment]) -> None:
    """Decide what repair keeps: a record only with every record of its atomic unit.
    A unit (binary: records of type 2 closed by one of type 1, maybe across segments)
    that damage interrupts, or that the log ends before closing, is moved aside whole,
    never glued to the next unit."""
    unit: list[tuple[_Segment, int, int]] = []  # records of the unit not closed yet

    def orphan(problem: str, torn: bool) -> None:
        for seg in {id(s): s for s, _, _ in unit}.values():
            ranges: list[list[int]] = []
            for s, a, b in unit:
                if s is seg:
                    if ranges and ranges[-1][1] == a:
                        ranges[-1][1] = b
                    else:
                        ranges.append([a, b])
            seg.damage += [Damage(seg.file, a, b - a, problem, torn) for a, b in ranges]
        unit.clear()

    for seg in segments:
        events = [(a, 0, b, closes) for a, b, closes in seg.pieces]
        events += [(d.offset, 1, d.offset + d.length, d.torn) for d in seg.damage]
        for start, kind, end, flag in sorted(events):
            if kind == 1:  # damage: the unit in progress cannot be whole
                if unit:
                    orphan("records of an atomic unit whose closing record is damaged",
                           torn=flag)
                continue
            unit.append((seg, start, end))
            if flag:
                for s, a, b in unit:
                    s.keep.append((a, b))
                unit.clear()
    if unit:
        orphan("records of an atomic unit the log ends before closing", torn=True)
    for seg in segments:
        seg.damage.sort(key=lambda d: d.offset)


def _meta(path: str) -> Meta:
    meta = read_meta(path) if os.path.isdir(path) and check_store_dir(path) else None
    if meta is None:
        raise FormatError(f"{path}: not an mpkv store")
    # Metadata naming the wrong format would make every record look damaged.
    check_written(path, meta.format, os.path.join(path, AUX, META))
    return meta


Progress = Callable[[list[str]], Iterable[str]]
#: How many times ``verify`` reads the log before it gives up on a log that changes
#: under every read (each compaction's switch starts it over).
_ATTEMPTS = 5


def _examine(path: str, meta: Meta, fix: bool, progress: Progress | None
             ) -> tuple[Report, list[str]]:
    """Scan every segment of the log; with ``fix``, quarantine damage and rewrite.
    Returns the report and the segments listed (in one look: never a compaction's
    switch halfway)."""
    report = Report()
    _unfinished_commit(path, meta, fix, report)
    names = _list(path)
    log = log_of(path, names, _check_marker(path, names, fix, report))
    report.segments = len(log)
    segments = [_Segment(name, os.path.join(path, name)) for name in log]
    for i, _ in enumerate(progress(log) if progress else log):
        seg = segments[i]
        data, size = _read(seg.file, meta.max_file_bytes)
        report.records += _scan(meta.codec, seg, data, newest=i == len(log) - 1)
        report.bytes += size
        if size > len(data):  # no writer put these bytes there (format.md)
            seg.damage.append(Damage(seg.file, len(data), size - len(data),
                                     f"the file runs past max_segment_bytes "
                                     f"({meta.max_file_bytes} bytes)", torn=i == len(log) - 1))
    _whole_units(segments)
    for seg in segments:
        report.damage += seg.damage
        if fix and seg.damage:
            data, size = _read(seg.file, meta.max_file_bytes)
            if size > len(data) and not seg.damage[-1].torn:
                data += _read(seg.file, size)[0][len(data):]  # sealed: move all of it aside
            report.quarantined += _quarantine(path, seg.name, data, seg.damage)
            kept = b"".join(data[a:b] for a, b in seg.keep)
            write_atomically(seg.file, kept)
            report.actions.append(f"rewrote {seg.file}: kept {len(kept)} of {len(data)} bytes")
    while (gap := log_gap(log)) is not None:
        report.damage.append(Damage(os.path.join(path, gap[1]), 0, 0, gap_message(path, gap)))
        if not fix or not _bridge(path, meta, log, gap[1]):
            break
        report.actions.append(f"bridged the missing segments before {gap[1]}")
        log = log_of(path, list_segments(path), None)
    _check_hints(path, meta, log, fix, report)
    return report, names


def _list(path: str) -> list[str]:
    """The segments, listed under the directory lock (shared)."""
    dirlock = DirLock(os.path.join(path, AUX, DIRLOCK), writable=False)
    try:
        with dirlock.shared():
            return list_segments(path)
    finally:
        dirlock.close()


def _check_hints(path: str, meta: Meta, log: list[str], fix: bool, report: Report) -> None:
    """Check the hints of the log's compaction outputs (hints.py). One that fails its
    own checks, or that is bound to its output but disagrees with the output's records,
    is damage; one bound to another file (the output was rewritten or copied) is only
    stale: readers ignore both. With ``fix``, a damaged one is moved into the quarantine
    (repair never deletes damaged bytes) and a stale one removed. Hints of files that
    are not in the log are left to the next compaction (readers never look at them)."""
    for name in hints.names(path):
        if name not in log or not parse_name(name)[1]:  # type: ignore[index]
            continue
        number, part = parse_name(name)  # type: ignore[misc]
        file = hints.hint_path(path, name)
        try:
            fd = open_regular(os.path.join(path, name), os.O_RDONLY)
        except FileNotFoundError:  # compacted away meanwhile: its hint goes too
            continue
        try:
            hint = hints.read(path, name, number, part, fd, meta.max_file_bytes)
            if isinstance(hint, str):
                problem, stale = hint, hint.startswith(hints.STALE)
            else:
                problem, stale = _hint_disagrees(meta.codec, fd, hint,
                                                 meta.max_file_bytes), False
        finally:
            os.close(fd)
        if problem == hints.MISSING or not problem:
            continue
        if stale:
            report.notes.append(f"{file}: stale hint, ignored: {problem}")
            if fix:  # a cache of another file, not damage: nothing to keep
                hints.remove(path, [name])
                report.actions.append(f"removed {file}")
            continue
        size = os.lstat(file).st_size
        report.damage.append(Damage(file, 0, size, f"hint of {name}: {problem}"))
        if fix:
            moved = _move_aside(path, file, f"hint-{name}")
            report.quarantined.append(moved)
            report.actions.append(f"moved {file} aside to {moved}")


def _hint_disagrees(codec: Codec, fd: int, hint: hints.Hint, max_bytes: int) -> str:
    """Where a hint that checks out says something else than its output's records
    ("" when it agrees with them)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read(max_bytes)
    dec = codec.decode(data)
    ops = [op for batch in dec.batches for op in ops_of(batch)]
    if dec.problem or [k for k, _ in ops] != hint.keys:
        return "its keys are not the output's keys"
    for (key, value), said in zip(ops, hint.values(hint.locations()), strict=True):
        if isinstance(said, tuple):
            offset, length, crc, kind = said
            raw = data[offset : offset + length]
            if zlib.crc32(raw) != crc:
                return f"the value of {key!r} at offset {offset}: checksum mismatch"
            encoded = value.encode("utf-8") if isinstance(value, str) else value
            if raw != encoded or kind != (STR_VALUE if isinstance(value, str) else BYTES_VALUE):
                return f"the value of {key!r} is not at offset {offset}"
        elif said != value:
            return f"the value of {key!r} differs"
    return ""


def _read(file: str, cap: int) -> tuple[bytes, int]:
    """The first ``cap`` bytes of a segment, and its size: a segment cannot be larger
    than the store's limit, and what lies past it (a sparse or grown file) is not read."""
    with os.fdopen(open_regular(file, os.O_RDONLY), "rb") as f:
        return f.read(cap), os.fstat(f.fileno()).st_size


def _unfinished_commit(path: str, meta: Meta, fix: bool, report: Report) -> None:
    """A ``.mpkv/txn`` left by a text commit that died half written: its lines are cut
    from the log (with ``fix``: moved to quarantine first), like the next writer would.
    One that cannot apply to these files (a binary store, a segment that is not there,
    an offset past its end) is itself moved aside, never obeyed."""
    txn = os.path.join(path, AUX, INTENT)
    raw = read_capped(txn, SIDE_FILE_CAP)
    if raw is None:
        return
    try:
        intent = read_intent(path) if meta.format == "text" else None
        problem = "a transaction intent that cannot apply to this store's files"
    except (CorruptionError, FormatError) as exc:  # damage, never an instruction
        intent, problem = None, str(exc)
    try:
        names = list_log(path)
    except CorruptionError:  # a gap or a bad marker: reported (and handled) later
        names = list_segments(path)
    target = segment_name(intent[0]) if intent is not None else ""
    size = os.path.getsize(os.path.join(path, target)) if target in names else -1
    if intent is None or not 0 <= intent[1] <= size:
        report.damage.append(Damage(txn, 0, len(raw), problem,
                                    torn=meta.format != "text"))
        if fix:
            report.quarantined.append(_save(path, INTENT, raw))
            clear_intent(path)
            fsync_dir(os.path.join(path, AUX))
            report.actions.append(f"removed {txn}")
        return
    number, offset = intent
    later = [n for n in names if n > target and parse_name(n)[1] == 0]  # type: ignore[index]
    cut = [(target, offset)] + [(n, 0) for n in later]
    for name, start in cut:
        file = os.path.join(path, name)
        length = os.path.getsize(file) - start
        report.damage.append(Damage(file, start, length, "lines of a text transaction that "
                                    "died before its end (.mpkv/txn)", torn=True))
        if fix:
            report.quarantined.append(_save(path, f"{name}.{start}",
                                                  _read(file, meta.max_file_bytes)[0][start:]))
    if fix:
        truncate_log(path, number, offset)
        clear_intent(path)
        fsync_dir(os.path.join(path, AUX))
        report.actions.append(f"cut the unfinished text transaction at {target} offset {offset}"
                              f" (and {len(later)} later segments); removed {txn}")


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
            report.actions.append(f"removed {marker} (its content is in the quarantine)")
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
    outputs = compaction.write_outputs(path, meta.codec, state, meta.max_segment_bytes, bridge)
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
    meta = _meta(path)
    for attempt in range(_ATTEMPTS):
        # After a first read that a compaction upset, hold compactions off (when one
        # ever ran: the lock file exists) so that the next read is stable.
        lock = CompactionLock(os.path.join(path, AUX, COMPACT_LOCK))
        held = attempt > 0 and lock.acquire(True, create=False)
        try:
            report, names = _examine(path, meta, False, progress)
        except FileNotFoundError:  # a compaction removed a file being read
            continue
        else:
            # No compaction switched files meanwhile: every segment read is still there
            # (a writer may have started new ones: they were not part of this read).
            if set(names) <= set(_list(path)):
                return report
        finally:
            if held:
                lock.release()
    raise Error(f"{path}: the segments changed under every one of {_ATTEMPTS} attempts to "
                "verify them (compactions running back to back?); try again")


def repair(path: str | os.PathLike[str], *, progress: Progress | None = None) -> Report:
    """Salvage every valid record; move damaged bytes aside into ``.mpkv/quarantine/``."""
    path = os.fspath(path)
    meta = _meta(path)
    # No compaction runs meanwhile (it would write outputs from inputs being rewritten),
    # and no writer.
    compacting = CompactionLock(os.path.join(path, AUX, COMPACT_LOCK))
    compacting.acquire(True)
    try:
        lock = WriterLock(os.path.join(path, AUX, LOCK), None)
        lock.acquire()
        try:
            return _examine(path, meta, True, progress)[0]
        finally:
            lock.release()
            lock.close()
    finally:
        compacting.release()


def _quarantine(path: str, name: str, data: bytes, damage: list[Damage]) -> list[str]:
    return [_save(path, f"{name}.{d.offset}", data[d.offset : d.offset + d.length])
            for d in damage]


def _move_aside(path: str, file: str, name: str) -> str:
    """Move ``file``, whatever it is (a huge file, a link, a FIFO, a folder), into
    ``.mpkv/quarantine/NAME.bad`` under a name never used before: its bytes are kept,
    neither copied nor read, and no link is followed. A file is linked there first
    (which fails when the name is taken), then unlinked; a folder is renamed (which
    fails onto a folder that holds anything)."""
    folder = os.path.join(path, AUX, QUARANTINE)
    make_dir(folder)
    is_dir = stat.S_ISDIR(os.lstat(file).st_mode)

    def put(target: str) -> None:
        if is_dir:
            if os.path.lexists(target):  # rename would replace an empty folder
                raise FileExistsError(target)
            os.rename(file, target)
        else:
            os.link(file, target, follow_symlinks=False)
            os.unlink(file)

    target = place_new(folder, name, ".bad", put)
    fsync_dir(os.path.dirname(file))
    return target


def _save(path: str, name: str, data: bytes) -> str:
    """``data`` in ``.mpkv/quarantine/NAME.bad`` (fsynced), under a name never used
    before: a later repair never overwrites what an earlier one moved aside."""
    folder = os.path.join(path, AUX, QUARANTINE)
    make_dir(folder)
    fsync_dir(os.path.join(path, AUX))
    return save_new(folder, name, ".bad", data)
