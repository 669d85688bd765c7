"""Open time of a large store: full replay of its log versus after compaction.

    python stress/open_time.py [--records 1000000]

Writes N single puts (one record each, 16-byte keys, 100-byte values), times a fresh
open (full replay), compacts, and times a fresh open again: through the outputs' hint
files (keys only; values stay in the files), then without them (the hints folder moved
aside: replay of the packed records). Each open runs in a new process so nothing is
cached in Python.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import mpkv

_OPEN = "import sys, time, mpkv; t = time.perf_counter(); s = mpkv.Store(sys.argv[1]); " \
        "print(time.perf_counter() - t, len(s))"


def _timed_open(path: str) -> float:
    out = subprocess.run([sys.executable, "-c", _OPEN, path], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    n = ap.parse_args().records
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        with mpkv.Store(path, fsync="never", auto_compact=False) as store:
            value = "v" * 100
            for i in range(n):
                store[f"key{i:013d}"] = value
        full = min(_timed_open(path) for _ in range(2))
        with mpkv.Store(path, auto_compact=False) as store:
            started = time.perf_counter()
            store.compact()
            compact_s = time.perf_counter() - started
        packed = min(_timed_open(path) for _ in range(2))
        hints = os.path.join(path, ".mpkv", "hints")
        line = (f"{n} records: open by full replay {full:.2f} s; compaction {compact_s:.2f} s;"
                f" open after compaction {packed:.2f} s ({packed / full:.2f}x the full replay)")
        if os.path.isdir(hints):
            os.rename(hints, hints + "-aside")
            replay = min(_timed_open(path) for _ in range(2))
            line += f"; without its hints {replay:.2f} s ({replay / full:.2f}x)"
    print(line)


if __name__ == "__main__":
    main()
