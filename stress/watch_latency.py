"""watch() as a change feed: delivery latency, idle cost, and catch-up speed.

    python stress/watch_latency.py [--rounds 300] [--watchers 8] [--backlog 1000000]

1. Latency: a writer process puts the current time (time.time_ns) every 20 ms; each of
   ``--watchers`` watcher processes records arrival minus write time. p50/p99/max over
   all watchers.
2. Idle cost: the same watchers then wait 5 s with nothing written; each measures its
   CPU time over that span, reported as a share of one core (mean and max).
3. Catch-up: ``--backlog`` changes are written after a position is taken (transactions
   of 100 puts); a watcher resuming from that position reads them all: changes/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from typing import Any

import mpkv

IDLE_SECONDS = 5.0


def _writer(path: str, rounds: int, go: Any) -> None:
    go.wait()
    with mpkv.Store(path) as store:
        for i in range(rounds):
            time.sleep(0.02)
            store.put(f"t{i}", str(time.time_ns()))
        store.put("end", "")


def _watcher(path: str, ready: Any, out: Any) -> None:
    with mpkv.Store(path) as store:
        changes = store.watch(timeout=30)
        ready.release()
        delays = []
        for key, value in changes:
            if key == "end":
                break
            delays.append((time.time_ns() - int(value)) / 1e3)
        idle = store.watch(timeout=IDLE_SECONDS)
        cpu0, wall0 = time.process_time(), time.monotonic()
        for _ in idle:
            pass
        cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    out.put((delays, cpu))


def latency(path: str, rounds: int, watchers: int) -> str:
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_watcher, args=(path, ready, out)) for _ in range(watchers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    writer = ctx.Process(target=_writer, args=(path, rounds, go))
    writer.start()
    go.set()
    results = [out.get(timeout=300) for _ in procs]
    writer.join()
    for p in procs:
        p.join()
    delays = [d for ds, _ in results for d in ds]
    cpus = [c for _, c in results]
    q = statistics.quantiles(delays, n=100)
    return (f"delivery to {watchers} watcher processes, {len(delays)} deliveries: "
            f"p50 {q[49]:.0f} us, p99 {q[98]:.0f} us, max {max(delays):.0f} us\n"
            f"idle watcher CPU over {IDLE_SECONDS:.0f} s: mean {statistics.mean(cpus) * 100:.2f}%"
            f", max {max(cpus) * 100:.2f}% of a core")


def catch_up(path: str, backlog: int) -> str:
    with mpkv.Store(path) as store:
        start = store.position()
        value = "x" * 16
        for base in range(0, backlog, 100):
            with store.transaction() as tx:
                for i in range(base, min(base + 100, backlog)):
                    tx[f"key:{i % 50_000:06d}"] = value
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in store.watch(since=start, timeout=0):
            n += 1
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert n == backlog, (n, backlog)
    return (f"catch-up from a position {backlog} changes back: {n / elapsed:,.0f} changes/s "
            f"({elapsed:.2f} s wall; {n / cpu:,.0f} changes per CPU second); peak RSS grew "
            f"{(rss1 - rss0) / 1024:.0f} MiB while reading")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--watchers", type=int, default=8)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(latency(os.path.join(tmp, "latency"), args.rounds, args.watchers), flush=True)
        print(catch_up(os.path.join(tmp, "backlog"), args.backlog))


if __name__ == "__main__":
    main()
