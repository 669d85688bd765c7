"""``mpkv bench``'s peers that share a dict between processes without files, and how a
peer that is not installed shows in the report."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from mpkv import bench


def _child_puts(spec: str, path: str, n: int) -> None:
    kv = bench.SPECS[spec].make(path)
    for i in range(n):
        kv.put(bench.key(i), b"from the child")
    kv.close()


@pytest.mark.parametrize("spec", bench.SHARED)
def test_shared_dict_peers_are_shared_between_processes(spec: str, tmp_path: Path) -> None:
    """What one process puts into a Manager().dict() / UltraDict, another one reads: the
    peer is a real multi-process dict, and the owner keeps it across close/reopen."""
    if not bench.SPECS[spec].available:
        pytest.skip(f"{spec} is not installed")
    path = str(tmp_path / "d")
    try:
        bench.SPECS[spec].make(path).close()  # as the bench does before a race
        child = multiprocessing.get_context("spawn").Process(
            target=_child_puts, args=(spec, path, 50))
        child.start()
        child.join(120)
        assert child.exitcode == 0
        kv = bench.SPECS[spec].make(path)
        assert kv.get(bench.key(49)) == b"from the child"
        kv.batch([(bench.key(100), b"batch")])
        assert kv.get(bench.key(100)) == b"batch"
        kv.close()
    finally:
        bench.release_shared()


def test_a_peer_that_is_not_installed_says_so_in_the_table() -> None:
    rows = [bench.Row("hot get", "mpkv fsync=never", 2.0, "gets/s"),
            bench.Row("hot get", "dict", 4.0, "gets/s")]
    text = bench.table(rows, ["UltraDict"])
    last = text.splitlines()[-1]
    assert "UltraDict" in last and "not installed" in last and "pip install UltraDict" in last


def test_bench_quick_runs_from_the_command_line(tmp_path: Path) -> None:
    """`mpkv bench --quick` is accepted as it is (no `--` needed) and writes its report,
    with or without matplotlib."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "mpkv", "bench", "--quick", "--stores", "dict",
                        "--out", str(tmp_path), "--tmp", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "bench-quick.md").read_text()
    assert "| dict |" in report and (tmp_path / "bench-quick.json").is_file()


def test_memory_benchmark_quick_prints_every_table(tmp_path: Path) -> None:
    """`stress/memory.py --quick --compare REPO` runs every part against two trees (here the
    same one twice) through the public API and prints each table with both rows, their
    ratio and the targets; a numbers-free smoke run, nothing is timed."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, str(repo / "stress" / "memory.py"), "--quick",
                        "--open-table", "--compare", str(repo), "--tmp", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for title in ("**Memory**", "**Open**", "**Compaction**", "**Hot get**",
                  "**Open time against keys**", "**Targets**"):
        assert title in r.stdout, title
    lines = r.stdout.splitlines()
    for row in ("| mpkv this (", "| mpkv compare (", "| this / compare |"):
        assert sum(line.startswith(row) for line in lines) == 4, row
    assert "cannot read" not in r.stdout
    assert list(tmp_path.iterdir()) == []  # its scratch stores are removed
