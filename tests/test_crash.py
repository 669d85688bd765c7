"""Crash safety of mpkv: SIGKILLed writers (plain ops, transactions, transactions larger
than a segment, three writers at once, deserialize), torn tails at every byte offset,
flipped bytes and repair, malformed text lines, a process dying at each step of
compact(), simulated power loss (LevelDB fault_injection_test style) and decoder fuzzing.

Children run ``tests/crash_workers.py`` and log each op *after* it returned; the ops
come from a seeded generator, so the parent knows every acknowledged op and the single
op that may have been in flight when the child was killed. All randomness is seeded
from the test parameters and the round number.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from itertools import product

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import crash_workers as cw  # noqa: E402

import mpkv  # noqa: E402
from mpkv.codec import CODECS, HEADER  # noqa: E402
from mpkv.segments import AUX, SHM, list_segments, written_format  # noqa: E402

WORKER = os.path.join(TESTS, "crash_workers.py")
BINARY, TEXT = CODECS["binary"], CODECS["text"]


# --------------------------------------------------------------------------- helpers


def snapshot(path, **kw):
    with mpkv.Store(path, **kw) as s:
        return dict(s.items())


def model(base, ops):
    state = dict(base)
    for op in ops:
        cw.apply_model(state, op)
    return state


def spawn(mode, args, err_path):
    with open(err_path, "wb") as err:
        return subprocess.Popen([sys.executable, WORKER, mode, json.dumps(args)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)


def log_lines(log):
    """Complete lines of a child's log (a line cut by the kill is ignored: conservative,
    the op it describes is then treated as the one in flight)."""
    try:
        with open(log, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].decode().splitlines()


def child_error(proc, err_path):
    with open(err_path, "rb") as f:
        return f"child exited with {proc.returncode}: {f.read().decode(errors='replace')}"


def wait_for_line(proc, log, err_path, line, timeout=60.0):
    deadline = time.monotonic() + timeout
    while line not in log_lines(log):
        if proc.poll() is not None:
            pytest.fail(child_error(proc, err_path))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"child did not log {line!r} within {timeout} s")
        time.sleep(0.002)


def sigkill(*procs):
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def acked_count(log, seed, fmt, allow_tx, prefix):
    """Number of ops the child logged as acknowledged; checks that parent and child
    generated the same ops."""
    lines = [ln for ln in log_lines(log) if ln != "ready"]
    ops = cw.take(seed, fmt, len(lines), prefix=prefix, allow_tx=allow_tx)
    for i, (ln, op) in enumerate(zip(lines, ops, strict=True)):
        assert ln == f"{i} {cw.tag(op)}", "child and parent generated different ops"
    return len(lines)


def split(state, prefixes):
    parts = {p: {k: v for k, v in state.items() if k.startswith(p)} for p in prefixes}
    rest = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    return parts, rest


def check_after_kill(path, base, writers, after_key, label):
    """``writers``: list of (prefix, ops, n): n ops acknowledged, ops[n] maybe in flight.

    The reopened state must be, per writer, model(n) or model(n + 1); then one more put
    must work and survive a reopen. Returns the final state (base for the next round).
    """
    report = mpkv.verify(path)
    assert report.ok, f"{label}: store damaged after SIGKILL:\n{report.summary()}"
    prefixes = [p for p, _, _ in writers]
    base_parts, base_rest = split(base, prefixes)

    def matches(state):
        parts, rest = split(state, prefixes)
        found = {}
        for prefix, ops, n in writers:
            found[prefix] = [j for j in (n, n + 1)
                             if parts[prefix] == model(base_parts[prefix], ops[:j])]
        return found, rest

    s1 = snapshot(path)
    m1, rest1 = matches(s1)
    assert rest1 == base_rest, f"{label}: keys outside every writer's space changed"
    for prefix, ops, n in writers:
        assert m1[prefix], (
            f"{label}: writer {prefix!r} state after SIGKILL is neither the replay of its "
            f"{n} acknowledged ops nor that plus the in-flight op {ops[n]!r}")

    with mpkv.Store(path) as s:
        s.put(after_key, label)
        assert s.get(after_key) == label
    s2 = snapshot(path)
    m2, rest2 = matches(s2)
    assert rest2 == {**base_rest, after_key: label}, f"{label}: the post-crash put is lost"
    for prefix in prefixes:
        # An op that never returned may be linearized late (a complete but unpublished
        # record picked up by the next writer), never un-applied once it was seen.
        assert m2[prefix] and max(m2[prefix]) >= min(m1[prefix]), (
            f"{label}: writer {prefix!r} state changed inconsistently after the next put")
    return s2


# ----------------------------------------------------------------- 1. SIGKILL loops

# (format, fsync, transactions allowed, max_segment_bytes). Text uses plain ops only: a
# text transaction may keep a prefix on crash (documented in the contract).
# "big": some transactions exceed max_segment_bytes and span several segments.
KILL_PARAMS = [
    ("binary", "always", "big", 400),
    ("binary", "periodic", True, 700),
    ("binary", "never", "big", 1000),
    ("text", "always", False, 300),
    ("text", "periodic", False, 1200),
    ("text", "never", False, 2000),
]
KILL_ROUNDS = 9


@pytest.mark.parametrize("pidx", range(len(KILL_PARAMS)),
                         ids=[f"{f}-{s}" for f, s, _, _ in KILL_PARAMS])
def test_sigkill_single_writer(tmp_path, pidx):
    fmt, fsync, allow_tx, maxseg = KILL_PARAMS[pidx]
    prefix = "w/"
    most_segments = big_tx = 0
    for rnd in range(KILL_ROUNDS):
        if rnd % 3 == 0:  # a few crashes on top of each other, then a fresh store (speed)
            path = str(tmp_path / f"store{rnd}")
            state: dict = {}
        seed = 10_000 + 100 * pidx + rnd
        rng = random.Random(seed)
        log, err = tmp_path / f"log{rnd}", tmp_path / f"err{rnd}"
        args = dict(path=path, format=fmt, fsync=fsync, max_segment_bytes=maxseg, seed=seed,
                    allow_tx=allow_tx, prefix=prefix, log=str(log))
        proc = spawn("writer", args, err)
        wait_for_line(proc, log, err, "ready")
        time.sleep(rng.uniform(0.05, 0.4))
        if proc.poll() is not None:
            pytest.fail(child_error(proc, err))
        sigkill(proc)
        n = acked_count(log, seed, fmt, allow_tx, prefix)
        ops = cw.take(seed, fmt, n + 1, prefix=prefix, allow_tx=allow_tx)
        state = check_after_kill(path, state, [(prefix, ops, n)], f"__after__{rnd}",
                                 f"round {rnd} ({fmt}/{fsync}, {n} acked)")
        most_segments = max(most_segments, len(list_segments(path)))
        big_tx += sum(1 for op in ops[:n] if op[0] == "tx" and len(op[1]) >= 10)
    assert most_segments > 3, "no rotation happened: test too weak"
    assert big_tx or allow_tx != "big", "no multi-segment transaction: test too weak"


CONC_PARAMS = [
    ("binary", "always", True, 500),
    ("binary", "never", "big", 400),
    ("text", "periodic", False, 300),
]
CONC_ROUNDS = 3
CONC_WRITERS = 3


@pytest.mark.parametrize("pidx", range(len(CONC_PARAMS)),
                         ids=[f"{f}-{s}" for f, s, _, _ in CONC_PARAMS])
def test_sigkill_concurrent_writers(tmp_path, pidx):
    fmt, fsync, allow_tx, maxseg = CONC_PARAMS[pidx]
    path = str(tmp_path / "store")
    mpkv.Store(path, format=fmt, max_segment_bytes=maxseg).close()
    state: dict = {}
    totals = [0] * CONC_WRITERS
    for rnd in range(CONC_ROUNDS):
        rng = random.Random(20_000 + 100 * pidx + rnd)
        procs, writers = [], []
        for w in range(CONC_WRITERS):
            seed = 30_000 + 1000 * pidx + 10 * rnd + w
            log, err = tmp_path / f"log{rnd}.{w}", tmp_path / f"err{rnd}.{w}"
            args = dict(path=path, format=fmt, fsync=fsync, max_segment_bytes=maxseg,
                        seed=seed, allow_tx=allow_tx, prefix=f"c{w}/", log=str(log))
            procs.append((spawn("writer", args, err), log, err, seed, f"c{w}/"))
        for proc, log, err, _, _ in procs:
            wait_for_line(proc, log, err, "ready")
        time.sleep(rng.uniform(0.05, 0.4))
        for proc, _, err, _, _ in procs:
            if proc.poll() is not None:
                pytest.fail(child_error(proc, err))
        sigkill(*(p for p, *_ in procs))
        for _, log, _, seed, prefix in procs:
            n = acked_count(log, seed, fmt, allow_tx, prefix)
            writers.append((prefix, cw.take(seed, fmt, n + 1, prefix=prefix,
                                            allow_tx=allow_tx), n))
        counts = [n for _, _, n in writers]
        state = check_after_kill(path, state, writers, f"__after__{rnd}",
                                 f"round {rnd} ({fmt}/{fsync}, acked {counts})")
        totals = [t + n for t, n in zip(totals, counts, strict=True)]
    assert all(totals), f"a writer never got to write: test too weak ({totals})"


DESER_PARAMS = [("binary", "periodic"), ("text", "periodic"), ("text", "always")]


@pytest.mark.parametrize("fmt,fsync", DESER_PARAMS, ids=[f"{f}-{s}" for f, s in DESER_PARAMS])
def test_sigkill_during_deserialize_is_all_or_nothing(tmp_path, fmt, fsync):
    """deserialize() replaces the whole contents "atomically for every process,
    crash-safe": a writer killed in the middle of one leaves the old or the new state,
    never a mix, in both formats (the replacement spans several segments here)."""
    states = []
    files = []
    for name, n in (("A", 150), ("B", 170)):
        state = {f"{name}{i:03d}": f"{name} value {i}" for i in range(n)}
        state.update({f"shared{i:02d}": f"{name}-{i}" for i in range(40)})
        src = str(tmp_path / f"make{name}")
        with mpkv.Store(src, format=fmt, fsync="never") as s:
            for k, v in state.items():
                s.put(k, v)
            s.serialize(str(tmp_path / f"{name}.snap"))
        states.append(state)
        files.append(str(tmp_path / f"{name}.snap"))
    path = str(tmp_path / "store")
    with mpkv.Store(path, format=fmt, max_segment_bytes=1500) as s:
        s.deserialize(files[0])
        assert dict(s.items()) == states[0]
    total = 0
    for rnd in range(4):
        rng = random.Random(f"deser-{fmt}-{fsync}-{rnd}")
        log, err = tmp_path / f"log{rnd}", tmp_path / f"err{rnd}"
        args = dict(path=path, format=fmt, fsync=fsync, max_segment_bytes=1500, seed=0,
                    files=files, log=str(log))
        proc = spawn("deserialize", args, err)
        wait_for_line(proc, log, err, "ready")
        time.sleep(rng.uniform(0.05, 0.3))
        if proc.poll() is not None:
            pytest.fail(child_error(proc, err))
        sigkill(proc)
        n = len([ln for ln in log_lines(log) if ln != "ready"])
        total += n
        label = f"round {rnd}: killed after {n} deserialize calls"
        assert mpkv.verify(path).ok, label
        got = snapshot(path)
        # n calls done: the state is files[n % 2]; the call in flight makes files[(n+1) % 2]
        if got not in states:
            a = sum(1 for k in got if k.startswith("A"))
            b = sum(1 for k in got if k.startswith("B"))
            pytest.fail(f"{label}: a mix of the two snapshots ({a} A keys, {b} B keys, "
                        f"{len(got)} keys)")
        with mpkv.Store(path, fsync="never") as s:
            if s.get("A000") is None:
                s.deserialize(files[0])  # back to A, the state the next child starts from
        assert snapshot(path) == states[0], label
    assert total > 0, "the child never completed a deserialize: test too weak"


# --------------------------------------------------- 2. torn tail at every byte offset


def _newest(path):
    segs = list_segments(path)
    name = segs[-1]
    return name, os.path.getsize(os.path.join(path, name))


def _prepare_torn_case(path, case):
    """Build a store; return (segment, record start, record end, state without the last
    record). The last record is the newest segment's last one."""
    fmt = "text" if case.startswith("text") else "binary"
    maxseg = 4096 if case == "binary-tx50" else 230 if fmt == "binary" else 200
    before = {}
    with mpkv.Store(path, format=fmt, max_segment_bytes=maxseg, fsync="never") as s:
        for i in range(14):
            s.put(f"k{i % 9}", f"value {i} é")
            before[f"k{i % 9}"] = f"value {i} é"
        s.delete("k3")
        del before["k3"]
        if case.endswith("fresh"):
            # fill the newest segment up so that a short last record does not fit
            i = 0
            while maxseg - _newest(path)[1] > 40:
                filler = "f" * min(10, maxseg - _newest(path)[1] - 40)
                s.put(f"fill{i}", filler)
                before[f"fill{i}"] = filler
                i += 1
        seg0, size0 = _newest(path)
        if case == "binary-tx50":
            with s.transaction() as tx:
                for i in range(50):  # one-character keys: a small record, still 50 puts
                    tx.put(chr(0x41 + i), "v" * (i % 2))
                tx.delete("k1")
            expect_fresh = False
        else:
            fresh = case.endswith("fresh")
            room = maxseg - size0
            # a value that does not fit what is left of the segment, or one that does
            vlen = room + 5 if fresh else max(1, min(12, room - 30))
            value = ("välüe€😀" * 40)[:vlen] if fmt == "text" else b"\x00|\n" * vlen
            value = value[:vlen]
            s.put("last", value)
            expect_fresh = fresh
    seg, size = _newest(path)
    if expect_fresh:
        assert seg != seg0, "setup: the last record should start a new segment"
        start = 0
    else:
        assert seg == seg0, "setup: the last record should share the segment"
        start = size0
    return seg, start, size, before


TORN_CASES = ["binary-put-mid", "binary-put-fresh", "binary-tx50", "text-line-mid",
              "text-line-fresh"]


@pytest.mark.parametrize("case", TORN_CASES)
def test_truncate_last_record_at_every_offset(tmp_path, case):
    src = str(tmp_path / "src")
    seg, start, end, before = _prepare_torn_case(src, case)
    assert end - start > 8
    with open(os.path.join(src, seg), "rb") as f:
        whole = f.read()
    for off in range(start, end):
        dst = str(tmp_path / f"o{off}")
        shutil.copytree(src, dst)
        if off % 2:  # half the cases as after a reboot: no trusted shared state
            os.remove(os.path.join(dst, AUX, SHM))
        os.truncate(os.path.join(dst, seg), off)
        label = f"{case}: truncated {seg} at {off} (record {start}..{end})"
        report = mpkv.verify(dst)
        assert report.ok, f"{label}: {report.summary()}"
        if case == "binary-put-mid":
            with mpkv.Store(dst, readonly=True) as ro:
                assert dict(ro.items()) == before, label
        assert snapshot(dst) == before, f"{label}: last record (partly) applied"
        with mpkv.Store(dst, fsync="never") as s:
            s.put("next", f"after {off}")
        assert snapshot(dst) == {**before, "next": f"after {off}"}, label
        report = mpkv.verify(dst)
        assert report.damage == [], f"{label}: torn tail not cut: {report.summary()}"
        with open(os.path.join(dst, seg), "rb") as f:
            assert f.read(start) == whole[:start], f"{label}: bytes before the tear changed"
        shutil.rmtree(dst)


def _segment_records(path):
    """{segment: [record end offsets]} of a binary store."""
    out = {}
    for name in list_segments(path):
        with open(os.path.join(path, name), "rb") as f:
            dec = BINARY.decode(f.read())
        assert not dec.problem
        out[name] = dec.ends
    return out


def test_cut_inside_transaction_spanning_segments(tmp_path):
    """A transaction larger than a segment is written as several records over several
    segments; a crash anywhere inside it (the log cut there, later segments gone, or an
    empty next segment) must leave it entirely absent, and the next writer must clean
    up so that the next put applies alone."""
    src = str(tmp_path / "src")
    before = {}
    with mpkv.Store(src, format="binary", max_segment_bytes=300, fsync="never") as s:
        for i in range(6):
            s.put(f"k{i}", f"value {i}")
            before[f"k{i}"] = f"value {i}"
        seg0, size0 = _newest(src)
        with s.transaction() as tx:
            for i in range(40):
                tx.put(f"t{i:02d}", "x" * 30 + str(i))
            tx.delete("k1")
    names = list_segments(src)
    tx_names = names[names.index(seg0):]
    assert len(tx_names) >= 4, "setup: the transaction should span several segments"
    ends = _segment_records(src)
    final = {}
    for n in names:
        with open(os.path.join(src, n), "rb") as f:
            final[n] = f.read()
    after_tx = {**{k: v for k, v in before.items() if k != "k1"},
                **{f"t{i:02d}": "x" * 30 + str(i) for i in range(40)}}
    assert snapshot(src) == after_tx
    # positions inside the transaction: near every record boundary, and a sample between
    rng = random.Random(7)
    cuts = []
    for n in tx_names:
        lo = size0 if n == seg0 else 0
        bounds = [lo] + [e for e in ends[n] if e > lo]
        near = {c for b in bounds for c in range(b - 6, b + 7) if lo <= c <= len(final[n])}
        span = range(lo, len(final[n]) + 1)
        cuts += [(n, c) for c in sorted(near | set(rng.sample(span, min(10, len(span)))))]
    cuts.remove((tx_names[-1], len(final[tx_names[-1]])))  # that is the whole transaction
    for case, (n, c) in enumerate(cuts):
        k = names.index(n)
        files = {m: final[m] for m in names[:k]}
        files[n] = final[n][:c]
        if c == len(final[n]) and k + 1 < len(names) and case % 2:
            # the next segment was created (after this one was sealed), nothing reached it
            files[names[k + 1]] = b""
        dst = str(tmp_path / f"x{case}")
        _make_crash_dir(src, dst, files, keep_shm=case % 2 == 0)
        label = f"transaction cut at {n}:{c}"
        assert mpkv.verify(dst).ok, label
        assert snapshot(dst) == before, f"{label}: part of the transaction was applied"
        with mpkv.Store(dst, fsync="never") as s:
            s.put("next", str(case))
        assert snapshot(dst) == {**before, "next": str(case)}, (
            f"{label}: the next put resurrected part of the cut transaction")
        assert mpkv.verify(dst).damage == [], label
        with open(os.path.join(dst, seg0), "rb") as f:
            assert f.read(size0) == final[seg0][:size0], f"{label}: older records changed"
        shutil.rmtree(dst)
    assert len(cuts) > 100


def test_repair_inside_transaction_spanning_segments(tmp_path):
    """A flipped byte in one record of a multi-record transaction: CorruptionError naming
    it, and repair keeps every record outside that transaction intact and quarantines the
    damaged record. (Whether the transaction's other records are kept is a design
    choice: the contract says repair salvages every valid record.)"""
    path = str(tmp_path / "s")
    with mpkv.Store(path, format="binary", max_segment_bytes=300, fsync="never") as s:
        for i in range(6):
            s.put(f"a{i}", f"value {i}")
        with s.transaction() as tx:
            for i in range(40):
                tx.put(f"t{i:02d}", "x" * 30 + str(i))
        for i in range(6):
            s.put(f"z{i}", f"value {i}")
    names = list_segments(path)
    ends = _segment_records(path)
    victim = next(n for n in names if len(ends[n]) == 1 and n != names[-1])  # a tx middle
    with open(os.path.join(path, victim), "r+b") as f:
        data = bytearray(f.read())
        data[40] ^= 0x5A
        f.seek(0)
        f.write(data)
    with pytest.raises(mpkv.CorruptionError) as ei:
        mpkv.Store(path)
    _check_corruption_error(ei.value, path, victim, 0, "tx middle record")
    report = mpkv.repair(path)
    _check_quarantine(path, report, [bytes(data[: ends[victim][0]])], "tx middle record")
    state = snapshot(path)
    for i in range(6):
        assert state[f"a{i}"] == f"value {i}" and state[f"z{i}"] == f"value {i}"
    assert mpkv.verify(path).ok


# ------------------------------------------------- a crash in the middle of compact()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the fatal moment runs (no except clause in mpkv
    catches a BaseException that is not an Exception)."""


class _DieAtCall:
    """Patched over ``os.rename/replace/unlink/remove`` while compact() runs: the
    process "dies" just before its ``n``-th such call, leaving the directory exactly as
    a SIGKILL there would."""

    def __init__(self, n, monkeypatch):
        self.n = n
        self.calls = 0
        for name in ("rename", "replace", "unlink", "remove"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def call(*a, **k):
            if self.calls == self.n:
                raise _Killed
            self.calls += 1
            return real(*a, **k)
        return call


def _build_for_compaction(path, fmt):
    expected = {}
    maxseg = 200 if fmt == "binary" else 100
    with mpkv.Store(path, format=fmt, max_segment_bytes=maxseg, fsync="never") as s:
        for i in range(40):
            s.put(f"k{i}", f"v{i}-" + "x" * (i % 9))
            expected[f"k{i}"] = f"v{i}-" + "x" * (i % 9)
        for i in range(0, 40, 3):
            s.delete(f"k{i}")
            del expected[f"k{i}"]
        for i in range(0, 40, 4):
            s.put(f"k{i}", "again")
            expected[f"k{i}"] = "again"
    return expected


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_killed_during_compaction_loses_nothing(tmp_path, fmt, monkeypatch):
    """compact() renames its outputs into place, then deletes the segments they replace.
    A process killed before any of those renames or unlinks (each one in turn) must
    leave a store that opens with exactly the same state and keeps working."""
    src = str(tmp_path / "src")
    expected = _build_for_compaction(src, fmt)
    assert len(list_segments(src)) >= 6
    failures = []
    n = 0
    while True:
        dst = str(tmp_path / f"k{n}")
        shutil.copytree(src, dst)
        s = mpkv.Store(dst, fsync="never")
        with monkeypatch.context() as mp:
            _DieAtCall(n, mp)
            try:
                s.compact()
                finished = True
            except _Killed:
                finished = False
        s.close()
        label = f"{fmt}: killed before rename/unlink #{n + 1} of compact()"
        try:
            report = mpkv.verify(dst)
            assert report.ok, report.summary()
            got = snapshot(dst)
            if got != expected:
                lost = sorted(set(expected) - set(got))
                wrong = sorted(k for k in got if expected.get(k) != got[k])
                failures.append(f"{label}: lost {lost}, wrong {wrong}, "
                                f"segments {list_segments(dst)}")
                continue
            with mpkv.Store(dst, fsync="never") as s2:
                s2.put("after", "crash")
                s2.compact()
            assert snapshot(dst) == {**expected, "after": "crash"}
        except (AssertionError, mpkv.Error) as exc:
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
        finally:
            n += 1
        if finished:
            break
    assert n > 5, "compaction made too few renames/unlinks: test too weak"
    assert not failures, "\n".join(failures)


# ------------------------------------------------ 3. flipped byte in a binary store


def _records(path):
    """[(segment, start, end, ops)] of every record, in log order."""
    out = []
    for name in list_segments(path):
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        dec = BINARY.decode(data)
        assert not dec.problem
        start = 0
        for ops, end in zip(dec.batches, dec.ends, strict=True):
            out.append((name, start, end, ops))
            start = end
    return out


def _build_unique_binary(path, n=40, maxseg=300):
    expected = {}
    with mpkv.Store(path, format="binary", max_segment_bytes=maxseg, fsync="never") as s:
        for i in range(n):
            key = f"key{i:03d}"
            value = f"value-{i}-" + "x" * (i % 7) if i % 3 else bytes([i]) * (i % 11 + 1)
            s.put(key, value)
            expected[key] = value
    return expected


def _number_named(msg, number):
    return re.search(rf"(?<![\d.]){number}(?![\d.])", msg) is not None


def _check_corruption_error(exc, path, seg, offset, label, line=None):
    msg = str(exc)
    assert seg in msg, f"{label}: message does not name the file: {msg}"
    rest = msg.replace(os.path.join(path, seg), "").replace(seg, "")
    assert _number_named(rest, offset), f"{label}: message does not name offset {offset}: {msg}"
    if line is not None:
        m = re.search(r"line\D{0,3}(\d+)", rest)
        assert m and int(m.group(1)) == line, f"{label}: message does not name line {line}: {msg}"


def _check_quarantine(path, report, expected_chunks, label):
    qdir = os.path.join(path, AUX, "quarantine")
    assert len(report.quarantined) == len(expected_chunks), f"{label}: {report.summary()}"
    saved = []
    for q in report.quarantined:
        assert os.path.dirname(os.path.abspath(q)) == os.path.abspath(qdir), q
        with open(q, "rb") as f:
            saved.append(f.read())
    assert sorted(saved) == sorted(expected_chunks), f"{label}: quarantined bytes differ"


FLIP_LOCATIONS = ["first-record", "old-middle", "old-last-in-segment", "newest-not-last"]


@pytest.mark.parametrize("where", FLIP_LOCATIONS)
def test_flipped_byte_is_corruption_and_repair_salvages(tmp_path, where):
    src = str(tmp_path / "src")
    expected = _build_unique_binary(src)
    recs = _records(src)
    segs = list_segments(src)
    assert len(segs) >= 4
    by_seg = {n: [r for r in recs if r[0] == n] for n in segs}
    if where == "first-record":
        rec = by_seg[segs[0]][0]
    elif where == "old-middle":
        rec = by_seg[segs[1]][len(by_seg[segs[1]]) // 2]
    elif where == "old-last-in-segment":
        rec = by_seg[segs[-2]][-1]
    else:
        assert len(by_seg[segs[-1]]) >= 2
        rec = by_seg[segs[-1]][0]
    seg, start, end, ops = rec
    (key, _), = ops
    rng = random.Random(f"flip-{where}")
    for pos in range(start, end):
        dst = str(tmp_path / f"f{pos}")
        shutil.copytree(src, dst)
        file = os.path.join(dst, seg)
        with open(file, "r+b") as f:
            data = bytearray(f.read())
            data[pos] ^= rng.randrange(1, 256)
            f.seek(0)
            f.write(data)
        damaged = bytes(data[start:end])
        label = f"{where}: byte {pos} of record {start}..{end} in {seg}"
        with pytest.raises(mpkv.CorruptionError) as ei:
            mpkv.Store(dst)
        _check_corruption_error(ei.value, dst, seg, start, label)
        with pytest.raises(mpkv.CorruptionError):
            mpkv.Store(dst, readonly=True)
        report = mpkv.verify(dst)
        assert not report.ok and len(report.damage) == 1, f"{label}: {report.summary()}"
        report = mpkv.repair(dst)
        assert not report.ok, f"{label}: repair report hides the damage"
        d = report.damage[0]
        assert seg in d.file and d.offset == start, f"{label}: {report.summary()}"
        _check_quarantine(dst, report, [damaged], label)
        want = {k: v for k, v in expected.items() if k != key}
        assert snapshot(dst) == want, f"{label}: repair lost or changed other records"
        assert mpkv.verify(dst).ok
        with mpkv.Store(dst, fsync="never") as s:
            s.put("after-repair", "ok")
        assert snapshot(dst) == {**want, "after-repair": "ok"}
        shutil.rmtree(dst)


def test_two_damaged_records_in_different_segments(tmp_path):
    path = str(tmp_path / "s")
    expected = _build_unique_binary(path, n=60)
    recs = _records(path)
    segs = list_segments(path)
    victims = [next(r for r in recs if r[0] == segs[1]), [r for r in recs if r[0] == segs[3]][-1]]
    chunks = []
    for seg, start, end, _ in victims:
        with open(os.path.join(path, seg), "r+b") as f:
            f.seek(start + HEADER.size + 3)
            b = f.read(1)
            f.seek(start + HEADER.size + 3)
            f.write(bytes([b[0] ^ 0x40]))
            f.seek(start)
            chunks.append(f.read(end - start))
    with pytest.raises(mpkv.CorruptionError) as ei:
        mpkv.Store(path)
    _check_corruption_error(ei.value, path, victims[0][0], victims[0][1], "first victim")
    report = mpkv.repair(path)
    assert len(report.damage) == 2, report.summary()
    _check_quarantine(path, report, chunks, "two victims")
    lost = {ops[0][0] for _, _, _, ops in victims}
    assert snapshot(path) == {k: v for k, v in expected.items() if k not in lost}
    # a second repair finds nothing and moves nothing
    again = mpkv.repair(path)
    assert again.ok and again.damage == [] and again.quarantined == [], again.summary()


# ---------------------------------------------------- 4. malformed line in text format

MALFORMED = [b"GARBAGE\n", b"\n", b"P|no-separator\n", b"D|a|b\n", b"X|k|v\n",
             b"P|k|\xff\xfe bad utf-8\n"]
TEXT_LOCATIONS = ["old-first", "old-middle", "old-end", "newest-middle", "newest-end"]


def _build_text(path):
    expected = {}
    with mpkv.Store(path, format="text", max_segment_bytes=60, fsync="never") as s:
        for i in range(30):
            s.put(f"key{i:02d}", f"välue|{i}")
            expected[f"key{i:02d}"] = f"välue|{i}"
    return expected


@pytest.mark.parametrize("where", TEXT_LOCATIONS)
def test_text_malformed_line(tmp_path, where):
    src = str(tmp_path / "src")
    expected = _build_text(src)
    segs = list_segments(src)
    assert len(segs) >= 4
    seg = segs[-1] if where.startswith("newest") else segs[1]
    with open(os.path.join(src, seg), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) >= 2
    at = {"old-first": 0, "old-middle": len(lines) // 2, "old-end": len(lines),
          "newest-middle": len(lines) // 2, "newest-end": len(lines)}[where]
    offset = sum(len(x) for x in lines[:at])
    for bad in MALFORMED:
        dst = str(tmp_path / f"m{MALFORMED.index(bad)}")
        shutil.copytree(src, dst)
        with open(os.path.join(dst, seg), "wb") as f:
            f.write(b"".join(lines[:at]) + bad + b"".join(lines[at:]))
        label = f"{where}: {bad!r} as line {at + 1} of {seg}"
        with pytest.raises(mpkv.CorruptionError) as ei:
            mpkv.Store(dst)
        _check_corruption_error(ei.value, dst, seg, offset, label, line=at + 1)
        assert not mpkv.verify(dst).ok, label
        report = mpkv.repair(dst)
        assert not report.ok, label
        _check_quarantine(dst, report, [bad], label)
        assert snapshot(dst) == expected, f"{label}: repair did not salvage every line"
        with mpkv.Store(dst, fsync="never") as s:
            s.put("after", "repair")
        assert snapshot(dst) == {**expected, "after": "repair"}
        with open(os.path.join(dst, seg), "rb") as f:
            assert bad not in f.read().splitlines(keepends=True) or bad == b"\n", label
        shutil.rmtree(dst)


# -------------------------------------------- 5. fault injection (power loss)
#
# In the style of LevelDB's fault_injection_test: a child runs a workload and logs,
# after every acknowledged op, the size of every segment file. From the final files we
# then build the directory a power loss could leave: the log up to some position (the
# segments before it whole, the one at it cut, none after), optionally followed by junk
# where unsynced bytes were. A position is (index of a segment in the final listing,
# length kept); since files are append-only, the files "at" a position are prefixes of
# the final ones.


def _run_faultload(tmp_path, fmt, fsync, maxseg, seed, nops):
    path = str(tmp_path / "store")
    log, err = tmp_path / "log", tmp_path / "err"
    allow_tx = "big" if fmt == "binary" else False
    args = dict(path=path, format=fmt, fsync=fsync, max_segment_bytes=maxseg, seed=seed,
                allow_tx=allow_tx, log=str(log), nops=nops)
    proc = spawn("faultload", args, err)
    wait_for_line(proc, log, err, "done", timeout=120)
    time.sleep(random.Random(seed).uniform(0, 0.01))  # let it start a few more ops
    sigkill(proc)
    acks = []
    for ln in log_lines(log):
        if ln in ("ready", "done"):
            continue
        rec = json.loads(ln)
        assert rec["i"] == len(acks)
        acks.append(rec)
    ops = cw.take(seed, fmt, len(acks) + 1, allow_tx=allow_tx)
    for rec, op in zip(acks, ops, strict=False):  # ops has one more
        assert rec["tag"] == cw.tag(op), "child and parent generated different ops"
    final = {}
    for name in list_segments(path):
        with open(os.path.join(path, name), "rb") as f:
            final[name] = f.read()
    names = sorted(final)
    # sanity: the files only grew by appends; sealed segments never changed after an ack
    for rec in acks:
        sizes = rec["sizes"]
        assert sorted(sizes) == names[: len(sizes)]
        for name in sorted(sizes)[:-1]:
            assert sizes[name] == len(final[name]), "a sealed segment changed"
        assert all(len(final[n]) >= s for n, s in sizes.items())
    ack_pos = [(len(a["sizes"]) - 1, a["sizes"][max(a["sizes"])]) for a in acks]
    if fmt == "binary":
        assert any(op[0] == "tx" and len(op[1]) >= 10 for op in ops[: len(acks)])
    return path, ack_pos, ops, final, names


def _files_at(final, names, pos):
    if pos is None:  # before the first segment was created
        return {}
    k, c = pos
    files = {n: final[n] for n in names[:k]}
    files[names[k]] = final[names[k]][:c]
    return files


def _positions_between(final, names, lo, hi):
    """Every position strictly after ``lo`` and strictly before ``hi`` (None: start)."""
    out = []
    k0, c0 = lo if lo is not None else (0, -1)
    k1, c1 = hi
    for k in range(k0, k1 + 1):
        first = c0 + 1 if k == k0 else 0
        last = c1 - 1 if k == k1 else len(final[names[k]])
        out += [(k, c) for c in range(first, last + 1)]
    return out


def _next_segment_name(files):
    newest = max(files) if files else None
    number = int(newest[:12]) + 1 if newest else 1
    return f"{number:012d}.seg"


def _make_crash_dir(src, dst, files, keep_shm):
    """A store directory with the source's metadata and exactly ``files`` as segments;
    the shared-memory file is dropped unless ``keep_shm`` (a reboot makes it untrusted)."""
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, AUX), os.path.join(dst, AUX),
                    ignore=None if keep_shm else shutil.ignore_patterns(SHM))
    for name, data in files.items():
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)


def _garbage(rng, n, fmt):
    data = bytes(rng.randrange(256) for _ in range(n))
    # A text tail that holds a newline is a complete malformed line, which the contract
    # defines as damage (text has no checksums): keep the garbage newline-free there.
    return data.replace(b"\n", b"?") if fmt == "text" else data


def _check_crash_state(src, dst, files, keep_shm, expected_options, label):
    _make_crash_dir(src, dst, files, keep_shm)
    report = mpkv.verify(dst)
    assert report.ok, f"{label}: {report.summary()}"
    got = snapshot(dst)
    assert got in expected_options, (
        f"{label}: state is not the replay of the acknowledged prefix of the history")
    with mpkv.Store(dst, fsync="never") as s:
        s.put("__after__", "crash")
    assert snapshot(dst) == {**got, "__after__": "crash"}, label
    assert mpkv.verify(dst).damage == [], label
    shutil.rmtree(dst)


FAULT_FORMATS = ["binary", "text"]


@pytest.mark.parametrize("fmt", FAULT_FORMATS)
def test_power_loss_fsync_always(tmp_path, fmt):
    """Every acknowledged write was fsynced: whatever happens to bytes written after the
    last ack (lost, garbage, zeros, partly there, a new segment with junk), the store
    opens with exactly the acknowledged history."""
    seed = 40_000 + FAULT_FORMATS.index(fmt)
    src, ack_pos, ops, final, names = _run_faultload(tmp_path, fmt, "always", 400, seed,
                                                     nops=45)
    rng = random.Random(seed)
    end_pos = (len(names) - 1, len(final[names[-1]]))
    ncases = 0
    # a crash after ack i (i == -1: before the first op completed)
    for i in range(-1, len(ack_pos)):
        pos = ack_pos[i] if i >= 0 else None
        synced = _files_at(final, names, pos)
        expected = model({}, ops[: i + 1])
        variants = {"synced only": synced}
        if synced:
            newest = max(synced)
            for kind in ("garbage", "zeros"):
                tail = (_garbage(rng, rng.randrange(1, 64), fmt) if kind == "garbage"
                        else bytes(rng.randrange(1, 64)))
                variants[f"{kind} tail"] = {**synced, newest: synced[newest] + tail}
        new_seg = _next_segment_name(synced)
        variants["empty new segment"] = {**synced, new_seg: b""}
        variants["junk new segment"] = {**synced, new_seg: _garbage(rng, 30, fmt)}
        # the next op partly written (maybe over several segments: a big transaction)
        nxt = ack_pos[i + 1] if i + 1 < len(ack_pos) else end_pos
        between = _positions_between(final, names, pos, nxt)
        if between:
            cut = _files_at(final, names, rng.choice(between))
            variants["next op partly written"] = cut
            newest = max(cut)
            variants["next op partly written + zeros"] = {**cut, newest: cut[newest] +
                                                          bytes(40)}
        # every ack point: the synced state, plus three of the variants in rotation
        names_v = sorted(variants)
        chosen = ["synced only"] + [names_v[(3 * (i + 1) + d) % len(names_v)] for d in range(3)]
        for vname in dict.fromkeys(chosen):
            files = variants[vname]
            label = f"{fmt}/always: crash after ack {i}, {vname}"
            _check_crash_state(src, str(tmp_path / f"c{ncases}"), files, ncases % 3 == 0,
                               [expected], label)
            ncases += 1
    # and the directory exactly as SIGKILL left it (ops[len(acks)] maybe complete)
    last = len(ack_pos)
    _check_crash_state(src, str(tmp_path / "as-killed"), dict(final), False,
                       [model({}, ops[:last]), model({}, ops[: last + 1])], "as killed")
    assert ncases > 3 * len(ack_pos)


@pytest.mark.parametrize("fsync", ["periodic", "never"])
@pytest.mark.parametrize("fmt", FAULT_FORMATS)
def test_power_loss_unsynced_tail(tmp_path, fmt, fsync):
    """Without fsync on every write, a power loss may cut the log anywhere after the last
    sync: cut it at record boundaries and mid-record (later segments gone); the state
    must be the replay of exactly the ops whose records all survived."""
    seed = 50_100 + 10 * FAULT_FORMATS.index(fmt) + (fsync == "never")
    src, ack_pos, ops, final, names = _run_faultload(tmp_path, fmt, fsync, 500, seed,
                                                     nops=120)
    rng = random.Random(seed)
    last_pos = ack_pos[-1]
    positions = set(rng.sample(ack_pos, min(20, len(ack_pos))))  # op boundaries
    everything = _positions_between(final, names, None, last_pos)
    positions |= set(rng.sample(everything, 30))  # anywhere up to the last ack
    positions |= {(0, 0), last_pos}
    for case, pos in enumerate(sorted(positions)):
        files = _files_at(final, names, pos)
        j = sum(1 for p in ack_pos if p <= pos)
        label = f"{fmt}/{fsync}: cut at {names[pos[0]]}:{pos[1]} ({j} acked ops survive)"
        variants = {"cut": files}
        if case % 2:
            newest = max(files)
            variants["cut + zeros"] = {**files, newest: files[newest] + bytes(25)}
        for vname, fl in variants.items():
            _check_crash_state(src, str(tmp_path / f"p{case}-{vname}"), fl, case % 3 == 0,
                               [model({}, ops[:j])], f"{label}, {vname}")
    # beyond the last ack the in-flight op may or may not be there
    last = len(ack_pos)
    _check_crash_state(src, str(tmp_path / "as-killed"), dict(final), True,
                       [model({}, ops[:last]), model({}, ops[: last + 1])], "as killed")


# ----------------------------------------------------------------- 6. decoder fuzzing

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

keys = st.text(st.characters(codec="utf-8"), max_size=8)
str_values = st.text(st.characters(codec="utf-8"), max_size=12)
bin_values = st.one_of(str_values, st.binary(max_size=12))
bin_batches = st.lists(st.lists(st.tuples(keys, st.one_of(st.none(), bin_values)),
                                max_size=4), min_size=1, max_size=6)


def _record(codec, ops):
    """The one record (one line for text) that encodes ``ops``: no size limit applies."""
    records = codec.encode(ops, 1 << 40)
    assert len(records) == 1
    return records[0][0]


def _units(dec, extra=()):
    """Complete atomic units of decoded batches (binary transactions may chain records
    with a "more" flag); a trailing unfinished unit is dropped, as readers do."""
    flags = list(getattr(dec, "more", [False] * len(dec.batches)))
    batches = list(dec.batches)
    for ops, more in extra:
        batches.append(ops)
        flags.append(more)
    units, pending = [], []
    for ops, more in zip(batches, flags, strict=True):
        pending = pending + list(ops)
        if not more:
            units.append(pending)
            pending = []
    return units


def _check_decoded(dec, buf, min_unit):
    assert isinstance(dec, type(BINARY.decode(b"")))
    assert 0 <= dec.stop <= len(buf)
    assert (dec.problem == "") == (dec.stop == len(buf))
    assert len(dec.batches) == len(dec.ends) == len(dec.units)
    assert len(getattr(dec, "more", dec.batches)) == len(dec.batches)
    assert len(dec.batches) <= len(buf) // min_unit
    assert dec.ends == sorted(set(dec.ends)) and all(0 < e <= dec.stop for e in dec.ends)
    if dec.batches:
        assert dec.ends[-1] == dec.stop
    for ops in dec.batches:
        for key, value in ops:
            assert isinstance(key, str)
            assert value is None or isinstance(value, (str, bytes))


def _encode_all(batches):
    return b"".join(_record(BINARY, b) for b in batches)


def _mutated_binary():
    @st.composite
    def build(draw):
        buf = bytearray(_encode_all(draw(bin_batches)))
        for _ in range(draw(st.integers(0, 3))):
            if buf:
                i = draw(st.integers(0, len(buf) - 1))
                buf[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(buf)))
        return bytes(buf[:cut]) + draw(st.binary(max_size=20))
    return build()


@FUZZ
@given(st.one_of(st.binary(max_size=600), _mutated_binary()))
def test_fuzz_binary_decode_never_raises(buf):
    dec = BINARY.decode(buf)
    _check_decoded(dec, buf, HEADER.size)


@FUZZ
@given(st.one_of(st.binary(max_size=600),
                 st.lists(st.sampled_from([b"P|", b"D|", b"|", b"\n", b"k", b"\xc3", b"\xa9",
                                           b"\xff", b"P|k|v\n", b"D|k\n"]),
                          max_size=60).map(b"".join)))
def test_fuzz_text_decode_never_raises(buf):
    dec = TEXT.decode(buf)
    _check_decoded(dec, buf, 3)
    assert len(dec.batches) <= buf.count(b"\n")


@FUZZ
@given(bin_batches, st.data())
def test_fuzz_binary_roundtrip_truncation_and_flip(batches, data):
    records = [_record(BINARY, b) for b in batches]
    buf = b"".join(records)
    dec = BINARY.decode(buf)
    assert dec.batches == [list(b) for b in batches] and not dec.problem
    # a cut anywhere keeps exactly the whole records before it, as a torn tail
    cut = data.draw(st.integers(0, len(buf)))
    dec = BINARY.decode(buf[:cut])
    whole = 0
    while whole < len(records) and sum(map(len, records[: whole + 1])) <= cut:
        whole += 1
    assert dec.batches == [list(b) for b in batches[:whole]]
    assert dec.torn or not dec.problem
    # a changed byte stops decoding at its record, never applies it
    pos = data.draw(st.integers(0, len(buf) - 1))
    flipped = bytearray(buf)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    hit = 0
    while sum(map(len, records[: hit + 1])) <= pos:
        hit += 1
    dec = BINARY.decode(bytes(flipped))
    assert dec.batches == [list(b) for b in batches[:hit]] and dec.problem
    assert dec.torn == (hit == len(records) - 1)


@FUZZ
@given(st.lists(st.tuples(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="|\n"),
                                  max_size=8),
                          st.one_of(st.none(),
                                    st.text(alphabet=st.characters(
                                        codec="utf-8", exclude_characters="\n"), max_size=12))),
                min_size=1, max_size=8), st.data())
def test_fuzz_text_roundtrip_truncation(ops, data):
    lines = [_record(TEXT, [op]) for op in ops]
    buf = b"".join(lines)
    assert TEXT.decode(buf).batches == [[op] for op in ops]
    cut = data.draw(st.integers(0, len(buf)))
    dec = TEXT.decode(buf[:cut])
    whole = 0
    while whole < len(lines) and sum(map(len, lines[: whole + 1])) <= cut:
        whole += 1
    assert dec.batches == [[op] for op in ops[:whole]]
    assert dec.torn or not dec.problem


def _open_outcome(path):
    """Open and return the state; CorruptionError is the only other allowed outcome."""
    try:
        with mpkv.Store(path) as s:
            return dict(s.items())
    except mpkv.CorruptionError:
        return None


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["binary", "text"]), st.booleans(),
       st.one_of(st.binary(max_size=300), _mutated_binary()))
def test_fuzz_open_store_with_random_segment(fmt, followed, junk):
    tmp = tempfile.mkdtemp(prefix="mpkv-fuzz-")
    try:
        path = os.path.join(tmp, "s")
        mpkv.Store(path, format=fmt).close()
        with open(os.path.join(path, "000000000001.seg"), "wb") as f:
            f.write(junk)
        if followed:  # the random segment is then an old one: damage is never torn
            with open(os.path.join(path, "000000000002.seg"), "wb") as f:
                f.write(b"P|z|1\n" if fmt == "text" else _record(BINARY, [("z", "1")]))
        written = written_format(path)
        if written is not None and written[0] != fmt:
            # The junk is a record of the other format: refused whole, never truncated.
            for opener in (mpkv.Store, mpkv.verify, mpkv.repair):
                with pytest.raises(mpkv.FormatError, match="holds"):
                    opener(path)
            with open(os.path.join(path, "000000000001.seg"), "rb") as f:
                assert f.read() == junk
            return
        codec = CODECS[fmt]
        dec = codec.decode(junk)
        got = _open_outcome(path)
        if got is not None:
            if followed:
                assert not dec.problem
            extra = [([("z", "1")], False)] if followed else []
            assert got == model({}, [("tx", u) for u in _units(dec, extra)])
        else:
            assert dec.problem and (followed or not dec.torn)
        report = mpkv.verify(path)
        assert report.ok == (got is not None)
        mpkv.repair(path)
        after = _open_outcome(path)
        assert after is not None, "repair left a store that does not open"
        if got is not None:
            assert after == got
    finally:
        shutil.rmtree(tmp)


def test_huge_length_field_does_not_allocate(tmp_path):
    rec = struct.pack("<IIB", 0xDEADBEEF, 2**31, 1) + b"tiny payload"
    good = _record(BINARY, [("a", "1")])
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for buf in (rec, good + rec, rec + good, struct.pack("<IIB", 0, 2**32 - 1, 1)):
            dec = BINARY.decode(buf)
            assert dec.problem
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 1 << 20, f"decoding a 2**31 length field allocated {peak} bytes"
    assert BINARY.decode(good + rec).batches == [[("a", "1")]]
    # in a store: as the torn tail of the newest segment it is ignored and cut ...
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s.put("a", "1")
    seg = os.path.join(path, list_segments(path)[-1])
    with open(seg, "ab") as f:
        f.write(rec)
    t0 = time.perf_counter()
    assert snapshot(path) == {"a": "1"}
    with mpkv.Store(path) as s:
        s.put("b", "2")
    assert snapshot(path) == {"a": "1", "b": "2"}
    assert time.perf_counter() - t0 < 2.0
    # ... and followed by a valid record it is damage
    path2 = str(tmp_path / "s2")
    mpkv.Store(path2).close()
    with open(os.path.join(path2, "000000000001.seg"), "wb") as f:
        f.write(good + rec + good)
    with pytest.raises(mpkv.CorruptionError):
        mpkv.Store(path2)


def test_values_are_never_unpickled(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = pickle.dumps(Boom())
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s.put("p", payload)
        s.put("q", payload.decode("latin-1"))

    def refuse(*a, **k):
        raise AssertionError("mpkv unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    state = snapshot(path)
    assert state == {"p": payload, "q": payload.decode("latin-1")}
    assert type(state["p"]) is bytes and type(state["q"]) is str
    # a record with an unknown entry type but a valid checksum is rejected, not interpreted
    entry = struct.pack("<BII", 9, 1, len(payload)) + b"k" + payload
    body = struct.pack("<IB", len(entry), 1) + entry
    bad = struct.pack("<I", zlib.crc32(body)) + body
    dec = BINARY.decode(bad)
    assert dec.batches == [] and dec.problem


def test_every_case_combination_is_covered():
    """Guard against the parameter lists shrinking below what the brief requires."""
    rounds = len(KILL_PARAMS) * KILL_ROUNDS
    assert rounds >= 50
    combos = {(f, s) for f, s, _, _ in KILL_PARAMS}
    assert combos == set(product(["binary", "text"], ["always", "periodic", "never"]))
