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
from collections.abc import Iterable
from typing import NamedTuple

from . import hints
from .codec import Codec, Puts, Spans, Value, apply
from .errors import CorruptionError, Error
from .files import create_temp, fsync_dir, make_dir, open_dir, open_regular, write_atomically
from .keydir import INLINE_MAX
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


def replay(path: str, codec: Codec, names: Iterable[str],
           last: list[UnitPos] | None = None) -> dict[str, Value]:
    """The state sealed segments ``names`` add up to; they must be whole and valid.
    ``last`` (when given) receives the position of the last unit they hold (the
    compaction's horizon, see ``switch``)."""
    state: dict[str, Value] = {}
    horizon: UnitPos = (1, 0, 0)
    begun = (1, 0)
    inside = False
    for name in names:
        number, part = parse_name(name)  # type: ignore[misc]
        file = os.path.join(path, name)
        with os.fdopen(open_regular(file, os.O_RDONLY), "rb") as f:
            data = f.read()
        dec = codec.decode(data)
        if dec.problem:
            raise CorruptionError(f"{file}: damaged record at offset {dec.stop}: {dec.problem}"
                                  " (run mpkv repair)", file, dec.stop)
        for batch in dec.batches:
            apply(state, batch)
        if last is not None:
            if part:  # a former output: the state as of the end of segment `number`
                horizon = max(horizon, (number + 1, 0, 0))
                continue
            offset, count = 0, 0
            for batch, end, more in zip(dec.batches, dec.ends, dec.more, strict=True):
                if not inside:
                    begun, count = (number, offset), 0
                count += len(batch.keys) if isinstance(batch, Puts) else len(batch)
                inside, offset = more, end
                if not more:
                    horizon = (*begun, count)
    if last is not None:
        last.append(horizon)
    return state


class Output(NamedTuple):
    """A compaction output written to a temporary file: its path, size and CRC-32."""

    path: str
    size: int
    crc: int


def write_outputs(path: str, codec: Codec, state: dict[str, Value], max_units: int,
                  number: int | None = None) -> list[Output]:
    """Write ``state`` into temporary files in ``.mpkv/`` (never taken for segments),
    each within the segment limit and fsynced. Returns them in order. On any error (a
    full disk) the files written so far are removed before it propagates.

    With ``number`` (the compaction's), each output gets its hint (hints.py), named for
    the output it becomes: ``number.0001``, ... Hints of outputs that never make it into
    the log are removed by ``tidy``."""
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
        f.close()
        outputs.append(Output(tmp, size, crc))

    items = list(state.items())
    spans: list[Spans] | None = [] if number is not None else None
    try:
        at = 0  # the first item of the next record
        for i, (data, units) in enumerate(codec.encode_state(items, max_units, spans)):
            if f is None or used + units > max_units:
                if f is not None:
                    seal()
                start()
            assert f is not None
            if hint is not None:
                assert spans is not None
                n = len(spans[i].starts)
                hint.add(data, size, items[at : at + n], spans[i])
                at += n
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
        for gone in [o.path for o in outputs] + ([tmp] if tmp else []):
            try:
                os.unlink(gone)
            except FileNotFoundError:
                pass
        raise
    finally:
        if f is not None:
            f.close()
    return outputs


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
