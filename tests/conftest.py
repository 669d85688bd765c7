"""Test helpers shared by several test files. Each section is owned by one topic."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mpkv
from mpkv.errors import CorruptionError

# ============================================================================
# Crash injection: kill an operation at every file-system step
# ============================================================================
#
# ``crash_points(case)`` runs ``case.op`` in a forked child that counts its file-system
# calls and SIGKILLs itself at the k-th one, for k = 1, 2, ... until the operation
# finishes first. A write is three points: before it, after writing half its bytes
# (or at more places: ``CrashCase.cuts``), and after writing all of them. After each
# crash, fresh processes check what a user would see (``check_after_crash``). Children
# are forked, not spawned: mpkv is already imported, so a child costs a few milliseconds.

#: what a process sees of a store: ``(format, items)``, ``None`` for "no store here",
#: or ``("error", exception class name)`` when opening it raised
Observation = Any

_real = {name: getattr(os, name) for name in (
    "rename", "replace", "link", "unlink", "remove", "write", "pwrite", "ftruncate",
    "truncate", "fsync", "fdatasync", "mkdir", "open")}
_real_open = builtins.open


class CrashInjector:
    """Counts file-system calls; at call number ``kill_at`` the process SIGKILLs itself
    (``kill_at`` 0: never). ``calls`` is the number of points passed so far. A write is
    also cut short at ``cuts`` places evenly spread over its bytes (one: half of it)."""

    def __init__(self, kill_at: int, cuts: int = 1) -> None:
        self.kill_at = kill_at
        self.cuts = cuts
        self.calls = 0

    def cut(self, n: int) -> int | None:
        """Where to cut a write of ``n`` bytes short, if this is the fatal point."""
        for pos in sorted({n * i // (self.cuts + 1) for i in range(1, self.cuts + 1)} - {0, n}):
            if self.reached():
                return pos
        return None

    def reached(self) -> bool:
        """Pass one point; True when it is the fatal one (the caller then dies)."""
        self.calls += 1
        return self.calls == self.kill_at

    def point(self) -> None:
        if self.reached():
            die()

    def install(self) -> None:
        def simple(name: str) -> Callable[..., Any]:
            real = _real[name]

            def call(*a: Any, **kw: Any) -> Any:
                self.point()
                return real(*a, **kw)
            return call

        for name in ("rename", "replace", "link", "unlink", "remove", "ftruncate",
                     "truncate", "fsync", "fdatasync", "mkdir"):
            setattr(os, name, simple(name))

        def write(fd: int, data: bytes) -> int:
            self.point()
            cut = self.cut(len(data))
            if cut is not None:
                _real["write"](fd, bytes(data[:cut]))
                die()
            n: int = _real["write"](fd, data)
            self.point()
            return n

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            self.point()
            cut = self.cut(len(data))
            if cut is not None:
                _real["pwrite"](fd, bytes(data[:cut]), offset)
                die()
            n: int = _real["pwrite"](fd, data, offset)
            self.point()
            return n

        def open_(file: Any, flags: int, *a: Any, **kw: Any) -> int:
            if flags & os.O_CREAT:
                self.point()
            fd: int = _real["open"](file, flags, *a, **kw)
            return fd

        def open_file(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if not any(c in mode for c in "wax+"):
                return _real_open(file, mode, *a, **kw)
            self.point()
            return _CountedFile(_real_open(file, mode, *a, **kw), self)

        os.write, os.pwrite, os.open = write, pwrite, open_
        builtins.open = io.open = open_file


class _CountedFile:
    """A file opened for writing whose ``write`` calls are crash points like os.write's
    (buffered bytes not yet flushed are lost by the kill, as with a real SIGKILL)."""

    def __init__(self, f: Any, injector: CrashInjector) -> None:
        self._f = f
        self._inj = injector

    def write(self, data: Any) -> int:
        inj = self._inj
        inj.point()
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        cut = inj.cut(len(raw))
        if cut is not None:
            self._f.flush()
            _real["write"](self._f.fileno(), raw[:cut])
            die()
        n: int = self._f.write(data)
        if inj.reached():
            self._f.flush()
            die()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __iter__(self) -> Any:
        return iter(self._f)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def in_child(fn: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``fn`` in a forked child; ``("ok", result)``, ``("raised", traceback text)``
    or ``("killed", signal number)``. The result travels pickled through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out = pickle.dumps(("ok", fn()))
        except BaseException:
            out = pickle.dumps(("raised", traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            f.write(out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed", os.WTERMSIG(status)
    if not data:
        return "raised", f"child exited with status {status} and no report"
    result: tuple[str, Any] = pickle.loads(data)
    return result


def _arm_and_run(op: Callable[[str, Callable[[], None]], None], path: str,
                 kill_at: int, cuts: int) -> int:
    """In the child: run the op, arming the injector where the op says; the number of
    points passed."""
    inj = CrashInjector(kill_at, cuts)
    op(path, inj.install)
    return inj.calls


def _opts() -> dict[str, Any]:
    return {"fsync": "always", "auto_compact": False}


def observe(path: str, readonly: bool = False) -> Observation:
    """What a fresh process opening ``path`` sees (call it in a child)."""
    if readonly and not os.path.isdir(os.path.join(path, ".mpkv")):
        return None
    try:
        with mpkv.Store(path, readonly=readonly, **_opts()) as s:
            return s.format, dict(s.items())
    except CorruptionError:
        return "error", "CorruptionError"


@dataclass
class CrashCase:
    """An operation to crash at every step. ``build(path)`` makes the store before it;
    ``op(path, arm)`` runs it in the child, calling ``arm()`` where counting starts.
    ``fix(path)``, when the state before is an error (a damaged store), is what a user
    runs to get past it (e.g. ``mpkv.repair``)."""

    name: str
    build: Callable[[str], None]
    op: Callable[[str, Callable[[], None]], None]
    fix: Callable[[str], Any] | None = None
    min_points: int = 5
    cuts: int = 1  # places where each write is cut short
    reboot: bool = False  # the shared state is lost with the crash, as after a reboot


PROBE = "~crash-probe"


def _same(a: Observation, b: Observation) -> bool:
    # no store at all, and an empty store of the default format, look alike to a user
    empty = ("binary", {})
    return (empty if a is None else a) == (empty if b is None else b)


def _with_probe(obs: Observation) -> Observation:
    fmt, items = ("binary", {}) if obs is None else obs
    return fmt, {**items, PROBE: "p"}


def check_after_crash(path: str, before: Observation, after: Observation,
                      fix: Callable[[str], Any] | None) -> list[str]:
    """The checks after one crash, each step in a fresh process; the problems found.

    A readonly open sees exactly the state before or the state after; from then on a
    writable open, a write, another compact() and a reopen all agree with it (once seen,
    a state stays); verify finds nothing after the next writer."""
    problems: list[str] = []
    first = in_child(lambda: observe(path, readonly=True))
    if first[0] != "ok":
        return [f"readonly open: {first[1]}"]
    seen = first[1]
    if not (_same(seen, before) or _same(seen, after)):
        return [f"readonly open sees neither the state before nor after: {seen!r}"]
    if fix is not None and _same(seen, before):
        # still damaged: the same for a writer; the fix then gives the state after
        still = in_child(lambda: observe(path))
        if still != ("ok", before):
            problems.append(f"writable open of the damaged store: {still!r}")
        fixed = in_child(lambda: fix(path) and None)
        if fixed[0] != "ok":
            return [*problems, f"running the fix again: {fixed[1]}"]
        seen = after

    def write() -> tuple[Observation, Observation, list[Any]]:
        with mpkv.Store(path, **_opts()) as s:
            opened = s.format, dict(s.items())
            s.put(PROBE, "p")
            written = s.format, dict(s.items())
        return opened, written, mpkv.verify(path).damage

    res = in_child(write)
    if res[0] != "ok":
        return [*problems, f"writable open + write: {res[1]}"]
    opened, written, damage = res[1]
    if not _same(opened, seen):
        problems.append(f"writable open sees {opened!r}, readonly saw {seen!r}")
    expect = _with_probe(seen)
    if written != expect:
        problems.append(f"after a write: {written!r}, expected {expect!r}")
    if damage:
        problems.append(f"verify after the next writer: {[str(d) for d in damage]}")

    def compact() -> Observation:
        with mpkv.Store(path, **_opts()) as s:
            s.compact()
            return s.format, dict(s.items())

    res = in_child(compact)
    if res != ("ok", expect):
        problems.append(f"compact() after the crash: {res!r}, expected {expect!r}")
    def reopen() -> tuple[Observation, Observation, list[Any]]:
        return observe(path, readonly=True), observe(path), mpkv.verify(path).damage

    res = in_child(reopen)
    if res[0] != "ok":
        problems.append(f"reopen: {res[1]}")
    elif res[1][:2] != (expect, expect) or res[1][2]:
        problems.append(f"reopen (readonly, writable, verify): {res[1]!r}, expected {expect!r}")
    return problems


def _copy(src: str, dst: str) -> None:
    if os.path.exists(src):  # (no store yet: the case creates one)
        shutil.copytree(src, dst, symlinks=True)


def crash_points(case: CrashCase, workdir: str) -> tuple[int, list[str]]:
    """Crash ``case`` at every point; return (number of points, problems found)."""
    base = os.path.join(workdir, "base")
    res = in_child(lambda: case.build(base))
    assert res[0] == "ok", res[1]
    before = in_child(lambda: observe(base, readonly=True))
    assert before[0] == "ok", before[1]
    dry = os.path.join(workdir, "dry")
    _copy(base, dry)
    res = in_child(lambda: _arm_and_run(case.op, dry, 0, case.cuts))
    assert res[0] == "ok", f"{case.name} without a crash: {res[1]}"
    total = res[1]
    after = in_child(lambda: observe(dry, readonly=True))
    assert after[0] == "ok", after[1]
    shutil.rmtree(dry, ignore_errors=True)
    assert total >= case.min_points, f"{case.name}: only {total} crash points"
    problems = []
    for k in range(1, total + 1):
        work = os.path.join(workdir, f"k{k}")
        _copy(base, work)
        res = in_child(lambda k=k, w=work: _arm_and_run(case.op, w, k, case.cuts))  # type: ignore[misc]
        if res != ("killed", signal.SIGKILL):
            problems.append(f"{case.name} k={k}: the op did not die there: {res!r}")
            continue
        if case.reboot and os.path.exists(os.path.join(work, ".mpkv", "shm")):
            os.unlink(os.path.join(work, ".mpkv", "shm"))
        found = check_after_crash(work, before[1], after[1], case.fix)
        problems += [f"{case.name} k={k}/{total}: {p}" for p in found]
        shutil.rmtree(work, ignore_errors=True)
    return total, problems


# ============================================================================
# Directory state: what a rejected call must leave exactly as it was
# ============================================================================


def dir_state(path: str | os.PathLike[str], *, dirs: bool = True) -> dict[str, bytes | None]:
    """Every file's bytes under ``path`` (recursively) and, with ``dirs``, every folder
    (as ``"name/": None``), ignoring only ``.mpkv/shm*`` and ``.mpkv/lock*``: the shared
    state and lock files change on any open, which is allowed."""
    out: dict[str, bytes | None] = {}
    for root, folders, files in os.walk(path):
        if dirs:
            for d in folders:
                out[os.path.relpath(os.path.join(root, d), path) + "/"] = None
        for f in files:
            full = os.path.join(root, f)
            rel = os.path.relpath(full, path)
            if rel.split(os.sep)[0] == ".mpkv" and f.startswith(("shm", "lock")):
                continue
            with _real_open(full, "rb") as fh:
                out[rel] = fh.read()
    return out


# ============================================================================
# Hint files: what a store looks like without them, and which files open reads
# ============================================================================


def view_entries(store: mpkv.Store) -> list[tuple[str, Any]]:
    """The store's view in order, each out-of-line value as its ``(length, crc, kind)``
    (handles themselves differ between two opens): what two opens must agree on."""
    values = store._values
    return [(k, ("in file", values.entry(v)) if type(v) is int else v)
            for k, v in store._view.items()]


def replayed(path: str, **opts: Any) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """``(view_entries, items)`` of a fresh open that replays every segment: the hints
    folder is moved aside meanwhile (a rename keeps every file as it was)."""
    hints = os.path.join(path, ".mpkv", "hints")
    aside = os.path.join(path, ".mpkv", "hints-aside")
    moved = os.path.isdir(hints)
    if moved:
        os.rename(hints, aside)
    try:
        with mpkv.Store(path, **opts) as s:
            return view_entries(s), dict(s.items())
    finally:
        if moved:
            os.rename(aside, hints)


class SegmentReads:
    """Records, while installed (a context manager), every ``os.pread`` that
    ``Cursor.read`` (the log replay) makes, by file name."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self._real = os.pread

    def __enter__(self) -> SegmentReads:
        real = self._real

        def pread(fd: int, n: int, offset: int) -> bytes:
            caller = sys._getframe(1).f_code
            if caller.co_name == "read" and caller.co_filename.endswith("segments.py"):
                self.files.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd, n, offset)

        os.pread = pread
        return self

    def __exit__(self, *exc: Any) -> None:
        os.pread = self._real


# ============================================================================
# Values left in their files, attacked (test_keydir_redteam.py)
# ============================================================================


def fd_count() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


def outputs(path: str) -> list[str]:
    """The compaction outputs in a store's directory, in name order."""
    return sorted(n for n in os.listdir(path) if n.count(".") == 2)


def reseal_hint(data: bytes) -> bytes:
    """A hint's bytes with their trailing CRC-32 made right again (a hostile edit)."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


# ============================================================================
# Damage on disk (compaction of large values)
# ============================================================================


def flip_byte(file: str | os.PathLike[str], offset: int) -> None:
    """Flip the low bit of the byte at ``offset`` of ``file`` in place, changing nothing
    else (no checksum fixed, size and inode kept)."""
    with _real_open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert len(byte) == 1, (file, offset)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


# ============================================================================
# A writer in another process while this one observes
# ============================================================================


@contextmanager
def writer_process(path: str | os.PathLike[str], body: str, timeout: float = 60
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that runs ``body`` (lines of code using ``s``, the store at
    ``path`` opened with the defaults) while the caller's block observes the store; the
    block's end waits for the child, which must exit 0."""
    code = "import mpkv,sys\ns=mpkv.Store(sys.argv[1])\n" + body + "s.close()\n"
    proc = subprocess.Popen([sys.executable, "-c", code, os.fspath(path)])
    try:
        yield proc
    finally:
        proc.wait(timeout=timeout)
    assert proc.returncode == 0


# ============================================================================
# A view left holding values in segments another store compacted away
# ============================================================================


def view_left_on_removed_segments(path: str, segment_bytes: int, **options: Any
                                  ) -> tuple[Any, dict[str, str]]:
    """A store opened with ``options`` whose view holds large values (one record each,
    left in their files) in segments that another store then compacted away, and which
    caught up only under the writer lock (an empty transaction), where a view does not
    rebuild. Returns the store and the state it must hold."""
    import mpkv

    store = mpkv.Store(path, max_segment_bytes=segment_bytes, auto_compact=False, **options)
    model = {f"k{i}": f"{i}-" + "L" * 300 for i in range(40)}
    for k, v in model.items():
        store[k] = v
    with mpkv.Store(path, auto_compact=False) as other:
        other.compact()
        other["o"] = model["o"] = "O" * 400
    with store.transaction():
        pass
    return store, model
