"""Compaction: rewrite sealed segments as the live state they add up to.

The outputs of compacting segments up to number b are named ``b.0001``, ``b.0002``...
so they sort just before segment b: see ``segments.follows`` for why a reader or an
opener that lists the directory at any moment of the switch still replays the exact
state. The outputs hold puts only: they start the log, so no tombstone is needed.
"""

from __future__ import annotations

import glob
import os
import zlib
from array import array
from collections.abc import Generator, Iterable, Iterator
from itertools import chain, compress, islice, repeat
from operator import add, and_, itemgetter, rshift, sub
from typing import NamedTuple

from . import hints
from .codec import BYTES_VALUE, STR_VALUE, Codec, Puts, Value, apply
from .errors import CorruptionError, Error
from .files import create_temp, fsync_dir, make_dir, open_dir, open_regular, write_atomically
from .keydir import INDEX_BITS, INDEX_MASK, INLINE_MAX, ValueFile, ValueFiles
from .locks import DirLock
from .segments import (
    AUX,
    HORIZON,
    RETAINED,
    SWITCH,
    Switch,
    UnitPos,
    check_switch,
    list_segments,
    log_of,
    oldest_needed,
    parse_name,
    read_switch,
    segment_name,
)

TMP_PREFIX = "compact-"


#: Replay leaves values of more encoded bytes than this in the inputs. Lower than the
#: view's ``INLINE_MAX``: compaction reads each value back once, not on every get, so
#: what counts is memory, and a handle and its table entry (about 50 bytes) cost less
#: than a value object of more than about 32 bytes.
LEAVE_OVER = 32
#: Bytes of the input read at a time by replay: the decoded records of one chunk are
#: all it holds besides the state.
_CHUNK = 4 << 20
#: Bytes of values write_outputs reads back at a time (about one packed record)...
_BATCH = 1 << 20
#: ... from at most this many items of the state at a time.
_STEP = 4096
_first, _second = itemgetter(0), itemgetter(1)
#: Input files write_outputs keeps open at a time while reading values back.
_OPEN_MAX = 16


class State(NamedTuple):
    """The live state of sealed segments: each key's value, or the handle (an int) of a
    value left in its input segment and read back through ``files`` (keydir.py) when it
    is written out: more than ``LEAVE_OVER`` encoded bytes when ``replay`` built it,
    more than the view's ``INLINE_MAX`` when it is a store's view (``from_view``). The
    Python objects per key (the key, a small value or a handle, a dict slot) and 17
    bytes of ``files`` per value read are what compaction holds: not the values."""

    view: dict[str, Value | int]
    files: ValueFiles


class Taken(NamedTuple):
    """A store's view as the compaction sealed the active segment (store.py takes it
    under the tail mutex, right after catching up with the log and sealing under the
    writer lock): then the view holds exactly the state of the sealed segments, since
    every later write goes to the new active segment."""

    #: A copy of the view (a C-level copy: the keys and values are the view's own
    #: objects, the handles ints into ``values``).
    view: dict[str, Value | int]
    #: The view's value files then: the view may replace its own later (a rebuild),
    #: and the handles of ``view`` keep their meaning in this one.
    values: ValueFiles
    #: The files ``values`` held values of then.
    files: list[str]
    #: Every segment file the view read, with the ``(st_dev, st_ino)`` it had then
    #: (``ValueFiles.entered``).
    entered: dict[str, tuple[int, int]]
    #: The position of the last unit the view had applied (``Cursor.position``).
    position: UnitPos


def from_view(path: str, taken: Taken, inputs: list[str]) -> tuple[State, UnitPos] | None:
    """The state of sealed segments ``inputs`` from a store's view taken at the seal
    (``Taken``), and their horizon as ``replay`` computes it; None when the view
    cannot serve: its handles may point into files that are not among the inputs
    (segments an earlier compaction removed while the view still held values in
    them), which nothing keeps in place; or an input is not the file the view read
    under that name (``repair`` rewrote a damaged segment while the store was open:
    the view may hold records it dropped, and places in the file it replaced).
    Nothing else is read: the values the view holds
    are the encoded values of the log, and those it left in the inputs are read back
    by ``write_outputs`` (CRC-checked, as for ``replay``).

    The view's last unit is the inputs' last unit, unless the view never entered the
    outputs of the compaction before (it read the segments they replaced): then the
    inputs begin with those outputs and no unit follows them, and the horizon is
    where the outputs end, as for a reader that entered them (``Cursor._enter``)."""
    files = {os.path.join(path, name) for name in inputs}
    if not all(file in files for file in taken.files):
        return None
    for file in files:
        ino = taken.entered.get(file)
        if ino is None:
            continue  # an output of the compaction before, whose inputs the view read
        try:
            st = os.stat(file)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino) != ino:
            return None
    horizon = taken.position
    for name in inputs:
        number, part = parse_name(name)  # type: ignore[misc]
        if part:
            horizon = max(horizon, (number + 1, 0, 0))
    return State(taken.view, taken.values), horizon


def replay(path: str, codec: Codec, names: Iterable[str],
           last: list[UnitPos] | None = None) -> State:
    """The state sealed segments ``names`` add up to; they must be whole and valid (a
    damaged record raises CorruptionError). ``last`` (when given) receives the
    position of the last unit they hold (the compaction's horizon, see ``switch``).

    Each segment is read ``_CHUNK`` bytes at a time (more when one record is larger),
    so memory holds the state and one chunk, whatever the sizes of the segments."""
    files = ValueFiles(LEAVE_OVER)
    state: dict[str, Value | int] = {}
    horizon: UnitPos = (1, 0, 0)
    begun = (1, 0)
    inside = False
    count = 0
    for name in names:
        number, part = parse_name(name)  # type: ignore[misc]
        file = os.path.join(path, name)
        fd = open_regular(file, os.O_RDONLY)
        try:
            refs = files.new_file(file, fd)
            size = os.fstat(fd).st_size
            offset, want = 0, _CHUNK
            while offset < size:
                start = offset
                data = os.pread(fd, min(want, size - start), start)
                dec = codec.decode(data, refs, start)
                for batch, end, more in zip(dec.batches, dec.ends, dec.more, strict=True):
                    apply(state, batch)
                    if last is not None and not part:
                        if not inside:
                            begun, count = (number, offset), 0
                        count += len(batch.keys) if isinstance(batch, Puts) else len(batch)
                        inside = more
                        if not more:
                            horizon = (*begun, count)
                    offset = start + end
                if data and not dec.problem:
                    continue
                if start + len(data) >= size or not data:
                    raise CorruptionError(f"{file}: damaged record at offset {offset}: "
                                          f"{dec.problem or 'the file ends early'} "
                                          "(run mpkv repair)", file, offset)
                # The chunk ends inside a record: read on from it, the whole record.
                want = max(_CHUNK, dec.need) if dec.stop else max(dec.need, 2 * len(data))
        finally:
            os.close(fd)
        if last is not None and part:  # a former output: the state as of the end of `number`
            horizon = max(horizon, (number + 1, 0, 0))
    if last is not None:
        last.append(horizon)
    return State(state, files)


class _Inputs:
    """Reads the values a ``State`` left in its input segments back, checking each
    against the CRC-32 taken when its record's checksum was verified: a byte changed
    since is a CorruptionError, never a wrong value in the outputs. Reads go through
    ``pread``, not a map: the input pages read do not stay in the process's memory.

    Inputs are sealed segments: no one truncates or rewrites them, and they stay in
    place while the compaction lock is held. Used by one thread."""

    def __init__(self, files: ValueFiles) -> None:
        self.files = files
        #: file id -> descriptor of that input, least recently used first
        self.fds: dict[int, int] = {}

    def _fd(self, vf: ValueFile) -> int:
        fd = self.fds.pop(vf.fid, -1)
        if fd < 0:
            try:
                fd = open_regular(vf.file, os.O_RDONLY)
            except FileNotFoundError:
                raise Error(f"{vf.file}: compaction input removed while compaction "
                            "ran") from None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != vf.ino:
                os.close(fd)
                raise Error(f"{vf.file}: compaction input replaced while compaction ran")
            if len(self.fds) >= _OPEN_MAX:
                os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[vf.fid] = fd
        return fd

    def batches(self, view: dict[str, Value | int]
                ) -> Generator[list[tuple[str, Value]], None, None]:
        """The items of ``view`` in order, handles replaced by their values, in lists
        holding about ``_BATCH`` bytes of values read from the inputs (a larger value
        alone): the number of items taken at a time follows the values' sizes."""
        items = iter(view.items())
        step = 64
        while batch := list(islice(items, step)):
            for piece, size in self._pieces(batch):
                yield self._resolve(piece)
                step = max(1, min(_STEP, 2 * step, _BATCH * len(piece) // (size or 1)))

    def _pieces(self, items: list[tuple[str, Value | int]]
                ) -> Iterator[tuple[list[tuple[str, Value | int]], int]]:
        """``items`` cut in halves until each holds at most ``_BATCH`` bytes of values
        left in the inputs (or one item); with that size."""
        files = self.files.files
        size = sum(files[h >> INDEX_BITS].lengths[h & INDEX_MASK]
                   for _, h in items if h.__class__ is int)
        if size <= _BATCH or len(items) == 1:
            yield items, size
            return
        half = len(items) // 2
        yield from self._pieces(items[:half])
        yield from self._pieces(items[half:])

    def _resolve(self, items: list[tuple[str, Value | int]]) -> list[tuple[str, Value]]:
        """``items`` with every handle replaced by its value. (Per item work is done by
        ``map`` and friends at C speed: this runs once per live key.)"""
        values: list[Value | int] = list(map(_second, items))
        is_handle = list(map(isinstance, values, repeat(int)))
        count = is_handle.count(True)
        if not count:
            return items  # type: ignore[return-value]
        where: range | list[int] = range(len(values))
        handles: list[int] = values  # type: ignore[assignment]
        if count < len(values):
            where = list(compress(where, is_handle))
            handles = list(compress(values, is_handle))  # type: ignore[arg-type]
        fids = list(map(rshift, handles, repeat(INDEX_BITS)))
        if min(fids) == max(fids):  # the common case: values written together
            got = self._read(self.files.files[fids[0]],
                             list(map(and_, handles, repeat(INDEX_MASK))))
            if count == len(values):
                return list(zip(map(_first, items), got, strict=True))
            for i, value in zip(where, got, strict=True):
                values[i] = value
        else:
            groups: dict[int, list[int]] = {}  # file id -> positions in ``where``
            for n, fid in enumerate(fids):
                groups.setdefault(fid, []).append(n)
            for fid, group in groups.items():
                got = self._read(self.files.files[fid],
                                 [handles[n] & INDEX_MASK for n in group])
                for n, value in zip(group, got, strict=True):
                    values[where[n]] = value
        return list(zip(map(_first, items), values, strict=True))  # type: ignore[arg-type]

    def _read(self, vf: ValueFile, index: list[int]) -> list[Value]:
        """The values of entries ``index`` of ``vf``: one ``pread`` of the span they lie
        in when it is not much larger than they are (values written together lie
        together), else one each."""
        fd = self._fd(vf)
        first = index[0]
        if index == list(range(first, first + len(index))):  # written in this order
            at = slice(first, first + len(index))
            offsets, lengths, crcs = vf.offsets[at], vf.lengths[at], vf.crcs[at]
            kinds = bytes(vf.kinds[at])
        else:
            offsets = array("Q", map(vf.offsets.__getitem__, index))
            lengths = array("I", map(vf.lengths.__getitem__, index))
            crcs = array("I", map(vf.crcs.__getitem__, index))
            kinds = bytes(map(vf.kinds.__getitem__, index))
        ends = array("Q", map(add, offsets, lengths))
        lo, hi, need = min(offsets), max(ends), sum(lengths)
        if hi - lo <= 2 * need + (64 << 10):
            span = os.pread(fd, hi - lo, lo)
            datas = list(map(span.__getitem__, map(slice, map(sub, offsets, repeat(lo)),
                                                   map(sub, ends, repeat(lo)))))
        else:
            datas = list(map(os.pread, repeat(fd), lengths, offsets))
        if (array("I", map(len, datas)) != lengths
                or array("I", map(zlib.crc32, datas)) != crcs):
            for j, data in zip(index, datas, strict=True):
                self._check(vf, j, data)
            raise AssertionError("a mismatch was found above")
        if STR_VALUE not in kinds:
            return datas  # type: ignore[return-value]
        try:
            if BYTES_VALUE not in kinds:
                return list(map(bytes.decode, datas))
            return [d.decode() if k == STR_VALUE else d for d, k in zip(datas, kinds, strict=True)]
        except UnicodeDecodeError:  # only a CRC collision gets here
            for j, data, kind in zip(index, datas, kinds, strict=True):
                if kind == STR_VALUE:
                    try:
                        data.decode()
                    except UnicodeDecodeError:
                        raise CorruptionError(f"{vf.file}: damaged value at offset "
                                              f"{vf.offsets[j]}: not UTF-8", vf.file,
                                              vf.offsets[j]) from None
            raise

    @staticmethod
    def _check(vf: ValueFile, j: int, data: bytes) -> None:
        offset, length = vf.offsets[j], vf.lengths[j]
        if len(data) != length:
            raise CorruptionError(f"{vf.file}: a value at offset {offset} ({length} bytes) "
                                  "lies past the end of the file", vf.file, offset)
        if zlib.crc32(data) != vf.crcs[j]:
            raise CorruptionError(f"{vf.file}: damaged value at offset {offset} "
                                  f"({length} bytes): checksum mismatch", vf.file, offset)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Output(NamedTuple):
    """A compaction output written to a temporary file: its path, size and CRC-32."""

    path: str
    size: int
    crc: int


class Placed(NamedTuple):
    """Where an output put the values of its items (from its hint): ``kinds`` holds
    one hint kind per item, in the state's order (``hints.FILE_STR`` and
    ``hints.FILE_BYTES``: the value is in the output), and the columns one entry per
    value in the output, as a view's ``ValueFile`` holds them."""

    kinds: bytes
    offsets: array[int]
    lengths: array[int]
    crcs: array[int]

    def file_kinds(self) -> bytes:
        """``STR_VALUE`` or ``BYTES_VALUE`` for each value in the output, in order."""
        return hints.file_kinds(self.kinds)


def write_outputs(path: str, codec: Codec, state: State, max_units: int,
                  number: int | None = None, placed: list[Placed] | None = None
                  ) -> list[Output]:
    """Write ``state`` into temporary files in ``.mpkv/`` (never taken for segments),
    each within the segment limit and fsynced. Returns them in order. Values left in
    the inputs are read back about a record's worth at a time (``_Inputs.batches``),
    so memory holds the state and about two records. On any error (a full disk, a
    damaged input value) the files and hints written so far are removed before it
    propagates.

    With ``number`` (the compaction's), each output gets its hint (hints.py), named for
    the output it becomes: ``number.0001``, ... Hints of outputs that never make it into
    the log are removed by ``tidy``. ``placed`` (with ``number``) receives, for each
    output, where it put the values (``Placed``)."""
    aux = os.path.join(path, AUX)
    outputs: list[Output] = []
    f = None
    tmp = ""
    used = size = crc = 0
    hint: hints.Builder | None = None

    def start() -> None:
        nonlocal f, tmp, used, size, crc, hint
        fd, tmp = create_temp(aux, f"{TMP_PREFIX}{len(outputs)}-")
        f = os.fdopen(fd, "wb")
        used = size = crc = 0
        hint = hints.Builder(INLINE_MAX) if number is not None else None

    def seal() -> None:
        assert f is not None
        f.flush()
        os.fsync(f.fileno())
        if hint is not None:
            assert number is not None
            # Bound to the file as it is now: the rename into place keeps inode and mtime.
            data = hint.encode(number, len(outputs) + 1, os.fstat(f.fileno()), used)
            hints.write(path, segment_name(number, len(outputs) + 1), data)
            del data
            if placed is not None:
                placed.append(Placed(bytes(hint.kinds), hint.offsets, hint.lengths,
                                     hint.crcs))
        f.close()
        outputs.append(Output(tmp, size, crc))

    inputs = _Inputs(state.files)
    batches = inputs.batches(state.view)
    try:
        for data, units, items, spans in codec.encode_state(chain.from_iterable(batches),
                                                            max_units, number is not None):
            if f is None or used + units > max_units:
                if f is not None:
                    seal()
                start()
            assert f is not None
            if hint is not None:
                assert spans is not None
                hint.add(data, size, items, spans)
            f.write(data)
            used += units
            size += len(data)
            crc = zlib.crc32(data, crc)
        if f is None:  # an empty state still gets a (empty) first part: the log's start
            start()
        seal()
    except BaseException:
        if f is not None and not f.closed:
            try:
                f.close()  # flushes what is buffered: may fail again on a full disk
            except OSError:
                pass
        files = [o.path for o in outputs]
        if tmp and tmp not in files:  # the part being written (its hint may be too)
            files.append(tmp)
        discard(path, files, number)
        raise
    finally:
        batches.close()
        inputs.close()
        if f is not None:
            f.close()
    return outputs


def discard(path: str, files: list[str], number: int | None) -> None:
    """Remove the output files of a compaction that failed before its switch began,
    and (with ``number``, the compaction's) the hints of as many parts."""
    for file in files:
        try:
            os.unlink(file)
        except FileNotFoundError:
            pass
    if number is not None:
        hints.remove(path, [segment_name(number, k) for k in range(1, len(files) + 1)])


def switch(path: str, outputs: list[Output], number: int, inputs: list[str],
           dirlock: DirLock, horizon: UnitPos | None = None) -> None:
    """Put the outputs in place of the inputs (writer lock held).

    Under the directory lock held exclusively, so no reader lists the directory halfway:
    rename the outputs to parts 1, 2, ... of ``number`` (each compaction seals a new
    segment first, so ``number`` was never compacted before); commit the switch by
    writing ``.mpkv/compacted`` with every output's size and checksum (from then on
    ``list_log`` ignores the inputs, even after a crash; before, it ignores the
    outputs, as segment ``number`` is still there); move inputs a live watcher still
    needs (see ``oldest_needed``) to ``.mpkv/retained/`` and delete the others; drop the
    record. Watchers register under the directory lock held shared, so the
    registrations read here are complete.

    ``horizon``, the position of the last unit of the inputs, goes to ``.mpkv/horizon``
    first: a watcher resuming at or after it has lost nothing (docs/compaction.md);
    None (repair bridging lost segments) removes it."""
    with dirlock.exclusive():
        needed = oldest_needed(path)
        if horizon is not None:
            write_atomically(os.path.join(path, AUX, HORIZON),
                             f"{number} {horizon[0]} {horizon[1]} {horizon[2]}\n".encode())
        else:  # changes were lost (repair): no position before this switch can resume
            try:
                os.unlink(os.path.join(path, AUX, HORIZON))
            except FileNotFoundError:
                pass
        for k, out in enumerate(outputs, start=1):
            target = os.path.join(path, segment_name(number, k))
            if os.path.exists(target):
                raise Error(f"{target}: compaction output exists already; not overwriting it")
            os.rename(out.path, target)
        fsync_dir(path)
        aux = os.path.join(path, AUX)
        record = Switch(number, tuple((out.size, out.crc) for out in outputs))
        write_atomically(os.path.join(aux, SWITCH), record.encode())
        _retire(path, inputs, needed)
        os.unlink(os.path.join(aux, SWITCH))
        fsync_dir(aux)
        # (a crash before this: the next compaction's tidy removes them)
        hints.remove(path, [n for n in inputs if parse_name(n)[1]])  # type: ignore[index]


def _retire(path: str, inputs: list[str], needed: int | None) -> None:
    """Through a descriptor of ``.mpkv/retained``: a link put in its place cannot make
    compaction delete or move files anywhere else."""
    kept = os.path.join(path, AUX, RETAINED)
    keep = [n for n in inputs
            if needed is not None and parse_name(n)[0] >= needed]  # type: ignore[index]
    if keep:
        make_dir(kept)
    try:
        fd = open_dir(kept)
    except FileNotFoundError:
        fd = -1
    try:
        old = sorted(n for n in os.listdir(fd) if parse_name(n)) if fd >= 0 else []
        for name in old:  # what watchers no longer need
            if needed is None or parse_name(name)[0] < needed:  # type: ignore[index]
                os.unlink(name, dir_fd=fd)
        for name in inputs:
            if name in keep:
                os.rename(os.path.join(path, name), name, dst_dir_fd=fd)
            else:
                os.unlink(os.path.join(path, name))
    finally:
        if fd >= 0:
            os.close(fd)
    fsync_dir(path)


def tidy(path: str, dirlock: DirLock) -> None:
    """Clean up after a compaction that died (compaction lock held): delete its
    temporary files and the outputs it renamed before its switch was committed (the
    log ignores them: their segment b is still there), or finish its committed switch;
    and delete every hint but those of the log's outputs.

    Inputs are deleted only on the word of a marker that checks out, contents included:
    a stray or damaged marker raises CorruptionError and nothing is deleted."""
    for tmp in glob.glob(os.path.join(path, AUX, f"{TMP_PREFIX}*.tmp")):
        os.unlink(tmp)
    names = list_segments(path)
    record = read_switch(path, names)
    if record is not None:
        check_switch(path, record)
    live = set(log_of(path, names, record))
    dead = [n for n in names if n not in live]  # inputs (committed) or stray outputs
    stale = [n for n in hints.names(path) if n not in live or not parse_name(n)[1]]  # type: ignore[index]
    if not dead and record is None and not stale:
        return
    with dirlock.exclusive():
        needed = oldest_needed(path)
        if record is not None:
            _retire(path, dead, needed)
            os.unlink(os.path.join(path, AUX, SWITCH))
            fsync_dir(os.path.join(path, AUX))
        else:
            for name in dead:
                assert parse_name(name)[1], name  # type: ignore[index]
                os.unlink(os.path.join(path, name))
            if dead:
                fsync_dir(path)
        hints.remove(path, stale)
