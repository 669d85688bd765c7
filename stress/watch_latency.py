"""How fast a change reaches a watcher in another process, and what an idle watcher costs.

    python stress/watch_latency.py [--rounds 200]

Process A puts the current time (time.time_ns) every 20 ms; this process watches and
records arrival minus write time. Then the watcher idles for 5 s with nothing written,
and its CPU time over that span is reported as a share of one core.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import mpkv


def _writer(path: str, rounds: int) -> None:
    with mpkv.Store(path) as store:
        for i in range(rounds):
            time.sleep(0.02)
            store.put(f"t{i}", str(time.time_ns()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    rounds = ap.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        with mpkv.Store(path) as store:
            changes = store.watch(timeout=5)
            writer = multiprocessing.get_context("spawn").Process(target=_writer,
                                                                  args=(path, rounds))
            writer.start()
            delays = []
            for _key, value in changes:
                delays.append((time.time_ns() - int(value)) / 1e3)  # type: ignore[arg-type]
                if len(delays) == rounds:
                    break
            writer.join()
            idle = store.watch(timeout=5)
            cpu0, wall0 = time.process_time(), time.monotonic()
            for _ in idle:
                pass
            cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    q = statistics.quantiles(delays, n=100)
    print(f"watch delivery over {rounds} changes: p50 {q[49]:.0f} us, p99 {q[98]:.0f} us, "
          f"max {max(delays):.0f} us; idle watcher CPU: {cpu * 100:.2f}% of a core")


if __name__ == "__main__":
    main()
