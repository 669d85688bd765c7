"""Record codecs: how operations become bytes in a segment, and back.

Two codecs share one interface. ``binary`` frames every record with its length and a
CRC-32 so a torn or damaged record is always detected; ``text`` is the exact
human-readable log of the original problem (``P|key|value\\n``, ``D|key\\n``), which has
no framing beyond the newline. See docs/format.md for the byte layout.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, Union

Value = Union[str, bytes]
#: One mutation: ``(key, value)``, value ``None`` for a delete. Decoding with ``refs``
#: gives an int handle (keydir.py) in place of a value kept in the file; only the
#: store's view, typed for it, ever holds such ops.
Op = tuple[str, Union[Value, None]]
#: What a value kept in its file is: its ``kind`` for ``Refs.add``.
STR_VALUE, BYTES_VALUE = 1, 2


def _handle(handle: int) -> Value:
    """A handle where a value goes in an op: see ``Op``."""
    return handle  # type: ignore[return-value]


class Refs(Protocol):
    """Where a reader keeps the values it leaves in the file (keydir.ValueFile)."""

    #: values of more encoded bytes than this are left in the file
    inline_max: int

    def add(self, offset: int, length: int, crc: int, kind: int) -> int:
        """Note the value of ``length`` bytes at ``offset`` of the file; its handle."""
        ...

    def next_handle(self) -> int:
        """The handle the next value noted will get."""
        ...

    def extend(self, offsets: Iterable[int], lengths: Iterable[int], crcs: Iterable[int],
               kinds: bytes) -> range:
        """Note many values at once; their handles, in order."""
        ...


class Spans(NamedTuple):
    """Where an encoded state record keeps its values: for each item it holds, in order,
    the value's byte offset in the record and its length in bytes (UTF-8 for str)."""

    starts: array[int]
    sizes: array[int]


class Puts(NamedTuple):
    """Puts of distinct keys in two columns (compaction output): applies at C speed."""

    keys: list[str]
    values: list[Value]


#: The ops of one atomic unit, in order.
Batch = Union[list[Op], Puts]


class Encoded(NamedTuple):
    """A record of encoded live state: its bytes, size units, the items it holds, and
    (when asked for) where their values are in it."""

    data: bytes
    units: int
    items: list[tuple[str, Value]]
    spans: Spans | None


def ops_of(batch: Batch) -> list[Op]:
    return list(zip(batch.keys, batch.values, strict=True)) if isinstance(batch, Puts) else batch


def apply(view: dict[str, Any], batch: Batch) -> None:
    """Apply one unit to a state, in order."""
    if isinstance(batch, Puts):
        view.update(zip(batch.keys, batch.values, strict=True))
        return
    for key, value in batch:
        if value is None:
            view.pop(key, None)
        else:
            view[key] = value


@dataclass
class Decoded:
    """What a codec found in a buffer: complete records, and where (if) it stopped early."""

    batches: list[Batch] = field(default_factory=list)
    #: end offset (in the buffer) of each batch, so readers can stop at any record boundary
    ends: list[int] = field(default_factory=list)
    #: size units (bytes, or characters for text) of each batch
    units: list[int] = field(default_factory=list)
    #: per batch: True when its atomic unit continues in the next record
    more: list[bool] = field(default_factory=list)
    #: offset of the first byte not decoded, == len(buf) when all was decoded
    stop: int = 0
    #: why decoding stopped before the end: "" when it did not
    problem: str = ""
    #: True when the stop can be a torn tail (an append cut short): nothing valid follows
    torn: bool = False
    #: bytes from ``stop`` the record there needs, when it runs past the end of the
    #: buffer (0 otherwise): a reader of a chunk reads that much and decodes again
    need: int = 0


class Codec:
    """Interface of a record codec."""

    name = ""

    def check(self, key: object, value: object, *, delete: bool = False) -> None:
        """Raise TypeError/ValueError for a key or value this format cannot store."""
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        if not delete and not isinstance(value, (str, bytes)):
            raise TypeError(f"value must be str or bytes, not {type(value).__name__}")

    def encode(self, ops: list[Op], limit: int = 2**32) -> list[tuple[bytes, int]]:
        """Encode ops as records ``(bytes, size units)``, each within ``limit`` units when
        possible (a record over it means one op alone is too big). Binary records of one
        call form one atomic unit. ValueError for text UTF-8 cannot encode (surrogates)."""
        try:
            return self._encode(ops, limit)
        except UnicodeEncodeError as exc:
            raise ValueError(f"key or value is not encodable as UTF-8: {exc}") from None

    def _encode(self, ops: list[Op], limit: int) -> list[tuple[bytes, int]]:
        raise NotImplementedError

    def encode_state(self, items: Iterable[tuple[str, Value]], limit: int,
                     spans: bool = False) -> Iterator[Encoded]:
        """Encode live state (distinct keys, puts only) in the form fastest to read back,
        the items in order. Records come as the items do: about ``_PACKED_TARGET``
        bytes of items at a time are held, so a caller streaming items from files holds
        no more of them. With ``spans``, each record says where its values are (a hint
        file is made of them, hints.py)."""
        chunk: list[tuple[str, Value]] = []
        size = 0
        for item in items:
            chunk.append(item)
            size += len(item[0]) + len(item[1])
            if size >= _PACKED_TARGET:
                yield from self._state_records(chunk, limit, spans)
                chunk, size = [], 0
        if chunk:
            yield from self._state_records(chunk, limit, spans)

    def _state_records(self, items: list[tuple[str, Value]], limit: int, spans: bool
                       ) -> list[Encoded]:
        """Records of ``items`` (about ``_PACKED_TARGET`` bytes of them)."""
        return self._one_per_item(items, limit, spans)

    def _one_per_item(self, items: list[tuple[str, Value]], limit: int, spans: bool
                      ) -> list[Encoded]:
        """One record per put (the codec's records of single ops)."""
        records = self.encode(list[Op](items), limit)
        assert len(records) == len(items)
        return [Encoded(data, units, [item], self._op_span(data, item[0]) if spans else None)
                for (data, units), item in zip(records, items, strict=True)]

    def _op_span(self, record: bytes, key: str) -> Spans:
        """Where the value of a record holding the one put of ``key`` is."""
        raise NotImplementedError

    def decode(self, buf: bytes, refs: Refs | None = None, base: int = 0) -> Decoded:
        """Decode every complete, valid record at the start of ``buf``. With ``refs``,
        a value of more than ``refs.inline_max`` encoded bytes is left in the file:
        ``refs.add`` notes it (``buf`` starts at offset ``base`` of the file) and the op
        holds the handle it returns."""
        raise NotImplementedError

    def next_valid(self, buf: bytes, start: int) -> int:
        """Offset of the first valid record after ``start`` (``len(buf)`` if none): where
        reading can resume after damage."""
        raise NotImplementedError

    def single_value(self, record: bytes) -> tuple[int, int, int]:
        """``(offset in the record, length in bytes, kind)`` of the value of a record
        this codec encoded for one put (where a reader finds it, without decoding)."""
        raise NotImplementedError



# --- binary -----------------------------------------------------------------------

HEADER = struct.Struct("<IIB")  # crc32, payload length, record type: how every header starts
#: Framing 2 (store format version 2) follows with these sync bytes and a CRC-32 of the
#: length, type and sync bytes: a length can be trusted before the record is complete.
SYNC = b"\x9d\xe3\x1f"
HEADER_V2 = struct.Struct("<IIB3sI")
ENTRY = struct.Struct("<BII")  # op, key length, value length
_SINGLE = struct.Struct("<IBBII")  # length and type, then the one entry's header (framing 1)
_LTS = struct.Struct("<IB3s")  # framing 2: length, type, sync (what hcrc covers)
_HCRC_ENTRY = struct.Struct("<IBII")  # framing 2: hcrc, then the one entry's header
#: A resync scan checks the checksums of candidate records over at most this many bytes
#: plus twice the data's size: linear in the data, whatever it holds.
_RESYNC_SLACK = 1 << 20
RECORD_OPS = 1  # entries; ends an atomic unit
RECORD_OPS_MORE = 2  # entries; the unit continues in the next record
RECORD_PACKED = 3  # puts of distinct keys in columns (compaction output); ends a unit
PACKED = struct.Struct("<IIII")  # count, key blob, str-value blob, bytes-value blob sizes
_PACKED_TARGET = 1 << 20  # bytes of keys and values per packed record


def _u32s(data: bytes) -> array[int]:
    out = array("I")
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def _slices(text: str | bytes, lengths: Iterable[int]) -> list[str] | list[bytes]:
    """Cut ``text`` into consecutive pieces of the given lengths, at C speed."""
    ends = list(accumulate(lengths))
    return list(map(text.__getitem__, map(slice, [0, *ends[:-1]], ends)))  # type: ignore[return-value]
OP_PUT_STR, OP_PUT_BYTES, OP_DELETE = 1, 2, 3


class BinaryCodec(Codec):
    """Length-prefixed, CRC-32-checked records. A transaction is one record, or, when it
    cannot fit in one segment, a run of records chained by type ``RECORD_OPS_MORE``.

    ``framing`` 2 (stores of format version 2) protects each header with its own
    checksum and sync bytes, so a record cut short by a crash is told from damage by its
    header alone, whatever the values hold; framing 1 (version 1 stores) has neither."""

    name = "binary"

    def __init__(self, framing: int = 2) -> None:
        assert framing in (1, 2)
        self.framing = framing
        self.hsize = HEADER_V2.size if framing == 2 else HEADER.size

    def _head(self, length: int, rtype: int) -> bytes:
        """Bytes 4 to the end of a header (what the record's CRC covers first)."""
        if self.framing == 1:
            return struct.pack("<IB", length, rtype)
        lts = _LTS.pack(length, rtype, SYNC)
        return lts + struct.pack("<I", zlib.crc32(lts))

    def single_value(self, record: bytes) -> tuple[int, int, int]:
        op, klen, vlen = ENTRY.unpack_from(record, self.hsize)
        at = self.hsize + ENTRY.size + klen
        assert op in (OP_PUT_STR, OP_PUT_BYTES) and at + vlen == len(record), "one put"
        return at, vlen, op

    def _head_ok(self, buf: bytes, pos: int) -> bool:
        """Framing 2: the header at ``pos`` (all there) is one a writer wrote."""
        _, _, _, sync, hcrc = HEADER_V2.unpack_from(buf, pos)
        return bool(sync == SYNC and zlib.crc32(memoryview(buf)[pos + 4 : pos + 12]) == hcrc)

    def _encode(self, ops: list[Op], limit: int) -> list[tuple[bytes, int]]:
        if len(ops) == 1 and isinstance(ops[0][1], str):  # the common single put, faster
            k, v = ops[0][0].encode("utf-8"), ops[0][1].encode("utf-8")
            if self.framing == 1:
                body = _SINGLE.pack(ENTRY.size + len(k) + len(v), RECORD_OPS, OP_PUT_STR,
                                    len(k), len(v)) + k + v
            else:
                lts = _LTS.pack(ENTRY.size + len(k) + len(v), RECORD_OPS, SYNC)
                body = b"".join((lts, _HCRC_ENTRY.pack(zlib.crc32(lts), OP_PUT_STR, len(k),
                                                        len(v)), k, v))
            record = struct.pack("<I", zlib.crc32(body)) + body
            return [(record, len(record))]
        chunks: list[list[bytes]] = [[]]
        size = self.hsize
        for key, value in ops:
            k = key.encode("utf-8")
            if value is None:
                entry = ENTRY.pack(OP_DELETE, len(k), 0) + k
            elif isinstance(value, str):
                v = value.encode("utf-8")
                entry = ENTRY.pack(OP_PUT_STR, len(k), len(v)) + k + v
            else:
                entry = ENTRY.pack(OP_PUT_BYTES, len(k), len(value)) + k + value
            if chunks[-1] and size + len(entry) > limit:
                chunks.append([])
                size = self.hsize
            chunks[-1].append(entry)
            size += len(entry)
        records = []
        for i, chunk in enumerate(chunks):
            payload = b"".join(chunk)
            rtype = RECORD_OPS if i == len(chunks) - 1 else RECORD_OPS_MORE
            body = self._head(len(payload), rtype) + payload
            record = struct.pack("<I", zlib.crc32(body)) + body
            records.append((record, len(record)))
        return records

    def _state_records(self, items: list[tuple[str, Value]], limit: int, spans: bool
                       ) -> list[Encoded]:
        return self._packed_within(items, limit, spans)

    def _packed_within(self, items: list[tuple[str, Value]], limit: int, spans: bool
                       ) -> list[Encoded]:
        record = self._encode_packed(items)
        if len(record) <= limit or len(items) == 1:
            if len(record) <= limit:
                return [Encoded(record, len(record), items,
                                self._packed_spans(record, items) if spans else None)]
            return self._one_per_item(items, limit, spans)  # one put, over the limit
        half = len(items) // 2
        return (self._packed_within(items[:half], limit, spans)
                + self._packed_within(items[half:], limit, spans))

    def _op_span(self, record: bytes, key: str) -> Spans:
        start = self.hsize + ENTRY.size + len(key.encode("utf-8"))
        return Spans(array("I", [start]), array("I", [len(record) - start]))

    def _packed_spans(self, record: bytes, items: list[tuple[str, Value]]) -> Spans:
        """Where ``_encode_packed`` put each value: str values are consecutive in their
        blob, bytes values in the next one."""
        n, kl, sl, _ = PACKED.unpack_from(record, self.hsize)
        at = self.hsize + PACKED.size + 9 * n + kl
        values = list(map(itemgetter(1), items))
        sizes = array("I", map(len, values))
        is_str = list(map(isinstance, values, repeat(str)))
        if sum(compress(sizes, is_str)) != sl:  # not all ASCII: sizes in bytes
            sizes = array("I", map(len, map(str.encode, values))) if all(is_str) else array(
                "I", (len(v.encode("utf-8")) if isinstance(v, str) else len(v) for v in values))
        if all(is_str) or not any(is_str):  # one blob: no Python code per value
            return Spans(array("I", accumulate(sizes[:-1], initial=at)), sizes)
        starts = array("I")
        spos, bpos = at, at + sl
        for value, size in zip(values, sizes, strict=True):
            if isinstance(value, str):
                starts.append(spos)
                spos += size
            else:
                starts.append(bpos)
                bpos += size
        return Spans(starts, sizes)

    def _encode_packed(self, items: list[tuple[str, Value]]) -> bytes:
        """Columns: key lengths (code points), value kinds, value lengths (code points
        for str, bytes for bytes), then the keys, str values and bytes values, each
        concatenated: reading back is a few C-level splits instead of a loop per key."""
        keys = [k for k, _ in items]
        kinds = bytes(1 if isinstance(v, str) else 2 for _, v in items)
        klens, vlens = array("I", map(len, keys)), array("I", (len(v) for _, v in items))
        if sys.byteorder == "big":
            klens.byteswap()
            vlens.byteswap()
        kblob = "".join(keys).encode("utf-8")
        sblob = "".join(v for _, v in items if isinstance(v, str)).encode("utf-8")
        bblob = b"".join(v for _, v in items if isinstance(v, bytes))
        payload = b"".join((PACKED.pack(len(items), len(kblob), len(sblob), len(bblob)),
                            klens.tobytes(), kinds, vlens.tobytes(), kblob, sblob, bblob))
        body = self._head(len(payload), RECORD_PACKED) + payload
        return struct.pack("<I", zlib.crc32(body)) + body

    def _packed(self, buf: bytes, pos: int, end: int, refs: Refs | None = None,
                base: int = 0) -> Puts | None:
        if end - pos < PACKED.size:
            return None
        n, kl, sl, bl = PACKED.unpack_from(buf, pos)
        pos += PACKED.size
        if pos + 9 * n + kl + sl + bl != end:
            return None
        klens = _u32s(buf[pos : pos + 4 * n])
        kinds = buf[pos + 4 * n : pos + 5 * n]
        vlens = _u32s(buf[pos + 5 * n : pos + 9 * n])
        pos += 9 * n
        try:
            ktext = buf[pos : pos + kl].decode("utf-8")
            stext = buf[pos + kl : pos + kl + sl].decode("utf-8")
        except UnicodeDecodeError:
            return None
        blob = buf[pos + kl + sl : end]
        nstr = kinds.count(1)
        if sum(klens) != len(ktext) or nstr + kinds.count(2) != n:
            return None
        keys: list[str] = _slices(ktext, klens)  # type: ignore[assignment]
        if nstr == n:
            if sum(vlens) != len(stext) or blob:
                return None
            values: list[Value] = _slices(stext, vlens)  # type: ignore[assignment]
        else:
            slens = [v for v, k in zip(vlens, kinds, strict=True) if k == 1]
            blens = [v for v, k in zip(vlens, kinds, strict=True) if k == 2]
            if sum(slens) != len(stext) or sum(blens) != len(blob):
                return None
            strs, raws = iter(_slices(stext, slens)), iter(_slices(blob, blens))
            values = [next(strs) if k == 1 else next(raws)  # type: ignore[misc]
                      for k in kinds]
        if refs is not None:
            return Puts(keys, self._leave_in_file(values, kinds, buf, pos + kl, sl, refs,
                                                  base))
        return Puts(keys, values)

    @staticmethod
    def _leave_in_file(values: list[Value], kinds: bytes, buf: bytes, at: int, sl: int,
                       refs: Refs, base: int) -> list[Value]:
        """A packed record's values with the large ones replaced by handles: str values
        are consecutive from ``at`` (``sl`` bytes of UTF-8), bytes values follow."""
        limit = refs.inline_max
        out = list(values)
        spos, bpos = at, at + sl
        crc32, view = zlib.crc32, memoryview(buf)
        ascii_only = sum(len(v) for v in values if isinstance(v, str)) == sl
        for i, value in enumerate(values):
            if kinds[i] == STR_VALUE:
                size = len(value) if ascii_only else len(value.encode("utf-8"))  # type: ignore[union-attr]
                if size > limit:
                    out[i] = _handle(refs.add(base + spos, size,
                                              crc32(view[spos : spos + size]), STR_VALUE))
                spos += size
            else:
                size = len(value)
                if size > limit:
                    out[i] = _handle(refs.add(base + bpos, size,
                                              crc32(view[bpos : bpos + size]), BYTES_VALUE))
                bpos += size
        return out

    def _record_end(self, buf: bytes, pos: int) -> tuple[int, str]:
        """End offset of the valid record at ``pos``, or (-1, what is wrong with it)."""
        n = len(buf)
        if n - pos < self.hsize:
            return -1, "incomplete record header"
        crc, length, rtype = HEADER.unpack_from(buf, pos)
        if self.framing == 2 and not self._head_ok(buf, pos):
            return -1, "damaged record header (sync bytes or header checksum)"
        end = pos + self.hsize + length
        if end > n:
            return -1, f"record length {length} runs past the end of the data"
        if zlib.crc32(memoryview(buf)[pos + 4 : end]) != crc:
            return -1, "checksum mismatch"
        if rtype not in (RECORD_OPS, RECORD_OPS_MORE, RECORD_PACKED):
            return -1, f"unknown record type {rtype}"
        return end, ""

    def next_valid(self, buf: bytes, start: int) -> int:
        """The first valid record after ``start``. Candidates are found at C speed (framing
        2: by their sync bytes; 1: by a record type byte) and checked cheapest first; the
        checksums of whole candidates are computed over a bounded number of bytes, so the
        scan is linear in the data. When that budget runs out, the candidate at hand is
        returned: it may be valid (so nothing after ``start`` is taken for a torn tail)."""
        n = len(buf)
        budget = 2 * n + _RESYNC_SLACK
        if self.framing == 2:
            at = 9  # offset of the sync bytes in a header
            found = (m.start() - at for m in re.finditer(re.escape(SYNC), buf[start + 1 + at:]))
            base = start + 1
        else:
            at = 8  # offset of the type byte
            found = (m.start() - at for m in re.finditer(b"[\x01-\x03]", buf[start + 1 + at:]))
            base = start + 1
        for rel in found:
            pos = base + rel + at
            if n - pos < self.hsize or (self.framing == 2 and not self._head_ok(buf, pos)):
                continue
            length = HEADER.unpack_from(buf, pos)[1]
            end = pos + self.hsize + length
            if end > n:
                continue
            budget -= end - pos
            if budget < 0:
                return pos
            if self._record_end(buf, pos)[0] > 0 and self._payload(buf, pos, end) is not None:
                return pos
        return n

    def _torn(self, buf: bytes, pos: int) -> tuple[bool, int]:
        """``(torn, need)`` for a record at ``pos`` that does not decode: can the bytes from
        ``pos`` be a write cut short, and how many bytes would the record need.

        Framing 2: a crash leaves a prefix of what was written, so a partial header, or a
        header that checks out with a length running past the end, is torn whatever the
        bytes hold (a value holding record bytes cannot fool it). A header that checks out
        over a complete record with a bad checksum, or a header that does not check out
        (garbage or zeros: what a power loss can leave) is torn only when no valid record
        follows it. A complete record with a valid checksum is never torn.
        Framing 1: torn when no offset after ``pos`` starts a valid record."""
        n = len(buf)
        if n - pos < self.hsize:
            return True, self.hsize
        length = HEADER.unpack_from(buf, pos)[1]
        need = self.hsize + length if pos + self.hsize + length > n else 0
        if self.framing == 1:
            return self.next_valid(buf, pos) == n, need
        if not self._head_ok(buf, pos):
            return self.next_valid(buf, pos) == n, 0
        if need:
            return True, need
        end = pos + self.hsize + length
        if zlib.crc32(memoryview(buf)[pos + 4 : end]) == HEADER.unpack_from(buf, pos)[0]:
            return False, 0
        return self.next_valid(buf, end - 1) == n, 0

    def _payload(self, buf: bytes, pos: int, end: int, refs: Refs | None = None,
                 base: int = 0) -> Batch | None:
        """The ops of the record at ``pos`` (checksum already verified), None if malformed."""
        if buf[pos + 8] == RECORD_PACKED:
            return self._packed(buf, pos + self.hsize, end, refs, base)
        return self._entries(buf, pos + self.hsize, end, refs, base)

    def _entries(self, buf: bytes, pos: int, end: int, refs: Refs | None = None,
                 base: int = 0) -> list[Op] | None:
        ops: list[Op] = []
        inline_max = refs.inline_max if refs is not None else -1
        # Values left in the file, noted in ``refs`` in one call at the end (a record can
        # hold thousands): the handle of the next is first + count.
        first = refs.next_handle() if refs is not None else 0
        offsets: list[int] = []
        lengths: list[int] = []
        crcs: list[int] = []
        kinds = bytearray()
        view, crc32 = memoryview(buf), zlib.crc32
        try:
            while pos < end:
                op, klen, vlen = ENTRY.unpack_from(buf, pos)
                pos += ENTRY.size
                key = buf[pos : pos + klen].decode("utf-8")
                pos += klen
                if 0 <= inline_max < vlen and op != OP_DELETE and pos + vlen <= end:
                    if op not in (OP_PUT_STR, OP_PUT_BYTES):
                        return None
                    ops.append((key, _handle(first + len(lengths))))
                    offsets.append(base + pos)
                    lengths.append(vlen)
                    crcs.append(crc32(view[pos : pos + vlen]))
                    kinds.append(op)
                    pos += vlen
                    continue
                raw = buf[pos : pos + vlen]
                pos += vlen
                if pos > end or op not in (OP_PUT_STR, OP_PUT_BYTES, OP_DELETE):
                    return None
                if op == OP_DELETE:
                    if vlen:  # a delete has no value: a writer never sets one
                        return None
                    ops.append((key, None))
                elif op == OP_PUT_STR:
                    ops.append((key, raw.decode("utf-8")))
                else:
                    ops.append((key, raw))
        except (struct.error, UnicodeDecodeError):
            return None
        if lengths:  # only for a record that decoded whole: a bad one notes nothing
            assert refs is not None
            refs.extend(offsets, lengths, crcs, bytes(kinds))
        return ops

    def decode(self, buf: bytes, refs: Refs | None = None, base: int = 0) -> Decoded:
        out = Decoded()
        batches, ends, units, more = out.batches, out.ends, out.units, out.more
        pos, n, hsize = 0, len(buf), self.hsize
        view = memoryview(buf)
        head, entry, crc32 = HEADER.unpack_from, ENTRY.unpack_from, zlib.crc32
        # Values the loop below leaves in the file, noted in ``refs`` in one call at the
        # end (or before another path notes one): handle of the next is first + count.
        offsets: list[int] = []
        lengths: list[int] = []
        crcs: list[int] = []
        limit = refs.inline_max if refs is not None else -1
        first = refs.next_handle() if refs is not None else 0
        while pos + hsize <= n:
            # Inlined for speed (replay of a large log is this loop); any doubt falls
            # back to the general checks below, which also say what is wrong.
            crc, length, rtype = head(buf, pos)
            end = pos + hsize + length
            if end > n or crc32(view[pos + 4 : end]) != crc:
                break
            ops: Batch | None = None
            if rtype in (RECORD_OPS, RECORD_OPS_MORE) and length >= ENTRY.size:
                op, klen, vlen = entry(buf, pos + hsize)
                start = pos + hsize + ENTRY.size
                if start + klen + vlen == end and op == OP_PUT_STR:  # one put of a str
                    try:
                        if 0 <= limit < vlen:
                            at = start + klen
                            ops = [(buf[start:at].decode("utf-8"),
                                    _handle(first + len(lengths)))]
                            offsets.append(base + at)
                            lengths.append(vlen)
                            crcs.append(crc32(view[at:end]))
                        else:
                            ops = [(buf[start : start + klen].decode("utf-8"),
                                    buf[start + klen : end].decode("utf-8"))]
                    except UnicodeDecodeError:
                        break
            if ops is None:
                if rtype not in (RECORD_OPS, RECORD_OPS_MORE, RECORD_PACKED):
                    break
                if lengths:
                    assert refs is not None
                    refs.extend(offsets, lengths, crcs, bytes([STR_VALUE]) * len(lengths))
                    offsets, lengths, crcs = [], [], []
                ops = self._payload(buf, pos, end, refs, base)
                if ops is None:
                    break
                if refs is not None:
                    first = refs.next_handle()
            batches.append(ops)
            ends.append(end)
            units.append(end - pos)
            more.append(rtype == RECORD_OPS_MORE)
            pos = end
        if lengths:
            assert refs is not None
            refs.extend(offsets, lengths, crcs, bytes([STR_VALUE]) * len(lengths))
        if pos < n:
            end, problem = self._record_end(buf, pos)
            out.problem = problem or "malformed entries in a record with a valid checksum"
            out.torn, out.need = self._torn(buf, pos)
        out.stop = pos
        return out



# --- text -------------------------------------------------------------------------


class TextCodec(Codec):
    """The exact log format of the original problem: one line per put or delete."""

    name = "text"

    def check(self, key: object, value: object, *, delete: bool = False) -> None:
        super().check(key, value, delete=delete)
        assert isinstance(key, str)
        if "|" in key or "\n" in key:
            raise ValueError(f"text format: key {key!r} contains '|' or a newline")
        if not delete:
            if isinstance(value, bytes):
                raise ValueError("text format: values must be str, not bytes")
            assert isinstance(value, str)
            if "\n" in value:
                raise ValueError(f"text format: value for key {key!r} contains a newline")

    def _encode(self, ops: list[Op], limit: int) -> list[tuple[bytes, int]]:
        out = []
        for key, value in ops:
            assert not isinstance(value, bytes)
            line = f"D|{key}\n" if value is None else f"P|{key}|{value}\n"
            out.append((line.encode("utf-8"), len(line)))
        return out

    def _op_span(self, record: bytes, key: str) -> Spans:
        start = 3 + len(key.encode("utf-8"))  # P|key|value\n
        return Spans(array("I", [start]), array("I", [len(record) - start - 1]))

    @staticmethod
    def _parse(line: str) -> Op | None:
        if line.startswith("P|"):
            key, sep, value = line[2:].partition("|")
            return (key, value) if sep else None
        if line.startswith("D|") and "|" not in line[2:]:
            return (line[2:], None)
        return None

    def single_value(self, record: bytes) -> tuple[int, int, int]:
        assert record.startswith(b"P|") and record.endswith(b"\n"), "one put"
        at = record.index(b"|", 2) + 1  # keys hold no '|'
        return at, len(record) - 1 - at, STR_VALUE

    def next_valid(self, buf: bytes, start: int) -> int:
        # Lines are the unit: skip the damaged one (or the torn remainder).
        end = buf.find(b"\n", start)
        return len(buf) if end < 0 else end + 1

    def decode(self, buf: bytes, refs: Refs | None = None, base: int = 0) -> Decoded:
        out = Decoded()
        cut = buf.rfind(b"\n") + 1
        pos = 0
        inline_max = refs.inline_max if refs is not None else len(buf)
        for raw in buf[:cut].split(b"\n")[:-1]:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = "\x00"  # not a valid line
            op = self._parse(line)
            if op is None:
                out.problem = f"malformed line {line[:40]!r}"
                break
            if op[1] is not None and len(raw) > inline_max:
                at = raw.index(b"|", 2) + 1  # keys hold no '|'
                if len(raw) - at > inline_max:
                    assert refs is not None
                    op = (op[0], _handle(refs.add(base + pos + at, len(raw) - at,
                                                  zlib.crc32(memoryview(raw)[at:]), STR_VALUE)))
            pos += len(raw) + 1
            out.batches.append([op])
            out.ends.append(pos)
            out.units.append(len(line) + 1)
            out.more.append(False)
        else:
            if cut < len(buf):
                # Only a last line without its newline can be a torn append; a complete
                # malformed line is damage wherever it is (text has no checksums).
                out.problem, out.torn = "incomplete last line (no newline)", True
                out.need = len(buf) - pos + 1
        out.stop = pos
        return out


#: The codecs of the current store format version (2).
CODECS: dict[str, Codec] = {"binary": BinaryCodec(2), "text": TextCodec()}
_BINARY_V1 = BinaryCodec(1)


def codec_for(name: str, version: int = 2) -> Codec:
    """The codec of format ``name`` in stores of format version ``version``: version 1
    binary stores keep framing 1; text is the same in both."""
    if name == "binary" and version == 1:
        return _BINARY_V1
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"format must be 'binary' or 'text', not {name!r}") from None
