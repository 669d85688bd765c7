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

from mpkv.stress import Event, Expect, RegOp, check_history, linearizable, lost_write

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^mpkv stress: (OK|FAIL) ops=(\d+) in_flight=\d+ keys=50 processes=3 "
                     r"threads=2 kills=(\d+) compactions=(\d+) violations=(\d+) undecided=\d+ ",
                     re.MULTILINE)
INF = math.inf


def stress(*args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str],
                                                       re.Match[str]]:
    # "--" keeps the options away from the top-level parser of `mpkv`
    proc = subprocess.run([sys.executable, "-m", "mpkv", "stress", "--", "--processes", "3",
                           "--threads", "2", "--keys", "50", *args],
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
