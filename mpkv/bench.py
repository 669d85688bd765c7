"""``mpkv bench``: mpkv and its peers on the same workloads, in one run.

Numbers measured on different days are not comparable, so every store runs every
workload here, one after the other, on the same machine and files system, and the
report gives ratios mpkv/peer. Peers are optional (``pip install -e '.[bench]'``):
those not installed are skipped. Keys are 16 characters, values 100 bytes.

Throughputs are timed from the first operation to the last one being done (for stores
that write in the background, a final flush is inside the timing). Each single-store
workload runs for a time budget rather than a count, so slow peers do not dominate the
run. Concurrent workloads use real processes (spawned, timed from a barrier).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.managers import BaseManager, DictProxy
from typing import Any

from .store import Store

VALUE = random.Random(0).randbytes(100)
BATCH = 1000
VIS_KEY = "visibility-probe"


def key(i: int) -> str:
    """The i-th 16-character key."""
    return f"key{i:013d}"


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does (``--quick`` or full)."""

    budget: float  # seconds per store for single-process throughputs
    gets_keys: int  # keys present during the hot-get workload
    proc_puts: int  # puts per process, concurrent workload without fsync
    proc_synced_puts: int  # ... with fsync on every put
    procs: tuple[int, ...]
    synced_procs: tuple[int, ...]
    vis_rounds: int
    records: int  # records in the store whose open is timed
    disk_records: int  # keys overwritten 3 times for the disk-size workload
    repeats: int  # runs of each concurrent workload (best kept) and open (median kept)


QUICK = Sizes(0.4, 10_000, 2_000, 150, (1, 2, 4, 8), (1, 4), 200, 20_000, 10_000, 1)
FULL = Sizes(2.0, 100_000, 20_000, 500, (1, 2, 4, 8), (1, 2, 4, 8), 2_000, 200_000, 100_000,
             2)


# --- the stores ---------------------------------------------------------------------------


class Kv:
    """The few operations every workload needs, over one store instance. ``put`` and
    ``get`` are attributes: where a store's own methods fit they are bound straight in,
    so the adapter adds no call to the timing."""

    put: Callable[[str, bytes], None]
    get: Callable[[str], bytes | None]

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        """All of ``items`` in one transaction where the store has them."""
        for k, v in items:
            self.put(k, v)

    def flush(self) -> None:
        """Wait for writes a store does in the background (inside the timing)."""

    def compact(self) -> bool:
        """Give back the space of overwritten values; False when the store cannot."""
        return False

    def close(self) -> None:
        pass


class MpkvKv(Kv):
    def __init__(self, path: str, fsync: str) -> None:
        self.store = Store(path, fsync=fsync)
        self.put, self.get = self.store.put, self.store.get

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        with self.store.transaction() as tx:
            for k, v in items:
                tx[k] = v

    def compact(self) -> bool:
        self.store.compact()
        return True

    def close(self) -> None:
        self.store.close()


class LmdbKv(Kv):
    """One write transaction per put, one read transaction per get."""

    def __init__(self, path: str, sync: bool) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 34, sync=sync, metasync=sync,
                             max_readers=64)
        self.put, self.get = self._put, self._get

    def _put(self, key: str, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), value)

    def _get(self, key: str) -> bytes | None:
        with self.env.begin() as txn:
            value: bytes | None = txn.get(key.encode())
            return value

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k.encode(), v)

    def close(self) -> None:
        self.env.close()


class SqliteKv(Kv):
    """sqlite3 in WAL mode, autocommit: one transaction per put."""

    def __init__(self, path: str, synchronous: str) -> None:
        import sqlite3

        os.makedirs(path, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(path, "kv.sqlite"), timeout=60,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
        self.put, self.get = self._put, self._get

    def _put(self, key: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))

    def _get(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        self.db.execute("COMMIT")

    def compact(self) -> bool:
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    def close(self) -> None:
        self.db.close()


class DiskcacheKv(Kv):
    def __init__(self, path: str) -> None:
        import diskcache

        self.cache = diskcache.Cache(path, eviction_policy="none", size_limit=1 << 40)
        self.put, self.get = self.cache.set, self.cache.get

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        with self.cache.transact():
            for k, v in items:
                self.cache.set(k, v)

    def close(self) -> None:
        self.cache.close()


class SqlitedictKv(Kv):
    def __init__(self, path: str) -> None:
        from sqlitedict import SqliteDict

        os.makedirs(path, exist_ok=True)
        self.d = SqliteDict(os.path.join(path, "kv.sqlite"), autocommit=True)
        self.put, self.get = self.d.__setitem__, self.d.get

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        self.d.update(items)

    def flush(self) -> None:
        self.d.commit(blocking=True)

    def close(self) -> None:
        self.d.close()


class ShelveKv(Kv):
    def __init__(self, path: str) -> None:
        import shelve

        os.makedirs(path, exist_ok=True)
        self.shelf = shelve.open(os.path.join(path, "kv"))  # noqa: SIM115 (closed in close)
        self.put, self.get = self.shelf.__setitem__, self.shelf.get

    def flush(self) -> None:
        self.shelf.sync()

    def close(self) -> None:
        self.shelf.close()


class DictKv(Kv):
    def __init__(self, path: str) -> None:
        self.d: dict[str, bytes] = {}
        self.put, self.get = self.d.__setitem__, self.d.get


# --- dicts shared between processes without files --------------------------------------
#
# The process that first opens a "path" of these owns the shared dict (a manager's server
# process, a shared-memory segment) and writes how to reach it into the path; other
# processes attach. The owner keeps it until release_shared() at the end of the run, so
# the bench can close and reopen the dict as it does a store.

_OWNED: list[Callable[[], None]] = []  # release actions of the dicts this process owns


def release_shared() -> None:
    while _OWNED:
        _OWNED.pop()()


_SHARED_DICT: dict[str, bytes] = {}  # in a manager's server process: the dict it serves


def _shared_dict() -> dict[str, bytes]:
    return _SHARED_DICT


class DictManager(BaseManager):
    """A server process holding one dict; ``get_dict()`` is a proxy to it."""


DictManager.register("get_dict", callable=_shared_dict, proxytype=DictProxy)


class ManagerKv(Kv):
    """``multiprocessing.Manager().dict()``: every operation a round trip to the server."""

    def __init__(self, path: str) -> None:
        info = os.path.join(path, "manager.json")
        if os.path.exists(info):
            with open(info, encoding="utf-8") as f:
                host, port, key = json.load(f)
            manager = DictManager(address=(host, port), authkey=bytes.fromhex(key))
            manager.connect()
        else:
            os.makedirs(path, exist_ok=True)
            key = os.urandom(16).hex()
            manager = DictManager(address=("127.0.0.1", 0), authkey=bytes.fromhex(key),
                                  ctx=multiprocessing.get_context("spawn"))
            manager.start()
            # the closure keeps the manager alive: collecting it would stop its server
            _OWNED.append(lambda: manager.shutdown())
            address: Any = manager.address  # (host, port) for a TCP address
            host, port = address
            with open(info, "w", encoding="utf-8") as f:
                json.dump([host, port, key], f)
        self.d = manager.get_dict()  # type: ignore[attr-defined]
        self.put, self.get = self.d.__setitem__, self.d.get

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        self.d.update(items)  # one round trip


class UltraDictKv(Kv):
    """UltraDict: a dict streamed through shared memory, with a shared lock so that
    several processes may write."""

    def __init__(self, path: str) -> None:
        from UltraDict import UltraDict

        info = os.path.join(path, "ultradict.name")
        if os.path.exists(info):
            with open(info, encoding="utf-8") as f:
                name = f.read()
            self.d = UltraDict(name=name, create=False, shared_lock=True)
        else:
            os.makedirs(path, exist_ok=True)
            name = f"mpkv-bench-{os.getpid()}-{os.urandom(4).hex()}"
            self.d = UltraDict(name=name, create=True, shared_lock=True,
                               buffer_size=1 << 24, full_dump_size=1 << 28, auto_unlink=False)
            _OWNED.append(self.d.unlink)
            with open(info, "w", encoding="utf-8") as f:
                f.write(name)
        self.put, self.get = self.d.__setitem__, self.d.get

    def batch(self, items: list[tuple[str, bytes]]) -> None:
        with self.d.lock:
            for k, v in items:
                self.d[k] = v


def _dbm_backend() -> str:
    """The module ``shelve`` will use: the first of dbm's choices that imports."""
    for name in ("dbm.gnu", "dbm.ndbm"):
        if importlib.util.find_spec(name) is not None:
            try:
                importlib.import_module(name)
                return name
            except ImportError:
                pass
    return "dbm.dumb"


@dataclass(frozen=True)
class Spec:
    """A store in one configuration; ``name`` is how child processes find it again."""

    name: str
    durability: str
    module: str  # what must be importable, comma-separated ("" for the standard library)
    make: Callable[[str], Kv]

    @property
    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.module.split(",") if m)

    @property
    def is_mpkv(self) -> bool:
        return self.name.startswith("mpkv")


SPECS = {s.name: s for s in [
    Spec("mpkv fsync=never", "no fsync; survives kill -9, not power loss", "",
         lambda p: MpkvKv(p, "never")),
    Spec("mpkv fsync=periodic", "fsync every 1 s in the background (default)", "",
         lambda p: MpkvKv(p, "periodic")),
    Spec("mpkv fsync=always", "fdatasync before every put returns (group commit)", "",
         lambda p: MpkvKv(p, "always")),
    Spec("lmdb sync=False", "no fsync at commit; one txn per op", "lmdb",
         lambda p: LmdbKv(p, False)),
    Spec("lmdb sync=True", "fsync at every commit; one txn per op", "lmdb",
         lambda p: LmdbKv(p, True)),
    Spec("sqlite3 WAL sync=OFF", "no fsync; autocommit per op", "",
         lambda p: SqliteKv(p, "OFF")),
    Spec("sqlite3 WAL sync=FULL", "WAL fsync at every commit", "",
         lambda p: SqliteKv(p, "FULL")),
    Spec("diskcache", "defaults: sqlite WAL, synchronous=NORMAL (no fsync per op)", "diskcache",
         DiskcacheKv),
    Spec("sqlitedict", "autocommit=True: a commit per op, journal=DELETE, sync=FULL",
         "sqlitedict", SqlitedictKv),
    Spec("shelve", f"{_dbm_backend()}: no fsync; one process only", "", ShelveKv),
    Spec("dict", "in memory: nothing persisted (the ceiling)", "", DictKv),
    Spec("Manager().dict()", "multiprocessing manager: a server process's memory; nothing "
         "persisted", "", ManagerKv),
    Spec("UltraDict", "shared memory, shared_lock=True; nothing persisted",
         "UltraDict,atomics", UltraDictKv),  # atomics: its lock across processes
]}

UNSYNCED = ["mpkv fsync=never", "lmdb sync=False", "sqlite3 WAL sync=OFF", "diskcache",
            "sqlitedict", "shelve", "dict"]
SYNCED = ["mpkv fsync=always", "lmdb sync=True", "sqlite3 WAL sync=FULL"]
CONCURRENT = ["mpkv fsync=never", "lmdb sync=False", "sqlite3 WAL sync=OFF", "diskcache"]
CROSS = ["mpkv fsync=never", "lmdb sync=False", "sqlite3 WAL sync=OFF"]
# dicts several processes share without persisting anything: the other way to share state
SHARED = ["Manager().dict()", "UltraDict"]


# --- results ---------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    store: str
    value: float
    unit: str
    higher_is_better: bool = True


class Bench:
    """One benchmark run: the sizes, a scratch directory, and the rows measured so far."""

    def __init__(self, sizes: Sizes, stores: list[str], scratch: str) -> None:
        self.sizes = sizes
        self.stores = [n for n in stores if SPECS[n].available]
        self.scratch = scratch
        self.rows: list[Row] = []
        self.ctx = multiprocessing.get_context("spawn")
        self._dirs = 0

    def specs(self, names: list[str]) -> Iterator[Spec]:
        return (SPECS[n] for n in names if n in self.stores)

    def fresh_dir(self) -> str:
        self._dirs += 1
        return os.path.join(self.scratch, f"s{self._dirs}")

    def add(self, workload: str, store: str, value: float, unit: str,
            higher_is_better: bool = True) -> None:
        self.rows.append(Row(workload, store, value, unit, higher_is_better))
        print(f"  {workload:<56} {store:<22} {_fmt(value):>10} {unit}", file=sys.stderr)

    def value(self, workload: str, store: str) -> float | None:
        return next((r.value for r in self.rows if r.workload == workload and r.store == store),
                    None)

    def race(self, workload: str, names: list[str], op: Callable[[Kv, int], object],
             unit: str, per_op: int = 1, every: int = 100,
             setup: Callable[[Kv], None] | None = None) -> None:
        """Operations per second of ``op(kv, 0), op(kv, 1), ...`` on each store: three
        rounds of a third of the time budget each, the stores taking turns within a
        round, each store's best round kept, so that a burst of other work on the
        machine neither decides a result nor favours one store. The clock is read every
        ``every`` operations only, not to slow the fastest stores down."""
        kvs = {spec.name: spec.make(self.fresh_dir()) for spec in self.specs(names)}
        best, done = dict.fromkeys(kvs, 0.0), dict.fromkeys(kvs, 0)
        for kv in kvs.values():
            if setup is not None:
                setup(kv)
        for _ in range(3):
            for name, kv in kvs.items():
                start, n = time.perf_counter(), done[name]
                while time.perf_counter() - start < self.sizes.budget / 3:
                    for i in range(n, n + every):
                        op(kv, i)
                    n += every
                kv.flush()
                rate = (n - done[name]) / (time.perf_counter() - start)
                best[name], done[name] = max(best[name], rate), n
        for name, kv in kvs.items():
            kv.close()
            self.add(workload, name, best[name] * per_op, unit)

    # --- single process --------------------------------------------------------------

    def puts(self, workload: str, names: list[str]) -> None:
        self.race(workload, names, lambda kv, i: kv.put(key(i), VALUE), "puts/s")

    def gets(self, names: list[str] = UNSYNCED + SHARED) -> None:
        n = self.sizes.gets_keys
        order = [key(random.Random(i).randrange(n)) for i in range(4096)]
        self.race("hot get", names, lambda kv, i: kv.get(order[i & 4095]), "gets/s",
                  setup=lambda kv: _fill(kv, n, rounds=1))

    def batches(self) -> None:
        self.race(f"batch of {BATCH} puts (one txn)", UNSYNCED + SHARED, lambda kv, i: kv.batch(
            [(key(i * BATCH + j), VALUE) for j in range(BATCH)]), "puts/s", per_op=BATCH,
            every=1)

    # --- several processes -----------------------------------------------------------------

    def concurrent(self, names: list[str], procs: tuple[int, ...], per_proc: int,
                   label: str) -> None:
        for n in procs:
            best: dict[str, float] = {}
            for _ in range(self.sizes.repeats):  # stores take turns, as in race()
                for spec in self.specs(names):
                    rate = self._concurrent_once(spec, n, per_proc)
                    best[spec.name] = max(best.get(spec.name, 0.0), rate)
            for name, rate in best.items():
                self.add(f"{label}, {n} process{'es' if n > 1 else ''}", name, rate, "puts/s")

    def _concurrent_once(self, spec: Spec, n: int, per_proc: int) -> float:
        """Aggregate puts/s of ``n`` processes putting into one fresh store."""
        path = self.fresh_dir()
        spec.make(path).close()  # created before the race
        spans: list[tuple[float, float]] = self._run_children(_put_child, n, spec.name, path,
                                                              per_proc)
        shutil.rmtree(path)
        return n * per_proc / (max(e for _, e in spans) - min(s for s, _ in spans))

    def _run_children(self, target: Callable[..., None], n: int, *args: Any) -> list[Any]:
        """Start ``n`` children on one barrier; return what each put on the queue."""
        barrier, queue = self.ctx.Barrier(n), self.ctx.Queue()
        children = [self.ctx.Process(target=target, args=(k, barrier, queue, *args))
                    for k in range(n)]
        for c in children:
            c.start()
        results = [queue.get(timeout=600) for _ in children]
        for c in children:
            c.join()
        return results

    def visibility(self) -> None:
        rounds = self.sizes.vis_rounds
        workload = "visibility latency (write -> other process sees it)"
        for spec in self.specs(CROSS + SHARED):
            path = self.fresh_dir()
            spec.make(path).close()
            seen = self.ctx.Value("q", -1, lock=False)
            results = self._run_children(_visibility_child, 2, spec.name, path, rounds, seen)
            lat = sorted(x for r in results for x in r)
            if len(lat) < rounds:
                raise RuntimeError(f"{spec.name}: the reader saw {len(lat)} of {rounds} values")
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                self.add(f"{workload} {name}", spec.name,
                         lat[min(int(q * len(lat)), len(lat) - 1)] / 1000, "µs", False)

    # --- space and time of a big store ---------------------------------------------------------

    def open_time(self) -> None:
        records = self.sizes.records
        for spec in self.specs(CROSS):
            path = self.fresh_dir()
            kv = spec.make(path)
            _fill(kv, records, rounds=1)
            kv.close()
            self.add(f"open a store of {records} records", spec.name,
                     self._open_time(spec, path), "s", False)
            kv = spec.make(path)
            if kv.compact():
                kv.close()
                self.add(f"open a store of {records} records, compacted", spec.name,
                         self._open_time(spec, path), "s", False)
            else:
                kv.close()
            shutil.rmtree(path)

    def _open_time(self, spec: Spec, path: str) -> float:
        """Median time to open the store and read a key, each in a fresh process."""
        times = [t for _ in range(self.sizes.repeats)
                 for t in self._run_children(_open_child, 1, spec.name, path)]
        return float(statistics.median(times))

    def disk(self) -> None:
        n = self.sizes.disk_records
        live = n * (len(key(0)) + len(VALUE))
        self.add(f"disk bytes, {n} keys", "live keys+values", live, "bytes", False)
        for spec in self.specs(CONCURRENT):
            path = self.fresh_dir()
            kv = spec.make(path)
            _fill(kv, n, rounds=4)
            self.add(f"disk bytes after 3 overwrites of {n} keys", spec.name, _du(path),
                     "bytes", False)
            if kv.compact():
                self.add(f"disk bytes after compaction ({n} keys)", spec.name, _du(path),
                         "bytes", False)
            kv.close()
            shutil.rmtree(path)


def _fill(kv: Kv, n: int, rounds: int) -> None:
    """Write keys 0..n-1 ``rounds`` times, in transactions of BATCH puts."""
    for _ in range(rounds):
        for start in range(0, n, BATCH):
            kv.batch([(key(i), VALUE) for i in range(start, min(start + BATCH, n))])
    kv.flush()


def _du(path: str) -> int:
    """Bytes allocated on disk under ``path``."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(path) for f in files)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# --- child processes ----------------------------------------------------------------------


def _put_child(k: int, barrier: Any, queue: Any, spec: str, path: str, n: int) -> None:
    kv = SPECS[spec].make(path)
    barrier.wait()
    start = time.monotonic()
    for i in range(k * n, (k + 1) * n):
        kv.put(key(i), VALUE)
    kv.flush()
    queue.put((start, time.monotonic()))
    kv.close()


def _visibility_child(k: int, barrier: Any, queue: Any, spec: str, path: str, rounds: int,
                      seen: Any) -> None:
    """Child 0 puts ``seq:monotonic_ns`` (stamped just before the put), then waits until
    child 1, polling get() in a loop, has seen it; child 1 records how long after the
    stamp it saw each value. ``seen`` is a shared counter: the handshake."""
    kv = SPECS[spec].make(path)
    barrier.wait()
    latencies: list[int] = []
    give_up = time.monotonic() + 60 + rounds * 0.01
    if k == 0:
        for i in range(rounds):
            kv.put(VIS_KEY, b"%d:%d" % (i, time.monotonic_ns()))
            while seen.value < i and time.monotonic() < give_up:
                time.sleep(0.00002)  # leave the CPU to the reader
            time.sleep(random.random() * 0.0005)
        kv.flush()
    else:
        while seen.value < rounds - 1 and time.monotonic() < give_up:
            value = kv.get(VIS_KEY)
            now = time.monotonic_ns()
            if value is not None:
                seq, stamp = map(int, value.split(b":"))
                if seq > seen.value:
                    latencies.append(now - stamp)
                    seen.value = seq
    queue.put(latencies)
    kv.close()


def _open_child(k: int, barrier: Any, queue: Any, spec: str, path: str) -> None:
    """Time opening the store and reading one key, in a process that never saw it."""
    start = time.perf_counter()
    kv = SPECS[spec].make(path)
    if kv.get(key(0)) is None:
        raise RuntimeError(f"{spec}: key missing after open")
    queue.put(time.perf_counter() - start)
    kv.close()


# --- report -----------------------------------------------------------------------------------


def with_ratios(rows: list[Row]) -> list[tuple[Row, float | None]]:
    """Each row with mpkv/row for the mpkv row of the same workload (None when none)."""
    out = []
    for row in rows:
        ours = next((r.value for r in rows if r.workload == row.workload
                     and r.store in SPECS and SPECS[r.store].is_mpkv), None)
        out.append((row, ours / row.value if ours is not None and row.value else None))
    return out


def table(rows: list[Row], skipped: list[str] = []) -> str:  # noqa: B006 (read only)
    """A Markdown table of every row, with the ratio mpkv/store; the stores ``skipped``
    (not installed) get a row that says so."""
    lines = ["| workload | store | durability | result | mpkv/store |",
             "|---|---|---|---:|---:|"]
    first = {w: i for i, w in reversed(list(enumerate(r.workload for r in rows)))}
    previous = ""
    for row, ratio in sorted(with_ratios(rows), key=lambda rr: first[rr[0].workload]):
        durability = SPECS[row.store].durability if row.store in SPECS else ""
        workload = f"{row.workload}{'' if row.higher_is_better else ' (lower is better)'}"
        shown, previous = ("" if workload == previous else f"**{workload}**"), workload
        lines.append(f"| {shown} | {row.store} | {durability} | "
                     f"{_fmt(row.value)} {row.unit} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    for name in skipped:
        need = " ".join(SPECS[name].module.split(","))
        lines.append(f"| **not measured** | {name} | {SPECS[name].durability} | "
                     f"skipped: not installed (`pip install {need}`) | |")
    return "\n".join(lines)


@dataclass
class Target:
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run


def targets(b: Bench) -> list[Target]:
    """The performance goals of docs/performance.md, judged on this run."""

    def ratio(workload: str, peer: str, ours: str = "mpkv fsync=never") -> float | None:
        a, p = b.value(workload, ours), b.value(workload, peer)
        return a / p if a is not None and p else None

    def judge(goal: str, r: float | None, limit: float, unit: str = "x") -> Target:
        return Target(goal, "not measured" if r is None else f"{r:.2f}{unit}",
                      None if r is None else r >= limit)

    def at_most(goal: str, v: float | None, limit: float, unit: str) -> Target:
        return Target(goal, "not measured" if v is None else f"{_fmt(v)} {unit}",
                      None if v is None else v <= limit)

    conc = "concurrent puts (no fsync), 4 processes"
    n, rec = b.sizes.disk_records, b.sizes.records
    compacted = b.value(f"disk bytes after compaction ({n} keys)", "mpkv fsync=never")
    live = b.value(f"disk bytes, {n} keys", "live keys+values")
    return [
        judge("single put, fsync=never >= 1.0x lmdb sync=False",
              ratio("single put (no fsync)", "lmdb sync=False"), 1.0),
        judge("hot get >= 1.0x lmdb", ratio("hot get", "lmdb sync=False"), 1.0),
        judge(f"batch of {BATCH} >= 0.5x lmdb",
              ratio(f"batch of {BATCH} puts (one txn)", "lmdb sync=False"), 0.5),
        judge("4 processes concurrent puts >= 0.5x lmdb", ratio(conc, "lmdb sync=False"), 0.5),
        judge("4 processes concurrent puts >= 5x diskcache", ratio(conc, "diskcache"), 5.0),
        judge("fsync=always, 4 writers aggregate >= 2x lmdb sync=True",
              ratio("concurrent puts (fsync every put), 4 processes", "lmdb sync=True",
                    "mpkv fsync=always"), 2.0),
        at_most("visibility p99 <= 50 µs",
                b.value("visibility latency (write -> other process sees it) p99",
                        "mpkv fsync=never"), 50, "µs"),
        at_most(f"open of 1M records <= 0.3 s (measured: {rec} records)",
                b.value(f"open a store of {rec} records", "mpkv fsync=never"), 0.3, "s"),
        at_most("disk bytes after compaction <= 1.2x live keys+values",
                compacted / live if compacted and live else None, 1.2, "x"),
    ]


def plot(rows: list[Row], file: str) -> bool:
    """Aggregate put throughput against the number of writer processes; False when
    matplotlib (the bench extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, label in zip(axes, ("concurrent puts (no fsync)",
                                "concurrent puts (fsync every put)"), strict=True):
        for store in dict.fromkeys(r.store for r in rows if r.workload.startswith(label)):
            points = sorted((int(r.workload.rsplit(", ", 1)[1].split()[0]), r.value)
                            for r in rows if r.workload.startswith(label) and r.store == store)
            ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=store)
        ax.set(title=label, xlabel="writer processes", ylabel="aggregate puts/s",
               xticks=[1, 2, 4, 8])
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    """What the numbers were measured on, and how busy it was (other work skews them)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, load average {load}")


# --- main -------------------------------------------------------------------------------------


def run(b: Bench) -> None:
    steps: list[tuple[str, Callable[[], None]]] = [
        ("single puts", lambda: b.puts("single put (no fsync)",
                                       [*UNSYNCED[:1], "mpkv fsync=periodic", *UNSYNCED[1:],
                                        *SHARED])),
        ("synced puts", lambda: b.puts("single put (fsync every put)", SYNCED)),
        ("hot gets", b.gets),
        ("batches", b.batches),
        ("concurrent puts", lambda: b.concurrent(
            CONCURRENT + SHARED, b.sizes.procs, b.sizes.proc_puts, "concurrent puts (no fsync)")),
        ("concurrent synced puts", lambda: b.concurrent(
            SYNCED, b.sizes.synced_procs, b.sizes.proc_synced_puts,
            "concurrent puts (fsync every put)")),
        ("visibility", b.visibility),
        ("open time", b.open_time),
        ("disk bytes", b.disk),
    ]
    for name, step in steps:
        print(f"mpkv bench: {name}", file=sys.stderr)
        step()


def parser() -> argparse.ArgumentParser:
    from .argparsing import Parser

    p = Parser(prog="mpkv bench", epilog="example:\n  mpkv bench --quick --out /tmp/bench",
               description="mpkv against lmdb, diskcache, "
                                "sqlitedict, sqlite3, shelve and dict on the same workloads; "
                                "writes a Markdown table, a JSON file and a PNG plot.")
    p.add_argument("--quick", action="store_true", help="small counts (under a minute)")
    p.add_argument("--out", default=os.path.join("stress", "results"),
                   help="directory for the results (default: stress/results)")
    p.add_argument("--records", type=int, default=None,
                   help="records in the store whose open is timed (default 200000; "
                   "1000000 for the target)")
    p.add_argument("--stores", default=",".join(SPECS),
                   help="comma-separated store names to run (default: all installed)")
    p.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.records:
        sizes = Sizes(**{**asdict(sizes), "records": args.records})
    names = [n.strip() for n in args.stores.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        print(f"mpkv bench: unknown stores {unknown}; known: {list(SPECS)}", file=sys.stderr)
        return 2
    skipped = [n for n in names if not SPECS[n].available]
    if skipped:
        print(f"mpkv bench: not installed, skipped: {skipped}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="mpkv-bench-", dir=args.tmp)
    started, before = time.monotonic(), machine()
    try:
        b = Bench(sizes, names, scratch)
        run(b)
    finally:
        release_shared()
        shutil.rmtree(scratch, ignore_errors=True)
    stem = os.path.join(args.out, "bench-quick" if args.quick else "bench")
    goals = targets(b)
    report = "\n".join([
        f"Machine: {before} at the start, {machine().rsplit(', ', 1)[1]} at the end. "
        f"Run: `mpkv bench {' '.join(argv)}` in "
        f"{time.monotonic() - started:.0f} s.", "", table(b.rows, skipped), "",
        "| target | measured | met |", "|---|---:|---|",
        *[f"| {t.goal} | {t.measured} | {'n/a' if t.met is None else 'yes' if t.met else 'NO'} |"
          for t in goals]])
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(report + "\n")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"machine": before, "load_at_end": os.getloadavg(), "argv": argv,
                   "sizes": asdict(sizes),
                   "durability": {n: SPECS[n].durability for n in b.stores},
                   "skipped": skipped,
                   "rows": [{**asdict(r), "mpkv_ratio": q} for r, q in with_ratios(b.rows)],
                   "targets": [asdict(t) for t in goals]}, f, indent=1)
    wrote = [f"{stem}.md", f"{stem}.json"]
    if plot(b.rows, stem + "-concurrency.png"):
        wrote.append(f"{stem}-concurrency.png")
    else:
        print("mpkv bench: matplotlib is not installed: no plot", file=sys.stderr)
    print(report)
    print(f"mpkv bench: wrote {', '.join(wrote)}", file=sys.stderr)
    return 0
