"""Hint files: a compaction output's keys and where its values are, so open reads keys only.

Compaction writes, next to each output segment, a hint ``.mpkv/hints/<output name>``:
every key of the output in order, with its value when the value is small (at most
``keydir.INLINE_MAX`` encoded bytes, what the view keeps inline) and otherwise the
value's location in the output (offset, length, CRC-32 of its bytes, str or bytes). A
reader that enters the output at its start loads the hint instead of replaying the
output: a few C-level operations on columns, and the values stay in the file, read on
``get`` through the shared map of keydir.py (their CRC checked there).

A hint is a cache. It is bound to the exact file it describes (name, size, inode and
modification time, as ``fstat`` of the reader's own descriptor of the output reports
them) and covered by a CRC-32; anything that does not check out, a missing hint
included, only means the output is replayed as without hints. Nothing here raises for
a bad hint. The byte layout is in docs/format.md, "Hint files".
"""

from __future__ import annotations

import operator
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import compress, repeat
from operator import itemgetter
from typing import Any

from .codec import BYTES_VALUE, STR_VALUE, Puts, Spans, Value, _slices
from .errors import FormatError
from .files import check_dir, make_dir, open_dir, open_regular, write_temp
from .keydir import ValueFile

#: The folder of the hints, in the store's ``.mpkv/``.
HINTS = "hints"
MAGIC = b"mpkvhint"
VERSION = 1
#: magic, version, flags, inline_max; output number and part; its size, st_ino,
#: st_mtime_ns and size in the limit's units; counts: keys, inline str values, inline
#: bytes values, values in the output; bytes of the key blob, the str blob and the
#: bytes blob.
HEAD = struct.Struct("<8sIIIQIQQqQIIIIQQQ")
#: Flag: the key blob holds the keys joined by U+0000 (none contains it), so a reader
#: splits it in one call, several times faster than cutting it by lengths.
KEYS_JOINED = 1
#: Kinds of an entry: the value inline (str, bytes) or in the output (str, bytes).
INLINE_STR, INLINE_BYTES, FILE_STR, FILE_BYTES = 1, 2, 3, 4
_STR_KINDS = (INLINE_STR, FILE_STR)  # by "is the value in the file"
_VALID_KINDS = bytes([INLINE_STR, INLINE_BYTES, FILE_STR, FILE_BYTES])
#: kinds of the in-file entries, as ``keydir.ValueFile`` counts them
_FILE_KIND = bytes.maketrans(bytes([FILE_STR, FILE_BYTES]), bytes([STR_VALUE, BYTES_VALUE]))
_TMP_PREFIX = ".hint-"
#: What ``read`` says when there is no hint, and how it starts saying that a hint
#: belongs to another file (stale, not damaged).
MISSING = "missing"
STALE = "describes another"


def file_kinds(kinds: bytes) -> bytes:
    """``STR_VALUE`` or ``BYTES_VALUE`` for each value in the output, from the hint
    kinds of all items (the inline ones dropped)."""
    return kinds.translate(_FILE_KIND, bytes([INLINE_STR, INLINE_BYTES]))


def hint_path(path: str, name: str) -> str:
    return os.path.join(path, ".mpkv", HINTS, name)


def max_hint_bytes(size: int) -> int:
    """The largest hint an output of ``size`` bytes can have: an entry costs at most 21
    bytes more than its key and inline value, and the record holding them at least 4."""
    return HEAD.size + 4 + 6 * size + 64


class Builder:
    """One output's hint, collected while the output is written (compaction).

    An output can hold millions of small values: they are kept as one UTF-8 (or bytes)
    blob per record and a column of lengths, not as an object each, and ``encode``
    returns the hint in pieces, so the hint costs about its own size in memory once."""

    def __init__(self, inline_max: int) -> None:
        self.inline_max = inline_max
        self.keys: list[str] = []  # the compaction state's own key objects
        self.kinds = bytearray()
        self.strs: list[bytes] = []  # per record: its inline str values, as UTF-8
        self.str_lengths = array("I")  # code points of each inline str value
        self.raws: list[bytes] = []  # per record: its inline bytes values, joined
        self.raw_lengths = array("I")
        self.offsets = array("Q")
        self.lengths = array("I")
        self.crcs = array("I")

    def add(self, record: bytes, base: int, items: list[tuple[str, Value]],
            spans: Spans) -> None:
        """The items of one record, written at offset ``base`` of the output, whose
        values ``spans`` locates in ``record``."""
        values = list(map(itemgetter(1), items))
        big = list(map(self.inline_max.__lt__, spans.sizes))
        if not all(map(isinstance, values, repeat(str))):
            self._add_mixed(record, base, values, big, spans)
        else:  # the common case, with no Python code per item
            self.kinds += bytes(map(_STR_KINDS.__getitem__, big))
            small: list[str] = list(compress(values, map(operator.not_, big)))
            self.strs.append("".join(small).encode("utf-8"))
            self.str_lengths.extend(map(len, small))
            starts = array("I", compress(spans.starts, big))
            lengths = array("I", compress(spans.sizes, big))
            self.offsets.extend(map(base.__add__, starts))
            self.lengths.extend(lengths)
            self.crcs.extend(map(zlib.crc32, map(memoryview(record).__getitem__,
                                                 map(slice, starts, map(operator.add, starts,
                                                                        lengths)))))
        self.keys += map(itemgetter(0), items)

    def _add_mixed(self, record: bytes, base: int, values: list[Value], big: list[bool],
                   spans: Spans) -> None:
        view = memoryview(record)
        strs: list[str] = []
        raws: list[bytes] = []
        for value, start, size, out in zip(values, spans.starts, spans.sizes, big,
                                           strict=True):
            is_str = isinstance(value, str)
            if out:
                self.kinds.append(FILE_STR if is_str else FILE_BYTES)
                self.offsets.append(base + start)
                self.lengths.append(size)
                self.crcs.append(zlib.crc32(view[start : start + size]))
            elif is_str:
                self.kinds.append(INLINE_STR)
                strs.append(value)  # type: ignore[arg-type]
            else:
                self.kinds.append(INLINE_BYTES)
                raws.append(value)  # type: ignore[arg-type]
        self.strs.append("".join(strs).encode("utf-8"))
        self.str_lengths.extend(map(len, strs))
        self.raws.append(b"".join(raws))
        self.raw_lengths.extend(map(len, raws))

    def encode(self, number: int, part: int, st: os.stat_result, units: int) -> list[bytes]:
        """The hint of output ``number.part``, whose ``fstat`` after its last write is
        ``st``, and which holds ``units`` size units: its bytes in pieces, in order."""
        ktext = "\0".join(self.keys)
        flags = KEYS_JOINED
        if ktext.count("\0") != max(len(self.keys) - 1, 0):  # a key holds U+0000
            ktext, flags = "".join(self.keys), 0
        kblob = ktext.encode("utf-8")
        del ktext
        columns = [array("I", map(len, self.keys)), self.str_lengths, self.raw_lengths,
                   self.offsets, self.lengths, self.crcs]
        if sys.byteorder == "big":
            columns = [array(c.typecode, c) for c in columns]
            for column in columns:
                column.byteswap()
        head = HEAD.pack(MAGIC, VERSION, flags, self.inline_max, number, part, st.st_size,
                         st.st_ino, st.st_mtime_ns, units, len(self.keys),
                         len(self.str_lengths), len(self.raw_lengths), len(self.offsets),
                         len(kblob), sum(map(len, self.strs)), sum(map(len, self.raws)))
        pieces = [head, columns[0].tobytes(), bytes(self.kinds),
                  *(c.tobytes() for c in columns[1:]), kblob, *self.strs, *self.raws]
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        pieces.append(struct.pack("<I", crc))
        return pieces


def write(path: str, name: str, data: bytes | list[bytes]) -> None:
    """Put hint ``data`` in place for output ``name`` (temporary file, rename; no fsync:
    a hint lost in a crash only means replay). Errors are ignored for the same reason
    (a full disk, or a folder that is not a real directory)."""
    folder = os.path.join(path, ".mpkv", HINTS)
    try:
        make_dir(folder)
        tmp = write_temp(folder, _TMP_PREFIX, data, durable=False)
        try:
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            os.unlink(tmp)
            raise
    except (OSError, FormatError):
        pass


def names(path: str) -> list[str]:
    """Every file in the hints folder (hints and leftover temporary files)."""
    try:
        fd = open_dir(os.path.join(path, ".mpkv", HINTS))
    except (OSError, FormatError):
        return []
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def remove(path: str, names: list[str]) -> None:
    """Delete these hints (or temporary files), through a descriptor of the folder: a
    link put in its place cannot make this delete anything elsewhere."""
    if not names:
        return
    try:
        fd = open_dir(os.path.join(path, ".mpkv", HINTS))
    except FileNotFoundError:
        return
    try:
        for name in names:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


@dataclass
class Hint:
    """A hint read and checked on its own (``parse``): its header and columns."""

    inline_max: int
    number: int
    part: int
    size: int
    ino: int
    mtime_ns: int
    units: int
    keys: list[str]
    kinds: bytes
    strs: list[str]
    raws: list[bytes]
    offsets: array[int]
    lengths: array[int]
    crcs: array[int]

    def locations(self) -> Iterator[tuple[int, int, int, int]]:
        """``(offset, length, crc, kind)`` of each value in the output, in key order."""
        return zip(self.offsets, self.lengths, self.crcs, self.file_kinds(), strict=True)

    def file_kinds(self) -> bytes:
        """``STR_VALUE`` or ``BYTES_VALUE`` for each value in the output, in key order."""
        return file_kinds(self.kinds)

    def values(self, in_file: Iterable[Any]) -> list[Any]:
        """The values in key order: the inline ones, and the next of ``in_file`` in
        place of each value in the output. C-level: no Python code runs per key."""
        if len(self.strs) == len(self.kinds):
            return list(self.strs)
        if len(self.offsets) == len(self.kinds):
            return list(in_file)
        rest = iter(in_file)
        sources = (None, iter(self.strs), iter(self.raws), rest, rest)
        return list(map(next, map(sources.__getitem__, self.kinds)))  # type: ignore[arg-type]


def _u32s(data: bytes | memoryview, typecode: str = "I") -> array[int]:
    out = array(typecode)
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out


class _InFile:
    """A blob of a hint left in its file (``parse`` with ``blob``): a slice is read
    when taken."""

    def __init__(self, blob: Callable[[int, int], bytes], start: int, length: int) -> None:
        self.blob, self.start, self.length = blob, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, piece: slice) -> bytes:
        start, stop, _ = piece.indices(self.length)
        return self.blob(self.start + start, max(stop - start, 0))


def parse(data: bytes, only: str | None = None, *, size: int | None = None,
          blob: Callable[[int, int], bytes] | None = None) -> Hint | str:
    """The hint ``data`` holds, or what is wrong with it (a sentence). With ``only``,
    the hint is checked whole but holds the entry of that key alone (or none): a lookup
    of one key in a large hint, without making an object per key.

    With ``blob`` (``only`` and joined keys alone; see ``_read_one``): ``data`` is the
    hint up to its value blobs, ``size`` bytes in all, whose checksum the caller has
    verified, and ``blob(offset, length)`` reads bytes of the hint further on."""
    total = len(data) if blob is None else size
    assert total is not None
    if total < HEAD.size + 4:
        return f"too short for a hint ({total} bytes)"
    if data[:8] != MAGIC:
        return "bad magic (not a hint file)"
    if blob is None and zlib.crc32(memoryview(data)[:-4]) != struct.unpack_from(
            "<I", data, len(data) - 4)[0]:
        return "checksum mismatch"
    (_, version, flags, inline_max, number, part, size, ino, mtime_ns, units, count, nstr,
     nraw, nref, kbytes, sbytes, bbytes) = HEAD.unpack_from(data)
    if version != VERSION:
        return f"unknown hint version {version}"
    if flags & ~KEYS_JOINED:
        return f"unknown flags {flags:#x}"
    if count != nstr + nraw + nref:
        return f"counts do not add up ({count} keys, {nstr} + {nraw} + {nref} values)"
    pos = HEAD.size
    widths = (4 * count, count, 4 * nstr, 4 * nraw, 8 * nref, 4 * nref, 4 * nref,
              kbytes, sbytes, bbytes)
    if pos + sum(widths) + 4 != total:
        return f"the columns its counts announce do not fill its {total} bytes"
    cols: list[Any] = []
    view = memoryview(data)  # columns without copies: a hint can be as large as its output
    for width in widths:
        cols.append(view[pos : pos + width] if pos + width <= len(data) or blob is None
                    else _InFile(blob, pos, width))
        pos += width
    if blob is not None and not (flags & KEYS_JOINED and only is not None):
        return "a hint read in part serves one key's lookup over joined keys alone"
    klens, kinds, slens, blens = _u32s(cols[0]), bytes(cols[1]), _u32s(cols[2]), _u32s(cols[3])
    offsets, lengths, crcs = _u32s(cols[4], "Q"), _u32s(cols[5]), _u32s(cols[6])
    if kinds.translate(None, _VALID_KINDS) or (
            kinds.count(INLINE_STR), kinds.count(INLINE_BYTES)) != (nstr, nraw):
        return "bad value kinds"
    joined = flags & KEYS_JOINED
    # One key's lookup need not decode the str values when they are ASCII (as many
    # bytes as code points): it cuts its value from the bytes.
    lazy = joined and only is not None and sum(slens) == sbytes
    try:
        ktext = str(cols[7], "utf-8")
        stext: str | memoryview = cols[8] if lazy else str(cols[8][:], "utf-8")
    except UnicodeDecodeError:
        return "keys or values are not UTF-8"
    if (sum(klens) + (max(count - 1, 0) if joined else 0) != len(ktext)
            or sum(slens) != len(stext) or sum(blens) != bbytes):
        return "key or value lengths do not match their blobs"
    if joined and only is not None:
        if ktext.count("\0") != max(count - 1, 0):
            return "the key blob does not hold as many keys as the count says"
        return _one(only, ktext, kinds, slens, blens, stext, cols[9], offsets, lengths, crcs,
                    (inline_max, number, part, size, ino, mtime_ns, units))
    assert isinstance(stext, str)
    if joined:
        keys = ktext.split("\0") if count else []
        if len(keys) != count:
            return "the key blob does not hold as many keys as the count says"
    else:
        keys = _slices(ktext, klens)  # type: ignore[assignment]
    hint = Hint(inline_max, number, part, size, ino, mtime_ns, units,
                keys, kinds, _slices(stext, slens),  # type: ignore[arg-type]
                _slices(bytes(cols[9]), blens), offsets, lengths, crcs)  # type: ignore[arg-type]
    return hint if only is None else _filtered(hint, only)  # keys not joined: rare


def _filtered(hint: Hint, only: str) -> Hint:
    """``hint`` with the entry of key ``only`` alone (or none)."""
    try:
        i = hint.keys.index(only)
    except ValueError:
        i = -1
    head = (hint.inline_max, hint.number, hint.part, hint.size, hint.ino, hint.mtime_ns,
            hint.units)
    return _entry(head, only, i, hint.kinds, hint.strs.__getitem__, hint.raws.__getitem__,
                  hint.offsets, hint.lengths, hint.crcs)


def _one(only: str, ktext: str, kinds: bytes, slens: array[int], blens: array[int],
         stext: str | memoryview, bblob: memoryview, offsets: array[int],
         lengths: array[int], crcs: array[int],
         head: tuple[int, int, int, int, int, int, int]) -> Hint | str:
    """The entry of key ``only`` in a hint whose keys ``ktext`` holds joined by U+0000,
    found with C-level searches and counts: no object per key. ``stext`` is the str
    values, or their bytes when those are ASCII."""
    i = -1
    if "\0" not in only and kinds:  # no keys: the padded blob "\0\0" is no empty key
        at = ("\0" + ktext + "\0").find("\0" + only + "\0")
        i = ktext.count("\0", 0, at) if at >= 0 else -1

    def str_at(n: int) -> str:
        start = sum(slens[:n])
        piece = stext[start : start + slens[n]]
        return piece if isinstance(piece, str) else str(piece, "utf-8")

    def raw_at(n: int) -> bytes:
        start = sum(blens[:n])
        return bytes(bblob[start : start + blens[n]])

    try:
        return _entry(head, only, i, kinds, str_at, raw_at, offsets, lengths, crcs)
    except UnicodeDecodeError:
        return "keys or values are not UTF-8"


def _entry(head: tuple[int, int, int, int, int, int, int], key: str, i: int, kinds: bytes,
           str_at: Callable[[int], str], raw_at: Callable[[int], bytes],
           offsets: array[int], lengths: array[int], crcs: array[int]) -> Hint:
    """A hint holding entry ``i`` (of key ``key``) alone, or none when ``i`` is -1.
    ``str_at(n)`` and ``raw_at(n)`` give the n-th inline str and bytes value."""
    if i < 0:
        return Hint(*head, [], b"", [], [], array("Q"), array("I"), array("I"))
    kind = kinds[i]
    nstr, nraw = kinds.count(INLINE_STR, 0, i), kinds.count(INLINE_BYTES, 0, i)
    j = i - nstr - nraw  # its index among the values in the output
    in_file = kind in (FILE_STR, FILE_BYTES)
    return Hint(*head, [key], bytes([kind]),
                [str_at(nstr)] if kind == INLINE_STR else [],
                [raw_at(nraw)] if kind == INLINE_BYTES else [],
                offsets[j : j + 1] if in_file else array("Q"),
                lengths[j : j + 1] if in_file else array("I"),
                crcs[j : j + 1] if in_file else array("I"))


#: Bytes of a hint's value blobs read at a time for their checksum when one key's
#: entry is wanted (``_read_one``).
_STREAM = 1 << 20


def _read_one(hfd: int, size: int, only: str) -> Hint | str | None:
    """``parse`` of the whole hint for key ``only``, without holding the whole hint:
    most of a hint of small values is its value blobs, which only pass through a
    buffer of ``_STREAM`` bytes for the checksum; the one value wanted is read again
    after. (A hint rewritten in place meanwhile could give that value unchecked: only
    a hostile writer does that, and it could as well forge a hint with a valid
    checksum.) None when the hint is not one of joined keys, or its header does not
    add up: then the whole hint is read and ``parse`` says what is wrong."""
    head = os.pread(hfd, HEAD.size, 0)
    if len(head) < HEAD.size or head[:8] != MAGIC:
        return None
    fields = HEAD.unpack(head)
    flags, sbytes, bbytes = fields[2], fields[15], fields[16]
    end = size - 4  # where the checksum starts
    prefix = end - sbytes - bbytes  # the header, the columns and the keys
    if not flags & KEYS_JOINED or prefix < HEAD.size:
        return None
    data = os.pread(hfd, prefix, 0)
    if len(data) != prefix:
        return "the file ends early"
    crc = zlib.crc32(data)
    buf = memoryview(bytearray(max(min(_STREAM, end - prefix), 1)))
    at = prefix
    while at < end:
        got = os.preadv(hfd, [buf[: min(len(buf), end - at)]], at)
        if got <= 0:
            return "the file ends early"
        crc = zlib.crc32(buf[:got], crc)
        at += got
    tail = os.pread(hfd, 4, end)
    if len(tail) != 4 or struct.unpack("<I", tail)[0] != crc:
        return "checksum mismatch"

    def blob(at: int, n: int) -> bytes:
        piece = os.pread(hfd, n, at)
        if len(piece) != n:  # cut since the checksum was read: not the hint it was
            raise OSError(f"the hint was cut to {at + len(piece)} bytes while read")
        return piece

    return parse(data, only, size=size, blob=blob)


def read(path: str, name: str, number: int, part: int, fd: int,
         max_bytes: int | None = None, only: str | None = None) -> Hint | str:
    """The hint of output ``name`` (``number.part``) open at ``fd``, checked against
    that file: the hint (with ``only``: that key's entry alone), or which check failed."""
    file = hint_path(path, name)
    try:
        if not check_dir(os.path.dirname(file)):
            return MISSING
        hfd = open_regular(file, os.O_RDONLY)
    except FileNotFoundError:
        return MISSING
    except (OSError, FormatError) as exc:
        return f"unreadable: {exc}"
    try:
        st = os.fstat(fd)
        cap = max_hint_bytes(st.st_size)
        hsize = os.fstat(hfd).st_size
        if hsize > cap:
            return f"larger ({hsize} bytes) than any hint of its output"
        hint = None if only is None else _read_one(hfd, hsize, only)
        if hint is None:
            hint = parse(os.pread(hfd, cap + 1, 0), only)
    except OSError as exc:
        return f"unreadable: {exc}"
    finally:
        os.close(hfd)
    if isinstance(hint, str):
        return hint
    if (hint.number, hint.part) != (number, part):
        return f"{STALE} output (number {hint.number}, part {hint.part})"
    if (hint.size, hint.ino, hint.mtime_ns) != (st.st_size, st.st_ino, st.st_mtime_ns):
        return (f"{STALE} file than its output (size, inode or modification time "
                "differ: the output was rewritten or copied)")
    if max_bytes is not None and st.st_size > max_bytes:
        return "its output is larger than a segment can be"
    if not (st.st_size // 4 <= hint.units <= st.st_size):
        return f"bad size in units ({hint.units})"
    # The largest offset plus the largest length bounds every end (two C-level passes);
    # only past that bound is each end worth computing.
    if hint.offsets and max(hint.offsets) + max(hint.lengths) > st.st_size and max(
            map(operator.add, hint.offsets, hint.lengths)) > st.st_size:
        return "a value location lies past the end of the output"
    return hint


def load(path: str, name: str, number: int, part: int, fd: int, refs: ValueFile,
         max_bytes: int | None, only: str | None = None) -> tuple[Puts, int] | None:
    """The state output ``name`` (open at ``fd``) holds, from its hint, and its size in
    units; None when there is no hint that checks out (then replay the output). Values
    in the file are noted in ``refs``: the batch holds their handles. With ``only``, the
    state of that key alone."""
    hint = read(path, name, number, part, fd, max_bytes, only)
    if isinstance(hint, str) or hint.inline_max != refs.inline_max:
        return None
    handles = refs.extend(hint.offsets, hint.lengths, hint.crcs,
                          hint.file_kinds()) if hint.offsets else range(0)
    return Puts(hint.keys, hint.values(handles)), hint.units
