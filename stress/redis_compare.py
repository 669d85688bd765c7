"""The file store and the Redis store on the same workloads, and mpkv's overhead over
raw redis-py calls. The numbers of docs/scale-out.md come from this script.

    python stress/redis_compare.py [--quick] [--url redis://host:port/db] [--out FILE]

Without ``--url`` it starts its own ``redis-server`` processes on free ports of
127.0.0.1 (one without persistence, one with ``appendfsync everysec``, one with
``appendfsync always``; files in a temporary directory) and stops them at the end.
Keys are 16 characters, values 100 bytes. Workloads:

- put: latency of one ``put`` from one process (median of all puts, µs);
- hot get: latency of ``get`` of one key read over and over (µs);
- 4 processes putting: aggregate puts/s of 4 processes, distinct keys;
- visibility: from the start of a ``put`` in one process until another process that
  polls ``get`` in a loop (or iterates ``watch``) sees the value (median and p99, µs);
- overhead: ``RedisStore.put``/``get`` against the raw redis-py calls doing the least
  (``HSET``/``HGET``) and doing the same work (the same commit script by ``EVALSHA``).
  Runs alternate between the two sides, several rounds, and the medians are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis

import mpkv
from mpkv import redis_store

VALUE = b"v" * 100
HOST = "127.0.0.1"


def key(i: int) -> str:
    return f"key{i:013d}"


# --- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(folder: str, *options: str) -> Iterator[str]:
    """A redis-server on a free loopback port; yields its URL (without namespace)."""
    port = free_port()
    os.makedirs(folder, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", HOST, "--dir",
                             folder, "--save", "", *options,
                             "--logfile", os.path.join(folder, "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                if redis.Redis(host=HOST, port=port).ping():
                    break
            except redis.RedisError:
                time.sleep(0.01)
        yield f"redis://{HOST}:{port}/0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- workloads ---------------------------------------------------------------------------


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def put_latency(store: Any, n: int) -> float:
    samples = []
    clock = time.perf_counter
    put = store.put
    for i in range(n):
        t0 = clock()
        put(key(i), VALUE)
        samples.append(clock() - t0)
    return median_us(samples)


def get_latency(store: Any, n: int) -> float:
    store.put("hot", VALUE)
    store.get("hot")
    samples = []
    clock = time.perf_counter
    get = store.get
    for _ in range(n):
        t0 = clock()
        get("hot")
        samples.append(clock() - t0)
    return median_us(samples)


def _putter(target: str, options: dict[str, Any], worker: int, n: int, barrier: Any,
            out: Any) -> None:
    with mpkv.open(target, **options) as store:
        barrier.wait()
        t0 = time.monotonic()
        for i in range(n):
            store.put(f"w{worker}-{i:010d}", VALUE)
        out.put((t0, time.monotonic()))


def concurrent_puts(target: str, options: dict[str, Any], procs: int, n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_putter, args=(target, options, w, n, barrier, out))
               for w in range(procs)]
    for w in workers:
        w.start()
    spans = [out.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    return procs * n / (end - start)


def _observer(target: str, options: dict[str, Any], use_watch: bool, rounds: int,
              conn: Any) -> None:
    with mpkv.open(target, **options) as store:
        if use_watch:
            changes = store.watch("vis", timeout=30)
            conn.send("ready")
            for _, value in changes:
                now = time.monotonic()
                i, t0 = value.split()
                conn.send(now - float(t0))
                if int(i) == rounds - 1:
                    return
        conn.send("ready")
        last = None
        while True:
            value = store.get("vis")
            if value is not None and value != last:
                now = time.monotonic()
                last = value
                i, t0 = value.split()
                conn.send(now - float(t0))
                if int(i) == rounds - 1:
                    return


def visibility(target: str, options: dict[str, Any], rounds: int,
               use_watch: bool = False) -> tuple[float, float]:
    """(median, p99) µs from the start of a put until another process sees it."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    with mpkv.open(target, **options) as store:
        store.delete("vis")
        proc = ctx.Process(target=_observer, args=(target, options, use_watch, rounds, child))
        proc.start()
        assert parent.recv() == "ready"
        samples = []
        for i in range(rounds):
            time.sleep(0.001)
            store.put("vis", f"{i} {time.monotonic()!r}")
            samples.append(parent.recv())
        proc.join()
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def interleaved(pairs: list[tuple[str, Callable[[], float]]],
                rounds: int) -> dict[str, list[float]]:
    """Run each timed function once per round, alternating: every name's results."""
    results: dict[str, list[float]] = {name: [] for name, _ in pairs}
    for _ in range(rounds):
        for name, fn in pairs:
            results[name].append(fn())
    return results


def overhead(url: str, n: int, rounds: int) -> dict[str, list[float]]:
    """µs per op, per round: RedisStore against raw redis-py on the same server."""
    store = redis_store.RedisStore(url + "?namespace=overhead")
    raw = redis.Redis.from_url(url)
    data = store._data
    sha = raw.script_load(redis_store._COMMIT)
    keys = store._keys
    tagged = b"b" + VALUE
    ks = [key(i).encode() for i in range(n)]
    store.put("hot", VALUE)

    def timed(op: Callable[[int], object]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for i in range(n):
                op(i)
            return (time.perf_counter() - t0) / n * 1e6
        return run

    put, get = store.put, store.get
    names = [key(i) for i in range(n)]
    return interleaved([
        ("mpkv put", timed(lambda i: put(names[i], VALUE))),
        ("raw HSET", timed(lambda i: raw.hset(data, ks[i], tagged))),
        ("raw EVALSHA (same script)", timed(lambda i: raw.evalsha(
            sha, 4, *keys, b"", b"p", b"100000", ks[i], tagged))),
        ("mpkv get", timed(lambda i: get("hot"))),
        ("raw HGET", timed(lambda i: raw.hget(data, b"hot"))),
    ], rounds)


# --- the report --------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts (about 30 s)")
    p.add_argument("--url", help="use this server (redis://host:port/db) instead of "
                   "starting local ones; only one Redis column then")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args()
    n = 1000 if args.quick else 5000
    procs_n = 1000 if args.quick else 5000
    vis = 100 if args.quick else 500
    rounds = 5 if args.quick else 15
    scratch = tempfile.mkdtemp(prefix="mpkv-redis-compare-")
    lines = []
    try:
        columns: list[tuple[str, str, dict[str, Any]]] = []
        servers = []
        with contextlib.ExitStack() as stack:
            if args.url:
                columns.append((f"redis ({args.url})", args.url, {}))
            else:
                for label, opts in (("redis, no persistence", ("--appendonly", "no")),
                                    ("redis, AOF everysec", ("--appendonly", "yes",
                                                             "--appendfsync", "everysec")),
                                    ("redis, AOF always", ("--appendonly", "yes",
                                                           "--appendfsync", "always"))):
                    folder = os.path.join(scratch, f"redis{len(servers)}")
                    u = stack.enter_context(redis_server(folder, *opts))
                    servers.append(u)
                    columns.append((label, u, {}))
            file_columns = [("file, fsync=periodic", os.path.join(scratch, "periodic"),
                             {"fsync": "periodic"}),
                            ("file, fsync=always", os.path.join(scratch, "always"),
                             {"fsync": "always"})]
            columns = file_columns + columns
            rows: dict[str, list[str]] = {}

            def target(base: str, ns: str) -> str:
                return f"{base}?namespace={ns}" if base.startswith("redis") else \
                    os.path.join(base, ns)

            for label, base, opts in columns:
                print(f"measuring {label} ...", file=sys.stderr)
                with mpkv.open(target(base, "single"), **opts) as s:
                    rows.setdefault("put, 1 process (median µs)", []).append(
                        f"{put_latency(s, n):.0f}")
                    rows.setdefault("hot get (median µs)", []).append(
                        f"{get_latency(s, n * 4):.1f}")
                rate = concurrent_puts(target(base, "procs"), opts, 4, procs_n)
                rows.setdefault("4 processes putting (puts/s, total)", []).append(f"{rate:,.0f}")
                med, p99 = visibility(target(base, "vis"), opts, vis)
                rows.setdefault("visibility, polling get (median / p99 µs)", []).append(
                    f"{med:.0f} / {p99:.0f}")
                med, p99 = visibility(target(base, "visw"), opts, vis, use_watch=True)
                rows.setdefault("visibility, watch (median / p99 µs)", []).append(
                    f"{med:.0f} / {p99:.0f}")
            redis_url = args.url or servers[0]
            with mpkv.open(target(redis_url, "stale"), max_staleness=0.5) as s:
                lazy_get = get_latency(s, n * 4)
            print("measuring overhead ...", file=sys.stderr)
            over = overhead(redis_url, n, rounds)
            version = redis_version(redis_url)

        header = ["workload", *(c[0] for c in columns)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name, values in rows.items():
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        lines.append("")
        lines.append(f"Hot get from a Redis store with max_staleness=0.5 (local view): "
                     f"{lazy_get:.2f} µs median.")
        lines.append("")
        lines.append(f"Overhead on {'the given server' if args.url else 'redis, no persistence'}"
                     f" ({n} ops per run, {rounds} rounds of alternating runs; µs/op is the "
                     "median run, the ratio the median of the rounds' ratios):")
        lines.append("")
        lines.append("| operation | µs/op | mpkv / raw |")
        lines.append("|---|---|---|")
        for name, base in (("mpkv put", None), ("raw HSET", "mpkv put"),
                           ("raw EVALSHA (same script)", "mpkv put"), ("mpkv get", None),
                           ("raw HGET", "mpkv get")):
            ratio = ""
            if base:
                pairs = zip(over[base], over[name], strict=True)
                ratio = f"{statistics.median([a / b for a, b in pairs]):.2f}x"
            lines.append(f"| {name} | {statistics.median(over[name]):.1f} | {ratio} |")
        lines.append("")
        load = os.getloadavg()
        lines.append(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
                     f"{platform.python_version()}, redis-py {redis.__version__}, "
                     f"{version}; load average at the end "
                     f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def redis_version(url: str) -> str:
    try:
        info = redis.Redis.from_url(url).info("server")
        return f"Redis {info['redis_version']}"
    except redis.RedisError:
        return "Redis (version unknown)"


if __name__ == "__main__":
    sys.exit(main())
