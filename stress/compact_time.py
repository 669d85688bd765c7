"""Time of compact() alone, and the compacting process's memory, for one or more trees.

    python stress/compact_time.py [--keys 1000000] [--value-bytes 100] [--runs 2]
                                  [--compare DIR[,DIR...]]

Builds once (with this tree's mpkv) a store of K keys x V-byte values, each key written
twice and not compacted; then, for each run and each tree in turn (this one first, then
every ``--compare`` checkout's root, run with PYTHONPATH=DIR), copies it, and a fresh
process opens the copy and calls ``compact()``: its open time, resident memory after
the open, the time of ``compact()`` and its peak resident memory (ru_maxrss). Trees
alternate so that a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import mpkv

_CHILD = """
import resource, sys, time
import mpkv
t0 = time.perf_counter()
s = mpkv.Store(sys.argv[1], auto_compact=False)
t1 = time.perf_counter()
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
s.compact()
t2 = time.perf_counter()
s.close()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(t1 - t0, rss, t2 - t1, peak)
"""


def _build(path: str, keys: int, value_bytes: int) -> None:
    value = "x" * value_bytes
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        for _ in range(2):
            for start in range(0, keys, 10_000):
                s.update({f"key-{i:08d}": value for i in range(start, min(start + 10_000, keys))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--compare", default="", help="other checkouts' roots, comma-separated")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(mpkv.__file__)))
    trees = [here] + [os.path.abspath(d) for d in args.compare.split(",") if d]
    print(f"{args.keys:,} keys x {args.value_bytes} B, each written twice; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        started = time.perf_counter()
        _build(base, args.keys, args.value_bytes)
        print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
        for _ in range(args.runs):
            for tree in trees:
                work = os.path.join(tmp, "work")
                shutil.copytree(base, work)
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run([sys.executable, "-c", _CHILD, work], check=True,
                                     capture_output=True, text=True, env=env, cwd=tmp)
                shutil.rmtree(work)
                opened, rss, took, peak = out.stdout.split()
                print(f"{tree}: open {float(opened):.2f} s, resident after open "
                      f"{int(rss) // 1024} MB, compact() {float(took):.2f} s, peak "
                      f"{int(peak) // 1024} MB", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
