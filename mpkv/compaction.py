"""Compaction: rewrite sealed segments as the live state they add up to.

The outputs of compacting segments up to number b are named ``b.0001``, ``b.0002``...
so they sort just before segment b: see ``segments.follows`` for why a reader or an
opener that lists the directory at any moment of the switch still replays the exact
state. The outputs hold puts only: they start the log, so no tombstone is needed.
"""

from __future__ import annotations

import glob
import os

from .codec import Codec, Value, apply
from .errors import CorruptionError, Error
from .segments import AUX, fsync_dir, segment_name

TMP_PREFIX = "compact-"


def replay(path: str, codec: Codec, names: list[str]) -> dict[str, Value]:
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
    each within the segment limit and fsynced. Returns their paths in order."""
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
    finally:
        if f is not None:
            f.close()
    return outputs


def install(path: str, outputs: list[str], number: int) -> list[str]:
    """Rename the outputs into place as parts 1, 2, ... of ``number`` (writer lock held).
    Each compaction seals a new segment first, so ``number`` was never compacted before."""
    names = [segment_name(number, k) for k in range(1, len(outputs) + 1)]
    for tmp, name in zip(outputs, names, strict=True):
        target = os.path.join(path, name)
        if os.path.exists(target):
            raise Error(f"{target}: compaction output exists already; not overwriting it")
        os.rename(tmp, target)
    fsync_dir(path)
    return names


def remove(path: str, names: list[str]) -> None:
    """Delete replaced segments oldest first, so any listing replays correctly."""
    for name in names:
        os.unlink(os.path.join(path, name))
    fsync_dir(path)


def remove_stale_outputs(path: str) -> None:
    """Temporary outputs of a compaction that died (compaction lock held)."""
    for tmp in glob.glob(os.path.join(path, AUX, f"{TMP_PREFIX}*.tmp")):
        os.unlink(tmp)
