"""The segment directory: file naming, store metadata, rotation and tailing.

A store is a directory of append-only segment files whose names sort in log order:
``000000000007.seg`` for the 7th segment appended, ``000000000005.0001.seg`` for the
first file a compaction wrote to replace segments up to number 5 (it sorts just
before ``000000000005.seg``, which it replaces). Everything else lives in ``.mpkv/``,
so no other file can be taken for a segment. See docs/format.md and docs/protocol.md.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import hints
from .codec import (
    HEADER,
    HEADER_V2,
    RECORD_OPS,
    RECORD_OPS_MORE,
    RECORD_PACKED,
    SYNC,
    Batch,
    Codec,
    Decoded,
    Op,
    Puts,
    apply,
    codec_for,
    ops_of,
)
from .errors import CorruptionError, Error, FormatError
from .files import check_dir, make_dir, open_dir, open_regular, read_capped, write_temp
from .files import fsync_dir as fsync_dir
from .keydir import ValueFile, ValueFiles
from .locks import DirLock

AUX = ".mpkv"
META = "meta"
LOCK = "lock"
SHM = "shm"
READERS = "readers"
INTENT = "txn"
COMPACT_LOCK = "compact.lock"  # held by one compaction (or repair) at a time
DIRLOCK = "dirlock"  # shared: listing + opening a segment; exclusive: compaction's switch
SWITCH = "compacted"  # a committed compaction switch (``Switch``): its inputs go
RETAINED = "retained"  # compacted inputs a live watcher has not read yet
HORIZON = "horizon"  # "b S O N": the last unit compaction b removed (watch positions)
QUARANTINE = "quarantine"  # damaged bytes repair moved aside
MAGIC = "mpkv"
VERSION = 2  # of the store format: 2 frames binary records with a header checksum
VERSIONS = (1, 2)  # what this code reads and writes (a store keeps its version)
DEFAULT_MAX_SEGMENT_BYTES = 64 * 1024 * 1024
#: Largest side file (meta, txn, compacted, a readers entry) mpkv reads: they hold a few
#: dozen bytes, and one that a link or a stray writer made huge must not fill memory.
SIDE_FILE_CAP = 4096

_NAME = re.compile(r"^(\d{12})(?:\.(\d{4}))?\.seg$")


def segment_name(major: int, part: int = 0) -> str:
    return f"{major:012d}.seg" if part == 0 else f"{major:012d}.{part:04d}.seg"


def parse_name(name: str) -> tuple[int, int] | None:
    """``(number, part)``; part 0 for an appended segment, >= 1 for a compaction output."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def list_segments(path: str) -> list[str]:
    """Every segment file in the directory, in name order (see ``list_log``)."""
    return sorted(n for n in os.listdir(path) if _NAME.match(n))


#: The most bytes ``.mpkv/compacted`` can hold (9999 parts of a few dozen bytes each).
SWITCH_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Switch:
    """A committed compaction switch, as ``.mpkv/compacted`` records it: compaction
    ``number``'s outputs ``number.0001 ... number.K`` are all in place, with these
    ``(size, CRC-32)``; its inputs no longer count."""

    number: int
    parts: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        body = f"{self.number} {len(self.parts)}\n" + "".join(
            f"{size} {crc:08x}\n" for size, crc in self.parts)
        return (body + f"{zlib.crc32(body.encode('ascii')):08x}\n").encode("ascii")


def _parse_switch(data: bytes) -> Switch | None:
    """The switch ``data`` records, None unless it is exactly the layout ``encode``
    writes with a matching checksum (a torn, stray or hand-written file is not one)."""
    try:
        lines = data.decode("ascii").split("\n")
        if lines[-1] != "" or len(lines) < 4:
            return None
        body = "".join(line + "\n" for line in lines[:-2])
        check = lines[-2]
        if len(check) != 8 or int(check, 16) != zlib.crc32(body.encode("ascii")):
            return None
        number, count = (int(x) for x in lines[0].split(" "))
        parts = []
        for line in lines[1:-2]:
            size, crc = line.split(" ")
            parts.append((int(size), int(crc, 16)))
    except ValueError:
        return None
    switch = Switch(number, tuple(parts))
    if count != len(parts) or not 1 <= count <= 9999 or switch.encode() != data:
        return None
    return switch


def read_switch(path: str, names: list[str] | None = None) -> Switch | None:
    """The committed switch ``.mpkv/compacted`` records, None when there is none.

    The marker is checked against the files, never obeyed blindly: it must parse with
    its own checksum, and every output it announces must be present (in ``names``, the
    directory's segments) with the recorded size, and no further part. Anything else is
    damage: CorruptionError naming the marker. (``check_switch`` also compares the
    outputs' checksums; that reads them, so only compaction and verify do it.)"""
    file = os.path.join(path, AUX, SWITCH)
    try:
        data = read_capped(file, SWITCH_MAX_BYTES)
    except OSError as exc:  # (a link or a special file: FormatError from read_capped)
        raise CorruptionError(f"{file}: unreadable compaction marker: {exc}", file, 0) from None
    if data is None:
        return None
    switch = _parse_switch(data)
    if switch is None:
        raise CorruptionError(f"{file}: not a valid compaction marker ({len(data)} bytes): "
                              "a stray or damaged file; run mpkv repair", file, 0)
    present = set(list_segments(path) if names is None else names)
    for k, (size, _) in enumerate(switch.parts, start=1):
        part = os.path.join(path, segment_name(switch.number, k))
        try:
            actual = os.stat(part).st_size if segment_name(switch.number, k) in present else -1
        except FileNotFoundError:
            actual = -1
        if actual != size:
            found = "missing" if actual < 0 else f"{actual} bytes"
            raise CorruptionError(f"{file}: the compaction marker announces {part} of {size} "
                                  f"bytes, but it is {found}; run mpkv repair", file, 0)
    extra = segment_name(switch.number, len(switch.parts) + 1)
    if extra in present:
        raise CorruptionError(f"{file}: the compaction marker announces "
                              f"{len(switch.parts)} outputs, but {extra} exists too; "
                              "run mpkv repair", file, 0)
    return switch


def check_switch(path: str, switch: Switch) -> None:
    """Compare the outputs' contents with the checksums the marker recorded: required
    before anything is deleted on the marker's word. CorruptionError when one differs."""
    file = os.path.join(path, AUX, SWITCH)
    for k, (_, crc) in enumerate(switch.parts, start=1):
        part = os.path.join(path, segment_name(switch.number, k))
        if file_crc(part) != crc:
            raise CorruptionError(f"{file}: {part} does not match the checksum the compaction "
                                  "marker recorded; run mpkv repair", file, 0)


def file_crc(file: str) -> int:
    crc = 0
    with os.fdopen(open_regular(file, os.O_RDONLY), "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def log_of(path: str, names: list[str], switch: Switch | None) -> list[str]:
    """The segments among ``names`` that make up the log, in order.

    After a committed switch (``switch``), the inputs it replaced no longer count, even
    if a crash left some behind. Outputs of a compaction whose switch is not committed
    (its segment ``b`` is still there) do not count: they only repeat what the inputs
    say, and may be incomplete."""
    if switch is not None:
        first = segment_name(switch.number, 1)
        names = [n for n in names if n >= first and n != segment_name(switch.number)]
    present = set(names)
    out = []
    for name in names:
        number, part = parse_name(name)  # type: ignore[misc]
        if part == 0 or segment_name(number) not in present:
            out.append(name)
    return out


def log_gap(names: list[str]) -> tuple[str | None, str] | None:
    """Where the log ``names`` is not contiguous: ``(before, after)`` around the first
    gap (``before`` None when the log does not start at segment 1 or at the first part
    of a compaction output), None when it is whole."""
    if not names:
        return None
    first = parse_name(names[0])
    if first is None or first[1] > 1 or (first[1] == 0 and first[0] != 1):
        return None, names[0]
    for prev, nxt in itertools.pairwise(names):
        if not follows(prev, nxt):
            return prev, nxt
    return None


def gap_message(path: str, gap: tuple[str | None, str]) -> str:
    before, after = gap
    if before is None:
        return (f"{path}: the log starts at {after}: the segments before it are missing "
                "(their records are lost); run mpkv repair")
    return (f"{path}: segments missing between {before} and {after} (their records are "
            "lost); run mpkv repair")


def list_log(path: str) -> list[str]:
    """The segments that make up the log, in order (``log_of``), listing the directory
    once. CorruptionError when the compaction marker does not check out or when
    segments are missing from the log (a gap)."""
    names = list_segments(path)
    log = log_of(path, names, read_switch(path, names))
    gap = log_gap(log)
    if gap is not None:
        after = os.path.join(path, gap[1])
        raise CorruptionError(gap_message(path, gap), after, 0)
    return log


def follows(prev: str, nxt: str) -> bool:
    """True when a reader that applied ``prev`` may apply ``nxt`` next and stay exact.

    Appended segments chain by number; the parts of a compaction output by part; the
    last part of the output of b (the state as of segment b) by b + 1. Any other step
    means files the reader needed were compacted away: it must reload.
    """
    pm, pp = parse_name(prev) or (0, 0)
    nm, np_ = parse_name(nxt) or (0, 0)
    if np_ == 0:
        return nm == pm + 1
    return pp != 0 and nm == pm and np_ == pp + 1


# --- metadata -------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    format: str
    max_segment_bytes: int
    serializer: str = "raw"  # stores created before the field existed are raw
    version: int = VERSION  # of the store format (framing of binary records)

    @property
    def codec(self) -> Codec:
        return codec_for(self.format, self.version)

    @property
    def max_file_bytes(self) -> int:
        """The most bytes a segment can hold: the limit counts bytes in binary stores,
        characters (up to 4 bytes each in UTF-8) in text stores."""
        return self.max_segment_bytes * (4 if self.format == "text" else 1)


def read_meta(path: str) -> Meta | None:
    """The store's metadata, None when the file does not exist (yet)."""
    file = os.path.join(path, AUX, META)
    try:
        data = read_capped(file, SIDE_FILE_CAP)
        if data is None:
            return None
        raw = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise FormatError(f"{file}: unreadable store metadata: {exc}") from None
    if not isinstance(raw, dict) or raw.get("magic") != MAGIC:
        raise FormatError(f"{file}: not mpkv metadata (bad magic)")
    version = raw.get("version")
    if version not in VERSIONS or isinstance(version, bool):
        raise FormatError(f"{file}: unsupported format version {version!r}")
    fmt, limit = raw.get("format"), raw.get("max_segment_bytes")
    if (fmt not in ("binary", "text") or not isinstance(limit, int)
            or isinstance(limit, bool) or limit < 1):
        raise FormatError(f"{file}: bad format {fmt!r} or max_segment_bytes {limit!r}")
    serializer = raw.get("serializer", "raw")
    if serializer not in ("raw", "json"):
        raise FormatError(f"{file}: unknown serializer {serializer!r}")
    return Meta(fmt, limit, serializer, version)


_SNIFF_CAP = 1 << 20


def written_format(path: str) -> tuple[str, str, int] | None:
    """``(format, file, version)``: the format (and binary framing: store format
    version) the log's first record is written in, judged from its bytes, or None when
    no segment holds a recognisable first record. A binary record is recognised by its
    header checksum (framing 2) or its checksum (framing 1), a text one by ``P|``/``D|``;
    so metadata that names the wrong format (edited, or lost and recreated) is caught
    before any writer takes the other format's records for a torn tail and truncates
    them."""
    for name in list_segments(path):  # any segment will do: no need to judge the log
        file = os.path.join(path, name)
        try:
            fd = open_regular(file, os.O_RDONLY)
        except FileNotFoundError:  # compacted away meanwhile
            continue
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_V2.size, 0)
            if len(head) < 2:
                continue
            text = head[:2] in (b"P|", b"D|")
            for version, hsize in ((VERSION, HEADER_V2.size), (1, HEADER.size)):
                if len(head) < hsize:
                    continue
                crc, length, kind = HEADER.unpack(head[: HEADER.size])
                if version == VERSION and (head[9:12] != SYNC
                                           or zlib.crc32(head[4:12]) != HEADER_V2.unpack(head)[4]):
                    continue
                if kind in (RECORD_OPS, RECORD_OPS_MORE, RECORD_PACKED) and (
                        hsize + length <= size):
                    if length > _SNIFF_CAP:  # too big to checksum at every open
                        return ("text", file, VERSION) if text else ("binary", file, version)
                    record = os.pread(fd, hsize + length, 0)
                    if zlib.crc32(record[4:]) == crc:
                        return "binary", file, version
            return ("text", file, VERSION) if text else None
        finally:
            os.close(fd)
    return None


def check_written(path: str, fmt: str, source: str) -> None:
    """FormatError when the segments are written in another format than ``fmt``
    (which ``source`` says); nothing is written before this check."""
    written = written_format(path)
    if written is not None and written[0] != fmt:
        raise FormatError(f"{written[1]}: holds {written[0]} records, but {source} says "
                          f"{fmt!r}; refusing to open (a writer would truncate them)")


def check_store_dir(path: str) -> bool:
    """Raise FormatError unless ``path`` can hold a store; True when it exists.
    ``.mpkv`` and its folders must be real directories, never links: files mpkv
    creates, truncates or deletes in them must stay inside the store."""
    if not os.path.exists(path):
        if os.path.islink(path):
            # Creating the directory would fail (the name is taken) or land wherever the
            # link points: refuse clearly instead.
            raise FormatError(f"{path}: a symbolic link to nothing (not an mpkv store)")
        return False
    if not os.path.isdir(path):
        raise FormatError(f"{path}: not a directory (an mpkv store is a directory)")
    entries = os.listdir(path)
    if entries and AUX not in entries:
        raise FormatError(f"{path}: a non-empty directory that is not an mpkv store")
    aux = os.path.join(path, AUX)
    if check_dir(aux):
        for folder in (READERS, RETAINED, QUARANTINE, hints.HINTS):
            check_dir(os.path.join(aux, folder))
    return True


def create_meta(path: str, meta: Meta) -> Meta:
    """Write the metadata unless another process won the race; return what is stored.

    The file is written whole under a unique name, then hard-linked into place: link
    fails if the name exists, so racing creators agree on exactly one metadata file.
    """
    aux = os.path.join(path, AUX)
    make_dir(aux)
    body = {"magic": MAGIC, "version": meta.version, "format": meta.format,
            "max_segment_bytes": meta.max_segment_bytes, "serializer": meta.serializer}
    tmp = write_temp(aux, "meta.tmp.", (json.dumps(body) + "\n").encode("utf-8"))
    try:
        os.link(tmp, os.path.join(aux, META))
        fsync_dir(aux)
        fsync_dir(path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    stored = read_meta(path)
    assert stored is not None
    return stored


# --- text transactions: an intent file makes them all-or-nothing -------------------
#
# Text records have no framing, so a multi-line commit first records where it starts
# and how many bytes it writes in .mpkv/txn, and removes the file when its last line is
# written. While the shared state is untrusted and the file exists, readers treat the
# log as ending there and the next writer truncates the log at that point (undoing the
# unfinished commit). The file is never obeyed blindly: ``read_intent`` checks it
# against the segments, and binary stores never read it (docs/format.md).

_INTENT_MAX_BYTES = 64
_INTENT_LINE = re.compile(rb"(\d{1,12}) (\d{1,19}) (\d{1,19})\n")


def write_intent(path: str, number: int, offset: int, length: int, durable: bool) -> None:
    """Written whole under a unique name, then renamed into place: a reader never sees
    half of it. ``length``: the bytes the commit appends from ``(number, offset)`` on."""
    aux = os.path.join(path, AUX)
    tmp = write_temp(aux, f"{INTENT}.", f"{number} {offset} {length}\n".encode("ascii"),
                     durable)
    try:
        os.replace(tmp, os.path.join(aux, INTENT))
    except BaseException:
        os.unlink(tmp)
        raise
    if durable:
        fsync_dir(aux)


def read_intent(path: str) -> tuple[int, int] | None:
    """Where an unfinished text commit starts, ``(segment number, offset)``; None when
    there is none. Raises CorruptionError when the file is not an intent this store's
    segments can have left: bad syntax, a segment that does not exist or is not the
    log's end, an offset past the file or not at a line's start, or more bytes after it
    than the commit was to write. FormatError when it is a link, a special file or huge
    (never followed, never read whole)."""
    file = os.path.join(path, AUX, INTENT)
    data = read_capped(file, _INTENT_MAX_BYTES)
    if not data:  # written whole then renamed: empty only when power loss lost it
        return None
    m = _INTENT_LINE.fullmatch(data)
    if m is None:
        raise CorruptionError(f"{file}: malformed transaction intent {data[:64]!r}", file, 0)
    number, offset, length = (int(g) for g in m.groups())
    problem = _intent_problem(path, number, offset, length)
    if problem:
        raise CorruptionError(f"{file}: transaction intent {number} {offset} {length} "
                              f"does not match the segments: {problem}", file, 0)
    return number, offset


def _intent_problem(path: str, number: int, offset: int, length: int) -> str:
    appended: dict[int, int] = {}
    compacted_up_to = 0
    for name in list_segments(path):
        major, part = parse_name(name)  # type: ignore[misc]
        if part:
            compacted_up_to = max(compacted_up_to, major)
        else:
            appended[major] = os.lstat(os.path.join(path, name)).st_size
    if number == 0:  # the log was empty when the commit started
        if offset or compacted_up_to:
            return "segment 0 is only the start of an empty log"
        after = sum(appended.values())
    else:
        if number not in appended:
            return f"no segment {segment_name(number)}"
        if number <= compacted_up_to:
            return "that segment was compacted"
        size = appended[number]
        if offset > size:
            return f"offset past the segment's {size} bytes"
        if offset:
            fd = open_regular(os.path.join(path, segment_name(number)), os.O_RDONLY)
            try:
                if os.pread(fd, 1, offset - 1) != b"\n":
                    return "offset is not at the start of a line"
            finally:
                os.close(fd)
        after = size - offset + sum(s for n, s in appended.items() if n > number)
    if after > length:
        return f"{after} bytes follow it, more than the commit's {length}"
    return ""


def discard_intent(path: str) -> None:
    """Remove an intent a trusted commit point makes meaningless (commits remove theirs
    before publishing). A link, special file or huge file there raises FormatError."""
    read_capped(os.path.join(path, AUX, INTENT), _INTENT_MAX_BYTES)
    clear_intent(path)


def clear_intent(path: str) -> None:
    try:
        os.unlink(os.path.join(path, AUX, INTENT))
    except FileNotFoundError:
        pass


def truncate_log(path: str, number: int, offset: int) -> None:
    """Cut the log at ``offset`` of segment ``number``: later appended segments are
    deleted, the newest first, so that a reader listing meanwhile never sees a gap
    (compaction outputs are older than any segment a commit appends to). Never extends
    a file. (Unlinking a name never follows a link; the truncated file is opened
    without.)"""
    for name in reversed(list_segments(path)):
        major, part = parse_name(name)  # type: ignore[misc]
        if major > number and not part:
            os.unlink(os.path.join(path, name))
        elif major == number and not part:
            fd = open_regular(os.path.join(path, name), os.O_WRONLY)
            try:
                if os.fstat(fd).st_size > offset:
                    os.ftruncate(fd, offset)
            finally:
                os.close(fd)
    fsync_dir(path)


# --- readers that must not lose history ------------------------------------------
#
# A watcher must see every change, so compaction keeps the segments it has not read
# yet. Each registers "I still need segments from number N on" in .mpkv/readers/.


def register_reader(path: str, token: str, number: int) -> None:
    folder = os.path.join(path, AUX, READERS)
    make_dir(folder)
    tmp = write_temp(folder, f".{token}.", str(number).encode("ascii"), durable=False)
    try:
        os.replace(tmp, os.path.join(folder, token))
    except BaseException:
        os.unlink(tmp)
        raise


def unregister_reader(path: str, token: str) -> None:
    try:
        os.unlink(os.path.join(path, AUX, READERS, token))
    except FileNotFoundError:
        pass


def read_horizon(path: str) -> tuple[int, UnitPos] | None:
    """``(b, last unit)`` of the latest compaction, None when unknown or unreadable."""
    try:
        data = read_capped(os.path.join(path, AUX, HORIZON), 100)
        if data is None:
            return None
        b, segment, offset, count = (int(x) for x in data.split())
    except (OSError, ValueError, FormatError):  # unknown: resuming is refused, not guessed
        return None
    return b, (segment, offset, count)


_TOKEN = re.compile(r"[1-9]\d{0,9}-[0-9A-Za-z-]{1,64}")  # "<pid>-<name>": a live process


def oldest_needed(path: str) -> int | None:
    """The oldest segment number a live registered reader still needs. Entries that
    are not ``<pid>-<id>`` holding a number are not mpkv's and are ignored; the folder
    is used through a descriptor, so nothing outside it is ever deleted."""
    folder = os.path.join(path, AUX, READERS)
    try:
        fd = open_dir(folder)
    except FileNotFoundError:
        return None
    numbers = []
    try:
        for token in os.listdir(fd):
            pid_text = token.split("-")[0]
            if not _TOKEN.fullmatch(token):  # a temporary file, or not ours
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:  # that reader died: forget it
                try:
                    os.unlink(token, dir_fd=fd)
                except FileNotFoundError:
                    pass
                continue
            except (PermissionError, OverflowError):
                pass
            try:
                entry = os.open(token, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            except OSError:  # gone meanwhile, or a link or special file: not a reader's
                continue
            try:
                numbers.append(int(os.pread(entry, SIDE_FILE_CAP, 0)))
            except (OSError, ValueError):
                continue
            finally:
                os.close(entry)
    finally:
        os.close(fd)
    return min(numbers, default=None)


# --- tailing --------------------------------------------------------------------


class NeedReload(Exception):
    """Internal: files this cursor needed were compacted away; rebuild from scratch."""


#: How many bytes of a segment a cursor reads at a time (more for a larger record).
_CHUNK = 4 << 20

#: Where a reader must stop: ``(segment number, end offset)``; end None means "to EOF".
Limit = tuple[int, "int | None"]
#: Where an atomic unit starts: ``(segment number, compaction part, byte offset)``.
Start = tuple[int, int, int]
#: The last unit a cursor applied: ``(segment number, start offset, number of ops)``;
#: ``(N, 0, 0)`` when it applied none since the start of segment N (docs/protocol.md,
#: "Positions").
UnitPos = tuple[int, int, int]


def _beyond(name: str, limit: Limit | None) -> bool:
    """True when segment ``name`` lies past the limit. Compaction outputs never do: they
    hold a whole sealed state, maybe newer than a limit read just before they appeared."""
    number, part = parse_name(name)  # type: ignore[misc]
    return limit is not None and part == 0 and number > limit[0]


#: A cursor's position as ``Cursor.mark`` returns it: name, folder, offset, units and
#: the last unit read.
Mark = tuple["str | None", str, int, int, UnitPos]


class Cursor:
    """A position in the log: the current segment and the end of the last record applied.

    ``read`` decodes only complete, valid records, so a record being written is never an
    error: it is picked up by a later read. A writer (under the writer lock) appends and
    rotates through the same cursor, so it never re-reads its own records.
    """

    def __init__(self, path: str, codec: Codec, writable: bool, dirlock: DirLock,
                 max_bytes: int | None = None) -> None:
        self.path = path
        self.codec = codec
        self.writable = writable
        self.dirlock = dirlock
        self.max_bytes = max_bytes  # no segment of the store can be larger (None: unchecked)
        self.retained = False  # also look in .mpkv/retained/ (a watcher needs every change)
        self.name: str | None = None
        self.folder = path  # where the current segment is
        self.fd = -1
        self.offset = 0
        self.units = 0  # size of the current segment in the limit's units
        self.number = 0  # the current segment's number (0: none yet)
        self.part = 0  # and its compaction part (0: an appended segment)
        self.position: UnitPos = (1, 0, 0)  # the last unit read (or appended by the owner)
        #: Where the store's view keeps values it leaves in the files (keydir.py), or
        #: None: decode every value (watchers, compaction). Set by the owner once.
        self.values: ValueFiles | None = None
        #: The current segment's table in ``values`` (None without ``values``).
        self.refs: ValueFile | None = None
        #: A key, for a cursor that looks up that key alone: a compaction output's hint
        #: gives only that key's entry (other segments are read whole). Set by the owner.
        self.only: str | None = None
        # The log's names (and their folders) as listed once in the current ``read``:
        # one listing per tail step, not one per segment. None: not listed yet.
        self._listing: list[tuple[str, str]] | None = None

    @property
    def listing(self) -> list[tuple[str, str]] | None:
        """The log's names as the last ``read`` listed them (None: it did not list)."""
        return self._listing

    def _enter(self, name: str, folder: str, fd: int) -> None:
        self.close()
        self.name, self.folder, self.fd, self.offset, self.units = name, folder, fd, 0, 0
        self.number, self.part = parse_name(name)  # type: ignore[misc]
        if self.values is not None:
            self.refs = self.values.new_file(os.path.join(folder, name), fd)
        if self.part:  # the state as of the end of segment `number`: before number + 1
            self.position = max(self.position, (self.number + 1, 0, 0))

    def seek(self, number: int, offset: int) -> bool:
        """Start at ``offset`` of appended segment ``number`` (in the log or, with
        ``retained``, in .mpkv/retained/); False when no such segment exists."""
        name = segment_name(number)
        with self.dirlock.shared():
            folders = [self.path, os.path.join(self.path, AUX, RETAINED)]
            for folder in folders[:2 if self.retained else 1]:
                if folder == self.path and name not in list_log(self.path):
                    continue
                try:
                    fd = self._open(folder, name)
                except NeedReload:
                    continue
                self._enter(name, folder, fd)
                self.offset = offset
                return True
            return False

    def _open(self, folder: str, name: str, flags: int = 0) -> int:
        mode = os.O_RDWR if self.writable else os.O_RDONLY
        try:
            return open_regular(os.path.join(folder, name), mode | flags)
        except FileNotFoundError:
            raise NeedReload from None

    def _list(self) -> list[tuple[str, str]]:
        """The log's segments, and retained ones for a watcher, in name order.

        Listing holds the directory lock shared, so a compaction's switch (exclusive) is
        seen whole or not at all."""
        with self.dirlock.shared():
            names = [(n, self.path) for n in list_log(self.path)]
            kept = os.path.join(self.path, AUX, RETAINED)
            if self.retained and os.path.isdir(kept):
                names = sorted(names + [(n, kept) for n in list_segments(kept)])
            return names

    def _next(self) -> tuple[str, str, int] | None:
        """The segment to read after this one, opened: ``(name, folder, fd)``.

        The first later name that continues the log (see ``follows``) is taken: ``N+1``
        before a compaction's outputs, so a watcher sees every change once. Names come
        from the listing of this tail step; when the one to take has gone since (a
        compaction's switch: deleted, or moved to ``.mpkv/retained/``), or none continues,
        the directory is listed again once. NeedReload when later names exist but none
        continues."""
        fresh = self._listing is None
        while True:
            if self._listing is None:
                self._listing = self._list()
            start = 0 if self.name is None else bisect.bisect_right(self._listing,
                                                                    (self.name, "\uffff"))
            later = self._listing[start:]
            if not later:
                return None
            for name, folder in later if self.name is not None else later[:1]:
                if self.name is None or follows(self.name, name):
                    try:
                        return name, folder, self._open(folder, name)
                    except NeedReload:
                        if fresh:
                            raise
                    break
            else:
                if fresh:
                    raise NeedReload
            self._listing, fresh = None, True

    def read(self, limit: Limit | None, starts: list[Start] | None = None,
             apply_to: dict[str, Any] | None = None) -> tuple[list[Batch], int | None]:
        """Decode what follows the cursor, up to ``limit``; return the complete atomic
        units and, when the log ends in a torn record or an unfinished unit, the offset
        (in the cursor's segment) where the torn part starts. ``starts`` (when given)
        receives where each returned unit starts, for positions. With ``apply_to``,
        each complete unit is applied to that state as soon as it is read, and none is
        returned: reading a whole log into a new view never holds all its records.

        A unit may span segments; until its last record is read the cursor stays at its
        start, so an unfinished unit is read again, whole, next time."""
        self._listing = None  # a new tail step lists the directory (at most) once
        batches: list[Batch] = []
        emit: Callable[[Batch], None] = (batches.append if apply_to is None
                                         else functools.partial(apply, apply_to))
        pending: list[Op] = []  # ops of a unit whose last record is not read yet
        mark = (self.name, self.folder, self.offset, self.units)  # where that unit starts
        inside = False  # the last record read continues its unit
        begun: Start = (self.number, self.part, self.offset)  # where that unit started
        while True:
            if self.name is None:
                first = self._next()
                if first is None:
                    return batches, None
                if _beyond(first[0], limit):
                    os.close(first[2])
                    return batches, None
                self._enter(*first)
                mark = (self.name, self.folder, 0, 0)
            # The limit names an appended segment; a compaction output with that number
            # replaced it whole (it was sealed), so it is read to its end.
            last = limit is not None and self.number >= limit[0] and not self.part
            size = os.fstat(self.fd).st_size
            # No segment can be larger than the limit: what lies past it is read as
            # neither records nor data (a torn tail in the newest segment, damage in any
            # other), so a huge or sparse file costs no more than a full segment.
            over = self.max_bytes is not None and size > self.max_bytes
            if self.max_bytes is not None:
                size = min(size, self.max_bytes)
            if last and limit is not None and limit[1] is not None:
                size = min(size, limit[1])
            want = _CHUNK
            hinted = not pending and self._from_hint(size, emit, starts)
            if hinted:
                start, data, dec = size, b"", Decoded(stop=0)
                mark = (self.name, self.folder, self.offset, self.units)
            while not hinted:  # one chunk at a time: memory stays bounded, whatever the file
                start = self.offset
                data = os.pread(self.fd, min(want, size - start), start) if size > start else b""
                at_end = start + len(data) >= size or len(data) < want
                dec = self.codec.decode(data, self.refs, start)
                for ops, end, units, more in zip(dec.batches, dec.ends, dec.units, dec.more,
                                                 strict=True):
                    if not inside:
                        begun = (self.number, self.part, self.offset)
                    inside = more
                    if more:
                        pending += ops_of(ops)
                    else:
                        batch = pending + ops_of(ops) if pending else ops
                        emit(batch)
                        pending = []
                        if starts is not None:
                            starts.append(begun)
                        if not begun[1]:
                            self.position = (begun[0], begun[2], len(batch.keys)
                                             if isinstance(batch, Puts) else len(batch))
                    self.offset = start + end
                    self.units += units
                    if not more:
                        mark = (self.name, self.folder, self.offset, self.units)
                if at_end or not dec.problem:
                    if at_end:
                        break
                    want = _CHUNK
                elif dec.stop == 0:
                    # Stopped at the chunk's first record: it needs more bytes than the
                    # chunk holds, or it is bad and the verdict (torn or damage) needs
                    # the rest of the segment.
                    want = max(dec.need, 2 * len(data)) if dec.need else size - start
                else:
                    want = max(_CHUNK, dec.need)
            if over and not dec.problem and self.offset == self.max_bytes:
                dec = Decoded(stop=len(data), torn=True, problem="the file runs past "
                              f"max_segment_bytes ({self.max_bytes} bytes): not a record")
            nxt = None if last else self._next()
            beyond = nxt is not None and _beyond(nxt[0], limit)
            if nxt is not None and (dec.problem or beyond):
                os.close(nxt[2])
            if dec.problem and not (nxt is None and dec.torn):
                raise self._damage(start, data, dec.stop, dec.problem)
            if dec.problem or nxt is None or beyond:
                torn = dec.problem != "" or bool(pending)
                if pending:
                    self._rewind(*mark)
                return batches, (self.offset if torn else None)
            self._enter(*nxt)

    def _from_hint(self, size: int, emit: Callable[[Batch], None], starts: list[Start] | None
                   ) -> bool:
        """Read the whole current segment from its hint (hints.py) when it is a
        compaction output entered at its start, the view keeps values in the files,
        and a hint that checks out exists: True, and the cursor is at its end."""
        if not (self.part and self.offset == 0 and self.refs is not None
                and self.folder == self.path and self.name is not None):
            return False
        loaded = hints.load(self.path, self.name, self.number, self.part, self.fd, self.refs,
                            self.max_bytes, self.only)
        if loaded is None:
            return False
        emit(loaded[0])
        if starts is not None:
            starts.append((self.number, self.part, 0))
        self.offset, self.units = size, loaded[1]
        return True

    def mark(self) -> Mark:
        """The position, for ``restore``."""
        return self.name, self.folder, self.offset, self.units, self.position

    def restore(self, mark: Mark) -> None:
        """Go back to a position ``mark`` returned (NeedReload if its file is gone)."""
        name, folder, offset, units, position = mark
        if name is None:
            self.close()
            self.name, self.folder, self.offset, self.units = None, self.path, 0, 0
            self.number = self.part = 0
        else:
            self._rewind(name, folder, offset, units)
        self.position = position

    def _rewind(self, name: str | None, folder: str, offset: int, units: int) -> None:
        """Go back to the start of an unfinished unit, maybe in an earlier segment."""
        if name != self.name:
            assert name is not None
            self._enter(name, folder, self._open(folder, name))
        self.offset, self.units = offset, units

    def _damage(self, start: int, data: bytes, stop: int, problem: str) -> CorruptionError:
        file = os.path.join(self.folder, self.name or "")
        offset = start + stop
        where = f"offset {offset}"
        if self.codec.name == "text":
            line = os.pread(self.fd, start, 0).count(b"\n") + data[:stop].count(b"\n") + 1
            where += f" (line {line})"
        return CorruptionError(f"{file}: damaged record at {where}: {problem}", file, offset)

    # --- writer side (writer lock held) ---

    def truncate(self, offset: int) -> None:
        """Cut a torn tail so the next record starts on a clean boundary: the rest of
        this segment and any later segment (holding the rest of an unfinished unit)."""
        later = [n for n in list_segments(self.path) if self.name and n > self.name]
        for name in reversed(later):  # newest first: a reader listing never sees a gap
            os.unlink(os.path.join(self.path, name))
        if later:
            fsync_dir(self.path)
        os.ftruncate(self.fd, offset)
        self.offset = offset

    def append(self, data: bytes, units: int) -> None:
        n = os.pwrite(self.fd, data, self.offset)
        while n < len(data):  # a short write: rare, but legal
            data = data[n:]
            self.offset += n
            n = os.pwrite(self.fd, data, self.offset)
        self.offset += n
        self.units += units

    def rotate(self) -> None:
        """Seal the current segment (fsync: sealed segments are always whole) and start
        the next one, its directory entry fsynced before any record goes in."""
        if self.fd >= 0:
            os.fsync(self.fd)
        name = segment_name(self.number + 1)
        try:
            self._enter(name, self.path, self._open(self.path, name, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            raise Error(f"{os.path.join(self.path, name)}: segment exists but was not "
                        "found while catching up; the directory changed under the lock") from None
        fsync_dir(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
