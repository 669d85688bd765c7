"""The single-file snapshot format of ``serialize``/``deserialize``.

Layout: ``b"MPKVSNAP"``, u32 version, u64 entry count, the entries (u8 type 1=str
2=bytes, u32 key length, u32 value length, key UTF-8, value), then a u32 CRC-32 of
every byte before it. Self-describing and checked end to end.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

from .codec import Value
from .errors import CorruptionError, FormatError
from .files import write_atomically

MAGIC = b"MPKVSNAP"
VERSION = 1
_HEAD = struct.Struct("<8sIQ")
_ENTRY = struct.Struct("<BII")


def encode(items: Mapping[str, Value]) -> bytes:
    parts = [_HEAD.pack(MAGIC, VERSION, len(items))]
    for key, value in items.items():
        k = key.encode("utf-8")
        v, kind = (value.encode("utf-8"), 1) if isinstance(value, str) else (value, 2)
        parts += (_ENTRY.pack(kind, len(k), len(v)), k, v)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes, file: str) -> dict[str, Value]:
    if len(data) < _HEAD.size + 4 or data[:8] != MAGIC:
        raise FormatError(f"{file}: not an mpkv snapshot (bad magic)")
    _, version, count = _HEAD.unpack_from(data)
    if version != VERSION:
        raise FormatError(f"{file}: unsupported snapshot version {version}")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise CorruptionError(f"{file}: snapshot checksum mismatch", file, len(data) - 4)
    out: dict[str, Value] = {}
    pos, end = _HEAD.size, len(data) - 4
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
    return out


def read(file: str) -> dict[str, Value]:
    """The state a snapshot file holds (FormatError/CorruptionError when it is not one)."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise FormatError(f"{file}: a directory, not a snapshot file") from None
    return decode(data, file)


def write(file: str, data: bytes) -> None:
    """Write a snapshot to ``file`` atomically (old file or whole new one, even after a
    crash), mode 0666 minus the umask. ``file`` is the path the user named, so a
    symbolic link there is followed on purpose, like a shell's ``>``: the file it points
    to is replaced and the link stays (a dangling link gets its target created)."""
    write_atomically(file, data, follow_link=True)
