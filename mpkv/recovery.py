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

from .codec import Codec
from .errors import CorruptionError, FormatError
from .locks import WriterLock
from .segments import AUX, INTENT, LOCK, Meta, fsync_dir, list_log, read_intent, read_meta
from .snapshot import write_atomically

QUARANTINE = "quarantine"


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
        records += len(dec.batches)
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
    meta = read_meta(path) if os.path.isdir(path) else None
    if meta is None:
        raise FormatError(f"{path}: not an mpkv store")
    return meta


Progress = Callable[[list[str]], Iterable[str]]


def _examine(path: str, meta: Meta, fix: bool, progress: Progress | None) -> Report:
    """Scan every segment of the log; with ``fix``, quarantine damage and rewrite."""
    names = list_log(path)
    report = Report(segments=len(names))
    for i, name in enumerate(progress(names) if progress else names):
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            data = f.read()
        records, good, damage = _scan(meta.codec, file, data, newest=i == len(names) - 1)
        report.records += records
        report.bytes += len(data)
        report.damage += damage
        if fix and damage:
            report.quarantined += _quarantine(path, name, data, damage)
            write_atomically(file, b"".join(data[a:b] for a, b in good))
    if meta.format == "text":
        _examine_intent(path, fix, report)
    return report


def _examine_intent(path: str, fix: bool, report: Report) -> None:
    """A ``.mpkv/txn`` that does not match the segments is damage, never an instruction:
    ``repair`` moves it into the quarantine folder whole."""
    try:
        read_intent(path)
        return
    except CorruptionError as exc:
        problem = str(exc)
    file = os.path.join(path, AUX, INTENT)
    try:
        size = os.lstat(file).st_size
    except FileNotFoundError:  # gone meanwhile
        return
    report.damage.append(Damage(file, 0, size, problem))
    if fix:
        folder = os.path.join(path, AUX, QUARANTINE)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, f"{INTENT}.{os.urandom(6).hex()}.bad")
        os.rename(file, target)
        fsync_dir(os.path.join(path, AUX))
        report.quarantined.append(target)


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
    os.makedirs(folder, exist_ok=True)
    saved = []
    for d in damage:
        target = os.path.join(folder, f"{name}.{d.offset}.bad")
        write_atomically(target, data[d.offset : d.offset + d.length])
        saved.append(target)
    fsync_dir(os.path.join(path, AUX))
    return saved
