"""Child processes and shared op generators for tests/test_compaction.py.

Run as a script: ``python compaction_workers.py ROLE JSON_ARGS``. Conventions:

- a child prints ``ready`` on stdout (flushed) once its store is open;
- long-running roles stop when their stdin reaches EOF (the parent closes it): no
  sleeps are used to synchronise;
- acknowledgements go to a log file, one ``os.write`` per line *after* the operation
  returned, so they survive a SIGKILL; the ops come from seeded generators, so the
  parent regenerates exactly the same sequence and knows the op that was in flight;
- a final report, when there is one, is the last stdout line, as JSON.

Roles:

``writer``       (concurrency test) ops of :func:`mono_ops`: every put gives a key a
                 strictly higher version; "deletable" keys are deleted for good.
``reader``       reads in a loop (``items()`` snapshots and ``get``) and checks the view
                 with :class:`MonotonicChecker`; one log line per pass.
``opener``       opens (writable and readonly, alternately), snapshots and closes the
                 store in a loop, checking every snapshot the same way; one log line
                 per open.
``compactor``    ``compact()`` every ``interval`` seconds until stopped, logging each
                 result as a JSON line: the parent stops it once the workload did what
                 the test needs, however slow the machine.
``crash_writer`` (kill test) ops of :func:`random_ops` forever, acked in the log.
``crash_compactor`` ``compact()`` forever, logging ``start i`` / ``done i``; with a
                 ``kill_at`` of ``[kind, n]`` it SIGKILLs itself at the n-th call of
                 kind ``rename``/``unlink``/``fsync``/``fsync_dir`` made by
                 ``mpkv.compaction`` (counted over all its compactions).
``watch_writer`` (watch test) writes the phases of :func:`watch_phases`, compacting every
                 ``compact_every`` ops; after each phase it prints ``phase i`` and waits
                 for a line on stdin.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

Value = Union[str, bytes]
# ("put", key, value) | ("delete", key) | ("tx", [(key, value-or-None), ...])
Op = tuple[Any, ...]


# --------------------------------------------------------------------------- models


def apply_model(state: dict[str, Value], op: Op) -> None:
    if op[0] == "put":
        state[op[1]] = op[2]
    elif op[0] == "delete":
        state.pop(op[1], None)
    else:
        for k, v in op[1]:
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v


def apply_store(store: Any, op: Op) -> None:
    if op[0] == "put":
        store.put(op[1], op[2])
    elif op[0] == "delete":
        store.delete(op[1])
    else:
        with store.transaction() as tx:
            for k, v in op[1]:
                if v is None:
                    tx.delete(k)
                else:
                    tx.put(k, v)


def changes_of(op: Op) -> list[tuple[str, Value | None]]:
    """The (key, value-or-None) changes an op commits, in order."""
    if op[0] == "put":
        return [(op[1], op[2])]
    if op[0] == "delete":
        return [(op[1], None)]
    return list(op[1])


def take(gen: Iterator[Op], n: int) -> list[Op]:
    return [next(gen) for _ in range(n)]


# ------------------------------------------------- monotonic ops (concurrency test)
#
# Writer w owns the keys "w<w>:p<i>" (permanent: put again and again, never deleted)
# and "w<w>:d<j>" (deletable: put a few times, then deleted and never written again).
# Every put carries the writer's op counter as the version, so a key's version only
# ever increases. Keys never contain "|" and values never contain a newline: the same
# ops work in the text format.


def mono_value(key: str, version: int) -> str:
    return f"{version}|{key}|" + "é" * (version % 5) + "x" * (version % 23)


def mono_version(key: str, value: object) -> int | None:
    """The version in a value written by :func:`mono_ops`; None when malformed."""
    if not isinstance(value, str):
        return None
    head = value.split("|", 1)[0]
    if not head.isdigit():
        return None
    version = int(head)
    return version if value == mono_value(key, version) else None


def mono_ops(seed: int, wid: int, nperm: int = 24, max_deletable: int = 60) -> Iterator[Op]:
    rng = random.Random(f"mono-{seed}-{wid}")
    version = 0
    live: list[str] = []  # deletable keys not deleted yet
    created = 0

    def put(key: str) -> tuple[str, str]:
        nonlocal version
        version += 1
        return key, mono_value(key, version)

    while True:
        r = rng.random()
        if live and (r < 0.14 or len(live) >= max_deletable):
            yield ("delete", live.pop(rng.randrange(len(live))))
        elif r < 0.32:
            key = f"w{wid}:d{created:05d}"
            created += 1
            live.append(key)
            yield ("put", *put(key))
        elif r < 0.42:
            sub: list[tuple[str, Value | None]] = [
                put(f"w{wid}:p{i:03d}") for i in rng.sample(range(nperm), rng.randint(2, 4))]
            if live and rng.random() < 0.4:
                sub.append((live.pop(rng.randrange(len(live))), None))
            if live and rng.random() < 0.4:
                sub.append(put(rng.choice(live)))
            rng.shuffle(sub)
            yield ("tx", sub)
        elif r < 0.55 and live:
            yield ("put", *put(rng.choice(live)))
        else:
            yield ("put", *put(f"w{wid}:p{rng.randrange(nperm):03d}"))


def is_permanent(key: str) -> bool:
    return ":p" in key


class MonotonicChecker:
    """What a process sees of the writers' keys over time must only move forward:
    versions never go backwards, a permanent key once seen never vanishes, a deletable
    key once seen and then gone never comes back, every value is well formed."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.last: dict[str, int] = {}
        self.gone: set[str] = set()
        self.violations: list[str] = []
        self.checks = 0

    def _bad(self, msg: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(f"{self.where} check {self.checks}: {msg}")

    def one(self, key: str, value: object) -> None:
        """A single get() result (None: missing)."""
        if value is None:
            if key in self.last and key not in self.gone:
                if is_permanent(key):
                    self._bad(f"permanent key {key!r} vanished (last version {self.last[key]})")
                else:
                    self.gone.add(key)
            return
        version = mono_version(key, value)
        if version is None:
            self._bad(f"malformed value {value!r} for {key!r}")
            return
        if key in self.gone:
            self._bad(f"deleted key {key!r} came back with version {version}")
        if version < self.last.get(key, 0):
            self._bad(f"{key!r} went back from version {self.last[key]} to {version}")
        self.last[key] = version

    def snapshot(self, snap: dict[str, Value]) -> None:
        self.checks += 1
        for key, value in snap.items():
            self.one(key, value)
        for key in list(self.last):
            if key not in snap:
                self.one(key, None)

    def report(self) -> dict[str, Any]:
        return {"checks": self.checks, "keys": len(self.last), "gone": len(self.gone),
                "violations": self.violations}


# ------------------------------------------------------------ random ops (kill test)


def random_ops(seed: int, fmt: str, nkeys: int) -> Iterator[Op]:
    """Puts, deletes (of present and missing keys) and small transactions over the keys
    ``k000 …`` of the prepared store, with values that are unique per op."""
    rng = random.Random(f"random-{seed}")
    i = 0

    def value() -> Value:
        nonlocal i
        i += 1
        body = f"{i}-" + "v" * rng.randrange(0, 30)
        if fmt == "binary" and rng.random() < 0.2:
            return body.encode() + b"\x00\xff\n"
        return body + rng.choice(["", "|", "é", "😀"])

    def key() -> str:
        return f"k{rng.randrange(nkeys):03d}"

    while True:
        r = rng.random()
        if r < 0.12:
            sub: list[tuple[str, Value | None]] = [
                (key(), None if rng.random() < 0.25 else value())
                for _ in range(rng.randint(2, 5))]
            yield ("tx", sub)
        elif r < 0.35:
            yield ("delete", key())
        else:
            yield ("put", key(), value())


def prepared_ops(seed: int, fmt: str, nkeys: int, n: int) -> list[Op]:
    """The ops that build the kill test's prepared store: overwrites and deletes."""
    rng = random.Random(f"prepared-{seed}")
    ops: list[Op] = []
    for i in range(n):
        k = f"k{rng.randrange(nkeys):03d}"
        if rng.random() < 0.1:
            ops.append(("delete", k))
        else:
            ops.append(("put", k, f"p{i}-" + "w" * rng.randrange(10, 40)))
    return ops


# ------------------------------------------------------------- watch test ops


def watch_phases(seed: int, fmt: str, phases: int, n: int) -> list[list[Op]]:
    """The ops of each phase. Every put has a value never written before and every
    delete is of a key that exists, so each op is a change a watcher must report."""
    rng = random.Random(f"watch-{seed}")
    state: set[str] = set()
    out: list[list[Op]] = []
    for phase in range(phases):
        ops: list[Op] = []
        for i in range(n):
            tag = f"{phase}.{i}"
            r = rng.random()
            if r < 0.2 and state:
                k = rng.choice(sorted(state))
                state.discard(k)
                ops.append(("delete", k))
            elif r < 0.3:
                sub: list[tuple[str, Value | None]] = []
                for j in range(rng.randint(2, 4)):
                    k = f"t{rng.randrange(30):02d}"
                    if k in state and rng.random() < 0.3:
                        sub.append((k, None))
                        state.discard(k)
                    else:
                        sub.append((k, f"{tag}.{j}-" + "t" * rng.randrange(20)))
                        state.add(k)
                ops.append(("tx", sub))
            else:
                k = f"k{rng.randrange(40):02d}"
                v: Value = f"{tag}-" + "v" * rng.randrange(40)
                if fmt == "binary" and rng.random() < 0.2:
                    v = v.encode() + b"\x00\n"
                state.add(k)
                ops.append(("put", k, v))
        out.append(ops)
    return out


# --------------------------------------------------------------------------- roles


def _stop_on_eof() -> threading.Event:
    stop = threading.Event()

    def wait() -> None:
        try:  # os.read, not sys.stdin: no buffer lock held at interpreter shutdown
            while os.read(0, 4096):
                pass
        finally:
            stop.set()

    threading.Thread(target=wait, daemon=True).start()
    return stop


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _open(args: dict[str, Any], **extra: Any) -> Any:
    import mpkv

    opts = dict(format=args.get("format"), max_segment_bytes=args.get("max_segment_bytes"))
    opts.update(extra)
    return mpkv.Store(args["path"], **opts)


def role_writer(args: dict[str, Any]) -> None:
    stop = _stop_on_eof()
    store = _open(args)
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _say("ready")
    n = 0
    for op in mono_ops(args["seed"], args["wid"]):
        if stop.is_set():
            break
        apply_store(store, op)
        n += 1
        os.write(log, f"{n}\n".encode())
    store.close()
    _say(json.dumps({"acked": n}))


def role_reader(args: dict[str, Any]) -> None:
    stop = _stop_on_eof()
    store = _open(args)
    check = MonotonicChecker("reader")
    rng = random.Random(args["seed"])
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _say("ready")
    gets = 0
    while not stop.is_set():
        check.snapshot(dict(store.items()))
        # single gets between snapshots: each must be at least as new as the snapshot
        for key in rng.sample(sorted(check.last), min(5, len(check.last))):
            check.one(key, store.get(key))
            gets += 1
        os.write(log, b"pass\n")
    store.close()
    _say(json.dumps({**check.report(), "gets": gets}))


def role_opener(args: dict[str, Any]) -> None:
    stop = _stop_on_eof()
    check = MonotonicChecker("opener")
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _say("ready")
    opens = 0
    while not stop.is_set():
        readonly = opens % 2 == 1
        store = _open({"path": args["path"]}, readonly=readonly)
        try:
            snap = dict(store.items())
        finally:
            store.close()
        check.where = f"opener (readonly={readonly})"
        check.snapshot(snap)
        opens += 1
        os.write(log, b"open\n")
    _say(json.dumps({**check.report(), "opens": opens}))


def role_compactor(args: dict[str, Any]) -> None:
    stop = _stop_on_eof()
    store = _open(args)
    check = MonotonicChecker("compactor")
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _say("ready")
    results = []
    while not stop.is_set():
        results.append(store.compact())
        check.snapshot(dict(store.items()))  # its own view stays exact too
        os.write(log, (json.dumps(results[-1]) + "\n").encode())
        stop.wait(args["interval"])  # pacing of the workload, not synchronisation
    store.close()
    _say(json.dumps({**check.report(), "results": results}))


def role_crash_writer(args: dict[str, Any]) -> None:
    store = _open(args)
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _say("ready")
    for i, op in enumerate(random_ops(args["seed"], args["format"], args["nkeys"])):
        apply_store(store, op)
        os.write(log, f"{i}\n".encode())


class _KillingOS:
    """Stands in for ``os`` inside ``mpkv.compaction``: SIGKILLs this process right
    after the n-th call of one kind (the call itself completes)."""

    def __init__(self, kind: str, n: int, log: int) -> None:
        self.kind, self.n, self.log, self.count = kind, n, log, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _tick(self, kind: str) -> None:
        if kind == self.kind:
            self.count += 1
            if self.count == self.n:
                os.write(self.log, f"kill {kind} {self.n}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)

    def rename(self, *a: Any, **kw: Any) -> Any:
        out = os.rename(*a, **kw)
        self._tick("rename")
        return out

    def unlink(self, *a: Any, **kw: Any) -> Any:
        out = os.unlink(*a, **kw)
        self._tick("unlink")
        return out

    def fsync(self, *a: Any, **kw: Any) -> Any:
        out = os.fsync(*a, **kw)
        self._tick("fsync")
        return out


def role_crash_compactor(args: dict[str, Any]) -> None:
    import mpkv.compaction as comp

    store = _open(args)
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if args.get("kill_at"):
        kind, n = args["kill_at"]
        killer = _KillingOS(kind, n, log)
        comp.os = killer  # type: ignore[attr-defined]
        real_fsync_dir = comp.fsync_dir

        def fsync_dir(path: str) -> None:
            real_fsync_dir(path)
            killer._tick("fsync_dir")

        comp.fsync_dir = fsync_dir  # type: ignore[attr-defined]
    _say("ready")
    i = 0
    while True:
        os.write(log, f"start {i}\n".encode())
        result = store.compact()
        os.write(log, f"done {i} {json.dumps(result)}\n".encode())
        i += 1


def role_watch_writer(args: dict[str, Any]) -> None:
    store = _open(args)
    _say("ready")
    compactions = []
    n = 0
    phases = watch_phases(args["seed"], args["format"], args["phases"], args["per_phase"])
    for phase, ops in enumerate(phases):
        for op in ops:
            apply_store(store, op)
            n += 1
            if n % args["compact_every"] == 0:
                compactions.append(store.compact())
        store.put("marker", f"phase {phase}")
        _say(f"phase {phase}")
        if not sys.stdin.readline():
            raise SystemExit("parent went away")
    compactions.append(store.compact())
    store.put("zz:end", "done")
    store.close()
    _say(json.dumps({"compactions": compactions}))


ROLES = {name[5:]: fn for name, fn in globals().items() if name.startswith("role_")}


def main(argv: list[str]) -> None:
    role, args = argv[1], json.loads(argv[2])
    try:
        ROLES[role](args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)


if __name__ == "__main__":
    main(sys.argv)
