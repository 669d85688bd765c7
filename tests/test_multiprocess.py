"""Multi-process (and multi-thread) behaviour of mpkv, with real processes.

Children are started with the ``spawn`` method and run functions from
``tests/mp_workers.py``; results and tracebacks come back over a queue. Processes are
synchronised with barriers, events and pipes, never with sleeps. The only timed
assertions are generous bounds on lock timeouts and on readers/writers not waiting, and
one 0.5 s window in which a forked child must NOT manage to commit.

The readonly test needs root to make a directory unwritable for a process that is
itself root: it drops CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH in the child (see
``_drop_dac_capabilities``); as another user it relies on the mode bits alone.
"""

from __future__ import annotations

import collections
import faulthandler
import hashlib
import json
import multiprocessing as mp
import os
import queue
import random
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mp_workers  # noqa: E402

import mpkv  # noqa: E402

CTX = mp.get_context("spawn")


# ------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _hang_guard():
    """A deadlock must fail the run (with every thread's stack), not hang it."""
    faulthandler.dump_traceback_later(150, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Workers:
    """Spawned worker processes that report back on one queue.

    Every wait on a worker (its result, or an event or pipe it should signal) also
    watches for it failing or dying, so a broken child fails the test at once, with
    its traceback.
    """

    def __init__(self):
        self.q = CTX.Queue()
        self.procs = []
        self.done = {}

    def start(self, fn, *args):
        idx = len(self.procs)
        p = CTX.Process(
            target=mp_workers.entry, args=(fn.__name__, self.q, idx, *args), daemon=True
        )
        p.start()
        self.procs.append(p)
        return idx

    def _drain(self, timeout):
        """Take one report off the queue (waiting up to ``timeout``); False when none."""
        try:
            idx, ok, payload = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            return False
        if not ok:
            raise AssertionError(f"worker {idx} failed:\n{payload}")
        self.done[idx] = payload
        return True

    def _check_alive(self, idxs):
        dead = [i for i in idxs if i not in self.done and self.procs[i].exitcode is not None]
        if dead:
            while self._drain(0.5):  # a report may still be on its way
                pass
            for i in dead:
                if i not in self.done:
                    code = self.procs[i].exitcode
                    raise AssertionError(f"worker {i} exited with code {code} without reporting")

    def wait_until(self, cond, what, timeout=60.0):
        """Wait until ``cond()`` (which may block briefly) while no worker fails."""
        deadline = time.monotonic() + timeout
        while not cond():
            while self._drain(0):
                pass
            self._check_alive(range(len(self.procs)))
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {what}")

    def recv(self, conn, what="a reply from a worker", timeout=60.0):
        """``conn.recv()``, but failing (not hanging) when the worker dies."""
        self.wait_until(lambda: conn.poll(0.1), what, timeout)
        return conn.recv()

    def results(self, idxs=None, timeout=60.0):
        """Wait for the given workers (all by default); return their results in order."""
        idxs = list(range(len(self.procs))) if idxs is None else list(idxs)
        deadline = time.monotonic() + timeout
        while any(i not in self.done for i in idxs):
            if self._drain(0.2):
                continue
            self._check_alive(idxs)
            if time.monotonic() > deadline:
                missing = [i for i in idxs if i not in self.done]
                raise AssertionError(f"workers {missing} did not finish in {timeout}s")
        for i in idxs:
            self.procs[i].join(30)
        return [self.done[i] for i in idxs]

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        self.q.close()


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.close()


def segment_files(path):
    """Segment files: the regular files directly in the store directory."""
    return sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


# ---------------------------------------------------------------- 1. transactions


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_transactional_counter_4_processes(tmp_path, workers, fmt):
    path = str(tmp_path / "store")
    mpkv.Store(path, format=fmt).close()  # the workers open it with format=None
    barrier = CTX.Barrier(4)
    for _ in range(4):
        workers.start(mp_workers.counter_worker, path, 300, barrier)
    workers.results()
    with mpkv.open(path) as s:
        assert s["n"] == "1200"
    with pytest.raises(ValueError):  # it kept the format it was created with
        mpkv.Store(path, format="text" if fmt == "binary" else "binary")


# ------------------------------------------------- 2. writers + a monotonic reader


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_concurrent_writers_with_monotonic_reader(tmp_path, workers, fmt):
    path = str(tmp_path / "store")
    nw, n, seg = 4, 2000, 4096
    # create it first: the store remembers its limit, and a reader that created it
    # (with the default limit) would make the writers' explicit 4096 a conflict
    mpkv.Store(path, max_segment_bytes=seg, format=fmt).close()
    barrier = CTX.Barrier(nw + 1)
    stop, passed = CTX.Event(), CTX.Event()
    writers = [workers.start(mp_workers.keys_writer, path, w, n, seg, barrier) for w in range(nw)]
    reader = workers.start(mp_workers.counter_reader, path, nw, barrier, stop, passed)
    workers.results(writers, timeout=90)
    # a reader starved until the writers finished still makes a pass before the last one
    workers.wait_until(lambda: passed.wait(0.1), "the reader's first pass")
    stop.set()
    (seen,) = workers.results([reader])
    assert seen["last"] == [n] * nw, "the reader's last pass (after all writers) is stale"
    assert seen["loops"] >= 2

    with mpkv.open(path) as s:
        assert len(s) == nw * n + nw
        for w in range(nw):
            assert s[f"count-{w}"] == str(n)
            for i in range(n):
                assert s.get(mp_workers.key_of(w, i)) == mp_workers.value_of(w, i), (w, i)
    segs = segment_files(path)
    assert len(segs) > 1, "max_segment_bytes=4096 should have rotated segments"
    assert segs == sorted(segs)
    too_big = {f: os.path.getsize(os.path.join(path, f)) for f in segs}
    too_big = {f: size for f, size in too_big.items() if size > seg}
    assert not too_big, f"segments over max_segment_bytes={seg}: {too_big}"


# ------------------------------------------------------ 3. read-after-write (pipes)


def test_read_after_write_across_processes(tmp_path, workers):
    path = str(tmp_path / "store")
    parent_conn, child_conn = CTX.Pipe()
    s = mpkv.Store(path)
    try:
        s.put("warm-up", "0")
        idx = workers.start(mp_workers.rw_peer, path, child_conn)
        assert workers.recv(parent_conn, "the peer to start") == "ready"
        for r in range(200):
            # this process writes, the peer reads at once (max_staleness=0)
            key, value = f"a-{r % 17}", f"from-parent-{r}"
            s.put(key, value)
            parent_conn.send(("get", key))
            assert workers.recv(parent_conn) == value, f"round {r}: peer read a stale value"
            # the peer writes, this process reads at once
            key, value = f"b-{r % 13}", f"from-child-{r}"
            parent_conn.send(("put", key, value))
            assert workers.recv(parent_conn) == "ok"
            assert s.get(key) == value, f"round {r}: parent read a stale value"
            assert key in s
        parent_conn.send(None)
        workers.results([idx])
    finally:
        s.close()


# --------------------------------------------- 4. threads: 8 readers, 2 writers


def _tval(key, i, as_bytes):
    digest = hashlib.sha256(f"{key}|{i}".encode()).hexdigest()[:16]
    text = f"{key}|{i}|{digest}|" + "p" * (i % 23)
    return text.encode() if as_bytes else text


def _tcheck(key, value):
    """Validate a self-describing value; return its version number."""
    as_bytes = isinstance(value, bytes)
    text = value.decode() if as_bytes else value
    assert isinstance(text, str), f"{key!r}: value of type {type(value).__name__}"
    vkey, i, _digest, _pad = text.split("|")
    i = int(i)
    assert vkey == key, f"value of {key!r} belongs to {vkey!r}"
    assert as_bytes == key.startswith("w1-"), f"{key!r}: wrong value type {type(value)}"
    assert value == _tval(key, i, as_bytes), f"torn value for {key!r}: {value!r}"
    return i


def test_threads_8_readers_2_writers(tmp_path):
    path = str(tmp_path / "store")
    s = mpkv.Store(path)
    n_ops, n_keys = 1500, 40
    keys = [f"w{w}-{k:02d}" for w in range(2) for k in range(n_keys)]
    expected = [dict(), dict()]
    errors = []
    done = threading.Event()
    reader_passes = [0] * 8

    def writer(w):
        try:
            rnd = random.Random(w)
            for i in range(n_ops):
                key = f"w{w}-{rnd.randrange(n_keys):02d}"
                if rnd.random() < 0.15:
                    existed = s.delete(key)
                    assert existed == (key in expected[w]), f"delete({key!r}) -> {existed}"
                    expected[w].pop(key, None)
                else:
                    s.put(key, _tval(key, i, w == 1))
                    expected[w][key] = _tval(key, i, w == 1)
        except BaseException:
            errors.append(f"writer {w}:\n{traceback.format_exc()}")

    def reader(r):
        rnd = random.Random(100 + r)
        last = {}
        try:
            while True:
                finished = done.is_set()
                for _ in range(50):
                    key = rnd.choice(keys)
                    value = s.get(key)
                    if value is not None:
                        i = _tcheck(key, value)
                        assert i >= last.get(key, -1), f"{key!r} went back: {last[key]} -> {i}"
                        last[key] = i
                    key in s  # noqa: B015 - must simply not raise
                if r % 2 == 0:
                    for key, value in s.items():
                        _tcheck(key, value)
                else:
                    for key in s:
                        assert key in keys, f"unknown key {key!r}"
                    len(s)
                reader_passes[r] += 1
                if finished:
                    break
        except BaseException:
            errors.append(f"reader {r}:\n{traceback.format_exc()}")

    try:
        readers = [threading.Thread(target=reader, args=(r,)) for r in range(8)]
        writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(120)
        done.set()
        for t in readers:
            t.join(120)
        assert not any(t.is_alive() for t in readers + writers), "a thread hung"
        assert not errors, "\n".join(errors)
        assert all(reader_passes)
        final = {**expected[0], **expected[1]}
        assert dict(s.items()) == final
        assert len(s) == len(final)
    finally:
        s.close()
    with mpkv.open(path) as s2:
        assert dict(s2.items()) == final


# --------------------------------------------------------------- 5. lock timeout


def test_lock_timeout_across_processes(tmp_path, workers):
    path = str(tmp_path / "store")
    held, release = CTX.Event(), CTX.Event()
    s = mpkv.Store(path, lock_timeout=0.3)
    try:
        s.put("before", "0")
        idx = workers.start(mp_workers.tx_holder, path, "a", held, release)
        workers.wait_until(lambda: held.wait(0.1), "the holder to take the lock")
        try:
            t0 = time.monotonic()
            with pytest.raises(mpkv.LockTimeout):
                s.put("b", "2")
            elapsed = time.monotonic() - t0
            assert 0.25 <= elapsed < 2.0, f"LockTimeout after {elapsed:.2f}s, lock_timeout=0.3"
            assert issubclass(mpkv.LockTimeout, mpkv.Error)

            t0 = time.monotonic()
            with pytest.raises(mpkv.LockTimeout), s.transaction() as tx:
                tx["b-tx"] = "2"
            elapsed = time.monotonic() - t0
            assert 0.25 <= elapsed < 2.0, f"transaction LockTimeout after {elapsed:.2f}s"
            assert s.get("b") is None and s.get("b-tx") is None
        finally:
            release.set()
        workers.results([idx])
        # the holder committed; the timed-out writes never appear; the store still works
        assert s.get("a") == "1"
        s.put("c", "3")
    finally:
        s.close()
    with mpkv.open(path) as s2:
        assert dict(s2.items()) == {"before": "0", "a": "1", "c": "3"}


def test_external_filelock_blocks_writers(tmp_path):
    filelock = pytest.importorskip("filelock")
    path = str(tmp_path / "store")
    with mpkv.open(path, lock_timeout=0.3) as s:
        s.put("a", "1")
        lock = filelock.FileLock(os.path.join(path, ".mpkv", "lock"))
        with lock.acquire(timeout=5):
            with pytest.raises(mpkv.LockTimeout):
                s.put("b", "2")
            assert s.get("a") == "1"  # readers do not wait for the writer lock
        s.put("c", "3")
        assert dict(s.items()) == {"a": "1", "c": "3"}


# ---------------------------------------------------------- 6. SIGKILLed holder


def test_sigkilled_lock_holder_does_not_block(tmp_path, workers):
    path = str(tmp_path / "store")
    held = CTX.Event()
    s = mpkv.Store(path, lock_timeout=10)
    try:
        s.put("before", "0")
        workers.start(mp_workers.tx_sleeper, path, held)
        workers.wait_until(lambda: held.wait(0.1), "the sleeper to take the lock")
        proc = workers.procs[0]
        proc.kill()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        t0 = time.monotonic()
        s.put("after", "1")
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, f"put after the holder died took {elapsed:.2f}s"
        assert s.get("uncommitted") is None, "a killed, uncommitted transaction was applied"
    finally:
        s.close()
    with mpkv.open(path, lock_timeout=10) as s2:
        assert dict(s2.items()) == {"before": "0", "after": "1"}
        s2.put("again", "2")


# ------------------------------------------------ 7. 16 processes create at once


@pytest.mark.parametrize("fmt", [None, "binary"])
def test_16_processes_create_same_store(tmp_path, workers, fmt):
    path = str(tmp_path / "deep" / "er" / "store")
    n = 16
    b1, b2 = CTX.Barrier(n), CTX.Barrier(n)
    for i in range(n):
        workers.start(mp_workers.create_and_put, path, i, n, fmt, b1, b2)
    views = workers.results(timeout=90)
    expected = {f"k{j:02d}": f"v{j}" for j in range(n)}
    for i, view in enumerate(views):
        assert view == expected, f"process {i} sees {view}"
    with mpkv.open(path) as s:
        assert dict(s.items()) == expected
    with mpkv.open(path, format="binary") as s:  # new stores are binary
        assert len(s) == n
    with pytest.raises(ValueError):
        mpkv.Store(path, format="text")


# ------------------------------------------------------------------ 8. readonly


@pytest.fixture
def unwritable_later(tmp_path):
    """tmp_path; whatever a test made read-only under it is made writable again after."""
    yield tmp_path
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def _tree(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _drop_dac_capabilities():
    """preexec_fn: the exec'd child keeps uid 0 but loses the permission-bypass capabilities.

    (A plain ``setuid(65534)`` cannot work here: the interpreter lives under /root, mode
    0700, and so does pytest's tmp_path.) Dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set before exec leaves root bound by the mode
    bits like anyone else: 0o444 files in 0o555 directories are read-only.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_readonly_on_unwritable_directory(unwritable_later):
    path = str(unwritable_later / "store")
    expected = {f"k{i:03d}": f"v{i}" for i in range(50)}
    with mpkv.open(path, max_segment_bytes=512) as s:
        for k, v in expected.items():
            s.put(k, v)
        s.put("gone", "x")
        s.delete("gone")
    for root, dirs, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o555)
    os.chmod(path, 0o555)
    before = _tree(path)

    is_root = os.geteuid() == 0
    if not is_root and os.access(path, os.W_OK):
        pytest.skip("cannot make the store unwritable for this user")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), PYTHONDONTWRITEBYTECODE="1")
    code = "import mp_workers, sys; mp_workers.readonly_check(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
        preexec_fn=_drop_dac_capabilities if is_root else None,
    )
    if is_root and "PR_CAPBSET_DROP" in proc.stderr:
        pytest.skip("cannot drop root's capabilities here: " + proc.stderr.strip()[-200:])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["writable"] == [], f"the child could still write the store: {result}"
    assert result["items"] == expected
    assert result["len"] == len(expected)
    assert result["first"] == result["after"] == "v0"
    assert result["errors"] == ["ReadOnlyError"] * 3
    assert _tree(path) == before, "a readonly open changed the store"


def test_readonly_never_waits_for_the_writer(tmp_path, workers):
    path = str(tmp_path / "store")
    with mpkv.open(path) as s:
        s.put("a", "1")
    held, release = CTX.Event(), CTX.Event()
    idx = workers.start(mp_workers.tx_holder, path, "pending", held, release)
    workers.wait_until(lambda: held.wait(0.1), "the holder to take the lock")
    try:
        t0 = time.monotonic()
        ro = mpkv.Store(path, readonly=True)
        got = ro.get("a")
        items = dict(ro.items())
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    try:
        # The holder keeps the lock until released below (30 s at most): waiting for it
        # would take that long. 5 s leaves room for a loaded machine.
        assert elapsed < 5.0, (
            f"readonly open + get took {elapsed:.2f}s while a writer held the lock"
        )
        assert got == "1"
        assert items == {"a": "1"}, "an uncommitted transaction was visible"
        workers.results([idx])
        assert ro.get("pending") == "1", "readonly store missed a committed write"
        with pytest.raises(mpkv.ReadOnlyError):
            ro.put("x", "y")
    finally:
        ro.close()


# ---------------------------------------------- 9. refresh() and max_staleness=None


def test_refresh_returns_records_applied(tmp_path, workers):
    path = str(tmp_path / "store")
    s = mpkv.Store(path, max_staleness=None)
    try:
        s.put("own", "0")
        s.refresh()
        assert s.refresh() == 0
        idx = workers.start(
            mp_workers.apply_ops, path, [("put", f"k{i}", str(i)) for i in range(5)]
        )
        workers.results([idx])
        assert s.refresh() == 5
        assert s.refresh() == 0
        assert {k: s[k] for k in s} == {"own": "0", **{f"k{i}": str(i) for i in range(5)}}

        # every put and every delete is a record -- a delete of a missing key too
        ops = [("put", "k0", "new"), ("delete", "k1"), ("delete", "never-was"), ("put", "z", "1")]
        idx = workers.start(mp_workers.apply_ops, path, ops)
        workers.results([idx])
        assert s.refresh() == 4
        assert s.refresh() == 0
        assert s.get("k0") == "new" and "k1" not in s and s.get("z") == "1"
    finally:
        s.close()


def test_max_staleness_none_view_does_not_move(tmp_path, workers):
    path = str(tmp_path / "store")
    with mpkv.open(path) as s0:
        for i in range(10):
            s0.put(f"k{i}", f"old{i}")
    old = {f"k{i}": f"old{i}" for i in range(10)}
    s = mpkv.Store(path, max_staleness=None)
    try:
        assert dict(s.items()) == old
        ops = [("put", "k0", "new0"), ("delete", "k1"), ("put", "added", "a")]
        idx = workers.start(mp_workers.apply_ops, path, ops)
        workers.results([idx])
        # the other process's writes are acknowledged, yet the view stays where it was
        for _ in range(3):
            assert s.get("k0") == "old0"
            assert s["k1"] == "old1"
            assert "k1" in s and "added" not in s
            assert len(s) == 10
            assert sorted(s) == sorted(old)
            assert dict(s.items()) == old
        assert s.refresh() == 3
        new = dict(old, k0="new0", added="a")
        del new["k1"]
        assert dict(s.items()) == new and len(s) == len(new)
        # own writes are always visible
        s.put("mine", "m")
        assert s.get("mine") == "m"
    finally:
        s.close()


# ------------------------------------------------------------------ 10. pickling


def test_store_pickled_into_spawned_worker(tmp_path, workers):
    path = str(tmp_path / "store")
    s = mpkv.Store(path, max_segment_bytes=1024)
    try:
        s.put("from-parent", "p")
        idx = workers.start(mp_workers.use_pickled_store, s, 100)
        (res,) = workers.results([idx])
        assert res == {"first": "p", "len": 101}
        assert s.get("child-0099") == "c" * 40 + "99"  # parent is still usable
        assert len(s) == 101
    finally:
        s.close()
    # the child wrote within the store's limit
    segs = segment_files(path)
    assert len(segs) > 1
    assert all(os.path.getsize(os.path.join(path, f)) <= 1024 for f in segs)

    # the options travel too: readonly ...
    ro = mpkv.Store(path, readonly=True)
    try:
        idx = workers.start(mp_workers.pickled_try_put, ro)
        (res,) = workers.results([idx])
        assert res == {"value": "p", "error": "ReadOnlyError"}
    finally:
        ro.close()
    # ... and lock_timeout (this process holds the writer lock meanwhile)
    impatient = mpkv.Store(path, lock_timeout=0.2)
    try:
        with impatient.transaction():
            idx = workers.start(mp_workers.pickled_try_put, impatient)
            (res,) = workers.results([idx], timeout=15)
        assert res == {"value": "p", "error": "LockTimeout"}
        assert impatient.get("from-child") is None
    finally:
        impatient.close()


# --------------------------------------------------------------------- 11. fork


def _fork_child(body):
    """Fork; run ``body()`` in the child and ``os._exit`` with 0 (ok), 3 (mpkv.Error), 4."""
    pid = os.fork()
    if pid:
        return pid
    code = 4
    try:
        signal.alarm(30)  # a hung child dies instead of hanging the test
        body()
        code = 0
    except mpkv.Error:
        code = 3
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _wait_child(pid):
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        pytest.fail(f"forked child killed by signal {sig} (SIGALRM = it hung)")
    code = os.WEXITSTATUS(status)
    assert code in (0, 3), f"forked child failed with an unexpected error (exit {code})"
    return code


def _check_forked_keys(state, prefix, n, code):
    got = {k: v for k, v in state.items() if k.startswith(prefix)}
    if code == 0:
        assert got == {f"{prefix}{i:03d}": str(i) for i in range(n)}
    else:  # a clear error: whatever it wrote before must still be right
        assert all(v == str(int(k[len(prefix) :])) for k, v in got.items())


def test_fork_child_uses_store(tmp_path):
    path = str(tmp_path / "store")
    s = mpkv.Store(path)
    try:
        for i in range(20):
            s.put(f"p-{i:03d}", str(i))
        s.get("p-000")

        def body():
            for i in range(100):
                s.put(f"c-{i:03d}", str(i))
            assert s.get("c-099") == "99"

        code = _wait_child(_fork_child(body))
        for i in range(20, 120):
            s.put(f"p-{i:03d}", str(i))
        state = dict(s.items())
    finally:
        s.close()
    assert {k: v for k, v in state.items() if k.startswith("p-")} == {
        f"p-{i:03d}": str(i) for i in range(120)
    }
    _check_forked_keys(state, "c-", 100, code)
    with mpkv.open(path) as s2:
        assert dict(s2.items()) == state


def _increment(store):
    with store.transaction() as tx:
        tx["n"] = str(int(tx.get("n", "0")) + 1)


def test_fork_child_and_parent_write_concurrently(tmp_path):
    """Parent and forked child write at the same time: no lost update, nothing torn."""
    path = str(tmp_path / "store")
    rounds = 200
    s = mpkv.Store(path, max_segment_bytes=2048)
    try:
        s.put("n", "0")
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()

        def body():
            os.close(go_w)
            os.close(out_r)
            os.read(go_r, 1)  # go
            done = 0
            try:
                for i in range(rounds):
                    s.put(f"c-{i:03d}", str(i))
                    _increment(s)
                    done += 1
            finally:
                os.write(out_w, str(done).encode())

        pid = _fork_child(body)
        os.close(go_r)
        os.close(out_w)
        os.write(go_w, b"g")
        os.close(go_w)
        for i in range(rounds):
            s.put(f"p-{i:03d}", str(i))
            _increment(s)
        code = _wait_child(pid)
        child_done = int(os.read(out_r, 64) or b"0")
        os.close(out_r)
        state = dict(s.items())
    finally:
        s.close()
    assert state["n"] == str(rounds + child_done), f"lost updates (child exit {code})"
    assert {k: v for k, v in state.items() if k.startswith("p-")} == {
        f"p-{i:03d}": str(i) for i in range(rounds)
    }
    _check_forked_keys(state, "c-", rounds, code)
    with mpkv.open(path) as s2:
        assert dict(s2.items()) == state


def test_fork_inside_transaction_stays_serializable(tmp_path):
    """Forking while this process holds the writer lock must not hand the lock to the child."""
    path = str(tmp_path / "store")
    s = mpkv.Store(path)
    try:
        s.put("n", "0")
        r, w = os.pipe()
        with s.transaction() as tx:
            n = int(tx["n"])

            def body():
                os.close(r)
                with s.transaction() as ctx:
                    ctx["n"] = str(int(ctx.get("n", "0")) + 1)
                os.write(w, b"c")

            pid = _fork_child(body)
            os.close(w)
            # the child must now be blocked on the lock (or have failed): it must not
            # be able to commit while this transaction is open
            ready, _, _ = select.select([r], [], [], 0.5)
            early = bool(ready) and os.read(r, 1) == b"c"
            tx["n"] = str(n + 1)
        code = _wait_child(pid)
        os.close(r)
        assert not early, "the forked child committed while the parent held the writer lock"
        expected = "2" if code == 0 else "1"
        assert s.get("n") == expected, f"lost update: n={s.get('n')!r}, child exit {code}"
    finally:
        s.close()
    with mpkv.open(path) as s2:
        assert s2["n"] == expected


# --------------------------------------------------------------- 12. iteration


def _gen_of(keys):
    extras = [int(k.split("-")[1]) for k in keys if k.startswith("extra-")]
    assert extras, f"no extra-* key in {sorted(keys)}"
    return max(extras)


def _check_keys(keys, where):
    keys = list(keys)
    assert len(keys) == len(set(keys)), f"{where}: a key repeated"
    g = _gen_of(keys)
    assert set(keys) == set(mp_workers.generation_state(g)), f"{where}: torn key set"
    return g


def _check_items(items, where):
    items = list(items)
    d = dict(items)
    assert len(d) == len(items), f"{where}: a key repeated"
    g = _gen_of(d)
    assert d == mp_workers.generation_state(g), f"{where}: torn snapshot"
    return g


def _check_values(values, where):
    values = list(values)
    g = max(int(v[1:]) for v in values)
    want = collections.Counter(mp_workers.generation_state(g).values())
    assert collections.Counter(values) == want, f"{where}: torn values"
    return g


def test_iteration_while_another_process_writes(tmp_path, workers):
    path = str(tmp_path / "store")
    parent_conn, child_conn = CTX.Pipe()
    idx = workers.start(mp_workers.generation_writer, path, child_conn)
    g = workers.recv(parent_conn, "the writer to start")
    s = mpkv.Store(path)
    try:
        assert dict(s.items()) == mp_workers.generation_state(g)

        # a suspended iteration keeps its point-in-time view across a commit
        for kind in ("keys", "items", "values"):
            it = iter({"keys": s, "items": s.items(), "values": s.values()}[kind])
            first = next(it)
            parent_conn.send("gen")
            g_new = workers.recv(parent_conn)
            assert s.get("k00") == f"g{g_new}"  # new reads see the commit at once
            rest = [first, *list(it)]
            check = {"keys": _check_keys, "items": _check_items, "values": _check_values}[kind]
            assert check(rest, f"suspended {kind}") == g, f"{kind}: not the view it started on"
            g = g_new

        # free-running writer: every iteration is a whole, committed generation
        parent_conn.send("run")
        seen = set()
        passes = 0
        deadline = time.monotonic() + 20
        while (len(seen) < 5 or passes < 20) and time.monotonic() < deadline:
            seen.add(_check_items(s.items(), "items"))
            seen.add(_check_keys(s, "keys"))
            seen.add(_check_values(s.values(), "values"))
            seen.add(_check_keys(s.keys(), "keys()"))
            passes += 1
        parent_conn.send("stop")
        g_last = workers.recv(parent_conn)
        assert len(seen) >= 2, "the writer made no progress while we iterated"
        assert max(seen) <= g_last
        assert dict(s.items()) == mp_workers.generation_state(g_last)
        parent_conn.send(None)
        workers.results([idx])
    finally:
        s.close()
