"""CONTRACT.md read to the letter by an outside auditor: each test hunts one place where
the code disagreed with a sentence of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mpkv


@pytest.mark.parametrize("name", ["self", "other", "args", "kwargs"])
def test_update_takes_any_str_key_as_a_keyword(tmp_path: Path, name: str) -> None:
    # A Store is a MutableMapping: update(**kw) takes every str key, as dict.update does
    # (a key named "self" used to collide with the method's own parameter).
    with mpkv.Store(tmp_path / "s") as s:
        s.update({"a": "1"}, **{name: "2"})
        with s.transaction() as tx:
            tx.update(**{name: "3"})
        assert dict(s) == {"a": "1", name: "3"}


def test_a_second_handle_writing_inside_a_first_handles_transaction_does_not_hang(
        tmp_path: Path) -> None:
    # Two Store objects of one path on one thread: the second waited for the writer lock
    # the first's open transaction holds, for ever. It must give up at once instead.
    code = f"""
import mpkv
a, b = mpkv.Store({str(tmp_path / "s")!r}), mpkv.Store({str(tmp_path / "s")!r})
with a.transaction() as tx:
    tx["x"] = "1"
    for write in (lambda: b.put("y", "2"), lambda: b.transaction().__enter__(),
                  lambda: b.compact(), lambda: b.incr("n")):
        try:
            write()
        except mpkv.LockTimeout as exc:
            assert "another Store object" in str(exc), exc
        else:
            raise AssertionError("a write through the second handle went through")
b.put("y", "2")  # once the block is over, the second handle writes as usual
print(sorted(b.items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('x', '1'), ('y', '2')]"


@pytest.mark.parametrize("side_file", ["lock", "shm"])
def test_deleting_a_side_file_under_two_writers_loses_nothing(tmp_path: Path,
                                                              side_file: str) -> None:
    # Someone "unlocks" or "cleans" the store by deleting .mpkv/lock or .mpkv/shm while
    # two processes have it open: the one that opened before kept using the deleted
    # file, the other a new one. With the lock, increments of both were lost; with the
    # shared state, the first wrote over the second's records (a CorruptionError).
    path = str(tmp_path / "s")
    mpkv.Store(path).close()
    code = f"""
import sys
import mpkv
s = mpkv.Store({path!r})
print("open", flush=True)
sys.stdin.readline()
for _ in range(400):
    s.incr("n")
s.close()
"""
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdin is not None
    first.stdout.readline()
    os.unlink(os.path.join(path, ".mpkv", side_file))
    second = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert second.stdout is not None and second.stdin is not None
    second.stdout.readline()
    for proc in (first, second):
        proc.stdin.write("go\n")
        proc.stdin.flush()
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    with mpkv.Store(path) as s:
        assert s["n"] == "800"
    assert mpkv.verify(path).ok
