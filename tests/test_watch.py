"""``Store.watch(prefix, timeout=...)`` (CONTRACT.md): an iterator of ``(key, value)``
pairs, value None for a delete, for every change committed by any process after the
call, in commit order; it ends after ``timeout`` seconds without a change."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mpkv

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
END = "zz:end"  # the children's last write: the watcher stops there


def child_script(body: str) -> str:
    return "import sys, mpkv\nstore = mpkv.Store(sys.argv[1], **eval(sys.argv[2]))\n" + \
        textwrap.dedent(body) + f"\nstore.put({END!r}, 'done')\nstore.close()\n"


def spawn(path: Path, body: str, **options: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", child_script(body), str(path), repr(options)],
                            env=ENV, stderr=subprocess.PIPE)


def until_end(changes, limit: float = 60.0) -> list:
    """The changes up to (without) the END marker; fails if it does not come in time."""
    out = []
    deadline = time.monotonic() + limit
    for key, value in changes:
        if key == END:
            return out
        out.append((key, value))
        assert time.monotonic() < deadline, "watch too slow"
    raise AssertionError(f"watch ended before the end marker, after {len(out)} changes")


def wait_ok(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()


WORKLOAD = """
for i in range(200):
    store.put(f"k:{i % 50:03d}", f"v{i}")
    if i % 7 == 3:
        store.delete(f"k:{(i * 3) % 50:03d}")
store.put("bin", b"\\x00\\xffraw")
store.delete("bin")
"""


def expected_workload() -> list:
    out: list = []
    for i in range(200):
        out.append((f"k:{i % 50:03d}", f"v{i}"))
        if i % 7 == 3:
            out.append((f"k:{(i * 3) % 50:03d}", None))
    out += [("bin", b"\x00\xffraw"), ("bin", None)]
    return out


@pytest.fixture
def store(tmp_path: Path):
    with mpkv.Store(tmp_path / "s") as s:
        yield s


def test_changes_by_another_process_arrive_in_commit_order(store, tmp_path: Path) -> None:
    changes = store.watch(timeout=30)
    child = spawn(tmp_path / "s", WORKLOAD)
    got = until_end(changes)
    wait_ok(child)
    assert got == expected_workload()
    # deletes came through as None, bytes as bytes
    assert ("bin", None) in got and isinstance(got[-2][1], bytes)


def test_changes_between_the_call_and_the_first_next_are_delivered(store, tmp_path) -> None:
    changes = store.watch(timeout=30)  # the call is the starting point, not the first next()
    wait_ok(spawn(tmp_path / "s", WORKLOAD))
    assert until_end(changes) == expected_workload()


def test_watch_works_with_text_format(tmp_path: Path) -> None:
    path = tmp_path / "t"
    with mpkv.Store(path, format="text", max_segment_bytes=200) as s:
        changes = s.watch(timeout=30)
        wait_ok(spawn(path, """
for i in range(100):
    store.put(f"k{i % 10}", f"v{i}")
    if i % 9 == 0:
        store.delete(f"k{i % 10}")
"""))
        expected = []
        for i in range(100):
            expected.append((f"k{i % 10}", f"v{i}"))
            if i % 9 == 0:
                expected.append((f"k{i % 10}", None))
        assert until_end(changes) == expected


def test_prefix_filters(store, tmp_path: Path) -> None:
    changes = store.watch("a:", timeout=30)
    ends = store.watch(END, timeout=30)
    child = spawn(tmp_path / "s", """
for i in range(60):
    store.put(f"a:{i}", str(i))
    store.put(f"b:{i}", str(i))
    store.put(f"a{i}", "no colon: does not match 'a:'")
    if i % 5 == 0:
        store.delete(f"a:{i}")
        store.delete(f"b:{i}")
""")
    assert next(ends) == (END, "done")
    wait_ok(child)
    got = []
    for change in changes:
        got.append(change)
        if change == ("a:59", "59"):
            break
    expected = []
    for i in range(60):
        expected.append((f"a:{i}", str(i)))
        if i % 5 == 0:
            expected.append((f"a:{i}", None))
    assert got == expected


def test_changes_committed_before_the_call_are_not_reported(store, tmp_path) -> None:
    wait_ok(spawn(tmp_path / "s", "store.put('old', 'from a child')"))
    store.put("mine-old", "x")
    store.delete("mine-old")
    changes = store.watch(timeout=0.5)
    store.put("new", "1")
    assert list(changes) == [("new", "1")]


def test_own_writes_are_included(store, tmp_path: Path) -> None:
    other = mpkv.Store(tmp_path / "s")  # another handle in the same process
    try:
        changes = store.watch(timeout=0.5)
        store.put("a", "1")
        store["b"] = b"\x01"
        other.put("c", "from the other handle")
        del store["a"]
        store.delete("never-existed")  # logged: a delete of a missing key is a change
        other["d"] = "4"
        got = list(changes)
    finally:
        other.close()
    assert got == [("a", "1"), ("b", b"\x01"), ("c", "from the other handle"), ("a", None),
                   ("never-existed", None), ("d", "4")]


def test_timeout_ends_after_idle_seconds(store) -> None:
    started = time.monotonic()
    assert list(store.watch(timeout=0.5)) == []
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 5, elapsed


def test_timeout_counts_idle_time_not_total_time(store) -> None:
    """Writes every 0.15 s for about 2.4 s: a 2 s idle timeout must not cut them off.
    (The gaps stay far below the timeout, so that a writer thread slowed down by a
    loaded machine is not taken for an idle one.)"""
    def writer() -> None:
        for i in range(16):
            store.put(f"tick:{i:02d}", str(i))
            time.sleep(0.15)

    changes = store.watch("tick:", timeout=2.0)
    t = threading.Thread(target=writer)
    started = time.monotonic()
    t.start()
    got = list(changes)
    t.join()
    assert time.monotonic() - started >= 2.25  # longer than the timeout in total
    assert got == [(f"tick:{i:02d}", str(i)) for i in range(16)]


def test_transaction_writes_arrive_in_order(store) -> None:
    changes = store.watch(timeout=0.5)
    store.put("before", "0")
    with store.transaction() as tx:
        tx.put("a", "1")
        tx["b"] = "2"
        tx.delete("a")
        tx["c"] = b"3"
        tx["b"] = "2 again"
    store.put("after", "9")
    assert list(changes) == [("before", "0"), ("a", "1"), ("b", "2"), ("a", None),
                             ("c", b"3"), ("b", "2 again"), ("after", "9")]


def test_aborted_transaction_reports_nothing(store) -> None:
    changes = store.watch(timeout=0.5)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx["x"] = "1"
        raise RuntimeError("abort")
    store.put("y", "2")
    assert list(changes) == [("y", "2")]


def test_transaction_from_another_process_is_contiguous(store, tmp_path: Path) -> None:
    changes = store.watch(timeout=30)
    wait_ok(spawn(tmp_path / "s", """
for n in range(20):
    with store.transaction() as tx:
        for j in range(5):
            tx[f"t{n}:{j}"] = str(j)
        tx.delete(f"t{n}:0")
"""))
    expected = []
    for n in range(20):
        expected += [(f"t{n}:{j}", str(j)) for j in range(5)] + [(f"t{n}:0", None)]
    assert until_end(changes) == expected


def test_two_writers_two_watchers_agree_on_one_commit_order(tmp_path: Path) -> None:
    path = tmp_path / "s"
    a, b = mpkv.Store(path), mpkv.Store(path)
    try:
        wa, wb = a.watch(timeout=2.0), b.watch(timeout=2.0)
        body = """
import os
me = os.getpid()
for i in range(150):
    store.put(f"w{{me}}:{{i % 10}}", str(i))
    store.put("shared", f"{{me}}:{{i}}")
"""
        kids = [spawn(path, body.format()) for _ in range(2)]
        for k in kids:
            wait_ok(k)
        results: dict[str, list] = {}

        def drain(name: str, changes) -> None:
            results[name] = list(changes)

        threads = [threading.Thread(target=drain, args=(n, w)) for n, w in (("a", wa), ("b", wb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seq = results["a"]
        assert seq == results["b"], "every watcher sees the same commit order"
        assert len(seq) == 2 * (300 + 1)
        # each writer's own changes keep their order
        for pid in {k.split(":")[0][1:] for k, _ in seq if k.startswith("w")}:
            mine = [v for k, v in seq if k == "shared" and v.startswith(pid + ":")]
            assert mine == [f"{pid}:{i}" for i in range(150)]
        # replaying the changes gives the store's final state
        state: dict = {}
        for k, v in seq:
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        assert state == dict(a.items())
    finally:
        a.close()
        b.close()


def test_lagging_watcher_across_compaction_misses_nothing(tmp_path: Path) -> None:
    """A watcher that has not read yet while another process writes and compacts still
    gets every change in order (compaction: "no reader sees a gap")."""
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=512) as s:
        changes = s.watch(timeout=30)
        wait_ok(spawn(path, """
for i in range(300):
    store.put(f"k{i % 20}", f"v{i}")
store.compact()
for i in range(300, 320):
    store.put(f"k{i % 20}", f"v{i}")
"""))
        got = until_end(changes)
    assert got == [(f"k{i % 20}", f"v{i}") for i in range(320)]


def test_watch_on_closed_store_raises(tmp_path: Path) -> None:
    s = mpkv.Store(tmp_path / "s")
    s.close()
    with pytest.raises(mpkv.ClosedError):
        s.watch(timeout=0.1)


def test_watcher_iterated_after_its_store_closed_raises_closed_error(tmp_path: Path) -> None:
    # "Any use after close raises mpkv.ClosedError": a watcher whose store was closed
    # must not end as if no change came (a consumer would take that for a quiet log).
    s = mpkv.Store(tmp_path / "s")
    changes = s.watch(timeout=5)
    s.put("a", "1")
    s.close()
    with pytest.raises(mpkv.ClosedError):
        next(changes)
