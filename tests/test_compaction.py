"""Online compaction (CONTRACT.md: "compact(): rewrite sealed segments keeping only live
data, while other threads and processes go on reading and writing; no write is lost,
no reader sees a gap"; design in docs/compaction.md).

Children run ``tests/compaction_workers.py`` (see its docstring for the roles and the
conventions: ``ready`` on stdout, stop on stdin EOF, acks in a log file written after
each op returned, seeded op generators the parent regenerates).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import compaction_workers as cw  # noqa: E402

import mpkv  # noqa: E402
from mpkv.locks import CompactionLock  # noqa: E402

WORKER = os.path.join(TESTS, "compaction_workers.py")
FORMATS = ["binary", "text"]
SEGMENT = re.compile(r"^\d{12}(\.\d{4})?\.seg$")
TIMEOUT = 120.0  # generous: the machine may be loaded


# --------------------------------------------------------------------------- helpers


class Child:
    """A worker process: ``ready`` handshake and final report over a stdout pipe, stop
    by closing its stdin, stderr in a file (shown when it fails)."""

    def __init__(self, role: str, args: dict[str, Any], tmp: Path, name: str) -> None:
        self.name = name
        self.err_path = tmp / f"{name}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, WORKER, role, json.dumps(args)], cwd=ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self._buf = b""
        self._eof = False

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def _fail(self, what: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        pytest.fail(f"{self.name}: {what} (exit {self.proc.returncode}):\n{self.stderr()}")

    def readline(self, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            if self._eof:
                self._fail("ended without a line")
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no line within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                self._buf += chunk
                self._eof = not chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, line: str, timeout: float = TIMEOUT) -> None:
        got = self.readline(timeout)
        if got != line:
            self._fail(f"said {got!r}, expected {line!r}")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def report(self, timeout: float = TIMEOUT, stop: bool = True) -> dict[str, Any]:
        """The final JSON line (asking the child to stop first, unless ``stop`` is
        False); the child must then exit 0."""
        if stop:
            self.stop()
        line = self.readline(timeout)
        self.stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail("did not exit")
        if self.proc.returncode != 0:
            self._fail("failed")
        return json.loads(line)  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.stop()

    def close(self) -> None:
        self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


def state_of(path: Path | str, **kw: Any) -> dict[str, Any]:
    with mpkv.Store(path, **kw) as s:
        return dict(s.items())


def seg_files(path: Path | str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def seg_bytes(path: Path | str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in seg_files(path))


def model(base: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    state = dict(base)
    for op in ops:
        cw.apply_model(state, op)
    return state


def acked(log: Path) -> int:
    """Complete lines of an ack log (a line cut by a kill counts as not acked)."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return 0
    return data[: data.rfind(b"\n") + 1].count(b"\n")


def tmp_outputs(path: Path | str) -> list[str]:
    aux = os.path.join(path, ".mpkv")
    return sorted(n for n in os.listdir(aux) if n.startswith("compact-"))


# ------------------------------------------- 1. compaction under concurrent load


@pytest.mark.parametrize("fmt", FORMATS)
def test_compaction_under_concurrent_writers_readers_and_openers(tmp_path: Path, fmt: str) -> None:
    """compact() every 0.2 s in its own process while 2 writers, 1 reader and 1 process
    that opens and closes the store work on it (max_segment_bytes=2048: many segments),
    for at least ~4 s and until the workload did what the checks below need (however
    slow a loaded machine makes it). Nothing acknowledged is lost, no deleted key comes
    back, and no process ever sees a key vanish or a version go backwards."""
    path = tmp_path / "store"
    opts = {"path": str(path), "format": fmt, "max_segment_bytes": 2048}
    with mpkv.Store(path, format=fmt, max_segment_bytes=2048):
        pass  # created once, so no child races to create it with other options
    seed = 11 if fmt == "binary" else 12
    logs = {name: tmp_path / f"{name}.log"
            for name in ("writer0", "writer1", "reader", "opener", "compactor")}
    children: list[Child] = []
    try:
        writers = [Child("writer", {**opts, "seed": seed, "wid": w,
                                    "log": str(logs[f"writer{w}"])}, tmp_path, f"writer{w}")
                   for w in range(2)]
        reader = Child("reader", {**opts, "seed": seed, "log": str(logs["reader"])},
                       tmp_path, "reader")
        opener = Child("opener", {"path": str(path), "log": str(logs["opener"])},
                       tmp_path, "opener")
        children = [*writers, reader, opener]
        for c in children:
            c.expect("ready")
        compactor = Child("compactor", {**opts, "interval": 0.2,
                                        "log": str(logs["compactor"])},
                          tmp_path, "compactor")
        children.append(compactor)
        compactor.expect("ready")

        def workload_done() -> bool:
            runs = [json.loads(line) for line in logs["compactor"].read_text().splitlines()
                    if line.endswith("}")]
            return (len(runs) >= 3 and max(r["segments_before"] for r in runs) >= 10
                    and min(acked(logs[f"writer{w}"]) for w in range(2)) >= 200
                    and acked(logs["opener"]) >= 3 and acked(logs["reader"]) >= 1)

        # Stopped by what happened, not by a clock: the 4 s only keep the workload at
        # least as long as on a fast machine; TIMEOUT only catches a hang.
        started = time.monotonic()
        while time.monotonic() - started < 4.0 or not workload_done():
            for c in children:
                if c.proc.poll() is not None:
                    c._fail("ended before it was stopped")
            if time.monotonic() - started > TIMEOUT:
                compactor._fail("the workload made too little progress in "
                                f"{TIMEOUT} s: " + ", ".join(
                                    f"{n}: {acked(log)} lines" for n, log in logs.items()))
            time.sleep(0.05)
        comp = compactor.report()  # stopped first: everything above ran while it compacted
        reports = {c.name: c.report() for c in [*writers, reader, opener]}
    finally:
        for c in children:
            c.close()

    # each writer's acked ops, regenerated from its seed
    expected: dict[str, Any] = {}
    deleted: set[str] = set()
    for w in range(2):
        n = acked(logs[f"writer{w}"])
        assert n == reports[f"writer{w}"]["acked"]
        ops = cw.take(cw.mono_ops(seed, w), n)
        expected.update(model({}, ops))
        deleted |= {k for op in ops for k, v in cw.changes_of(op) if v is None}
    assert deleted, "the writers deleted nothing: the workload is too short"

    final = state_of(path)
    assert not deleted & set(final), f"deleted keys came back: {sorted(deleted & set(final))[:5]}"
    missing = sorted(set(expected) - set(final))
    wrong = sorted(k for k in expected if k in final and final[k] != expected[k])
    extra = sorted(set(final) - set(expected))
    assert (missing, wrong, extra) == ([], [], []), "final state differs from the acked model"

    for name, rep in [("reader", reports["reader"]), ("opener", reports["opener"]),
                      ("compactor", comp)]:
        assert rep["violations"] == [], f"{name} saw the log go backwards:\n" + "\n".join(
            rep["violations"])
        assert rep["checks"] > 0, f"{name} checked nothing"

    # the workload really exercised compaction of many segments, many times
    results = comp["results"]
    assert len(results) >= 3, results
    assert max(r["segments_before"] for r in results) >= 10, results
    for r in results:
        assert set(r) == {"segments_before", "segments_after", "bytes_before", "bytes_after"}
    assert reports["opener"]["opens"] >= 3
    assert min(reports[f"writer{w}"]["acked"] for w in range(2)) >= 200

    # a last compaction keeps the exact state; the store verifies clean
    with mpkv.Store(path) as s:
        s.compact()
        assert dict(s.items()) == expected
    assert state_of(path) == expected
    assert mpkv.verify(str(path)).ok
    assert tmp_outputs(path) == []


# ------------------------------------------------------------ 2. disk space


#: Per live key, on top of len(key) + len(value) in UTF-8 bytes: the 9-byte entry
#: header of the binary format (format.md: op/kind, klen, vlen). The text format frames
#: a put with 4 bytes ("P|", "|", "\n"), so 9 is an upper bound for both.
RECORD_OVERHEAD = 9


def _nbytes(v: str | bytes) -> int:
    return len(v) if isinstance(v, bytes) else len(v.encode("utf-8"))


@pytest.mark.parametrize("value_len", [8, 100])
@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_bytes_after_compaction_within_1_5x_live_data(tmp_path: Path, fmt: str,
                                                            value_len: int) -> None:
    """Keys each overwritten 10 times (and 10% then deleted), compacted, then one tiny
    write so the active segment is not empty. Compared: the total size of the files
    matching *.seg in the store directory, against

        live = sum over live keys of (len(key) + len(value) + RECORD_OVERHEAD)

    lengths in UTF-8 bytes (raw length for bytes values); target: size <= 1.5 * live."""
    path = tmp_path / "store"
    rng = random.Random(f"{fmt}-{value_len}")
    nkeys = 400
    with mpkv.Store(path, format=fmt, max_segment_bytes=16 * 1024) as s:
        for rnd in range(10):
            with s.transaction() as tx:  # one commit per round keeps this fast
                for i in range(nkeys):
                    v: str | bytes = f"{rnd}:" + "".join(
                        rng.choice("abcdé|") for _ in range(value_len))
                    if fmt == "binary" and i % 3 == 0:
                        v = v.encode() + b"\x00"
                    tx.put(f"key:{i:04d}", v)
        for i in range(0, nkeys, 10):
            s.delete(f"key:{i:04d}")
        before = seg_bytes(path)
        result = s.compact()
        s.put("t", "1")  # a tiny write: the active segment is not empty
        state = dict(s.items())
        assert len(state) == nkeys - nkeys // 10 + 1
        assert len(seg_files(path)) >= 2
    live = sum(_nbytes(k) + _nbytes(v) + RECORD_OVERHEAD for k, v in state.items())
    after = seg_bytes(path)
    assert before >= 5 * live, "the workload did not create garbage to reclaim"
    assert result["bytes_before"] <= before
    assert result["segments_after"] >= 1
    assert after <= 1.5 * live, (f"{fmt}: {after} segment bytes after compaction for "
                                 f"{live} bytes of live data ({after / live:.2f}x)")
    assert state_of(path) == state


# ---------------------------------------------------- 3. SIGKILL during compaction


KILL_NKEYS = 150
KILL_SEGMENT = 1024


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Per format, a store with many segments (overwrites and deletes), built once and
    copied for each round."""
    out = {}
    for fmt in FORMATS:
        path = tmp_path_factory.mktemp(f"prepared-{fmt}") / "store"
        ops = cw.prepared_ops(7, fmt, KILL_NKEYS, 3000)
        with mpkv.Store(path, format=fmt, max_segment_bytes=KILL_SEGMENT, fsync="never") as s:
            for op in ops:
                cw.apply_store(s, op)
        state = model({}, ops)
        assert state_of(path) == state
        assert len(seg_files(path)) >= 100
        out[fmt] = (path, state)
    return out


KILL_KINDS = [("fsync", 3), ("rename", 3), ("fsync_dir", 4), ("unlink", 120)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_during_compaction_keeps_exact_state(tmp_path: Path, fmt: str,
                                                     prepared: dict) -> None:
    """20 seeded rounds per format: a child compacts a prepared many-segment store over
    and over while a writer child writes and logs its acks; the compactor is SIGKILLed
    at a random time (even rounds: by the parent, after a random delay) or right after
    a random file operation of the compaction (odd rounds: it kills itself after the
    n-th fsync / rename / directory fsync / unlink in mpkv.compaction); the writer is
    killed at the same moment. Reopening gives exactly the prepared state plus the
    acked writes (plus, at most, the one in flight); a later compact() keeps that exact
    state; verify() is clean."""
    template, base = prepared[fmt]
    mid_compaction = 0
    for rnd in range(20):
        rng = random.Random(f"kill-{fmt}-{rnd}")
        path = tmp_path / f"r{rnd}"
        shutil.copytree(template, path)
        seed = rng.randrange(1 << 30)
        opts = {"path": str(path), "format": fmt, "max_segment_bytes": KILL_SEGMENT}
        kill_at = None
        if rnd % 2:
            kind, most = rng.choice(KILL_KINDS)
            kill_at = [kind, rng.randint(1, most)]
        clog, wlog = tmp_path / f"c{rnd}.log", tmp_path / f"w{rnd}.log"
        comp = Child("crash_compactor", {**opts, "log": str(clog), "kill_at": kill_at},
                     tmp_path, f"compactor{rnd}")
        writer = Child("crash_writer", {**opts, "seed": seed, "nkeys": KILL_NKEYS,
                                        "log": str(wlog)}, tmp_path, f"writer{rnd}")
        try:
            comp.expect("ready")
            writer.expect("ready")
            if kill_at is None:
                time.sleep(rng.uniform(0.0, 0.6))  # the random kill moment
                comp.kill()
            else:
                try:
                    comp.proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    comp._fail(f"did not reach kill point {kill_at}")
            writer.kill()
            for c in (comp, writer):
                if c.proc.returncode != -signal.SIGKILL:
                    c._fail("did not die by SIGKILL")
        finally:
            comp.close()
            writer.close()

        lines = clog.read_text().splitlines()
        if lines and lines[-1].startswith(("start", "kill")):
            mid_compaction += 1
        n = acked(wlog)
        ops = cw.take(cw.random_ops(seed, fmt, KILL_NKEYS), n + 1)
        exact, with_inflight = model(base, ops[:n]), model(base, ops)
        where = f"round {rnd} ({fmt}, kill_at={kill_at}, acked={n}, compactor log {lines[-2:]})"

        assert mpkv.verify(str(path)).ok, where
        got = state_of(path)
        assert got in (exact, with_inflight), where
        kept = tmp_path / f"r{rnd}-before-compact"  # left behind for a post-mortem
        shutil.copytree(path, kept)
        where += f" [store before the later compact(): {kept}]"
        # The in-flight op's record may be complete but unpublished: openers stop at the
        # published end, the next writer (here: compact()) reads to the end of the files
        # and keeps it (protocol.md). So the state may still gain that op, never lose it.
        allowed = [with_inflight] if got == with_inflight else [exact, with_inflight]
        with mpkv.Store(path) as s:
            s.compact()
            after = dict(s.items())
            assert after in allowed, where
        assert state_of(path) == after, where
        assert state_of(path, readonly=True) == after, where
        assert mpkv.verify(str(path)).ok, where
        assert tmp_outputs(path) == [], where
        assert all(SEGMENT.match(n) for n in seg_files(path)), where
        shutil.rmtree(path)
        shutil.rmtree(kept)
    # the kills did land inside compactions (all odd rounds, by construction)
    assert mid_compaction >= 10, mid_compaction


# ------------------------------------------------------- 4. lagging watcher


@pytest.mark.parametrize("fmt", FORMATS)
def test_lagging_watcher_gets_every_change_across_compactions(tmp_path: Path, fmt: str) -> None:
    """A watcher in this process does not read while another process writes 5 phases of
    ops in small segments, compacting every 40 ops; the watcher catches up only after
    phases 1 and 3 (then lags again) and at the end. It must receive every change, in
    commit order, exactly once: compaction keeps the segments it has not read."""
    path = tmp_path / "store"
    phases, per_phase = 5, 150
    seed = 5
    with mpkv.Store(path, format=fmt, max_segment_bytes=512) as s:
        s.put("before", "x")  # not reported: committed before watch()
        changes = s.watch(timeout=TIMEOUT)
        child = Child("watch_writer", {"path": str(path), "format": fmt, "seed": seed,
                                       "phases": phases, "per_phase": per_phase,
                                       "compact_every": 40}, tmp_path, "watch_writer")
        got: list[tuple[str, Any]] = []
        try:
            child.expect("ready")
            for phase in range(phases):
                child.expect(f"phase {phase}")
                if phase in (1, 3):  # catch up to this phase's marker, then lag again
                    for kv in changes:
                        got.append(kv)
                        if kv == ("marker", f"phase {phase}"):
                            break
                child.send("go")
            report = child.report()
        finally:
            child.close()
        for kv in changes:
            got.append(kv)
            if kv[0] == "zz:end":
                break
        expected: list[tuple[str, Any]] = []
        for phase, ops in enumerate(cw.watch_phases(seed, fmt, phases, per_phase)):
            for op in ops:
                expected += cw.changes_of(op)
            expected.append(("marker", f"phase {phase}"))
        expected.append(("zz:end", "done"))
        bad = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                   min(len(got), len(expected)))
        assert got == expected, (f"{len(got)} changes received, {len(expected)} committed; "
                                 f"first difference at {bad}: got {got[bad:bad + 3]}, "
                                 f"expected {expected[bad:bad + 3]}")
        # the compactions had segments to remove while the watcher lagged
        assert sum(r["segments_before"] for r in report["compactions"]) > 20
        state = dict(s.items())
    # once the watcher is gone, a compaction leaves only its outputs and the new active
    # segment in the store directory (format.md names), and the exact state
    with mpkv.Store(path) as s:
        s.compact()
        assert dict(s.items()) == state
    names = seg_files(path)
    parts = {n.split(".")[0] for n in names[:-1]}
    assert len(parts) == 1 and all(n.count(".") == 2 for n in names[:-1]), names
    assert names[-1].count(".") == 1, names
    assert state_of(path) == state


# ----------------------------------------------------------- 5. edge cases


EMPTY = {"segments_before": 0, "segments_after": 0, "bytes_before": 0, "bytes_after": 0}


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_empty_store(tmp_path: Path, fmt: str) -> None:
    with mpkv.Store(tmp_path / "s", format=fmt) as s:
        assert s.compact() == EMPTY
        assert s.compact() == EMPTY
        assert dict(s.items()) == {}
        s.put("a", "1")  # still writable afterwards
        assert s["a"] == "1"
    assert state_of(tmp_path / "s") == {"a": "1"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_store_with_only_an_active_segment(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, format=fmt) as s:
        s.put("a", "1")
        s.put("a", "2")
        s.put("b", "x")
        s.delete("b")
        assert len(seg_files(path)) == 1
        r = s.compact()
        assert r["segments_before"] == 1
        assert r["segments_after"] == 1
        assert r["bytes_after"] < r["bytes_before"]
        assert dict(s.items()) == {"a": "2"}
        s.put("c", "3")
        assert dict(s.items()) == {"a": "2", "c": "3"}
    assert state_of(path) == {"a": "2", "c": "3"}
    assert mpkv.verify(str(path)).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_twice_in_a_row(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, format=fmt, max_segment_bytes=256) as s:
        for i in range(200):
            s.put(f"k{i % 17}", f"v{i}")
            if i % 5 == 0:
                s.delete(f"k{(i * 7) % 17}")
        expected = dict(s.items())
        first = s.compact()
        size1 = seg_bytes(path)
        second = s.compact()
        assert dict(s.items()) == expected
        assert first["segments_before"] > 1
        assert second["bytes_after"] <= first["bytes_after"]
        assert seg_bytes(path) <= size1
        s.put("after", "1")
        expected["after"] = "1"
        assert dict(s.items()) == expected
    assert state_of(path) == expected
    assert mpkv.verify(str(path)).ok
    assert all(SEGMENT.match(n) for n in seg_files(path))


def test_compact_on_readonly_store_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=128) as s:
        for i in range(50):
            s.put(f"k{i % 5}", f"v{i}")
    listing = {n: os.path.getsize(path / n) for n in seg_files(path)}
    with mpkv.Store(path, readonly=True) as ro:
        with pytest.raises(mpkv.ReadOnlyError):
            ro.compact()
        assert ro["k4"] == "v49"  # still usable after the error
    assert {n: os.path.getsize(path / n) for n in seg_files(path)} == listing


def test_compact_after_close_raises_closed_error(tmp_path: Path) -> None:
    s = mpkv.Store(tmp_path / "s")
    s.put("a", "1")
    s.close()
    with pytest.raises(mpkv.ClosedError):
        s.compact()
    assert state_of(tmp_path / "s") == {"a": "1"}


def test_compact_errors_are_mpkv_errors() -> None:
    assert issubclass(mpkv.ReadOnlyError, mpkv.Error)
    assert issubclass(mpkv.ClosedError, mpkv.Error)


# ------------------------------------------------- 6. text stays human-readable


def test_text_segments_after_compaction_are_put_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, format="text", max_segment_bytes=200) as s:
        for i in range(120):
            s.put(f"key {i % 15}", f"v{i}|with bar|é😀")
            if i % 4 == 0:
                s.delete(f"key {(i * 3) % 15}")
        s.delete("never existed")
        s.put("", "empty key")
        s.put("empty value", "")
        expected = dict(s.items())
        deleted = {f"key {i}" for i in range(15)} - set(expected)
        assert deleted
        s.compact()
        assert dict(s.items()) == expected
    lines: list[str] = []
    for name in seg_files(path):
        assert SEGMENT.match(name)
        text = (path / name).read_bytes().decode("utf-8")
        assert text == "" or text.endswith("\n"), name
        lines += text.splitlines()
    assert all(line.startswith("P|") for line in lines), [x for x in lines if x[:2] != "P|"]
    parsed = {}
    for line in lines:
        _, key, value = line.split("|", 2)
        assert key not in parsed, f"{key!r} twice after compaction"
        parsed[key] = value
    assert parsed == expected
    assert not deleted & set(parsed)
    assert state_of(path) == expected
    assert state_of(path, readonly=True) == expected


# --- verify and repair beside a compaction --------------------------------------------


def _churn(path: str, rounds: int) -> None:
    with mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=4000) as s:
        for r in range(rounds):
            s.update({f"k{i}": f"{r}-{i}" * 20 for i in range(60)})
            s.compact()


def test_verify_during_compactions_neither_raises_nor_reports_false_damage(tmp_path):
    path = str(tmp_path / "s")
    _churn(path, 1)
    child = multiprocessing.get_context("fork").Process(target=_churn, args=(path, 60))
    child.start()
    problems: list[str] = []
    try:
        while child.is_alive():
            try:
                report = mpkv.verify(path)
            except Exception as exc:  # before: FileNotFoundError of a compacted segment
                problems.append(f"verify raised {exc!r}")
                continue
            if not report.ok:
                problems.append(report.summary())
    finally:
        child.join()
    assert child.exitcode == 0
    assert not problems, problems[:3]


def test_repair_waits_for_a_running_compaction(tmp_path):
    path = str(tmp_path / "s")
    _churn(path, 1)
    released = tmp_path / "released"
    ready = multiprocessing.get_context("fork").Event()

    def hold() -> None:
        lock = CompactionLock(os.path.join(path, ".mpkv", "compact.lock"))
        lock.acquire(True)
        ready.set()
        time.sleep(0.5)
        released.write_text("yes")
        lock.release()

    child = multiprocessing.get_context("fork").Process(target=hold)
    child.start()
    try:
        assert ready.wait(10)
        assert mpkv.repair(path).ok
        assert released.exists(), "repair ran while a compaction held its lock"
    finally:
        child.join()
