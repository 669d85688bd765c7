"""The commit protocol under crashes, damage and a full disk.

- A write in flight when its process died is decided once, the same way by every
  process: readers, a writable store that has not written yet, and the next writer.
- Every read path stops at an unfinished text transaction.
- ``.mpkv/txn`` is never obeyed blindly; ``.mpkv/shm`` full of garbage is untrusted.
- A failed write (disk full) leaves the log exactly as it was.
- The directory lock excludes threads of one process from each other.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mpkv
from mpkv.segments import AUX, INTENT, SHM, list_segments

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _read(file: str) -> bytes:
    with open(file, "rb") as f:
        return f.read()


def _put_forever(path: str, log_fd: int, **options: object) -> None:
    """Child body: put k = 0, 1, 2, ... forever, logging each acknowledged value."""
    try:
        store = mpkv.Store(path, **options)  # type: ignore[arg-type]
        os.write(log_fd, b"open\n")
        i = 0
        while True:
            store["k"] = str(i)
            os.write(log_fd, f"{i}\n".encode())
            i += 1
    finally:
        os._exit(1)


def _acked(log: str) -> int:
    with open(log, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    values = [int(x) for x in lines if x.isdigit()]
    return max(values, default=-1)


def _kill_round(path: str, log: str, rng: random.Random, **options: object) -> int:
    """Run a putting child, SIGKILL it at a random moment; return its last ack."""
    open(log, "wb").close()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    pid = os.fork()
    if pid == 0:
        _put_forever(path, log_fd, **options)
    os.close(log_fd)
    deadline = time.monotonic() + 30
    while b"open" not in _read(log):
        assert time.monotonic() < deadline, "child never opened the store"
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.01))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return _acked(log)


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_write_in_flight_at_a_kill_never_flips_after_being_observed(tmp_path, fmt):
    """A put killed after its pwrite but before publishing used to be invisible to
    readers and then adopted by the next writer: a value everyone had read changed
    with nobody writing it."""
    path = str(tmp_path / "s")
    log = str(tmp_path / "log")
    rng = random.Random(f"flip-{fmt}")
    mpkv.Store(path, format=fmt, max_segment_bytes=2000).close()
    old_reader = mpkv.Store(path, readonly=True)
    flips, lost = [], []
    for r in range(40):
        acked = _kill_round(path, log, rng, fsync="never", auto_compact=False)
        seen = {"old reader": old_reader.get("k")}
        with mpkv.Store(path, readonly=True) as ro:
            seen["readonly"] = ro.get("k")
        with mpkv.Store(path) as idle:  # writable, has not written yet
            seen["idle writable"] = idle.get("k")
            with mpkv.Store(path) as writer:
                writer["other"] = str(r)
                seen["writer after its write"] = writer.get("k")
            seen["idle writable after the write"] = idle.get("k")
        seen["old reader after the write"] = old_reader.get("k")
        with mpkv.Store(path, readonly=True) as ro:
            seen["reopened"] = ro.get("k")
        if len(set(seen.values())) != 1:
            flips.append((r, acked, seen))
        final = int(seen["reopened"] or -1)
        if final < acked:
            lost.append((r, acked, final))
    old_reader.close()
    assert not flips, flips
    assert not lost, lost
    assert mpkv.verify(path).ok


# --------------------------------------------------------------------------- helpers


def _segments(path: str) -> list[str]:
    return list_segments(path)


def _newest(path: str) -> str:
    return os.path.join(path, _segments(path)[-1])


def _half_written_text_commit(path: str, lines: bytes) -> None:
    """What a text transaction killed after its first lines leaves: the intent (start
    and length) and some of its lines at the end of the newest segment."""
    newest = _newest(path)
    number = int(os.path.basename(newest)[:12])
    size = os.path.getsize(newest)
    with open(os.path.join(path, AUX, INTENT), "w") as f:
        f.write(f"{number} {size} {len(lines) + 100}\n")
    with open(newest, "ab") as f:
        f.write(lines)


def _untrust(path: str) -> None:
    os.unlink(os.path.join(path, AUX, SHM))


# --------------------------------------------------------------------------- intent


def test_untrusted_reads_stop_at_an_unfinished_text_commit(tmp_path):
    """With the shared state missing, refresh() and max_staleness reads used to show the
    first lines of an unfinished text transaction, which the next writer truncated."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, format="text") as s:
        s["a"] = "1"
    _untrust(path)
    readonly = mpkv.Store(path, readonly=True)  # no shared state to map at all
    stale = mpkv.Store(path, max_staleness=0.001)  # maps a fresh, untrusted one
    refreshing = mpkv.Store(path, max_staleness=None)
    _half_written_text_commit(path, b"P|x|1\nP|y|2\n")
    time.sleep(0.01)
    assert refreshing.refresh() == 0
    assert refreshing.get("x") is None
    assert readonly.get("x") is None
    assert stale.get("x") is None
    with mpkv.Store(path, readonly=True) as opened:
        assert dict(opened.items()) == {"a": "1"}
    with mpkv.Store(path) as writer:  # undoes the unfinished commit
        writer["z"] = "3"
    for s in (readonly, stale, refreshing):
        s.refresh()
        assert dict(s.items()) == {"a": "1", "z": "3"}
        s.close()
    assert mpkv.verify(path).ok


@pytest.mark.parametrize("intent", [b"1 0\n", b"1 99999999\n", b"2 -5\n", b"1 0 999\n",
                                    b"garbage"])
def test_binary_store_ignores_any_txn_file(tmp_path, intent):
    """``1 0`` used to delete all data at the first write, ``1 99999999`` grew segment 1
    to 100 MB of zeros, ``2 -5`` raised a raw EINVAL."""
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s.update({f"k{i}": "v" * 10 for i in range(20)})
    size = os.path.getsize(_newest(path))
    for untrusted in (False, True):
        with open(os.path.join(path, AUX, INTENT), "wb") as f:
            f.write(intent)
        if untrusted:
            _untrust(path)
        with mpkv.Store(path) as s:
            assert len(s) == 20 + untrusted
            s["new"] = "x"
        with mpkv.Store(path, readonly=True) as s:
            assert len(s) == 21
    assert os.path.getsize(_newest(path)) < size + 100


@pytest.mark.parametrize("intent", [b"1 0\n", b"1 99999999 5\n", b"2 -5 3\n", b"7 0 10\n",
                                    b"1 3 100\n", b"1 0 5\n", b"garbage\n"])
def test_nonsensical_txn_file_in_a_text_store_is_damage_not_an_instruction(tmp_path, intent):
    path = str(tmp_path / "s")
    with mpkv.Store(path, format="text") as s:
        s.update({f"k{i}": "v" * 10 for i in range(20)})
    before = _read(_newest(path))
    with open(os.path.join(path, AUX, INTENT), "wb") as f:
        f.write(intent)
    with mpkv.Store(path) as s:  # trusted shared state: the commit point decides
        s["new"] = "x"
        assert len(s) == 21
    assert _read(_newest(path)).startswith(before)
    with open(os.path.join(path, AUX, INTENT), "wb") as f:
        f.write(intent)
    _untrust(path)
    with pytest.raises(mpkv.CorruptionError, match="txn"):
        mpkv.Store(path)
    with pytest.raises(mpkv.CorruptionError, match="txn"):
        mpkv.Store(path, readonly=True)
    assert not mpkv.verify(path).ok
    report = mpkv.repair(path)
    assert any("txn" in q for q in report.quarantined)
    assert _read(_newest(path)).startswith(before)
    with mpkv.Store(path) as s:
        assert len(s) == 21
    assert mpkv.verify(path).ok


# --------------------------------------------------------------------------- shm


def test_garbage_shared_state_is_untrusted_then_rewritten(tmp_path):
    """``.mpkv/shm`` full of 0xFF: a 2 s stall per open, then every write raised a raw
    ValueError (the counter overflowed)."""
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s["a"] = "1"
    with open(os.path.join(path, AUX, SHM), "wb") as f:
        f.write(b"\xff" * 64)
    started = time.monotonic()
    reader = mpkv.Store(path, readonly=True)
    assert reader.get("a") == "1"
    # not a timing claim: the stall was 2 s an open; below that, a loaded machine may take
    # its time
    assert time.monotonic() - started < 1.9
    with mpkv.Store(path) as s:
        s["b"] = "2"
        assert s.get("b") == "2"
    assert reader.get("b") == "2"
    reader.close()
    with mpkv.Store(path, readonly=True) as s:
        assert dict(s.items()) == {"a": "1", "b": "2"}


def test_copied_directory_shared_state_is_not_trusted(tmp_path):
    """A copy of the directory carries a shared state that describes the original's
    files: it must not be taken as the copy's commit point."""
    import shutil
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with mpkv.Store(src) as s:
        s["a"] = "1"
        shutil.copytree(src, dst)  # shm says "end = one record"
        s["b"] = "2"
    shutil.copy(os.path.join(src, _segments(src)[-1]), os.path.join(dst, _segments(dst)[-1]))
    with mpkv.Store(dst, readonly=True) as s:
        assert dict(s.items()) == {"a": "1", "b": "2"}


# --------------------------------------------------------------------------- full disk


def _fill(path: str, store: mpkv.Store, size: int) -> int:
    """Put ``size``-unit values until the disk is full; return how many were acked."""
    n = 0
    with pytest.raises(OSError) as info:
        while True:
            store[f"k{n}"] = "v" * size
            n += 1
    assert info.value.errno == errno.ENOSPC
    return n


@pytest.fixture
def small_disk(tmp_path):
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_disk_full_mid_append_leaves_the_log_as_it_was(small_disk, fmt):
    """A put that ran out of space used to advance the cursor by its short write: the
    next put with the same handle then corrupted the store (binary) or glued itself to
    the failed record (text)."""
    path = os.path.join(small_disk, "s")
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * 300_000)
    s = mpkv.Store(path, format=fmt, fsync="never", max_segment_bytes=100_000,
                   auto_compact=False)
    n = _fill(path, s, 5000)
    assert mpkv.verify(path).ok
    with pytest.raises(OSError):  # still full: fails again, still cleanly
        s["again"] = "v" * 5000
    with pytest.raises(OSError):  # a compaction on a full disk leaves no temp files
        s.compact()
    assert not [n for n in os.listdir(os.path.join(path, AUX)) if n.startswith("compact-")]
    os.unlink(filler)
    s["after"] = "v" * 5000
    with s.transaction() as tx:
        tx["t1"], tx["t2"] = "1", "2"
    s.close()
    assert mpkv.verify(path).ok
    with mpkv.Store(path) as s:
        assert sorted(s) == sorted([f"k{i}" for i in range(n)] + ["after", "t1", "t2"])


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_failed_write_of_a_chained_commit_is_undone(tmp_path, monkeypatch, fmt):
    """ENOSPC after part of a commit that spans segments: the segments it started go,
    the one it appended to is cut back, nothing is published, and the next write works."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, format=fmt, max_segment_bytes=400, auto_compact=False)
    s["a"] = "1"
    files = {n: _read(os.path.join(path, n)) for n in _segments(path)}
    real = os.pwrite
    calls = [0]

    def failing(fd: int, data: bytes, offset: int) -> int:
        calls[0] += 1
        if calls[0] == 2:
            return real(fd, data[: len(data) // 2], offset)
        if calls[0] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError), s.transaction() as tx:
        for i in range(30):
            tx[f"t{i}"] = "x" * 30
    monkeypatch.setattr(os, "pwrite", real)
    assert {n: _read(os.path.join(path, n)) for n in _segments(path)} == files
    assert not os.path.exists(os.path.join(path, AUX, INTENT))
    with mpkv.Store(path, readonly=True) as ro:
        assert dict(ro.items()) == {"a": "1"}
    s["b"] = "2"
    assert dict(s.items()) == {"a": "1", "b": "2"}
    s.close()
    with mpkv.Store(path) as s:
        assert dict(s.items()) == {"a": "1", "b": "2"}


# --------------------------------------------------------------------------- locks


def test_a_reader_thread_does_not_weaken_the_directory_lock_of_another_thread(tmp_path):
    """flock belongs to the open file description: a reader thread's shared lock on the
    shared descriptor converted, and its unlock dropped, a compaction thread's
    exclusive lock."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, max_segment_bytes=200)
    for i in range(10):
        s[f"k{i}"] = "v" * 50
    held, done = threading.Event(), threading.Event()

    def compactor() -> None:
        with s._dirlock.exclusive():
            held.set()
            # held until the probe below is done: its Python start-up may be slow on a
            # loaded machine, and a lock let go early would make the probe fail
            done.wait(120)

    t = threading.Thread(target=compactor)
    t.start()
    assert held.wait(120)
    got_shared = threading.Event()

    def read_side() -> None:
        with s._dirlock.shared():
            got_shared.set()

    reader = threading.Thread(target=read_side)
    reader.start()
    # Another process must still be excluded: the exclusive flock is intact.
    probe = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({os.path.join(path, AUX, 'dirlock')!r}, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(0)
            sys.exit(1)
        """)], cwd=ROOT)
    assert not got_shared.is_set()  # the reader thread waits for the exclusive holder
    done.set()
    t.join()
    reader.join(120)
    assert got_shared.is_set()
    assert probe.returncode == 0, "another process could take the directory lock shared"
    s.close()


def test_stray_file_in_readers_folder_does_not_break_compaction(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, max_segment_bytes=200) as s:
        for i in range(10):
            s[f"k{i}"] = "v" * 50
        os.makedirs(os.path.join(path, AUX, "readers"), exist_ok=True)
        for stray in ("README", "0-1", "99999999999999999999-1", "x-y"):
            with open(os.path.join(path, AUX, "readers", stray), "w") as f:
                f.write("notes")
        s.compact()
        assert len(s) == 10


def test_failing_auto_compaction_is_reported_not_silent(tmp_path, caplog, monkeypatch):
    from mpkv import compaction
    path = str(tmp_path / "s")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compaction, "write_outputs", broken)
    monkeypatch.setattr(mpkv.store, "AUTO_COMPACT_MIN_BYTES", 2000)
    s = mpkv.Store(path, max_segment_bytes=500)
    s._next_check = 2000
    with caplog.at_level("ERROR", logger="mpkv"):
        for _ in range(200):
            s["k"] = "v" * 40
        if s._compactor is not None:
            s._compactor.join()
    assert isinstance(s.compaction_error, OSError)
    assert "automatic compaction failed" in caplog.text
    s["k"] = "still writable"
    s.close()
