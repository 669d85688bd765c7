"""mpkv's own rates, quickly: single-process put and get, and the aggregate put rate of
4 writer processes. For whoever tunes the hot paths (``mpkv bench`` compares with peers).

    python stress/rates.py [--fsync never|periodic|always] [--seconds S]
"""

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpkv import bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fsync", choices=["never", "periodic", "always"], default="never")
    p.add_argument("--seconds", type=float, default=2.0, help="time budget per rate")
    p.add_argument("--puts", type=int, default=20_000, help="puts per writer process")
    args = p.parse_args()
    store = f"mpkv fsync={args.fsync}"
    scratch = tempfile.mkdtemp(prefix="mpkv-rates-")
    try:
        b = bench.Bench(dataclasses.replace(bench.FULL, budget=args.seconds), [store], scratch)
        b.puts("put, 1 process", [store])
        b.gets([store])
        b.concurrent([store], (4,), args.puts, "put, aggregate")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for row in b.rows:
        print(f"{row.workload:<30} {row.value:>12,.0f} {row.unit}  ({store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
