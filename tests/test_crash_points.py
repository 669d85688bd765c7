"""Crash every operation at every file-system step.

Each case runs one operation in a forked child that SIGKILLs itself at its k-th
file-system call (rename, replace, link, unlink, write, pwrite, ftruncate, truncate,
fsync, fdatasync, mkdir, open with O_CREAT, open for writing; a write also dies after
half of its bytes, or at more places, and after all of them), for every k until the
operation finishes first. After each crash fresh processes must see exactly the state
before or exactly the state after, and keep seeing it through a writable open, a write,
a compaction and a reopen; ``verify`` must be clean (see ``check_after_crash`` in
conftest.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from conftest import CrashCase, crash_points

import mpkv
from mpkv.segments import list_segments


def _opts(**kw: Any) -> dict[str, Any]:
    return {"fsync": "always", "auto_compact": False, **kw}


def _filled(fmt: str, maxseg: int, puts: int, width: int, deletes: int = 0,
            rewrites: int = 0) -> Callable[[str], None]:
    """A builder: ``puts`` keys of ``width``-character values, some deleted or rewritten
    (garbage for compaction), over as many segments as ``maxseg`` gives."""
    def build(path: str) -> None:
        with mpkv.Store(path, format=fmt, max_segment_bytes=maxseg, **_opts()) as s:
            for i in range(puts):
                s.put(f"k{i}", f"v{i}".ljust(width, "x"))
            for i in range(deletes):
                s.delete(f"k{i}")
            for i in range(rewrites):
                s.put(f"k{puts - 1 - i}", f"w{i}".ljust(width, "y"))
    return build


def _compact(outputs: int = 1) -> Callable[[str, Callable[[], None]], None]:
    def op(path: str, arm: Callable[[], None]) -> None:
        s = mpkv.Store(path, **_opts())
        arm()
        made = s.compact()["segments_after"]
        assert made >= outputs, f"compact() wrote {made} outputs, the case needs {outputs}"
    return op


def _compact_watched(path: str, arm: Callable[[], None]) -> None:
    """A live watcher needs the newest segments: compaction moves them aside, not away."""
    s = mpkv.Store(path, **_opts())
    watcher = s.watch(timeout=0)
    arm()
    s.compact()
    assert os.listdir(os.path.join(path, ".mpkv", "retained")), "nothing was retained"
    del watcher


def _compacted_then(fmt: str, maxseg: int, width: int = 8) -> Callable[[str], None]:
    """A store compacted once (its log starts with compaction outputs), then written."""
    def build(path: str) -> None:
        _filled(fmt, maxseg, 6, width, 1, 2)(path)
        with mpkv.Store(path, **_opts()) as s:
            s.compact()
            for i in range(4):
                s.put(f"k{i}", f"again{i}".ljust(width, "a"))
            s.delete("k5")
    return build


def _put_rotating(fmt: str) -> Callable[[str, Callable[[], None]], None]:
    def op(path: str, arm: Callable[[], None]) -> None:
        s = mpkv.Store(path, **_opts())
        segments = len(list_segments(path))
        arm()
        s.put("new", "n" * 40)
        assert len(list_segments(path)) == segments + 1, "the put did not rotate"
    return op


def _put_value_holding_a_record(path: str, arm: Callable[[], None]) -> None:
    """A bytes value that holds a whole valid record early on, so a write cut at half
    its bytes ends past that copy: the torn tail must not be taken for a record."""
    s = mpkv.Store(path, **_opts())
    inner = b"".join(data for data, _ in s._codec.encode([("evil", "planted")], 1000))
    arm()
    s.put("hostile", b"." + inner + b"~" * (2 * len(inner)))


def _transaction(n: int, width: int) -> Callable[[str, Callable[[], None]], None]:
    def op(path: str, arm: Callable[[], None]) -> None:
        s = mpkv.Store(path, **_opts())
        arm()
        with s.transaction() as tx:
            for i in range(n):
                tx[f"t{i}"] = f"{i}".ljust(width, "t")
            del tx["k0"]
    return op


def _deserialize(path: str, arm: Callable[[], None]) -> None:
    s = mpkv.Store(path, **_opts())
    snap = path + ".snapshot"
    with mpkv.Store(path + ".other", format=s.format, **_opts()) as other:
        other.update({"k1": "changed", "fresh": "f", "k3": s["k3"]})
        other.serialize(snap)
    arm()
    s.deserialize(snap)


def _damaged(path: str) -> None:
    """A binary store whose middle segment has a flipped byte inside a record."""
    _filled("binary", 120, 12, 20)(path)
    middle = os.path.join(path, list_segments(path)[1])
    with open(middle, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))


def _repair(path: str, arm: Callable[[], None]) -> None:
    arm()
    mpkv.repair(path)


def _create(path: str, arm: Callable[[], None]) -> None:
    arm()
    mpkv.Store(path, format="text", max_segment_bytes=100, **_opts())


CASES = [
    # compaction: one output, several outputs, few and many segments, both formats
    CrashCase("compact-binary-one-output", _filled("binary", 200, 8, 20, 2, 3), _compact()),
    CrashCase("compact-binary-several-outputs", _filled("binary", 100, 12, 20, 1, 2),
              _compact(2)),
    CrashCase("compact-binary-many-segments", _filled("binary", 60, 10, 10, 4, 6), _compact(2)),
    CrashCase("compact-binary-one-segment-two-outputs", _filled("binary", 100, 2, 30),
              _compact(2)),
    CrashCase("compact-binary-again", _compacted_then("binary", 60), _compact(2)),
    CrashCase("compact-binary-watched", _filled("binary", 100, 6, 20, 1, 2), _compact_watched),
    CrashCase("compact-text-one-output", _filled("text", 100, 8, 8, 2, 3), _compact()),
    CrashCase("compact-text-several-outputs", _filled("text", 40, 8, 8, 1, 2), _compact(2)),
    CrashCase("compact-text-one-segment-two-outputs", _filled("text", 30, 2, 10), _compact(2)),
    CrashCase("compact-text-again", _compacted_then("text", 30), _compact(2)),
    # compaction of values large enough to stay in the files: hints written, removed
    CrashCase("compact-binary-hints", _filled("binary", 1000, 8, 300, 1, 2), _compact(2)),
    CrashCase("compact-text-hints", _filled("text", 1000, 8, 300, 1, 2), _compact(2)),
    CrashCase("compact-binary-hints-again", _compacted_then("binary", 1000, 300), _compact(2)),
    # writes
    CrashCase("put-rotates-binary", _filled("binary", 100, 6, 10), _put_rotating("binary")),
    CrashCase("put-value-holding-a-record", _filled("binary", 1000, 3, 10),
              _put_value_holding_a_record, min_points=3, cuts=60),
    CrashCase("put-rotates-text", _filled("text", 60, 5, 10), _put_rotating("text")),
    CrashCase("transaction-chained-binary", _filled("binary", 100, 3, 10), _transaction(8, 20)),
    CrashCase("transaction-text", _filled("text", 200, 3, 10), _transaction(3, 8)),
    CrashCase("deserialize-binary", _filled("binary", 100, 6, 10), _deserialize),
    CrashCase("deserialize-text", _filled("text", 100, 6, 10), _deserialize),
    # the same after a reboot: no shared state to say where the log was published
    CrashCase("put-rotates-binary-reboot", _filled("binary", 100, 6, 10),
              _put_rotating("binary"), reboot=True),
    CrashCase("transaction-chained-binary-reboot", _filled("binary", 100, 3, 10),
              _transaction(8, 20), reboot=True),
    CrashCase("transaction-text-reboot", _filled("text", 200, 3, 10), _transaction(3, 8),
              reboot=True),
    CrashCase("compact-binary-several-outputs-reboot", _filled("binary", 100, 6, 20, 1, 2),
              _compact(2), reboot=True),
    # recovery and creation
    CrashCase("repair", _damaged, _repair, fix=mpkv.repair),
    CrashCase("create", lambda path: None, _create),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crash_at_every_step(case: CrashCase, tmp_path: Any) -> None:
    points, problems = crash_points(case, str(tmp_path))
    print(f"{case.name}: {points} crash points")  # (pytest -s shows the count)
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
