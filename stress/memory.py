"""Memory of several processes sharing one store, and the time each takes to open it.

    python stress/memory.py [--keys 200000] [--value-bytes 1024] [--processes 4]

Builds a store of N keys (compacted), then starts P fresh processes that each open it
and read every key. Each reports its anonymous (private) memory growth, read from
/proc/self/smaps_rollup before the open and after the reads, and its open and
read-all times. lmdb runs the same workload for comparison when it is installed (its
values live in a shared read-only map: page cache, not private memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import mpkv

_CHILD = r"""
import sys, time
def anon():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0
kind, path = sys.argv[1], sys.argv[2]
if kind == "mpkv":
    import mpkv
else:
    import lmdb
before = anon()
t0 = time.perf_counter()
if kind == "mpkv":
    s = mpkv.Store(path, readonly=True)
    s.get("k0")
    t1 = time.perf_counter()
    total = sum(len(s[k]) for k in s)
else:
    env = lmdb.open(path, readonly=True, lock=False, map_size=1 << 34)
    with env.begin() as tx:
        tx.get(b"k0")
        t1 = time.perf_counter()
        total = sum(len(v) for _, v in tx.cursor())
t2 = time.perf_counter()
print(anon() - before, t1 - t0, t2 - t0, total)
"""


def build_mpkv(path: str, keys: int, value: bytes) -> None:
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        batch = 1000
        for start in range(0, keys, batch):
            s.update({f"k{i}": value for i in range(start, min(start + batch, keys))})
        s.compact()


def build_lmdb(path: str, keys: int, value: bytes) -> bool:
    try:
        import lmdb
    except ImportError:
        return False
    env = lmdb.open(path, map_size=1 << 34, sync=False)
    with env.begin(write=True) as tx:
        for i in range(keys):
            tx.put(f"k{i}".encode(), value)
    env.close()
    return True


def measure(kind: str, path: str, processes: int) -> list[tuple[int, float, float]]:
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, kind, path],
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    out = []
    for p in procs:
        anon, opened, done, _ = p.communicate()[0].split()
        out.append((int(anon), float(opened), float(done)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=200_000)
    p.add_argument("--value-bytes", type=int, default=1024)
    p.add_argument("--processes", type=int, default=4)
    args = p.parse_args()
    value = b"v" * args.value_bytes
    data = args.keys * (len(value) + len(f"k{args.keys}"))
    root = tempfile.mkdtemp(prefix="mpkv-memory-")
    try:
        rows = []
        build_mpkv(os.path.join(root, "mpkv"), args.keys, value)
        rows.append(("mpkv", measure("mpkv", os.path.join(root, "mpkv"), args.processes)))
        if build_lmdb(os.path.join(root, "lmdb"), args.keys, value):
            rows.append(("lmdb", measure("lmdb", os.path.join(root, "lmdb"), args.processes)))
        print(f"{args.keys} keys x {args.value_bytes} B values ({data / 1e6:.0f} MB of data), "
              f"{args.processes} processes each open the store and read every key")
        print("| store | private memory, all processes | x data | open + first get | "
              "open + read all |")
        print("|---|---:|---:|---:|---:|")
        for name, results in rows:
            anon = sum(r[0] for r in results)
            opened = max(r[1] for r in results)
            done = max(r[2] for r in results)
            print(f"| {name} | {anon / 1e6:,.0f} MB | {anon / data:.2f}x | {opened:.2f} s | "
                  f"{done:.2f} s |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
