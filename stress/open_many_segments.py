"""Open time against the number of segments: it must grow linearly.

    python stress/open_many_segments.py [--segments 1000 2000 4000]

Builds a store of N segments of one record each (written straight into the files,
with the store's own codec, so building is quick), then times a fresh open and a
readonly open, each in a new process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import mpkv
from mpkv.segments import segment_name

_OPEN = ("import sys, time, mpkv; t = time.perf_counter(); "
         "s = mpkv.Store(sys.argv[1], readonly=sys.argv[2] == 'ro'); "
         "print(time.perf_counter() - t, len(s))")


def _timed_open(path: str, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _OPEN, path, mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0])


def build(path: str, n: int) -> None:
    with mpkv.Store(path, max_segment_bytes=200, auto_compact=False) as store:
        store["k0"] = "v"
    codec = mpkv.codec.CODECS["binary"]
    for i in range(1, n):
        with open(os.path.join(path, segment_name(i + 1)), "wb") as f:
            f.write(codec.encode([(f"k{i}", "v" * 20)])[0][0])
    os.unlink(os.path.join(path, ".mpkv", "shm"))  # nothing published: read every file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, nargs="+", default=[1000, 2000, 4000])
    for n in ap.parse_args().segments:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "store")
            build(path, n)
            ro = _timed_open(path, "ro")
            rw = _timed_open(path, "rw")
            print(f"{n:6d} segments: open {rw:.2f} s, readonly open {ro:.2f} s")


if __name__ == "__main__":
    main()
