"""``watch()`` as a change feed (CONTRACT.md, watch/position): ``mpkv.Change``, positions
that sort in commit order, resuming with ``since``, ``CompactedError``, every watcher --
readonly ones and ``mpkv watch`` included -- seeing every change across compaction, and
watchers that are never iterated holding neither memory nor segments."""

from __future__ import annotations

import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

import mpkv
import mpkv.watch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_child(path: Path, body: str, **options: object) -> None:
    script = ("import sys, mpkv\nstore = mpkv.Store(sys.argv[1], **eval(sys.argv[2]))\n"
              + textwrap.dedent(body) + "\nstore.close()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path), repr(options)], env=ENV,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()


def collect(changes, n: int, limit: float = 60.0) -> list:
    out = []
    deadline = time.monotonic() + limit
    for change in changes:
        out.append(change)
        if len(out) == n:
            return out
        assert time.monotonic() < deadline, f"too slow: {len(out)} of {n}"
    raise AssertionError(f"watch ended after {len(out)} of {n} changes")


def mpkv_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpkv", *args], env=ENV, text=True,
                          capture_output=True, timeout=60, **kw)  # type: ignore[call-overload]


# --- Change and positions ---------------------------------------------------------------


def test_change_unpacks_as_key_value_and_carries_deleted_and_position(tmp_path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        changes = s.watch(timeout=0.2)
        s.put("a", "1")
        s.put("b", b"\x00")
        s.delete("a")
        got = list(changes)
    assert got == [("a", "1"), ("b", b"\x00"), ("a", None)]
    assert all(isinstance(c, mpkv.Change) and isinstance(c, tuple) for c in got)
    key, value = got[1]
    assert (key, value) == (got[1].key, got[1].value) == ("b", b"\x00")
    assert [c.deleted for c in got] == [False, False, True]
    assert all(isinstance(c.position, str) for c in got)
    copy = pickle.loads(pickle.dumps(got[2]))
    assert copy == got[2] and copy.deleted and copy.position == got[2].position
    assert "mpkv.Change" not in repr(got[0]) and "position=" in repr(got[0])
    assert {"Change", "CompactedError"} <= set(mpkv.__all__)
    assert issubclass(mpkv.CompactedError, mpkv.Error)


def test_positions_sort_in_commit_order_across_segments_processes_and_compaction(
        tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=300) as s:
        empty = s.position()
        changes = s.watch(timeout=30)
        run_child(path, """
for i in range(120):
    store.put(f"k{i % 9}", f"v{i}")
    if i == 60:
        store.compact()
with store.transaction() as tx:
    tx["t1"] = "x"; tx["t2"] = "y"; del tx["t1"]
store.compact()
store.put("last", "1")
""")
        got = collect(changes, 124)
        assert s.position() == got[-1].position
    positions = [c.position for c in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert empty < positions[0]
    assert [c[0] for c in got[-4:]] == ["t1", "t2", "t1", "last"]


def test_a_transactions_changes_share_one_unit_prefix_indexed_in_order(tmp_path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        changes = s.watch(timeout=0.2)
        s.put("before", "0")
        with s.transaction() as tx:
            tx["a"] = "1"
            tx["b"] = "2"
            tx.delete("a")
        s.put("after", "3")
        got = list(changes)
    units = [c.position.rsplit("-", 2)[0] for c in got]
    assert units[1] == units[2] == units[3] != units[0] and units[4] != units[3]
    # the index in the unit and the unit's size: where a transaction starts and ends
    assert [c.position.split("-")[2:] for c in got[1:4]] == [
        ["0000000000", "0000000003"], ["0000000001", "0000000003"],
        ["0000000002", "0000000003"]]


def test_every_position_resumes_with_exactly_the_changes_after_it(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s", max_segment_bytes=120) as s:
        changes = s.watch(timeout=0.2)
        for i in range(20):
            if i % 5 == 0:
                with s.transaction() as tx:
                    tx[f"t{i}"] = "a"
                    tx[f"u{i}"] = "b"
                    tx.delete(f"t{i}")
            else:
                s.put(f"k{i}", str(i))
        got = list(changes)
        for n, change in enumerate(got):
            assert list(s.watch(since=change.position, timeout=0)) == got[n + 1:]
            assert list(s.watch("u", since=change.position, timeout=0)) == [
                c for c in got[n + 1:] if c[0].startswith("u")]


def test_position_of_a_new_opener_after_compaction_resumes_exactly(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=100) as s:
        for i in range(40):
            s.put(f"k{i % 4}", str(i))
        s.compact()
        with mpkv.Store(path, readonly=True) as fresh:  # starts from the compaction outputs
            mark = fresh.position()
            s.put("new", "1")
            s.delete("k0")
            assert list(fresh.watch(since=mark, timeout=0)) == [("new", "1"), ("k0", None)]
        assert mark < s.position()


def test_empty_store_position_sorts_before_every_change_and_replays_all(tmp_path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        start = s.position()
        s.put("a", "1")
        s.delete("a")
        assert list(s.watch(since=start, timeout=0)) == [("a", "1"), ("a", None)]
        assert start < s.position()


def test_since_compacted_away_raises_compacted_error(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s", max_segment_bytes=100) as s:
        s.put("a", "1")
        old = s.position()
        for i in range(30):
            s.put(f"k{i}", "x" * 20)
        s.compact()
        with pytest.raises(mpkv.CompactedError, match="compacted"):
            s.watch(since=old)
        with pytest.raises(mpkv.CompactedError):
            s.watch(since=mpkv.watch.BEFORE_ALL)
        assert list(s.watch(since=s.position(), timeout=0)) == []


@pytest.mark.parametrize("bad", [
    "", "garbage", 12, "1-2-3-4", "000000000001-000000000000-0000000003-0000000002",
    "999999999999-000000000000-0000000000-0000000000"])
def test_malformed_or_future_since_raises_value_error(tmp_path: Path, bad: object) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s.put("a", "1")
        with pytest.raises(ValueError, match="since"):
            s.watch(since=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), -1, -0.001])
def test_nan_or_negative_timeout_raises_value_error(tmp_path: Path, bad: float) -> None:
    with mpkv.Store(tmp_path / "s") as s, pytest.raises(ValueError, match="timeout"):
        s.watch(timeout=bad)


# --- every watcher sees every change across compaction -------------------------------------


@pytest.mark.parametrize("readonly", [True, False])
def test_watcher_reading_after_3000_puts_and_two_compactions_sees_all(
        tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "s"
    mpkv.Store(path, max_segment_bytes=2000).close()
    with mpkv.Store(path, readonly=readonly) as w:
        changes = w.watch(timeout=30)
        run_child(path, """
for i in range(3000):
    store.put(f"k{i % 10}", str(i))
    if i in (1000, 2000):
        store.compact()
""")
        got = collect(changes, 3000)
    assert got == [(f"k{i % 10}", str(i)) for i in range(3000)]


def test_watcher_that_cannot_register_raises_compacted_error_at_the_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher that cannot write .mpkv/readers/ (as if the directory were not its own)
    cannot hold compaction back: it must say so, never skip silently."""
    path = tmp_path / "s"
    mpkv.Store(path, max_segment_bytes=200).close()

    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mpkv.watch, "register_reader", refuse)
    with mpkv.Store(path, readonly=True) as w:
        changes = w.watch(timeout=30)
        run_child(path, """
for i in range(300):
    store.put(f"k{i % 10}", str(i))
store.compact()
store.put("end", "1")
""")
        got = []
        with pytest.raises(mpkv.CompactedError, match="compacted away"):
            for change in changes:
                got.append(change)
                assert change != ("end", "1"), "reached the end without reporting the gap"
    assert got == [(f"k{i % 10}", str(i)) for i in range(len(got))]


# --- bounded: a watcher never iterated holds no memory; dropped ones no segments -------------


def test_never_iterated_watcher_does_not_queue_changes_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path) as s:
        changes = s.watch()
        tracemalloc.start()
        try:
            run_child(path, """
for i in range(20000):
    store.put("same-key", f"value number {i}")
""")
            s.refresh()
            grown, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert grown < 1_000_000, grown
        assert next(changes) == ("same-key", "value number 0")  # still every change


def retained(path: Path) -> list[str]:
    kept = path / ".mpkv" / "retained"
    return sorted(os.listdir(kept)) if kept.is_dir() else []


def readers(path: Path) -> list[str]:
    folder = path / ".mpkv" / "readers"
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) \
        if folder.is_dir() else []


@pytest.mark.parametrize("how", ["garbage-collected", "closed", "store closed"])
def test_dropped_watcher_no_longer_pins_segments(tmp_path: Path, how: str) -> None:
    path = tmp_path / "s"
    s = mpkv.Store(path, max_segment_bytes=200)
    other = mpkv.Store(path)
    try:
        changes = other.watch()
        assert len(readers(path)) == 1
        for i in range(100):
            s.put(f"k{i % 5}", "x" * 20)
        s.compact()
        assert retained(path), "a live watcher keeps what it has not read"
        if how == "garbage-collected":
            del changes
            gc.collect()
        elif how == "closed":
            changes.close()
            assert list(changes) == []
        else:
            other.close()
        assert readers(path) == []
        for i in range(100):
            s.put(f"k{i % 5}", "y" * 20)
        s.compact()
        assert retained(path) == []
    finally:
        s.close()
        other.close()


# --- the command line ---------------------------------------------------------------------


def test_cli_watch_waits_for_the_store_then_prints_every_change_from_its_first(
        tmp_path: Path) -> None:
    path = tmp_path / "later"
    proc = subprocess.Popen([sys.executable, "-m", "mpkv", "watch", str(path), "--timeout",
                             "3"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert "waiting" in proc.stderr.readline()  # type: ignore[union-attr]
        assert not path.exists(), "watch must not create the store"
        with mpkv.Store(path) as s:
            s.put("a", "1")
            s.put("b", b"\x01\x02")
            s.delete("a")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["key"], d["value"], d["deleted"]) for d in lines] == [
        ("a", "1", False), ("b", "AQI=", False), ("a", None, True)]
    assert lines[1]["bytes"] is True
    positions = [d["position"] for d in lines]
    assert positions == sorted(positions)
    again = mpkv_cli("watch", str(path), "--since", positions[0], "--timeout", "0")
    assert [json.loads(x)["key"] for x in again.stdout.splitlines()] == ["b", "a"]


def test_cli_watch_on_nothing_creates_nothing(tmp_path: Path) -> None:
    r = mpkv_cli("watch", str(tmp_path / "none"), "--timeout", "0.3")
    assert r.returncode == 0 and r.stdout == ""
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args", [["--timeout", "nan"], ["--timeout", "-1"],
                                  ["--since", "garbage"]])
def test_cli_watch_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    r = mpkv_cli("watch", str(tmp_path / "s"), *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_watch_compacted_since_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=100) as s:
        s.put("a", "1")
        old = s.position()
        for i in range(20):
            s.put(f"k{i}", "x" * 20)
        s.compact()
    r = mpkv_cli("watch", str(path), "--since", old, "--timeout", "0")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "compacted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_watch_follows_a_readonly_store_across_compaction(tmp_path: Path) -> None:
    path = tmp_path / "s"
    mpkv.Store(path, max_segment_bytes=500).close()
    # The writer is started (Python and mpkv loaded, the store open) before the watcher,
    # and writes on a word: its start-up, slow on a loaded machine, is then not taken for
    # the watcher's 5 s without a change.
    writer = subprocess.Popen([sys.executable, "-c", """
import sys, mpkv
store = mpkv.Store(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for i in range(600):
    store.put(f"k{i % 10}", str(i))
    if i % 200 == 199:
        store.compact()
store.close()
""", str(path)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    proc = None
    try:
        assert writer.stdout.readline() == b"ready\n", writer.stderr.read()  # type: ignore[union-attr]
        assert not readers(path)
        proc = subprocess.Popen([sys.executable, "-m", "mpkv", "watch", str(path), "--timeout",
                                 "5"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while not readers(path):  # registered: from now on no change can be missed
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.05)
        _, err = writer.communicate(b"go\n", timeout=120)
        assert writer.returncode == 0, err.decode()
        out, _ = proc.communicate(timeout=60)
    finally:
        for p in (writer, proc):
            if p is not None:
                p.kill()
                p.wait()
    assert [json.loads(x)["value"] for x in out.splitlines()] == [str(i) for i in range(600)]


# --- exactly-once consumer (docs/guide.md, "Building a consumer") --------------------------

CONSUMER = """
import os, sys, mpkv
store = mpkv.Store(sys.argv[1])
while True:
    try:
        since = store.get("consumer:position")
        for change in store.watch("job:", since=since, timeout=2):
            if change.deleted:
                continue
            with store.transaction() as tx:
                n = int(tx.get("consumer:seen", "0")) + 1
                if n == int(os.environ.get("DIE_AT", "0")):
                    os.kill(os.getpid(), 9)
                tx["out:" + change.key] = str(int(change.value) * 2)
                tx["consumer:seen"] = str(n)
                tx["consumer:position"] = change.position
        break
    except mpkv.CompactedError:
        raise
store.close()
"""


def test_consumer_storing_its_position_with_its_output_processes_exactly_once(
        tmp_path: Path) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path) as s:
        s.put("consumer:position", s.position())  # start from here, not from the past
        s.update({f"job:{i:03d}": str(i) for i in range(50)})
        for i in range(50, 100):
            s.put(f"job:{i:03d}", str(i))
    killed = subprocess.run([sys.executable, "-c", CONSUMER, str(path)], timeout=120,
                            env={**ENV, "DIE_AT": "37"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = subprocess.run([sys.executable, "-c", CONSUMER, str(path)], timeout=120, env=ENV,
                          capture_output=True)
    assert done.returncode == 0, done.stderr
    with mpkv.Store(path, readonly=True) as s:
        assert s["consumer:seen"] == "100"
        assert {k: v for k, v in s.items() if k.startswith("out:")} == {
            f"out:job:{i:03d}": str(2 * i) for i in range(100)}


# --- mpkv stress checks watcher streams against the log ------------------------------------


def test_stress_stream_check_catches_skips_duplicates_and_a_wrong_replay() -> None:
    from mpkv.stress import check_streams

    full = [(f"{i:04d}", f"k{i % 3}", None if i % 4 == 3 else str(i)) for i in range(12)]
    final: dict = {}
    for _, k, v in full:
        if v is None:
            final.pop(k, None)
        else:
            final[k] = v
    assert check_streams(full, final, {"w": full[4:9], "x": full[:1], "y": []}) == []
    skipped = full[4:6] + full[7:9]
    doubled = full[4:7] + full[6:9]
    problems = check_streams(full, final, {"skip": skipped, "dup": doubled})
    assert len(problems) == 2 and all("departs" in p for p in problems)
    assert any("differs" in p for p in check_streams(full[:-1], final, {}))
    assert any("increase" in p for p in check_streams(full[::-1], final, {}))


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_writer_positions_equal_the_positions_readers_compute(tmp_path: Path, fmt: str) -> None:
    """A process's own writes get the position every other process reads from the log
    -- across rotations and units chained over several segments -- so a position taken
    by a writer resumes exactly in any other process."""
    path = tmp_path / "s"
    marks = tmp_path / "marks"
    mpkv.Store(path, format=fmt, max_segment_bytes=150).close()
    with mpkv.Store(path, readonly=True) as reader:
        changes = reader.watch(timeout=30)
        run_child(path, f"""
marks = open({str(marks)!r}, "w")
for i in range(40):
    if i % 7 == 3:
        with store.transaction() as tx:
            for j in range(i % 5 + 1):
                tx[f"t{{i}}.{{j}}"] = "v" * 30
    elif i % 11 == 5:
        store.update({{f"u{{i}}.{{j}}": "w" * 20 for j in range(12)}})  # spans segments
    elif i % 3 == 0:
        store.delete(f"k{{i - 3}}")
    else:
        store.put(f"k{{i}}", str(i) * (i % 9))
    marks.write(store.position() + "\\n")
marks.close()
""", format=fmt)
        expected = marks.read_text().split()
        got: list = []
        for change in changes:
            got.append(change)
            if change.position == expected[-1]:
                break
    positions = [c.position for c in got]
    assert set(expected) <= set(positions), sorted(set(expected) - set(positions))[:3]
    ends = [positions.index(p) for p in expected]  # each write's last change, in order
    assert ends == sorted(ends) and ends[-1] == len(positions) - 1


def test_json_store_changes_are_decoded_and_a_stored_none_is_not_a_delete(tmp_path) -> None:
    with mpkv.Store(tmp_path / "s", serializer="json") as s:
        changes = s.watch(timeout=0.2)
        s["a"] = {"x": [1, 2]}
        s["n"] = None
        del s["a"]
        got = list(changes)
    assert [(c.key, c.value, c.deleted) for c in got] == [
        ("a", {"x": [1, 2]}, False), ("n", None, False), ("a", None, True)]
