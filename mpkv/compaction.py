"""Compaction: rewrite sealed segments as the live state they add up to.

The outputs of compacting segments up to number b are named ``b.0001``, ``b.0002``...
so they sort just before segment b: see ``segments.follows`` for why a reader or an
opener that lists the directory at any moment of the switch still replays the exact
state. The outputs hold puts only: they start the log, so no tombstone is needed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from .codec import Codec, Value, apply
from .errors import CorruptionError, Error
from .locks import DirLock
from .segments import (
    AUX,
    RETAINED,
    SWITCH,
    fsync_dir,
    list_log,
    list_segments,
    parse_name,
    segment_name,
)
from .snapshot import write_atomically

TMP_PREFIX = "compact-"


def replay(path: str, codec: Codec, names: Iterable[str]) -> dict[str, Value]:
    """The state sealed segments ``names`` add up to; they must be whole and valid."""
    state: dict[str, Value] = {}
    for name in names:
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            data = f.read()
        dec = codec.decode(data)
        if dec.problem:
            raise CorruptionError(f"{file}: damaged record at offset {dec.stop}: {dec.problem}"
                                  " (run mpkv repair)", file, dec.stop)
        for batch in dec.batches:
            apply(state, batch)
    return state


def write_outputs(path: str, codec: Codec, state: dict[str, Value], max_units: int) -> list[str]:
    """Write ``state`` into temporary files in ``.mpkv/`` (never taken for segments),
    each within the segment limit and fsynced. Returns their paths in order. On any
    error (a full disk) the files written so far are removed before it propagates."""
    aux = os.path.join(path, AUX)
    outputs: list[str] = []
    f = None
    used = 0
    try:
        for data, units in codec.encode_state(list(state.items()), max_units):
            if f is None or used + units > max_units:
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                outputs.append(os.path.join(aux, f"{TMP_PREFIX}{os.getpid()}-{len(outputs)}.tmp"))
                f = open(outputs[-1], "wb")  # noqa: SIM115
                used = 0
            f.write(data)
            used += units
        if f is None:  # an empty state still gets a (empty) first part: the log's start
            outputs.append(os.path.join(aux, f"{TMP_PREFIX}{os.getpid()}-0.tmp"))
            f = open(outputs[-1], "wb")  # noqa: SIM115
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        if f is not None:
            try:
                f.close()  # flushes what is buffered: may fail again on a full disk
            except OSError:
                pass
            f = None
        for tmp in outputs:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    finally:
        if f is not None:
            f.close()
    return outputs


def switch(path: str, outputs: list[str], number: int, inputs: list[str],
           needed: int | None, dirlock: DirLock) -> None:
    """Put the outputs in place of the inputs (writer lock held).

    Under the directory lock held exclusively, so no reader lists the directory halfway:
    rename the outputs to parts 1, 2, ... of ``number`` (each compaction seals a new
    segment first, so ``number`` was never compacted before); record the switch in
    ``.mpkv/compacted`` (from then on ``list_log`` ignores the inputs, even after a
    crash); move inputs a live watcher still needs (number >= ``needed``) to
    ``.mpkv/retained/`` and delete the others; drop the record."""
    with dirlock.exclusive():
        for k, tmp in enumerate(outputs, start=1):
            target = os.path.join(path, segment_name(number, k))
            if os.path.exists(target):
                raise Error(f"{target}: compaction output exists already; not overwriting it")
            os.rename(tmp, target)
        fsync_dir(path)
        aux = os.path.join(path, AUX)
        write_atomically(os.path.join(aux, SWITCH), str(number).encode())
        _retire(path, inputs, needed)
        os.unlink(os.path.join(aux, SWITCH))
        fsync_dir(aux)


def _retire(path: str, inputs: list[str], needed: int | None) -> None:
    kept = os.path.join(path, AUX, RETAINED)
    old = list_segments(kept) if os.path.isdir(kept) else []
    for name in old:  # what watchers no longer need
        if needed is None or parse_name(name)[0] < needed:  # type: ignore[index]
            os.unlink(os.path.join(kept, name))
    for name in inputs:
        if needed is not None and parse_name(name)[0] >= needed:  # type: ignore[index]
            os.makedirs(kept, exist_ok=True)
            os.rename(os.path.join(path, name), os.path.join(kept, name))
        else:
            os.unlink(os.path.join(path, name))
    fsync_dir(path)


def tidy(path: str, needed: int | None, dirlock: DirLock) -> None:
    """Finish a switch a crash interrupted, and delete outputs of a compaction that died
    before its switch (compaction lock held)."""
    for tmp in glob.glob(os.path.join(path, AUX, f"{TMP_PREFIX}*.tmp")):
        os.unlink(tmp)
    marker = os.path.join(path, AUX, SWITCH)
    if os.path.exists(marker):
        with dirlock.exclusive():
            live = set(list_log(path))
            _retire(path, [n for n in list_segments(path) if n not in live], needed)
            os.unlink(marker)
