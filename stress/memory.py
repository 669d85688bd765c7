"""Memory, open time, `mpkv get`, compaction peak and hot gets of stores many processes share.

    python stress/memory.py                       # every measurement, this tree (a few minutes)
    python stress/memory.py --compare OTHER_TREE  # the same for another checkout, same run
    python stress/memory.py --open-table          # adds open time at 100k, 1M and 4M keys
    python stress/memory.py --quick               # tiny sizes: a smoke run of a few seconds

Every measurement runs in fresh processes. "This tree" is the checkout the imported
mpkv package comes from; `--compare DIR` names another checkout's root (a directory
holding an `mpkv/` package), whose processes run with PYTHONPATH=DIR, and each table
then has a row for both trees and their ratio (this / compare). Stores are built once
by this tree and read by both (a tree that cannot read them gets its own, built by
itself), so run the newer code as "this tree": a store it builds may carry files the
older code ignores, not the other way round.

1. memory: K keys x 1 KB values (default 200,000), compacted; P processes (default 4)
   open it and read every key, at the same time. Anonymous (private) memory each gained
   from before the open to after the reads (/proc/self/smaps_rollup), summed, and in
   multiples of the data (keys + values); open + first get and open + read all (the
   slowest process). lmdb runs the same when installed: its values stay in a shared
   read-only map, page cache rather than private memory.
2. open: M keys x 100-byte values (default 1,000,000), compacted: open + first get in
   a fresh process (median of 3), lmdb too; and the wall time of `python -m mpkv get
   PATH KEY` against that of `python -c "import mpkv"` (median of 3 each).
3. compaction: the same M keys, each written twice and not compacted; a fresh process
   opens the store and calls `compact()`: its resident memory after the open and its
   peak (VmHWM) by the end, and the compaction's time; then `python -m mpkv compact
   PATH` on another copy: its peak resident memory (ru_maxrss) and wall time.
4. open table (`--open-table` or `--sizes`): open + first get of compacted stores of
   100k, 1M and 4M keys x 100-byte values (median of 3), and the time per key.
5. hot get: random gets of present keys in one process, values of 20 bytes and of
   1 KB, best of 3 rounds, against lmdb (one read transaction per get) in the same run.

Then every target is checked against the numbers (the "met" table). Page cache is
warm for everything (each store was just written or read); times on a shared machine
move by tens of percent between runs, so compare rows of the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mpkv

# One program for every child process, told what to do by its first argument. It uses
# only the public API (Store, get, iteration, update, compact) so that it runs against
# any version of the package.
_CHILD = r"""
import os, random, resource, sys, time

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

def anon():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0

def key(i):
    return f"k{i}"

mode, path = sys.argv[1], sys.argv[2]
if mode.startswith("lmdb"):
    import lmdb
else:
    import mpkv

if mode == "build":  # PATH KEYS VALUE_BYTES TIMES COMPACT
    keys, size, times, compact = (int(a) for a in sys.argv[3:7])
    value = b"v" * size
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        for _ in range(times):
            for start in range(0, keys, 1000):
                s.update({key(i): value for i in range(start, min(start + 1000, keys))})
        if compact:
            s.compact()
elif mode == "check":  # PATH KEYS VALUE_BYTES: does this tree read the store right?
    keys, size = int(sys.argv[3]), int(sys.argv[4])
    with mpkv.Store(path, readonly=True) as s:
        ok = len(s) == keys and all(s.get(key(i)) == b"v" * size
                                    for i in (0, keys // 2, keys - 1))
    print("ok" if ok else "wrong")
elif mode == "read-all":
    before = anon()
    t0 = time.perf_counter()
    s = mpkv.Store(path, readonly=True)
    s.get("k0")
    t1 = time.perf_counter()
    total = sum(len(s[k]) for k in s)
    print(anon() - before, t1 - t0, time.perf_counter() - t0, total)
elif mode == "open":
    t0 = time.perf_counter()
    s = mpkv.Store(path)
    assert s.get("k0") is not None
    print(time.perf_counter() - t0)
elif mode == "compact":
    t0 = time.perf_counter()
    s = mpkv.Store(path, auto_compact=False)
    opened, t1 = status("VmRSS"), time.perf_counter()
    s.compact()
    t2 = time.perf_counter()
    s.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(opened, max(status("VmHWM"), children), t1 - t0, t2 - t1)
elif mode in ("gets", "lmdb-gets"):  # PATH KEYS GETS
    keys, n = int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(1)
    order = [key(rng.randrange(keys)) for _ in range(n)]
    if mode == "gets":
        s = mpkv.Store(path)
        get = s.get
    else:
        env = lmdb.open(path, readonly=True, lock=False, map_size=1 << 34)
        def get(k):
            with env.begin() as tx:
                return tx.get(k.encode())
    assert get(order[0]) is not None
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for k in order:
            get(k)
        best = max(best, n / (time.perf_counter() - t0))
    print(best)
elif mode == "lmdb-build":  # PATH KEYS VALUE_BYTES
    keys, size = int(sys.argv[3]), int(sys.argv[4])
    value = b"v" * size
    env = lmdb.open(path, map_size=1 << 36, sync=False, metasync=False)
    for start in range(0, keys, 10000):
        with env.begin(write=True) as tx:
            for i in range(start, min(start + 10000, keys)):
                tx.put(key(i).encode(), value)
    env.close()
elif mode == "lmdb-read-all":
    before = anon()
    t0 = time.perf_counter()
    env = lmdb.open(path, readonly=True, lock=False, map_size=1 << 34)
    with env.begin() as tx:
        tx.get(b"k0")
        t1 = time.perf_counter()
        total = sum(len(v) for _, v in tx.cursor())
    print(anon() - before, t1 - t0, time.perf_counter() - t0, total)
elif mode == "lmdb-open":
    t0 = time.perf_counter()
    env = lmdb.open(path, readonly=True, lock=False, map_size=1 << 34)
    with env.begin() as tx:
        assert tx.get(b"k0") is not None
    print(time.perf_counter() - t0)
else:
    raise SystemExit(f"unknown mode {mode}")
"""

PARTS = ("memory", "open", "compact", "get", "open-table")


@dataclass
class Tree:
    """A checkout whose ``mpkv`` package the child processes import."""
    role: str  # "this" or "compare"
    root: Path
    label: str = ""

    def __post_init__(self) -> None:
        self.label = f"mpkv {self.role} ({describe(self.root)})"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.root)}


def describe(root: Path) -> str:
    """The checkout's short commit, with ``+changes`` when its package differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", "mpkv"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return root.name
    return head + ("+changes" if dirty else "")


def child(tree: Tree | None, mode: str, *args: object) -> list[str]:
    """Run one child program (lmdb's when ``tree`` is None) and split what it prints."""
    env = tree.env() if tree is not None else dict(os.environ)
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, *map(str, args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        who = tree.label if tree is not None else "lmdb"
        raise RuntimeError(f"{who}: child {mode} {args} failed:\n{r.stderr}")
    return r.stdout.split()


def wall(tree: Tree, argv: list[str]) -> float:
    """Wall time of a whole command (interpreter start included)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=tree.env())
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{tree.label}: {argv[1:]} failed:\n{r.stderr.decode()}")
    return elapsed


def medians(trees: list[Tree], repeat: int, measure: Callable[[Tree], float]
            ) -> dict[str, float]:
    """Median of ``repeat`` runs per tree, the trees taking turns so that a burst of
    other work on the machine hits both alike."""
    runs: dict[str, list[float]] = {t.role: [] for t in trees}
    for _ in range(repeat):
        for t in trees:
            runs[t.role].append(measure(t))
    return {role: statistics.median(v) for role, v in runs.items()}


def have_lmdb() -> bool:
    try:
        import lmdb  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Stores:
    """Stores built on demand under one scratch directory, once for all trees."""
    root: str
    trees: list[Tree]
    built: dict[tuple[object, ...], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def mpkv(self, tree: Tree, keys: int, size: int, times: int = 1,
             compact: bool = True) -> str:
        """A store of ``keys`` keys of ``size``-byte values, each written ``times`` times,
        that ``tree`` reads: the one this tree built, or one ``tree`` builds itself."""
        spec = (keys, size, times, compact)
        first = self.trees[0]
        if (first.role, *spec) not in self.built:
            path = os.path.join(self.root, f"mpkv-{keys}x{size}x{times}-{int(compact)}-this")
            t0 = time.perf_counter()
            child(first, "build", path, keys, size, times, int(compact))
            print(f"  built {keys:,} keys x {size} B x{times} "
                  f"{'compacted' if compact else 'uncompacted'} in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            self.built[(first.role, *spec)] = path
        shared = self.built[(first.role, *spec)]
        if tree is first:
            return shared
        if (tree.role, *spec) not in self.built:
            try:
                readable = child(tree, "check", shared, keys, size) == ["ok"]
            except RuntimeError:
                readable = False
            if readable:
                self.built[(tree.role, *spec)] = shared
            else:
                path = shared[:-len("-this")] + f"-{tree.role}"
                child(tree, "build", path, keys, size, times, int(compact))
                self.built[(tree.role, *spec)] = path
                self.notes.append(f"{tree.label} cannot read the store this tree built "
                                  f"({keys:,} keys x {size} B): it read one it built itself")
        return self.built[(tree.role, *spec)]

    def lmdb(self, keys: int, size: int) -> str:
        if ("lmdb", keys, size) not in self.built:
            path = os.path.join(self.root, f"lmdb-{keys}x{size}")
            child(None, "lmdb-build", path, keys, size)
            self.built[("lmdb", keys, size)] = path
        return self.built[("lmdb", keys, size)]


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:,.1f} MB"


def secs(s: float) -> str:
    if s < 0.01:
        return f"{s * 1000:.2f} ms"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


class Report:
    """Markdown tables on stdout as they are measured, and the targets met or not."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, str, bool]] = []

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        print(f"\n{title}\n")
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        sys.stdout.flush()

    def target(self, what: str, value: str, met: bool) -> None:
        self.targets.append((what, value, met))


def part_memory(args: argparse.Namespace, trees: list[Tree], stores: Stores,
                report: Report) -> None:
    keys, size, procs = args.keys, args.value_bytes, args.processes
    data = sum(len(f"k{i}") for i in range(keys)) + keys * size

    def run(tree: Tree | None, path: str) -> list[float]:
        mode = "read-all" if tree is not None else "lmdb-read-all"
        env = tree.env() if tree is not None else dict(os.environ)
        ps = [subprocess.Popen([sys.executable, "-c", _CHILD, mode, path],
                               stdout=subprocess.PIPE, text=True, env=env)
              for _ in range(procs)]
        out = [p.communicate()[0].split() for p in ps]
        if any(p.returncode != 0 for p in ps):
            raise RuntimeError(f"{mode} failed on {path}")
        assert all(int(o[3]) == keys * size for o in out), "a reader missed values"
        return [sum(int(o[0]) for o in out), max(float(o[1]) for o in out),
                max(float(o[2]) for o in out)]

    results = {t.role: run(t, stores.mpkv(t, keys, size)) for t in trees}
    rows = [[t.label, mb(r[0]), f"{r[0] / data:.2f}x", secs(r[1]), secs(r[2])]
            for t in trees for r in [results[t.role]]]
    if len(trees) == 2:
        a, b = results["this"], results["compare"]
        rows.append(["this / compare", ratio(a[0], b[0]), "", ratio(a[1], b[1]),
                     ratio(a[2], b[2])])
    if have_lmdb():
        r = run(None, stores.lmdb(keys, size))
        rows.append(["lmdb", mb(r[0]), f"{r[0] / data:.2f}x", secs(r[1]), secs(r[2])])
    report.table(f"**Memory**: {keys:,} keys x {size} B values ({mb(data)} of keys + values),"
                 f" compacted; {procs} processes at once each open it and read every key",
                 ["store", f"private memory, {procs} processes", "x data",
                  "open + first get", "open + read all"], rows)
    x = results["this"][0] / data
    report.target(f"private memory of {procs} readers <= 1.0x data (moonshot 0.3x)",
                  f"{x:.2f}x", x <= 1.0)


def part_open(args: argparse.Namespace, trees: list[Tree], stores: Stores,
              report: Report) -> None:
    keys = args.store_keys
    paths = {t.role: stores.mpkv(t, keys, 100) for t in trees}
    opened = medians(trees, args.repeat,
                     lambda t: float(child(t, "open", paths[t.role])[0]))
    probe = f"k{keys // 2}"
    cli = medians(trees, args.repeat, lambda t: wall(
        t, [sys.executable, "-m", "mpkv", "get", paths[t.role], probe]))
    imp = medians(trees, args.repeat, lambda t: wall(
        t, [sys.executable, "-c", "import mpkv"]))
    rows = [[t.label, secs(opened[t.role]), secs(cli[t.role]), secs(imp[t.role]),
             ratio(cli[t.role], imp[t.role])] for t in trees]
    if len(trees) == 2:
        rows.append(["this / compare", ratio(opened["this"], opened["compare"]),
                     ratio(cli["this"], cli["compare"]), ratio(imp["this"], imp["compare"]),
                     ""])
    if have_lmdb():
        path = stores.lmdb(keys, 100)
        lm = statistics.median(float(child(None, "lmdb-open", path)[0])
                               for _ in range(args.repeat))
        rows.append(["lmdb", secs(lm), "", "", ""])
    report.table(f"**Open**: {keys:,} keys x 100 B values, compacted; a fresh process "
                 f"(median of {args.repeat})",
                 ["store", "open + first get", "`python -m mpkv get PATH KEY` (wall)",
                  "`python -c \"import mpkv\"` (wall)", "get / import"], rows)
    if len(trees) == 2:
        x = opened["this"] / opened["compare"]
        report.target(f"open + first get of {keys:,} keys <= 0.3x compare", f"{x:.2f}x",
                      x <= 0.3)
    report.target(f"open + first get of {keys:,} keys <= 0.1 s (moonshot)",
                  secs(opened["this"]), opened["this"] <= 0.1)
    x = cli["this"] / imp["this"]
    report.target("`mpkv get` <= 2x `python -c \"import mpkv\"`", f"{x:.2f}x", x <= 2.0)


def peak_of(tree: Tree, argv: list[str]) -> tuple[float, float]:
    """Peak resident memory (the child's own ru_maxrss) and wall time of a command."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=tree.env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{tree.label}: {argv[1:]} failed:\n{err.read().decode()}")
    return usage.ru_maxrss * 1024, elapsed


def part_compact(args: argparse.Namespace, trees: list[Tree], stores: Stores,
                 report: Report) -> None:
    keys = args.store_keys
    results: dict[str, list[float]] = {}
    for t in trees:
        src = stores.mpkv(t, keys, 100, times=2, compact=False)
        work = os.path.join(stores.root, f"compact-{t.role}")
        # compaction changes the store: each run gets a copy
        shutil.copytree(src, work)
        try:
            results[t.role] = [float(x) for x in child(t, "compact", work)]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        try:
            results[t.role] += peak_of(t, [sys.executable, "-m", "mpkv", "compact", work])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[t.label, mb(r[0]), mb(r[1]), secs(r[2]), secs(r[3]), mb(r[4]), secs(r[5])]
            for t in trees for r in [results[t.role]]]
    if len(trees) == 2:
        a, b = results["this"], results["compare"]
        rows.append(["this / compare"] + [ratio(a[i], b[i]) for i in range(6)])
    report.table(f"**Compaction**: {keys:,} keys x 100 B values, each written twice, not "
                 "compacted; a fresh process opens it and calls `compact()`; then, on "
                 "another copy, `python -m mpkv compact PATH`",
                 ["store", "resident after open", "peak resident (VmHWM)", "open",
                  "compact()", "`mpkv compact`: peak resident", "`mpkv compact` (wall)"],
                 rows)
    if len(trees) == 2:
        x = results["this"][1] / results["compare"][1]
        report.target(f"peak memory of open + compact() on {keys:,} keys <= 0.5x compare",
                      f"{x:.2f}x", x <= 0.5)
        x = results["this"][4] / results["compare"][4]
        report.target(f"peak memory of `mpkv compact` on {keys:,} keys <= 0.5x compare",
                      f"{x:.2f}x", x <= 0.5)


def part_get(args: argparse.Namespace, trees: list[Tree], stores: Stores,
             report: Report) -> None:
    keys, n = args.get_keys, args.gets
    sizes = (20, 1024)
    rates: dict[tuple[str, int], float] = {}
    for size in sizes:
        for t in trees:
            rates[(t.role, size)] = float(child(t, "gets", stores.mpkv(t, keys, size),
                                                keys, n)[0])
        if have_lmdb():
            rates[("lmdb", size)] = float(child(None, "lmdb-gets", stores.lmdb(keys, size),
                                                keys, n)[0])
    lm = have_lmdb()

    def cells(who: str) -> list[str]:
        out = []
        for size in sizes:
            out.append(f"{rates[(who, size)]:,.0f}")
            out.append(ratio(rates[(who, size)], rates[("lmdb", size)]) if lm else "")
        return out

    rows = [[t.label, *cells(t.role)] for t in trees]
    if len(trees) == 2:
        rows.append(["this / compare"] + [
            c for size in sizes
            for c in (ratio(rates[("this", size)], rates[("compare", size)]), "")])
    if lm:
        rows.append(["lmdb (a read transaction per get)", *cells("lmdb")])
    report.table(f"**Hot get**: {n:,} gets of random present keys among {keys:,}, one "
                 "process, best of 3 rounds (gets/s)",
                 ["store", "20 B values", "x lmdb", "1 KB values", "x lmdb"], rows)
    if lm:
        x = rates[("this", 20)] / rates[("lmdb", 20)]
        report.target("hot get of 20 B values >= 1.0x lmdb", f"{x:.2f}x", x >= 1.0)
        x = rates[("this", 1024)] / rates[("lmdb", 1024)]
        report.target("hot get of 1 KB values >= 0.5x lmdb", f"{x:.2f}x", x >= 0.5)


def part_open_table(args: argparse.Namespace, trees: list[Tree], stores: Stores,
                    report: Report) -> None:
    times: dict[tuple[str, int], float] = {}
    for keys in args.sizes:
        paths = {t.role: stores.mpkv(t, keys, 100) for t in trees}
        med = medians(trees, args.repeat,
                      lambda t, paths=paths: float(child(t, "open", paths[t.role])[0]))
        for role, s in med.items():
            times[(role, keys)] = s
    header = ["keys"]
    for t in trees:
        header += [f"{t.label}: open + first get", "per key"]
    if len(trees) == 2:
        header.append("this / compare")
    rows = []
    for keys in args.sizes:
        row = [f"{keys:,}"]
        for t in trees:
            s = times[(t.role, keys)]
            row += [secs(s), f"{s / keys * 1e6:.2f} µs"]
        if len(trees) == 2:
            row.append(ratio(times[("this", keys)], times[("compare", keys)]))
        rows.append(row)
    report.table(f"**Open time against keys**: compacted stores of 100 B values, a fresh "
                 f"process (median of {args.repeat})", header, rows)
    if len(args.sizes) > 1:
        per_key = [times[("this", k)] / k for k in args.sizes]
        spread = max(per_key) / min(per_key)
        report.target(f"open time linear in keys ({args.sizes[0]:,} to {args.sizes[-1]:,}): "
                      "time per key within 1.5x", f"{spread:.2f}x", spread <= 1.5)


def sizes(text: str) -> list[int]:
    try:
        out = sorted(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of key counts: {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"not a list of positive key counts: {text!r}")
    return out


def parts(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in PARTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown part {bad}: choose among {', '.join(PARTS)}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", metavar="DIR", type=Path,
                   help="another checkout's root: its mpkv runs the same measurements "
                        "(PYTHONPATH=DIR) and each table shows both and this / compare")
    p.add_argument("--open-table", action="store_true",
                   help="add the open time table for --sizes (the 4M store takes minutes)")
    p.add_argument("--sizes", type=sizes, metavar="N,N,...",
                   help="key counts of the open table (default 100000,1000000,4000000; "
                        "implies --open-table)")
    p.add_argument("--only", type=parts, metavar="PART,...",
                   help=f"run only these parts: {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes everywhere (a smoke run: the numbers mean nothing)")
    p.add_argument("--keys", type=int, help="memory: keys (default 200000)")
    p.add_argument("--value-bytes", type=int, default=1024, help="memory: value size")
    p.add_argument("--processes", type=int, default=4, help="memory: reader processes")
    p.add_argument("--store-keys", type=int,
                   help="open, `mpkv get` and compaction: keys of 100 B (default 1000000)")
    p.add_argument("--get-keys", type=int, help="hot get: keys in the store (default 100000)")
    p.add_argument("--gets", type=int, help="hot get: gets per round (default 300000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each open (the median)")
    p.add_argument("--tmp", metavar="DIR", help="scratch directory (default the system's)")
    args = p.parse_args()
    q = args.quick
    args.keys = args.keys or (2000 if q else 200_000)
    args.store_keys = args.store_keys or (20_000 if q else 1_000_000)
    args.get_keys = args.get_keys or (2000 if q else 100_000)
    args.gets = args.gets or (20_000 if q else 300_000)
    if args.sizes is None:
        args.sizes = [2000, 20_000] if q else [100_000, 1_000_000, 4_000_000]
    else:
        args.open_table = True
    chosen = args.only or [x for x in PARTS if x != "open-table" or args.open_table]

    this = Path(mpkv.__file__).resolve().parents[1]
    trees = [Tree("this", this)]
    if args.compare is not None:
        other = args.compare.resolve()
        if not (other / "mpkv" / "__init__.py").is_file():
            p.error(f"--compare {args.compare}: no mpkv package in that directory")
        trees.append(Tree("compare", other))
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the start; "
          + "; ".join(t.label for t in trees) + ("" if have_lmdb() else "; lmdb not installed"))
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="mpkv-memory-", dir=args.tmp)
    report = Report()
    stores = Stores(root, trees)
    home = os.getcwd()
    # `python -c` and `-m` put the working directory first on sys.path: children run
    # in the scratch directory, or a checkout's root as working directory would hide
    # the tree they are told to import.
    os.chdir(root)
    try:
        for t in trees:
            where = subprocess.run([sys.executable, "-c", "import mpkv; print(mpkv.__file__)"],
                                   capture_output=True, text=True, env=t.env(),
                                   check=True).stdout.strip()
            if Path(where).resolve().parents[1] != t.root:
                raise SystemExit(f"{t.label}: its processes import mpkv from {where}, "
                                 f"not from {t.root}")
        run = {"memory": part_memory, "open": part_open, "compact": part_compact,
               "get": part_get, "open-table": part_open_table}
        for name in PARTS:
            if name in chosen:
                run[name](args, trees, stores, report)
    finally:
        os.chdir(home)
        shutil.rmtree(root, ignore_errors=True)
    report.table("**Targets** (this tree)", ["target", "this run", "met"],
                 [[w, v, "yes" if ok else "**no**"] for w, v, ok in report.targets])
    for note in stores.notes:
        print(f"\nNote: {note}")
    print(f"\n{time.perf_counter() - started:.0f} s; load average "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end")


if __name__ == "__main__":
    main()
