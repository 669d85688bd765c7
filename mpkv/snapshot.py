"""The single-file snapshot format of ``serialize``/``deserialize``.

Layout: ``b"MPKVSNAP"``, u32 version, u64 entry count, (version 2) u8 serializer,
the entries (u8 type 1=str 2=bytes, u32 key length, u32 value length, key UTF-8,
value), then a u32 CRC-32 of every byte before it. Self-describing and checked end to
end: values are stored encoded, so the file says which serializer encoded them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import NamedTuple

from .codec import Value
from .errors import CorruptionError, FormatError
from .files import write_atomically
from .serializer import Serializer

MAGIC = b"MPKVSNAP"
VERSION = 2  # 2 added the serializer byte; version 1 files are still read
_HEAD = struct.Struct("<8sIQ")
_SERIALIZER = struct.Struct("<B")
_ENTRY = struct.Struct("<BII")
SERIALIZER_CODES = {"raw": 0, "json": 1}


def encode(items: Mapping[str, Value], serializer: str = "raw") -> bytes:
    """``items`` hold encoded values, as the log does; ``serializer`` names the encoding."""
    parts = [_HEAD.pack(MAGIC, VERSION, len(items)),
             _SERIALIZER.pack(SERIALIZER_CODES[serializer])]
    for key, value in items.items():
        k = key.encode("utf-8")
        v, kind = (value.encode("utf-8"), 1) if isinstance(value, str) else (value, 2)
        parts += (_ENTRY.pack(kind, len(k), len(v)), k, v)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class Snapshot(NamedTuple):
    items: dict[str, Value]
    #: the serializer that encoded the values; None for a version 1 file (not recorded)
    serializer: str | None


def decode(data: bytes, file: str) -> Snapshot:
    if len(data) < _HEAD.size + 4 or data[:8] != MAGIC:
        raise FormatError(f"{file}: not an mpkv snapshot (bad magic)")
    _, version, count = _HEAD.unpack_from(data)
    if version not in (1, VERSION):
        raise FormatError(f"{file}: unsupported snapshot version {version}")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise CorruptionError(f"{file}: snapshot checksum mismatch", file, len(data) - 4)
    out: dict[str, Value] = {}
    pos, end = _HEAD.size, len(data) - 4
    serializer = None
    if version >= 2:
        if end - pos < _SERIALIZER.size:
            raise CorruptionError(f"{file}: snapshot header cut short", file, pos)
        (code,) = _SERIALIZER.unpack_from(data, pos)
        names = {c: n for n, c in SERIALIZER_CODES.items()}
        if code not in names:
            raise FormatError(f"{file}: unknown serializer code {code} at offset {pos}")
        serializer = names[code]
        pos += _SERIALIZER.size
    try:
        for _ in range(count):
            kind, klen, vlen = _ENTRY.unpack_from(data, pos)
            pos += _ENTRY.size
            key = data[pos : pos + klen].decode("utf-8")
            raw = data[pos + klen : pos + klen + vlen]
            pos += klen + vlen
            if pos > end or kind not in (1, 2):
                raise ValueError(f"bad entry ending at offset {pos}")
            out[key] = raw.decode("utf-8") if kind == 1 else raw
    except (struct.error, ValueError) as exc:
        raise CorruptionError(f"{file}: malformed snapshot: {exc}", file, pos) from None
    if pos != end:
        raise CorruptionError(f"{file}: {end - pos} stray bytes after the entries", file, pos)
    return Snapshot(out, serializer)


def read(file: str) -> Snapshot:
    """The state a snapshot file holds (FormatError/CorruptionError when it is not one)."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise FormatError(f"{file}: a directory, not a snapshot file") from None
    return decode(data, file)


def read_for(file: str, serializer: Serializer) -> dict[str, Value]:
    """The items of snapshot ``file`` for a store whose values ``serializer`` encodes:
    ValueError when the file records another serializer, TypeError/ValueError when a
    value of a file that records none (version 1) is not one this serializer made."""
    snap = read(file)
    if snap.serializer is not None and snap.serializer != serializer.name:
        raise ValueError(f"{file}: the snapshot's values were encoded by serializer "
                         f"{snap.serializer!r}, this store's is {serializer.name!r}")
    if snap.serializer is None and not serializer.identity:
        for key, value in snap.items.items():
            if not isinstance(value, str):
                raise TypeError(f"{file}: value of {key!r} is bytes, not text this store's "
                                f"serializer {serializer.name!r} could have written")
            serializer.decode(value)  # ValueError when it is not what the serializer writes
    return snap.items


def write(file: str, data: bytes) -> None:
    """Write a snapshot to ``file`` atomically (old file or whole new one, even after a
    crash), mode 0666 minus the umask. ``file`` is the path the user named, so a
    symbolic link there is followed on purpose, like a shell's ``>``: the file it points
    to is replaced and the link stays (a dangling link gets its target created)."""
    write_atomically(file, data, follow_link=True)
