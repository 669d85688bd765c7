"""Worker functions for tests/test_multiprocess.py.

They live in their own module so that children started with the ``spawn`` method (or
with ``python -c``) can import them by name. Every worker that is run through
:func:`entry` reports its return value, or its traceback, on a result queue, so a
failure in a child shows up as a readable assertion in the parent.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mpkv  # noqa: E402

# --------------------------------------------------------------------------- plumbing


def entry(name, result_q, idx, *args):
    """Run ``globals()[name](*args)`` and report ``(idx, ok, result-or-traceback)``."""
    try:
        result = globals()[name](*args)
    except BaseException:
        result_q.put((idx, False, traceback.format_exc()))
    else:
        result_q.put((idx, True, result))


def _wait(barrier, timeout=60.0):
    barrier.wait(timeout)


# --------------------------------------------------------------------------- counters


def counter_worker(path, rounds, barrier):
    s = mpkv.Store(path)
    try:
        _wait(barrier)
        for _ in range(rounds):
            with s.transaction() as tx:
                tx["n"] = str(int(tx.get("n", "0")) + 1)
    finally:
        s.close()


# ------------------------------------------------------- many writers, one reader


def key_of(w, i):
    return f"w{w}-{i:05d}"


def value_of(w, i):
    return f"value-{w}-{i}-" + "x" * (i % 7)


def keys_writer(path, w, n, max_segment_bytes, barrier):
    s = mpkv.Store(path, max_segment_bytes=max_segment_bytes)
    try:
        _wait(barrier)
        for i in range(n):
            s.put(key_of(w, i), value_of(w, i))
            s.put(f"count-{w}", str(i + 1))
    finally:
        s.close()


def counter_reader(path, nwriters, barrier, stop, passed):
    """Poll every ``count-<w>``; each must never go down, and the key it counts must exist.
    ``passed`` is set after the first pass (so the parent can wait for one before ``stop``)."""
    s = mpkv.Store(path)
    last = [0] * nwriters
    seen = [set() for _ in range(nwriters)]
    loops = 0
    try:
        _wait(barrier)
        while True:
            finished = stop.is_set()  # read before the pass: a pass after it sees the end
            for w in range(nwriters):
                c = int(s.get(f"count-{w}", "0"))
                if c < last[w]:
                    raise AssertionError(f"count-{w} went backwards: {last[w]} -> {c}")
                last[w] = c
                seen[w].add(c)
                if c:
                    got = s.get(key_of(w, c - 1))
                    if got != value_of(w, c - 1):
                        raise AssertionError(
                            f"count-{w} == {c} but {key_of(w, c - 1)!r} is {got!r} "
                            f"(written before the counter)"
                        )
            loops += 1
            passed.set()
            if finished:
                break
    finally:
        s.close()
    return {"loops": loops, "last": last, "distinct": [len(x) for x in seen]}


# ---------------------------------------------------------------- read-after-write


def rw_peer(path, conn):
    """Serve ``("get", key)`` and ``("put", key, value)`` requests until ``None``."""
    s = mpkv.Store(path)
    try:
        s.get("warm-up")  # build a view before the other side starts writing
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                break
            if msg[0] == "get":
                conn.send(s.get(msg[1]))
            else:
                s.put(msg[1], msg[2])
                conn.send("ok")
    finally:
        s.close()


# --------------------------------------------------------------------------- locks


def tx_holder(path, key, held, release, timeout=30.0):
    """Hold the writer lock inside a transaction until ``release`` is set, then commit."""
    s = mpkv.Store(path)
    try:
        with s.transaction() as tx:
            tx[key] = "1"
            held.set()
            if not release.wait(timeout):
                raise AssertionError("never told to release the lock")
    finally:
        s.close()


def tx_sleeper(path, held):
    """Take the writer lock in a transaction and sleep in it until killed."""
    s = mpkv.Store(path)
    with s.transaction() as tx:
        tx["uncommitted"] = "1"
        held.set()
        time.sleep(300)
    raise AssertionError("tx_sleeper was not killed")


# --------------------------------------------------------------- concurrent create


def create_and_put(path, i, n, fmt, barrier1, barrier2):
    try:
        _wait(barrier1)
        s = mpkv.Store(path, format=fmt)
        s.put(f"k{i:02d}", f"v{i}")
    except BaseException:
        barrier2.abort()  # let the others fail fast instead of timing out
        raise
    try:
        _wait(barrier2)
        return {f"k{j:02d}": s.get(f"k{j:02d}") for j in range(n)}
    finally:
        s.close()


# ------------------------------------------------------------------------ simple ops


def apply_ops(path, ops):
    """Apply ``("put", k, v)`` / ``("delete", k)`` ops, each one as its own call."""
    s = mpkv.Store(path)
    try:
        for op in ops:
            if op[0] == "put":
                s.put(op[1], op[2])
            else:
                s.delete(op[1])
    finally:
        s.close()


# ------------------------------------------------------------------------- pickling


def use_pickled_store(store, n):
    """Use a Store that arrived pickled: read the parent's key, write ``n`` keys."""
    first = store.get("from-parent")
    for i in range(n):
        store.put(f"child-{i:04d}", "c" * 40 + str(i))
    total = len(store)
    store.close()
    return {"first": first, "len": total}


def pickled_try_put(store):
    """Read the parent's key, then try a put that the store's options must refuse."""
    value = store.get("from-parent")
    try:
        store.put("from-child", "x")
    except (mpkv.ReadOnlyError, mpkv.LockTimeout) as exc:
        error = type(exc).__name__
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    store.close()
    return {"value": value, "error": error}


# ------------------------------------------------------------------------ iteration

N_FIXED = 30  #: keys k00..k29, all set to "g<N>" by generation N
WINDOW = 5  #: extra-<N> keys kept alive: the last WINDOW generations


def generation_state(n):
    """The whole committed state right after generation ``n`` (n >= 0)."""
    state = {f"k{j:02d}": f"g{n}" for j in range(N_FIXED)}
    for m in range(max(0, n - WINDOW + 1), n + 1):
        state[f"extra-{m:05d}"] = f"g{m}"
    return state


def generation_writer(path, conn):
    """Commit generations (one transaction each) on command.

    ``"gen"``: commit one, reply its number. ``"run"``: commit until a message arrives
    (which must be ``"stop"``), then reply the last number. ``None``: quit.
    """
    s = mpkv.Store(path)
    n = -1

    def one():
        nonlocal n
        n += 1
        with s.transaction() as tx:
            for j in range(N_FIXED):
                tx[f"k{j:02d}"] = f"g{n}"
            tx[f"extra-{n:05d}"] = f"g{n}"
            if n >= WINDOW:
                del tx[f"extra-{n - WINDOW:05d}"]

    try:
        one()
        conn.send(n)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            if msg == "gen":
                one()
            elif msg == "run":
                while not conn.poll():
                    one()
                if conn.recv() != "stop":
                    raise AssertionError("expected 'stop'")
            conn.send(n)
    finally:
        s.close()


# ------------------------------------------------------------------------- readonly


def readonly_check(path):
    """Run in a child that cannot write ``path``: open it readonly and report as JSON."""
    result = {"writable": []}
    for probe in (os.path.join(path, "probe.tmp"), os.path.join(path, ".mpkv", "probe.tmp")):
        try:
            with open(probe, "w"):
                pass
        except OSError:
            pass
        else:  # the privilege drop did not work: say so, and leave nothing behind
            os.unlink(probe)
            result["writable"].append(probe)
    t0 = time.monotonic()
    s = mpkv.Store(path, readonly=True)
    result["first"] = s.get("k000")
    result["open_get_seconds"] = time.monotonic() - t0
    result["items"] = dict(s.items())
    result["len"] = len(s)
    errors = []
    for what, call in (
        ("put", lambda: s.put("new", "x")),
        ("delete", lambda: s.delete("k000")),
        ("setitem", lambda: s.__setitem__("new", "x")),
    ):
        try:
            call()
        except mpkv.ReadOnlyError:
            errors.append("ReadOnlyError")
        except BaseException as exc:
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
        else:
            errors.append(f"{what}: no error")
    result["errors"] = errors
    result["after"] = s.get("k000")
    s.close()
    json.dump(result, sys.stdout)
