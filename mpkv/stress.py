"""``mpkv stress``: processes x threads hammer one store, then a checker judges the history.

With many processes the only sound question is "could a correct store have produced
what every client saw?", so workers assert nothing. Each worker thread logs every
operation to its own JSON-lines file: an *invoke* line (op, keys, values to write,
``time.monotonic_ns()``) written before the call, a *return* line (values read, time)
after it. CLOCK_MONOTONIC is one clock for every process on Linux, so the windows of
different processes compare. Afterwards the checker verifies:

(a) every way of reading the log gives one state: a view that tailed the whole run, a
    fresh open and a raw replay of the segment files; ``mpkv.verify`` finds no damage;
(b) no acknowledged write was lost: each key's final value was left by a write that no
    write acknowledged later superseded;
(c) each key's history (final state included) is linearizable for a register, by the
    Wing & Gong search with Porcupine's memoisation of (linearized set, value) states.

(d) transactions are atomic across keys: once one key shows a transaction's (unique)
    value, no later read of its other keys returns a value the transaction overwrote
    (the final state included, so a killed transaction is all-or-nothing there);
(e) the newest segment ends exactly at the published commit point after a last put;
(f) watchers miss nothing: a watcher the supervisor opens before the workload, read only
    after it, replays into the final state, its positions in strictly increasing order;
    each worker process runs a slow watcher (it starts reading ``WATCH_LAG`` seconds
    late, while compaction goes on) whose stream must be a gap-free run of that one.

Operations in flight when their process was SIGKILLed may or may not have taken
effect; the first write acknowledged after the kill decides (docs/protocol.md), so
their window ends there and the search may leave them out. A search that runs out of
steps makes the run INCONCLUSIVE, never OK. ``--torn`` also damages, after each kill,
what a power loss could damage: the bytes past the published end of the log.
Scheduling makes no two runs alike; ``--seed`` fixes the choices, not the interleaving.
"""

from __future__ import annotations

import argparse
import bisect
import enum
import glob
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .codec import Batch, Value, apply
from .locks import WriterLock
from .recovery import verify
from .segments import AUX, LOCK, SHM, list_log, list_segments, parse_name, read_meta
from .shm import SharedState
from .store import Store

#: one value a register can hold: a written string, or None for "no key"
Reg = str | None
#: what one operation read: a value, or for delete() whether the key existed
Read = str | bool | None
END_KEY = "~stress-end"  # written once after the workload; outside the key space
MAX_STEPS = 1_000_000  # search steps per key before a history is called undecided ...
STEPS_PER_OP = 300  # ... or this many per operation of the key, when more
MAX_ERRORS = 20  # exceptions after which a worker thread gives up
MIN_OPS_PER_THREAD = 20  # a run with fewer operations than this per thread proves nothing
KILLS = "kills.log"  # in the history folder: one JSON line per SIGKILL, {"proc", "t"}
WATCH_LAG = 10.0  # seconds a worker's watcher waits before reading (at most a third of a run)
# Each worker incarnation works at least this long once its store is open, even past the
# run's deadline: on a loaded machine a spawned process can take longer to start than a
# short run lasts, and a run whose workers never got going proves nothing.
MIN_WORK_NS = 500_000_000
STREAM = ".stream"  # in the history folder: a watcher's changes, {"p", "k", "v"} lines


# --- the history a worker thread records ---------------------------------------------


@dataclass(slots=True)
class Event:
    """One call of one worker thread. ``ret`` is ``math.inf`` when it never returned."""

    op: str  # get, put, delete, del (``del store[k]``), tx, readtx
    keys: list[str]
    writes: list[Reg]  # parallel to keys (puts and deletes); empty for reads
    call: int
    ret: float = math.inf
    reads: list[Read] = field(default_factory=list)
    error: str = ""
    who: str = ""  # history file and sequence number
    proc: str = ""  # the process incarnation that ran it (``p1i3``), to match kills

    @property
    def acked_write(self) -> bool:
        """Returned without error after writing something (``del`` of a missing key
        writes nothing)."""
        return (self.ret != math.inf and not self.error and bool(self.writes)
                and not (self.op == "del" and self.reads == [False]))


def perform(store: Store, op: str, keys: list[str], writes: list[Reg]) -> list[Read]:
    """Run one operation on the store; return what it read."""
    if op == "get":
        return [store.get(keys[0])]
    if op == "put":
        store.put(keys[0], writes[0])
        return []
    if op == "delete":
        return [store.delete(keys[0])]
    if op == "del":
        try:
            del store[keys[0]]
        except KeyError:
            return [False]
        return [True]
    with store.transaction() as tx:  # tx, readtx: read every key, then write
        reads: list[Read] = [tx.get(k) for k in keys]
        for key, value in zip(keys, writes, strict=False):  # readtx: no writes
            if value is None:
                tx.delete(key)
            else:
                tx.put(key, value)
    return reads


def random_op(rng: random.Random, keys: list[str], tag: str) -> tuple[str, list[str], list[Reg]]:
    """A random operation; ``tag`` makes every value written unique in the whole run."""
    r = rng.random()
    key = rng.choice(keys)
    if r < 0.35:
        return "get", [key], []
    if r < 0.60:
        return "put", [key], [tag]
    if r < 0.67:
        return "delete", [key], [None]
    if r < 0.70:
        return "del", [key], [None]
    chosen = rng.sample(keys, rng.randint(1, min(3, len(keys))))
    if r < 0.75:
        return "readtx", chosen, []
    return "tx", chosen, [None if rng.random() < 0.1 else f"{tag}.{j}"
                          for j in range(len(chosen))]


class HistoryFile:
    """Append-only JSON lines written with one ``write`` each, so a SIGKILL loses at
    most the line being written, never one already written."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, obj: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(obj) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


_PROC = re.compile(r"^(p\d+i\d+)t\d+\.jsonl$")


def read_history(path: str) -> list[Event]:
    """Parse one thread's file; a call without a return line stays in flight."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        records = json.loads("[" + ",".join(lines) + "]")
    except ValueError:  # the last line, cut short by a SIGKILL
        records = json.loads("[" + ",".join(lines[:-1]) + "]")
    events: dict[int, Event] = {}
    name = os.path.basename(path)
    proc = _PROC.match(name)
    for rec in records:
        if "op" in rec:
            events[rec["i"]] = Event(rec["op"], rec["k"], rec["w"], rec["t0"],
                                     who=f"{name}#{rec['i']}", proc=proc.group(1) if proc else "")
        elif "err" in rec:
            events[rec["i"]].error = rec["err"]
        else:
            events[rec["i"]].ret, events[rec["i"]].reads = rec["t1"], rec["r"]
    return list(events.values())


# --- worker processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    processes: int = 3
    threads: int = 2
    seconds: float = 10.0
    keys: int = 50
    kill: bool = False
    kill_compactor: bool = False
    compact: bool = False
    format: str = "binary"
    fsync: str = "periodic"
    max_segment_bytes: int = 4096
    max_staleness: float | None = 0.0  # > 0 lets reads go stale: the checker must object
    seed: int = 0
    dir: str = ""
    torn: bool = False  # after each kill, damage the bytes past the published end
    min_ops: int | None = None  # None: MIN_OPS_PER_THREAD per worker thread
    watchers: bool = True  # a slow watcher in each worker process, checked by (f)

    @property
    def required_ops(self) -> int:
        if self.min_ops is not None:
            return self.min_ops
        return MIN_OPS_PER_THREAD * self.processes * self.threads

    @property
    def store(self) -> str:
        return os.path.join(self.dir, "store")

    @property
    def history(self) -> str:
        return os.path.join(self.dir, "history")

    def open(self) -> Store:
        return Store(self.store, max_segment_bytes=self.max_segment_bytes, format=self.format,
                     fsync=self.fsync, max_staleness=self.max_staleness)

    def key_names(self) -> list[str]:
        return [f"k{i:03d}" for i in range(self.keys)]


def _thread_loop(cfg: Config, store: Store, name: str, deadline: int) -> None:
    """A worker thread; its death by an exception is reported like a process's."""
    try:
        _operate(cfg, store, name, deadline)
    except BaseException:
        _report_crash(cfg, name)
        raise


def _operate(cfg: Config, store: Store, name: str, deadline: int) -> None:
    rng = random.Random(f"{cfg.seed}/{name}")
    keys = cfg.key_names()
    history = HistoryFile(os.path.join(cfg.history, f"{name}.jsonl"))
    seq = errors = 0
    try:
        while time.monotonic_ns() < deadline:
            seq += 1
            op, ks, ws = random_op(rng, keys, f"{name}-{seq}")
            history.log({"i": seq, "op": op, "k": ks, "w": ws, "t0": time.monotonic_ns()})
            try:
                reads = perform(store, op, ks, ws)
            except Exception as exc:
                history.log({"i": seq, "err": f"{type(exc).__name__}: {exc}"})
                errors += 1
                if errors >= MAX_ERRORS:
                    return  # reported already; more would only slow the checker down
                continue
            history.log({"i": seq, "t1": time.monotonic_ns(), "r": reads})
    finally:
        history.close()


def _report_crash(cfg: Config, name: str) -> None:
    with open(os.path.join(cfg.history, f"{name}.crash"), "w", encoding="utf-8") as f:
        f.write(traceback.format_exc())


def worker(cfg: Config, proc: int, incarnation: int, deadline: int) -> None:
    """One writer process: ``cfg.threads`` threads sharing one Store until the deadline."""
    name = f"p{proc}i{incarnation}"
    try:
        store = cfg.open()
        deadline = max(deadline, time.monotonic_ns() + MIN_WORK_NS)
        threads = [threading.Thread(target=_thread_loop,
                                    args=(cfg, store, f"{name}t{t}", deadline))
                   for t in range(cfg.threads)]
        if cfg.watchers:
            threads.append(threading.Thread(target=_slow_watcher,
                                            args=(cfg, store, f"{name}w", deadline)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.close()
    except BaseException:
        _report_crash(cfg, name)
        raise


def _slow_watcher(cfg: Config, store: Store, name: str, deadline: int) -> None:
    """Watch from the start of this process, begin reading only ``WATCH_LAG`` seconds
    later (compaction must keep what it has not read), then log every change."""
    try:
        changes = store.watch(timeout=2.0)
        lag = min(WATCH_LAG, cfg.seconds / 3)
        time.sleep(max(min(lag, (deadline - time.monotonic_ns()) / 1e9), 0))
        with open(os.path.join(cfg.history, name + STREAM), "w", encoding="utf-8") as out:
            for change in changes:
                out.write(json.dumps({"p": change.position, "k": change.key,
                                      "v": change.value}) + "\n")
                if time.monotonic_ns() > deadline + 30 * 10**9:
                    break  # writers stopped long ago; never outlive the supervisor's wait
    except BaseException:
        _report_crash(cfg, name)
        raise


def read_stream(path: str) -> list[tuple[str, str, Reg]]:
    """A watcher's logged changes ``(position, key, value)``; a last line cut short by a
    SIGKILL is left out."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rec = json.loads(line)
            out.append((rec["p"], rec["k"], rec["v"]))
    return out


def check_streams(full: list[tuple[str, str, Reg]], final: dict[str, Value],
                  streams: dict[str, list[tuple[str, str, Reg]]]) -> list[str]:
    """Check (f): ``full`` is every change of the run, ``streams`` what slow watchers
    saw (each started at some point of it)."""
    problems = []
    positions = [p for p, _, _ in full]
    if any(a >= b for a, b in itertools.pairwise(positions)):
        problems.append("watch: positions of the full stream do not increase strictly")
    state: dict[str, Value] = {}
    for _, key, value in full:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    if state != final:
        diff = sorted(k for k in state.keys() | final.keys() if state.get(k) != final.get(k))
        problems.append(f"watch: replaying the full stream differs from the final state on "
                        f"keys {diff[:5]}")
    index = {p: n for n, p in enumerate(positions)}
    for name, stream in sorted(streams.items()):
        if not stream:
            continue
        first = index.get(stream[0][0])
        if first is None:
            problems.append(f"watch {name}: position {stream[0][0]} is not in the log")
        elif full[first:first + len(stream)] != stream:
            at = next((n for n, (a, b) in enumerate(zip(full[first:], stream, strict=False))
                       if a != b), min(len(full) - first, len(stream)))
            problems.append(f"watch {name}: after {at} changes its stream departs from the "
                            f"log (skip, duplicate or reorder) at {stream[at:at + 1]}")
    return problems


def compactor(cfg: Config, incarnation: int, deadline: int) -> None:
    """Compact every ~0.5 s; one line per finished compaction, so kills lose no count."""
    name = f"compactor{incarnation}"
    try:
        with cfg.open() as store, open(os.path.join(cfg.history, f"{name}.log"), "a",
                                       encoding="utf-8") as log:
            while time.monotonic_ns() < deadline:
                log.write(json.dumps(store.compact()) + "\n")
                log.flush()
                time.sleep(0.5)
    except BaseException:
        _report_crash(cfg, name)
        raise


# --- the checker -------------------------------------------------------------------------


class Expect(enum.Enum):
    """Read constraints other than "read exactly this value"."""

    ANY = "any"  # the operation read nothing (or its result is unknown)
    PRESENT = "present"  # delete() said the key existed
    ABSENT = "absent"  # delete() said it did not


class Keep(enum.Enum):
    """The operation wrote nothing."""

    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class RegOp:
    """One operation on one key: check ``expect`` against the value, then set ``write``."""

    call: float
    ret: float  # math.inf: in flight at a kill, may or may not have taken effect
    expect: Expect | Reg = Expect.ANY
    write: Keep | Reg = Keep.KEEP
    who: str = ""  # thread history file and sequence number, for reports
    maybe: bool = False  # in flight at a kill: takes effect by ``ret``, or never

    @property
    def in_doubt(self) -> bool:
        return self.maybe or self.ret == math.inf

    def __str__(self) -> str:
        expect = self.expect.value if isinstance(self.expect, Expect) else repr(self.expect)
        write = "-" if isinstance(self.write, Keep) else repr(self.write)
        return f"{self.who} [{self.call}, {self.ret}] read {expect} write {write}"

    def step(self, value: Reg) -> tuple[bool, Reg]:
        e = self.expect
        if e is Expect.ANY:
            ok = True
        elif e is Expect.PRESENT or e is Expect.ABSENT:
            ok = (value is not None) == (e is Expect.PRESENT)
        else:
            ok = value == e
        return ok, value if isinstance(self.write, Keep) else self.write


def linearizable(ops: list[RegOp], initial: Reg = None,
                 max_steps: int = MAX_STEPS) -> tuple[bool | None, int]:
    """Is there a linearization of ``ops`` for a register? None: undecided (step cap).
    With False comes the index of the earliest op the deepest attempt could not place.

    Porcupine's algorithm: call and return entries sorted by time in a linked list;
    linearize the first call that the model accepts and whose (set, value) state was
    not seen before, lifting it and its return out of the list; reaching a return entry
    means the op it closes cannot be linearized yet: backtrack. Reaching the return of
    an op in flight at a kill means every completed op is linearized: done. Reaching the
    (finite) return of a ``maybe`` op means it never took effect, the one choice left
    (taking effect was tried at its call): it is lifted out unapplied; when that fails
    too, backtracking goes on past it.
    """
    entries = sorted([(op.call, 0, i) for i, op in enumerate(ops)]
                     + [(op.ret, 1, i) for i, op in enumerate(ops)])
    end = len(entries) + 1  # positions 1..len are entries, 0 the head, end the tail
    nxt = list(range(1, end + 1))
    prv = list(range(-1, end))
    op_at = [0] + [i for _, _, i in entries]
    is_call = [False] + [kind == 0 for _, kind, _ in entries]
    ret_pos = [0] * len(ops)
    call_pos = [0] * len(ops)
    for pos, (_, kind, i) in enumerate(entries, start=1):
        if kind:
            ret_pos[i] = pos
        else:
            call_pos[i] = pos

    def lift(pos: int) -> None:
        for p in (pos, ret_pos[op_at[pos]]):
            nxt[prv[p]], prv[nxt[p]] = nxt[p], prv[p]

    def unlift(pos: int) -> None:
        for p in (ret_pos[op_at[pos]], pos):
            nxt[prv[p]] = prv[nxt[p]] = p

    seen: set[tuple[int, Reg]] = set()
    stack: list[tuple[int, Reg, bool]] = []  # (call position, value before, left out?)
    linearized, value, pos = 0, initial, nxt[0]
    deepest, stuck = -1, -1
    for _ in range(max_steps):
        if pos == end:
            return True, -1
        i = op_at[pos]
        if is_call[pos]:
            ok, new = ops[i].step(value)
            state = (linearized | 1 << i, new)
            if ok and state not in seen:
                seen.add(state)
                stack.append((pos, value, False))
                linearized, value = state
                lift(pos)
                pos = nxt[0]
            else:
                pos = nxt[pos]
            continue
        if ops[i].ret == math.inf:
            return True, -1
        if ops[i].maybe:
            state = (linearized | 1 << i, value)
            if state not in seen:
                seen.add(state)
                stack.append((call_pos[i], value, True))
                linearized = state[0]
                lift(call_pos[i])
                pos = nxt[0]
                continue
        if len(stack) > deepest:
            deepest, stuck = len(stack), op_at[nxt[0]]
        while True:  # backtrack to the last op linearized (not merely left out)
            if not stack:
                return False, stuck
            pos, value, left_out = stack.pop()
            linearized &= ~(1 << op_at[pos])
            unlift(pos)
            if not left_out:
                pos = nxt[pos]
                break
    return None, -1


def register_ops(events: Iterable[Event], decided: Callable[[Event], float] | None = None
                 ) -> dict[str, list[RegOp]]:
    """Split every event into per-key register operations (a transaction's read and
    write of one key become one read-modify-write with the transaction's window).
    ``decided(e)``: when the fate of an event that never returned was sealed (inf:
    never known)."""
    per_key: dict[str, list[RegOp]] = defaultdict(list)
    for e in events:
        done = e.ret != math.inf and not e.error
        if not done and not e.writes:
            continue  # a read that never returned constrains nothing
        ret = e.ret if done else decided(e) if decided else math.inf
        for j, key in enumerate(e.keys):
            write: Keep | Reg = e.writes[j] if e.writes else Keep.KEEP
            expect: Expect | Reg = Expect.ANY
            if done and e.op in ("delete", "del"):
                expect = Expect.PRESENT if e.reads[0] else Expect.ABSENT
            elif done and e.op != "put":
                expect = e.reads[j]  # type: ignore[assignment]
            per_key[key].append(RegOp(e.call, ret, expect, write, f"{e.who} {e.op}",
                                      maybe=not done and ret != math.inf))
    return per_key


def kill_bounds(events: list[Event], kills: dict[str, int], end: float
                ) -> Callable[[Event], float]:
    """``decided`` for ``register_ops``: an op in flight when its process was killed at
    time t took effect, if ever, by the return of the first write acknowledged that
    started after t (that writer took the lock and settled the log), or by ``end``."""
    acked = sorted((e.call, e.ret) for e in events if e.acked_write)
    calls = [c for c, _ in acked]
    first_ret = [end] * (len(acked) + 1)  # the earliest return among acked[i:]
    for i in range(len(acked) - 1, -1, -1):
        first_ret[i] = min(acked[i][1], first_ret[i + 1])

    def decided(e: Event) -> float:
        t = kills.get(e.proc)
        return math.inf if t is None else first_ret[bisect.bisect_right(calls, t)]
    return decided


def lost_write(ops: list[RegOp], final: Reg) -> str:
    """Why ``final`` cannot be the key's last value ("" when it can): it must have been
    written by some write that no acknowledged write started after the return of."""
    writes = [op for op in ops if not isinstance(op.write, Keep)]
    done = [op for op in writes if not op.in_doubt]
    sources = [op for op in writes if op.write == final]
    if final is None and not done:
        return ""  # never written, or only by writes in doubt: may be absent
    if not sources:
        return f"final value {final!r} was never written"
    if not done:
        return ""  # only writes in doubt, one of which took effect
    last = max(done, key=lambda op: op.call)
    if any(src.ret >= last.call for src in sources):
        return ""
    return (f"final value {final!r}, but the acknowledged write {last.write!r} "
            "started after its write returned")


def torn_transactions(events: list[Event], final: dict[str, Reg], keys: list[str],
                      after: float) -> list[str]:
    """Transactions seen applied on one key and not on another (check (d)).

    Values are unique, so a read of ``v`` shows that the write of ``v`` happened. Once
    a read showed one of transaction T's values (or T returned), a read of T's other
    keys that starts later must not return a value whose every possible writer
    finished before T started: T overwrote it. The final state counts as reads of every
    key made together at ``after``, so a killed T is all-or-nothing there."""
    writer: dict[str, Event] = {}  # unique value -> the op that wrote it
    deletes: dict[str, list[Event]] = defaultdict(list)  # key -> its deletes
    reads: dict[str, list[tuple[float, float, Reg]]] = defaultdict(list)  # by call time
    for e in events:
        for key, value in zip(e.keys, e.writes, strict=False):
            if value is None:
                deletes[key].append(e)
            else:
                writer[value] = e
        if e.ret != math.inf and not e.error and e.op in ("get", "readtx", "tx"):
            for key, got in zip(e.keys, e.reads, strict=False):
                assert not isinstance(got, bool)  # only delete() reads a bool
                reads[key].append((e.call, e.ret, got))
    for key in keys:
        reads[key].append((after, after, final.get(key)))
    for key_reads in reads.values():
        key_reads.sort(key=lambda r: r[0])
    first_read: dict[tuple[str, Reg], float] = {}  # (key, value) -> earliest return
    for key, key_reads in reads.items():
        for _, ret, value in key_reads:
            if value is not None and ret < first_read.get((key, value), math.inf):
                first_read[(key, value)] = ret

    def overwritten_by(t: Event, key: str, value: Reg) -> bool:
        """Every write that could have left ``value`` in ``key`` ended before t began."""
        if value is None:
            return all(d.ret < t.call for d in deletes[key])
        w = writer.get(value)
        return w is not None and w.ret < t.call

    problems = []
    for t in events:
        if t.op != "tx" or len(t.keys) < 2:
            continue
        wrote = dict(zip(t.keys, t.writes, strict=True))
        seen = min([first_read.get((k, v), math.inf) for k, v in wrote.items()
                    if v is not None] + [t.ret if not t.error else math.inf])
        if seen == math.inf:
            continue
        for key, value in wrote.items():
            key_reads = reads[key]
            i = bisect.bisect_left(key_reads, seen, key=lambda r: r[0])
            for call, _, got in key_reads[i:]:
                if got == value:
                    break  # seen here too; a later flip back is the per-key check's
                if overwritten_by(t, key, got):
                    when = "in the final state" if call == after else f"at {call}"
                    problems.append(f"{t.who} tx {t.keys}: seen applied by {seen}, but "
                                    f"{key} read {got!r} {when}, a value it overwrote")
                    break
                w = writer.get(got) if got is not None else None
                if w is not None and w.call > t.ret:
                    break  # a write after t: from here on the per-key check decides
    return problems


def published_end(path: str) -> list[str]:
    """Check (e): with no writer at work, the newest segment ends at the commit point."""
    shm = SharedState(os.path.join(path, AUX, SHM), writable=False)
    try:
        snap, inflight = shm.snapshot(), shm.inflight
    finally:
        shm.close()
    if snap is None:
        return ["the shared state is untrusted after the final put"]
    if inflight:
        return ["the shared state says a write is in flight after the final put"]
    _, segment, end = snap
    names = list_log(path)
    if not names:
        return [f"no segment, but the published end is segment {segment} offset {end}"]
    number = parse_name(names[-1])[0]  # type: ignore[index]
    size = os.path.getsize(os.path.join(path, names[-1]))
    if (number, size) != (segment, end):
        return [f"the newest segment {names[-1]} ends at {size}, but the published end "
                f"is segment {segment} offset {end}"]
    return []


def replay_segments(path: str) -> dict[str, Value]:
    """The state the segment files add up to, read raw (no Store, no commit point);
    an incomplete record or unit at the end of the newest segment is ignored, as torn."""
    meta = read_meta(path)
    assert meta is not None
    codec, state = meta.codec, dict[str, Value]()
    names = list_segments(path)
    unit: list[Batch] = []  # the records of one atomic unit (chained across records)
    for n, name in enumerate(names):
        with open(os.path.join(path, name), "rb") as f:
            decoded = codec.decode(f.read())
        if decoded.problem and not (decoded.torn and n == len(names) - 1):
            raise ValueError(f"{name}: {decoded.problem} at offset {decoded.stop}")
        for batch, more in zip(decoded.batches, decoded.more, strict=True):
            unit.append(batch)
            if not more:
                for b in unit:
                    apply(state, b)
                unit = []
    return state  # an unfinished unit at the end was cut short: not applied


@dataclass
class Verdict:
    ops: int = 0
    in_flight: int = 0
    errors: list[str] = field(default_factory=list)  # exceptions, crashes, state mismatch
    lost: list[str] = field(default_factory=list)
    nonlinearizable: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # transactions applied on some keys only
    undecided: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return len(self.errors) + len(self.lost) + len(self.nonlinearizable) + len(self.torn)

    @property
    def status(self) -> str:
        """FAIL on any violation; INCONCLUSIVE when a search gave up; else OK."""
        return "FAIL" if self.violations else "INCONCLUSIVE" if self.undecided else "OK"


def check_history(events: list[Event], final: dict[str, Reg], keys: list[str],
                  max_steps: int | None = None, kills: dict[str, int] | None = None
                  ) -> Verdict:
    """Checks (b), (c) and (d): the final state is read by one last op after everything.
    ``kills``: process incarnation -> time it was SIGKILLed, to bound its ops in flight.
    ``max_steps``: the search budget per key (default: see ``STEPS_PER_OP``)."""
    verdict = Verdict(ops=len(events), in_flight=sum(e.ret == math.inf for e in events))
    verdict.errors += [f"{e.op} {e.keys}: {e.error}" for e in events if e.error]
    after = max((t for e in events for t in (e.call, e.ret) if t != math.inf), default=0) + 1
    decided = kill_bounds(events, kills, after) if kills is not None else None
    per_key = register_ops(events, decided)
    verdict.torn += torn_transactions(events, final, keys, after)
    for key in keys:
        ops = per_key.get(key, [])
        why = lost_write(ops, final.get(key))
        if why:
            verdict.lost.append(f"{key}: {why}")
        ops = [*ops, RegOp(after, after + 1, final.get(key), who="final state")]
        budget = max_steps or max(MAX_STEPS, STEPS_PER_OP * len(ops))
        result, stuck = linearizable(ops, max_steps=budget)
        if result is None:
            verdict.undecided.append(key)
        elif not result:
            verdict.nonlinearizable.append(f"{key}: {len(ops)} ops, no linearization; the "
                                           f"deepest attempt could not place {ops[stuck]}")
    return verdict


def _failed(what: str, exc: BaseException) -> str:
    return f"{what} raised {type(exc).__name__}: {exc}"


def check_state(cfg: Config, tailing: Store | None) -> tuple[dict[str, Reg], list[str]]:
    """Checks (a) and (e); return the final state and the problems found. Every
    exception the store raises here is a problem found, not the checker's crash."""
    problems: list[str] = []
    try:
        problems += published_end(cfg.store)
    except Exception as exc:
        problems.append(_failed("reading the published end", exc))
    try:
        report = verify(cfg.store)
        if not report.ok:
            problems.append(f"verify: {report.summary()}")
    except Exception as exc:
        problems.append(_failed("verify", exc))
    views: dict[str, dict[str, Value]] = {}
    try:
        if tailing is not None:
            views["tailing view"] = dict(tailing.items())
    except Exception as exc:
        problems.append(_failed("reading the tailing view", exc))
    try:
        with cfg.open() as fresh:
            views["fresh open"] = dict(fresh.items())
    except Exception as exc:
        problems.append(_failed("a fresh open", exc))
    try:
        views["raw replay"] = replay_segments(cfg.store)
    except Exception as exc:
        problems.append(_failed("a raw replay", exc))
    if not views:
        return {}, problems
    name = "fresh open" if "fresh open" in views else next(iter(views))
    state = views[name]
    for other_name, other in views.items():
        if other != state:
            diff = sorted(k for k in state.keys() | other.keys() if state.get(k) != other.get(k))
            problems.append(f"{other_name} differs from {name} on keys {diff[:5]}")
    return {k: v if isinstance(v, str) else None for k, v in state.items()}, problems


def read_kills(cfg: Config) -> dict[str, int]:
    """Process incarnation -> when the supervisor SIGKILLed it (see ``Supervisor``)."""
    kills: dict[str, int] = {}
    try:
        with open(os.path.join(cfg.history, KILLS), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                kills[rec["proc"]] = rec["t"]
    except FileNotFoundError:
        pass
    return kills


def check_run(cfg: Config, tailing: Store | None = None, problems: Iterable[str] = (),
              final_put: bool = True) -> Verdict:
    """Every check on a finished run in ``cfg.dir`` (or a copy of one). ``tailing``: a
    view that followed the run, if any; ``problems``: what the supervisor saw."""
    found = list(problems)
    if final_put:  # it settles a record a killed writer left in doubt
        try:
            if tailing is not None:
                tailing.put(END_KEY, "")
            else:
                with cfg.open() as writer:
                    writer.put(END_KEY, "")
        except Exception as exc:
            found.append(_failed("the final put", exc))
    final, state_problems = check_state(cfg, tailing)
    events = [e for f in sorted(glob.glob(os.path.join(cfg.history, "*.jsonl")))
              for e in read_history(f)]
    verdict = check_history(events, final, cfg.key_names(), kills=read_kills(cfg))
    verdict.errors += found + state_problems
    if verdict.ops < cfg.required_ops:
        verdict.errors.append(f"only {verdict.ops} operations ran, fewer than the "
                              f"{cfg.required_ops} a run needs to mean anything")
    return verdict


def tear_tail(path: str, rng: random.Random, text: bool) -> str:
    """Damage what a power loss could: the bytes past the published end of the log (a
    write in flight, never acknowledged). Truncate or garble them; when there are none,
    leave what a writer killed mid-append with its record unsynced could: junk (zeros
    or random bytes, no newline in a text store: never a whole record) past the end,
    with the shared state saying a write was in flight. Writer lock held meanwhile.
    Returns what was done, or ""."""
    lock = WriterLock(os.path.join(path, AUX, LOCK), None)
    lock.acquire()
    try:
        shm = SharedState(os.path.join(path, AUX, SHM), writable=True)
        try:
            snap = shm.snapshot()
            if snap is not None:
                shm.begin()  # (already so if the killed process was writing)
        finally:
            shm.close()
        names = list_log(path)
        if snap is None or not names:
            return ""
        _, segment, end = snap
        number = parse_name(names[-1])[0]  # type: ignore[index]
        if number < segment:
            return ""
        start = end if number == segment else 0
        file = os.path.join(path, names[-1])
        size = os.path.getsize(file)
        how = rng.choice(["truncate", "garble"]) if size > start else "junk"
        with open(file, "r+b") as f:
            if how == "truncate":
                f.truncate(rng.randrange(start, size))
            elif how == "garble":
                for _ in range(rng.randint(1, 8)):
                    f.seek(rng.randrange(start, size))
                    f.write(rng.randbytes(1))
            else:
                junk = rng.choice([bytes(rng.randint(1, 64)), rng.randbytes(rng.randint(1, 64))])
                f.seek(size)
                f.write(junk.replace(b"\n", b"?") if text else junk)
        return f"{how} {names[-1]} past {start}"
    finally:
        lock.release()
        lock.close()


# --- running it ----------------------------------------------------------------------------


@dataclass
class Supervisor:
    """Starts, kills and restarts the processes of a run."""

    cfg: Config
    deadline: int
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    procs: dict[str, Any] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    kills: int = 0
    tears: int = 0

    def start(self, name: str) -> None:
        inc = self.incarnations.get(name, -1) + 1
        self.incarnations[name] = inc
        target: Callable[..., None]
        args: tuple[Any, ...]
        if name == "compactor":
            target, args = compactor, (self.cfg, inc, self.deadline)
        else:
            target, args = worker, (self.cfg, int(name[1:]), inc, self.deadline)
        self.procs[name] = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        self.procs[name].start()
        self.started[name] = time.monotonic()

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a process that had time to get going (mostly mid-operation)."""
        names = [n for n in sorted(self.procs) if n != "compactor" or self.cfg.kill_compactor]
        warm = [n for n in names if time.monotonic() - self.started[n] > 0.5]
        name = rng.choice(warm or names)
        self.kill(name)
        if self.cfg.torn and tear_tail(self.cfg.store, rng, self.cfg.format == "text"):
            self.tears += 1
        self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL, and note when: the checker bounds the killed ops' windows with it."""
        self.procs[name].kill()
        self.procs[name].join()
        self.kills += 1
        proc = f"{name}i{self.incarnations[name]}"
        with open(os.path.join(self.cfg.history, KILLS), "a", encoding="utf-8") as f:
            f.write(json.dumps({"proc": proc, "t": time.monotonic_ns()}) + "\n")

    def join(self, until: float) -> list[str]:
        """Wait for every process; the ones that hang or fail are problems."""
        problems = []
        for name, proc in self.procs.items():
            proc.join(max(until - time.monotonic(), 0.1))
            if proc.is_alive():
                self.kill(name)
                problems.append(f"{name} hung past the deadline (killed)")
            elif proc.exitcode != 0:
                problems.append(f"{name} exited with status {proc.exitcode}")
        return problems


def _crashes(cfg: Config) -> list[str]:
    """The last line of every traceback a process left (see ``_report_crash``)."""
    problems = []
    for file in sorted(glob.glob(os.path.join(cfg.history, "*.crash"))):
        with open(file, encoding="utf-8") as f:
            problems.append(f"{os.path.basename(file)}: {f.read().strip().splitlines()[-1]}")
    return problems


def run(cfg: Config) -> tuple[Verdict, dict[str, int]]:
    """One stress run in ``cfg.dir``: workload, then the checks."""
    os.makedirs(cfg.history, exist_ok=True)
    rng = random.Random(cfg.seed)
    problems: list[str] = []
    with cfg.open() as tailing:
        full = tailing.watch(since=tailing.position(), timeout=30) if cfg.watchers else None
        sup = Supervisor(cfg, time.monotonic_ns() + int(cfg.seconds * 1e9))
        for p in range(cfg.processes):
            sup.start(f"p{p}")
        if cfg.compact:
            sup.start("compactor")
        while time.monotonic_ns() < sup.deadline:
            pause = rng.uniform(0.2, 1.0) if cfg.kill else 0.05
            time.sleep(min(pause, max((sup.deadline - time.monotonic_ns()) / 1e9, 0)))
            try:
                len(tailing)  # keep one view tailing through rotations and compactions
            except Exception as exc:
                if not problems:
                    problems.append(_failed("the tailing view", exc))
            if cfg.kill and time.monotonic_ns() < sup.deadline:
                sup.kill_one(rng)
        problems += sup.join(time.monotonic() + 60) + _crashes(cfg)
        verdict = check_run(cfg, tailing, problems)
        if full is not None:
            verdict.errors += _check_watchers(cfg, full)
    compactions = 0
    for file in glob.glob(os.path.join(cfg.history, "compactor*.log")):
        with open(file, encoding="utf-8") as f:
            compactions += sum(1 for _ in f)
    return verdict, {"kills": sup.kills, "compactions": compactions, "tears": sup.tears}


def _check_watchers(cfg: Config, full: Any) -> list[str]:
    """Read the supervisor's watcher (to the end marker check_run wrote) and check (f)."""
    changes: list[tuple[str, str, Reg]] = []
    try:
        for change in full:
            if change.key == END_KEY:
                break
            changes.append((change.position, change.key, change.value))
        else:
            return ["watch: the supervisor's watcher ended before the end marker"]
        with cfg.open() as fresh:
            final = {k: v for k, v in fresh.items() if k != END_KEY}
    except Exception as exc:
        return [_failed("the supervisor's watcher", exc)]
    streams = {os.path.basename(f)[:-len(STREAM)]: read_stream(f)
               for f in glob.glob(os.path.join(cfg.history, "*" + STREAM))}
    return check_streams(changes, final, streams)


def parser() -> argparse.ArgumentParser:
    d = Config()
    from .argparsing import Parser

    p = Parser(
        prog="mpkv stress", epilog="example:\n  mpkv stress --seconds 60 --kill --compact",
        description="Processes x threads doing random put/get/delete/"
        "transactions on one store with constant rotation; then check that the history is "
        "linearizable per key, transactions are atomic across keys, no acknowledged write "
        "is lost and the log replays to the final state. Exit 1 on any violation (FAIL), "
        "3 when the checker could not decide (INCONCLUSIVE).")
    p.add_argument("--processes", type=int, default=d.processes)
    p.add_argument("--threads", type=int, default=d.threads, help="threads per process")
    p.add_argument("--seconds", type=float, default=d.seconds, help="length of the workload")
    p.add_argument("--keys", type=int, default=d.keys, help="size of the (contended) key space")
    p.add_argument("--kill", action="store_true",
                   help="SIGKILL a random worker process every 0.2-1 s and restart it")
    p.add_argument("--kill-compactor", action="store_true",
                   help="with --kill --compact, the compactor may be killed too")
    p.add_argument("--compact", action="store_true", help="a process compacting every ~0.5 s")
    p.add_argument("--format", choices=["binary", "text"], default=d.format)
    p.add_argument("--fsync", choices=["always", "periodic", "never"], default=d.fsync)
    p.add_argument("--max-segment-bytes", type=int, default=d.max_segment_bytes)
    p.add_argument("--max-staleness", type=float, default=d.max_staleness,
                   help="the workers' max_staleness; > 0 breaks linearizability on purpose, "
                   "to see the checker catch it")
    p.add_argument("--torn", action="store_true",
                   help="with --kill: after each kill, truncate, garble or extend the bytes "
                   "past the published end of the log, as a power loss could")
    p.add_argument("--min-ops", type=int, default=None,
                   help=f"fail a run with fewer operations (default: {MIN_OPS_PER_THREAD} "
                   "per worker thread)")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--dir", default=None,
                   help="where the store and histories go (kept); default: a temporary "
                   "directory, kept only when a violation is found")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    base = args.dir or tempfile.mkdtemp(prefix="mpkv-stress-")
    if args.dir and os.path.exists(os.path.join(args.dir, "store")):
        print(f"mpkv stress: {args.dir} already holds a run; use a new directory",
              file=sys.stderr)
        return 2
    cfg = Config(args.processes, args.threads, args.seconds, args.keys, args.kill,
                 args.kill_compactor, args.compact, args.format, args.fsync,
                 args.max_segment_bytes, args.max_staleness, seed, os.path.abspath(base),
                 args.torn, args.min_ops)
    started = time.monotonic()
    verdict, counts = run(cfg)
    for title, items in (("error", verdict.errors), ("lost write", verdict.lost),
                         ("not linearizable", verdict.nonlinearizable),
                         ("transaction not atomic", verdict.torn),
                         ("undecided (search step limit)", verdict.undecided)):
        for item in items[:20]:
            print(f"mpkv stress: {title}: {item}", file=sys.stderr)
    sys.stderr.flush()
    status = verdict.status
    if status != "OK":
        print(f"mpkv stress: run kept in {base}; reproduce the setup with the same options "
              f"and --seed {seed}", file=sys.stderr)
    elif not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print(f"mpkv stress: {status} ops={verdict.ops} "
          f"in_flight={verdict.in_flight} keys={cfg.keys} processes={cfg.processes} "
          f"threads={cfg.threads} kills={counts['kills']} compactions={counts['compactions']} "
          f"violations={verdict.violations} undecided={len(verdict.undecided)} "
          f"format={cfg.format} fsync={cfg.fsync} seed={seed} "
          f"seconds={time.monotonic() - started:.1f} tears={counts['tears']}")
    return {"OK": 0, "FAIL": 1}.get(status, 3)
