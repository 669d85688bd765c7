"""``mpkv stress`` end to end, and its history checker on hand-made histories.

The checker is what makes a stress run mean anything, so it is tested on its own:
a history no register could produce must be rejected, a correct one accepted.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpkv import stress as st
from mpkv.stress import Event, Expect, RegOp, check_history, linearizable, lost_write

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^mpkv stress: (OK|FAIL|INCONCLUSIVE) ops=(\d+) in_flight=\d+ "
                     r"keys=(?:50|1) processes=3 threads=2 kills=(\d+) compactions=(\d+) "
                     r"violations=(\d+) undecided=\d+ ",
                     re.MULTILINE)
INF = math.inf


def stress(*args: str, timeout: float = 180, keys: str = "50"
           ) -> tuple[subprocess.CompletedProcess[str], re.Match[str]]:
    # "--" keeps the options away from the top-level parser of `mpkv`
    proc = subprocess.run([sys.executable, "-m", "mpkv", "stress", "--", "--processes", "3",
                           "--threads", "2", "--keys", keys, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    found = SUMMARY.search(proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    return proc, found


def test_stress_plain_run_passes() -> None:
    proc, m = stress("--seconds", "8", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m.group(1) == "OK" and int(m.group(2)) > 1000 and m.group(5) == "0"


def test_stress_60_seconds_with_kills_and_compaction_passes() -> None:
    """The CI run of the issue: a minute of writers killed and restarted at random while
    a compactor runs, then the full check."""
    proc, m = stress("--seconds", "60", "--kill", "--compact", "--seed", "2", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m.group(1) == "OK" and int(m.group(3)) >= 3 and int(m.group(4)) >= 3


def test_stress_catches_stale_reads() -> None:
    """Reads allowed to lag 50 ms are not linearizable: the whole pipeline must say so."""
    proc, m = stress("--seconds", "3", "--max-staleness", "0.05", "--seed", "3")
    assert proc.returncode == 1 and m.group(1) == "FAIL", proc.stdout + proc.stderr
    assert "not linearizable" in proc.stderr


# --- the checker on hand-made register histories ------------------------------------------


def put(call: float, ret: float, value: str | None) -> RegOp:
    return RegOp(call, ret, Expect.ANY, value)


def get(call: float, ret: float, value: str | None) -> RegOp:
    return RegOp(call, ret, value)


def test_stale_read_is_rejected() -> None:
    history = [put(0, 10, "a"), put(20, 30, "b"), get(40, 50, "a")]
    ok, stuck = linearizable(history)
    assert ok is False and history[stuck] == history[2]


def test_read_concurrent_with_write_may_see_either_value() -> None:
    assert linearizable([put(0, 10, "a"), put(20, 30, "b"), get(25, 35, "a")])[0] is True
    assert linearizable([put(0, 10, "a"), put(20, 30, "b"), get(25, 35, "b")])[0] is True


def test_reads_may_not_flip_back() -> None:
    # two reads during one write: once "b" is seen, a later read cannot see "a" again
    history = [put(0, 10, "a"), put(20, 100, "b"), get(30, 40, "b"), get(50, 60, "a")]
    assert linearizable(history)[0] is False


def test_value_never_written_is_rejected() -> None:
    assert linearizable([put(0, 10, "a"), get(20, 30, "z")])[0] is False
    assert linearizable([get(0, 10, None)])[0] is True  # initially absent


def test_read_modify_write_must_be_atomic() -> None:
    # two increments that both read "0": a lost update
    history = [put(0, 1, "0"), RegOp(10, 20, "0", "1a"), RegOp(30, 40, "0", "1b")]
    assert linearizable(history)[0] is False
    history[2] = RegOp(30, 40, "1a", "2")
    assert linearizable(history)[0] is True


def test_delete_result_is_checked() -> None:
    assert linearizable([put(0, 10, "a"), RegOp(20, 30, Expect.ABSENT, None)])[0] is False
    assert linearizable([put(0, 10, "a"), RegOp(20, 30, Expect.PRESENT, None),
                         get(40, 50, None)])[0] is True


def test_op_in_flight_at_a_kill_may_or_may_not_happen() -> None:
    assert linearizable([put(0, 10, "a"), put(20, INF, "b"), get(40, 50, "a")])[0] is True
    assert linearizable([put(0, 10, "a"), put(20, INF, "b"), get(40, 50, "b")])[0] is True
    # ... but once seen it stays
    assert linearizable([put(0, 10, "a"), put(20, INF, "b"), get(40, 50, "b"),
                         get(60, 70, "a")])[0] is False


def test_lost_acknowledged_write() -> None:
    writes = [put(0, 10, "a"), put(20, 30, "b")]
    assert lost_write(writes, "b") == ""
    assert "acknowledged write 'b'" in lost_write(writes, "a")
    assert "never written" in lost_write(writes, "z")
    assert lost_write([put(0, 10, "a"), put(5, 30, "b")], "a") == ""  # concurrent
    assert lost_write([put(0, 10, "a"), put(20, INF, "b")], "a") == ""  # in flight
    assert lost_write([], None) == ""


def test_check_history_on_events() -> None:
    """Events as workers log them, transactions split per key, final state included."""
    events = [Event("put", ["x"], ["a"], 0, 10), Event("put", ["y"], ["b"], 0, 10),
              Event("tx", ["x", "y"], ["a2", "b2"], 20, 30, ["a", "b"]),
              Event("get", ["x"], [], 40, 50, ["a2"]),
              Event("delete", ["y"], [None], 60, INF)]  # killed: may or may not happen
    for final_y in ("b2", None):
        verdict = check_history(events, {"x": "a2", "y": final_y}, ["x", "y"])
        assert verdict.violations == 0 and verdict.in_flight == 1, verdict
    stale = [*events, Event("get", ["y"], [], 70, 80, ["b"])]  # read from before the tx
    verdict = check_history(stale, {"x": "a2", "y": "b2"}, ["x", "y"])
    assert len(verdict.nonlinearizable) == 1 and verdict.nonlinearizable[0].startswith("y:")
    verdict = check_history(events, {"x": "a", "y": "b2"}, ["x", "y"])  # the tx's x lost
    assert len(verdict.lost) == 1 and len(verdict.nonlinearizable) == 1


@pytest.mark.parametrize("n", [200, 2000])
def test_checker_is_fast_on_long_histories(n: int) -> None:
    """Sequential-ish histories with overlaps: linear time, no blow-up."""
    history = []
    for i in range(n):
        history.append(put(10 * i, 10 * i + 15, f"v{i}"))  # overlaps the next one
        seen = f"v{i + 1}" if i % 2 and i + 1 < n else f"v{i}"  # may see the next put
        history.append(get(10 * i + 16, 10 * i + 17, seen))
    assert linearizable(history, max_steps=20 * n)[0] is True


# --- faults the checker must not let through ----------------------------------------------


def ev(op: str, keys: list[str], writes: list[str | None], call: float, ret: float,
       reads: list[str | bool | None] | None = None, proc: str = "p0i0") -> Event:
    return Event(op, keys, writes, call, ret, reads or [], who=f"{proc}t0#{call}", proc=proc)


def test_final_value_from_the_only_write_in_flight_is_no_lost_write() -> None:
    """A key whose only write was in flight at a kill and took effect: no acknowledged
    write at all, which once crashed the checker (max() of nothing)."""
    assert lost_write([put(0, INF, "a")], "a") == ""
    assert lost_write([put(0, INF, "a")], None) == ""
    assert "never written" in lost_write([put(0, INF, "a")], "z")
    events = [ev("put", ["x"], ["a"], 0, INF)]
    assert check_history(events, {"x": "a"}, ["x"]).status == "OK"
    assert check_history(events, {"x": "a"}, ["x"], kills={"p0i0": 5}).status == "OK"


def test_search_out_of_steps_is_inconclusive_not_ok() -> None:
    events = [ev("put", ["x"], [f"v{i}"], i, i + 50) for i in range(20)]
    verdict = check_history(events, {"x": "v19"}, ["x"], max_steps=5)
    assert verdict.undecided == ["x"] and verdict.violations == 0
    assert verdict.status == "INCONCLUSIVE"
    assert check_history(events, {"x": "v19"}, ["x"]).status == "OK"


def test_killed_write_is_decided_by_the_next_acknowledged_write() -> None:
    """b was in flight when p1 was killed at 25; c, acknowledged at 40, came after the
    kill, so b took effect by 40 or never. A read of c at 50 then rules out b later."""
    events = [ev("put", ["x"], ["a"], 0, 10), ev("put", ["x"], ["b"], 20, INF, proc="p1i0"),
              ev("put", ["x"], ["c"], 30, 40), ev("get", ["x"], [], 50, 60, ["c"])]
    unbounded = check_history(events, {"x": "b"}, ["x"])
    assert unbounded.status == "OK"  # without the kill's time b could come at any time
    bounded = check_history(events, {"x": "b"}, ["x"], kills={"p1i0": 25})
    assert bounded.status == "FAIL" and bounded.nonlinearizable, bounded
    # ... while b before c, or never, are both fine
    assert check_history(events, {"x": "c"}, ["x"], kills={"p1i0": 25}).status == "OK"


def test_killed_ops_leave_the_search_small() -> None:
    """Hundreds of killed writes: bounded windows keep every one optional but local."""
    events, t = [], 0
    for i in range(300):
        events.append(ev("put", ["x"], [f"k{i}"], t, INF, proc=f"p1i{i}"))
        events.append(ev("put", ["x"], [f"a{i}"], t + 2, t + 3))
        events.append(ev("get", ["x"], [], t + 4, t + 5, [f"a{i}"]))
        t += 10
    kills = {f"p1i{i}": 10 * i + 1 for i in range(300)}
    verdict = check_history(events, {"x": "a299"}, ["x"], max_steps=20_000, kills=kills)
    assert verdict.status == "OK", verdict


def _tx_history(tx_ret: float) -> list[Event]:
    return [ev("put", ["x"], ["x0"], 0, 5), ev("put", ["y"], ["y0"], 0, 5),
            ev("tx", ["x", "y"], ["t.0", "t.1"], 10, tx_ret, ["x0", "y0"], proc="p1i0")]


def test_transaction_seen_on_one_key_only_is_rejected() -> None:
    """A killed transaction: x shows it, a later read of y shows the value it
    overwrote. Each key's history alone is linearizable."""
    events = [*_tx_history(INF), ev("get", ["x"], [], 30, 40, ["t.0"]),
              ev("get", ["y"], [], 50, 60, ["y0"])]
    verdict = check_history(events, {"x": "t.0", "y": "t.1"}, ["x", "y"])
    assert not verdict.nonlinearizable and not verdict.lost
    assert verdict.status == "FAIL" and len(verdict.torn) == 1, verdict
    assert "y read 'y0'" in verdict.torn[0]
    # reads of y that overlap the read of x (not after it) may still see y0
    events[-1] = ev("get", ["y"], [], 35, 60, ["y0"])
    assert check_history(events, {"x": "t.0", "y": "t.1"}, ["x", "y"]).status == "OK"


def test_killed_transaction_is_all_or_nothing_in_the_final_state() -> None:
    events = _tx_history(INF)
    for final, ok in (({"x": "t.0", "y": "t.1"}, True), ({"x": "x0", "y": "y0"}, True),
                      ({"x": "t.0", "y": "y0"}, False), ({"x": "x0", "y": "t.1"}, False)):
        verdict = check_history(events, final, ["x", "y"])
        assert (verdict.status == "OK") == ok, (final, verdict)
        assert bool(verdict.torn) != ok
    # y written again after the transaction: its final value is that write's
    later = [*events, ev("put", ["y"], ["y2"], 30, 40)]
    assert check_history(later, {"x": "t.0", "y": "y2"}, ["x", "y"]).status == "OK"


# --- faults injected into the store of a real run -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run kept on disk (with kills, so some ops are in flight)."""
    base = tmp_path_factory.mktemp("stress") / "run"
    proc, m = stress("--seconds", "3", "--kill", "--seed", "5", "--dir", str(base))
    assert proc.returncode == 0 and m.group(1) == "OK", proc.stdout + proc.stderr
    return base


def _copy_run(run: Path, dst: Path) -> st.Config:
    import shutil

    shutil.copytree(run, dst)
    return st.Config(processes=3, threads=2, keys=50, dir=str(dst))


def _history(cfg: st.Config) -> list[Event]:
    return [e for f in sorted(Path(cfg.history).glob("*.jsonl"))
            for e in st.read_history(str(f))]


def test_unharmed_copy_of_a_run_passes(finished_run: Path, tmp_path: Path) -> None:
    cfg = _copy_run(finished_run, tmp_path / "run")
    verdict = st.check_run(cfg)
    assert verdict.status == "OK", verdict


def test_lost_write_injected_into_a_run_is_caught(finished_run: Path, tmp_path: Path) -> None:
    """The store forgets a key's last write: its value goes back to an older one."""
    cfg = _copy_run(finished_run, tmp_path / "run")
    writes: dict[str, list[Event]] = {}
    for e in _history(cfg):
        if e.op == "put" and e.acked_write:
            writes.setdefault(e.keys[0], []).append(e)
    key = max(writes, key=lambda k: len(writes[k]))
    older = sorted(writes[key], key=lambda e: e.call)[0].writes[0]
    import mpkv

    with mpkv.Store(cfg.store) as s:
        s.put(key, older)
    verdict = st.check_run(cfg)
    assert verdict.status == "FAIL" and any(x.startswith(f"{key}:") for x in verdict.lost), \
        verdict


def test_half_applied_transaction_injected_into_a_run_is_caught(finished_run: Path,
                                                               tmp_path: Path) -> None:
    """The store ends with a transaction's write on one key and, on another, the value
    that transaction overwrote (written before it began)."""
    import mpkv

    cfg = _copy_run(finished_run, tmp_path / "run")
    events = _history(cfg)
    ended = {e.writes[0]: e.ret for e in events if e.op == "put" and e.acked_write}
    candidates = [(t, a, new, b, old) for t in events if t.op == "tx" and t.acked_write
                  for a, new in zip(t.keys, t.writes, strict=True) if new is not None
                  for b, old in zip(t.keys, t.reads, strict=True)
                  if b != a and ended.get(old, math.inf) < t.call]  # type: ignore[arg-type]
    assert candidates, "no transaction overwrote an acknowledged put: run too short"
    _, a, new, b, old = max(candidates, key=lambda c: c[0].call)
    with mpkv.Store(cfg.store) as s, s.transaction() as tx:
        tx[a], tx[b] = new, old  # type: ignore[assignment]
    verdict = st.check_run(cfg)
    assert verdict.status == "FAIL", verdict
    # the cross-key check, or (when b was read after the transaction) the per-key ones
    found = verdict.torn + verdict.lost + verdict.nonlinearizable
    assert any(f"{b} read {old!r}" in x or x.startswith(f"{b}:") for x in found), found


def test_damage_injected_into_a_run_is_reported_not_a_crash(finished_run: Path,
                                                           tmp_path: Path) -> None:
    """A flipped byte in a sealed segment: every way of reading the store raises; the
    checker reports each one and still judges the history."""
    from mpkv.segments import list_segments

    cfg = _copy_run(finished_run, tmp_path / "run")
    first = Path(cfg.store) / list_segments(cfg.store)[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    verdict = st.check_run(cfg)
    assert verdict.status == "FAIL"
    text = "\n".join(verdict.errors)
    assert "raised CorruptionError" in text and "verify" in text, text


def test_bytes_past_the_published_end_are_caught(finished_run: Path, tmp_path: Path) -> None:
    """After the last put, the newest segment must end at the commit point."""
    from mpkv.segments import list_log

    cfg = _copy_run(finished_run, tmp_path / "run")
    import mpkv

    with mpkv.Store(cfg.store) as s:
        s.put(st.END_KEY, "")
    assert st.published_end(cfg.store) == []
    newest = Path(cfg.store) / list_log(cfg.store)[-1]
    with open(newest, "ab") as f:
        f.write(b"\0" * 7)
    verdict = st.check_run(cfg, final_put=False)
    assert verdict.status == "FAIL"
    assert any("published end" in x for x in verdict.errors), verdict.errors


def test_too_few_operations_fail(finished_run: Path, tmp_path: Path) -> None:
    cfg = _copy_run(finished_run, tmp_path / "run")
    cfg = st.Config(processes=3, threads=2, keys=50, dir=cfg.dir, min_ops=10**9)
    verdict = st.check_run(cfg)
    assert verdict.status == "FAIL" and any("operations ran" in x for x in verdict.errors)


def test_worker_thread_death_is_reported(tmp_path: Path) -> None:
    """An exception outside the store call (here: no keys to choose from) kills the
    thread; that must be a reported crash, not a quiet thread."""
    cfg = st.Config(keys=0, dir=str(tmp_path), seconds=1)
    Path(cfg.history).mkdir()
    with pytest.raises(IndexError):
        st._thread_loop(cfg, None, "p0i0t0", 1 << 62)  # type: ignore[arg-type]
    crashes = st._crashes(cfg)
    assert len(crashes) == 1 and "IndexError" in crashes[0], crashes


def test_single_key_run_checks_every_op() -> None:
    """One key: transactions of 1 key only; every thread lives to the end."""
    proc, m = stress("--seconds", "2", "--seed", "4", keys="1")
    assert proc.returncode == 0 and m.group(1) == "OK", proc.stdout + proc.stderr
    assert int(m.group(2)) > 200


def test_stress_torn_tails_after_kills_pass() -> None:
    """After each kill the unpublished tail is truncated, garbled or padded with junk,
    as a power loss could leave it; the store must shrug that off."""
    proc, m = stress("--seconds", "12", "--kill", "--torn", "--compact", "--seed", "6")
    assert proc.returncode == 0 and m.group(1) == "OK", proc.stdout + proc.stderr
    tears = int(proc.stdout.rsplit("tears=", 1)[1])
    assert tears >= 3, proc.stdout
