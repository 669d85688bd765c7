"""The public contract (CONTRACT.md), read to the letter: one small real test per
sentence that states a behaviour, written the way a new user or an attacker would."""

from __future__ import annotations

import collections.abc
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mpkv
from mpkv.scenarios import multi_file_restart, single_file_restart
from tests.conftest import writer_process

# --- helpers -----------------------------------------------------------------------


def segs(path: Path) -> list[Path]:
    """The store's segment files, oldest first (anything the store keeps besides
    segments is named so it can never be taken for one)."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".seg")


def log_text(path: Path) -> list[str]:
    return [p.read_text("utf-8") for p in segs(path)]


def log_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in segs(path))


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with its bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


def cli(*args: str, stdin: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpkv", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


# --- Opening -----------------------------------------------------------------------


def test_path_is_created_with_parents(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "store"
    with mpkv.open(p) as s:
        s["k"] = "v"
    assert p.is_dir()
    with mpkv.Store(p) as s:
        assert s["k"] == "v"


def test_regular_file_as_path_raises_format_error_untouched(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"precious")
    before = os.stat(f)
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(f)
    assert f.read_bytes() == b"precious"
    assert os.stat(f).st_mtime_ns == before.st_mtime_ns


def test_non_store_dir_raises_format_error_untouched(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8meow")
    (d / "sub").mkdir()
    (d / "sub" / "x.txt").write_text("hi")
    before = tree(d)
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(d)
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(d, readonly=True)
    assert tree(d) == before


def test_empty_dir_becomes_a_store(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with mpkv.Store(d) as s:
        s["a"] = "1"
    with mpkv.Store(d) as s:
        assert dict(s) == {"a": "1"}


def test_default_format_is_binary_and_remembered(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        assert s.format == "binary"
        s["k"] = b"\x00\n|bytes"
    with mpkv.Store(tmp_path / "s") as s:
        assert s.format == "binary"
        assert s["k"] == b"\x00\n|bytes"


def test_format_remembered_and_conflict_raises(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=100) as s:
        s["a"] = "1"
    with mpkv.Store(p) as s:  # None: what the store has
        assert s.format == "text"
        assert s.max_segment_bytes == 100
    with mpkv.Store(p, format="text", max_segment_bytes=100):
        pass
    before = tree(p)
    with pytest.raises(ValueError):
        mpkv.Store(p, format="binary")
    with pytest.raises(ValueError):
        mpkv.Store(p, max_segment_bytes=200)
    assert tree(p) == before


def test_binary_store_rejects_explicit_text(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
    with pytest.raises(ValueError):
        mpkv.Store(p, format="text")


def test_serializer_default_raw_recorded_and_conflict_raises(tmp_path: Path) -> None:
    p = tmp_path / "raw"
    with mpkv.Store(p) as s:
        assert s.serializer == "raw"
        s["a"] = "1"
    with pytest.raises(ValueError):
        mpkv.Store(p, serializer="json")
    with mpkv.Store(p, serializer="raw") as s:
        assert s["a"] == "1"
    j = tmp_path / "json"
    with mpkv.Store(j, serializer="json") as s:
        s["a"] = {"x": [1, 2]}
    with mpkv.Store(j) as s:  # None: what the store has
        assert s.serializer == "json"
        assert s["a"] == {"x": [1, 2]}
    with pytest.raises(ValueError):
        mpkv.Store(j, serializer="raw")


def test_unknown_serializer_and_pickle_refused(tmp_path: Path) -> None:
    for name in ("pickle", "yaml", ""):
        with pytest.raises(ValueError):
            mpkv.Store(tmp_path / "s", serializer=name)
    assert not (tmp_path / "s").exists() or not segs(tmp_path / "s")


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_json_serializer_both_formats(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / "s"
    value = {"n": 1, "f": 1.5, "s": "é|x", "l": [None, True, False], "d": {"": []}}
    with mpkv.Store(p, format=fmt, serializer="json") as s:
        s["obj"] = value
        s["int"] = 7
        s["none"] = None
        s["str"] = "plain"
        assert s["obj"] == value
    with mpkv.Store(p) as s:
        assert s["obj"] == value
        assert s["int"] == 7 and type(s["int"]) is int
        assert s["none"] is None and "none" in s
        assert s["str"] == "plain"


def test_json_get_returns_fresh_object(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s", serializer="json") as s:
        v = {"a": [1]}
        s["k"] = v
        v["a"].append(2)  # mutating what was put must not change the store
        got = s["k"]
        assert got == {"a": [1]}
        got["a"].append(3)
        assert s["k"] == {"a": [1]}
        assert s.get("k") is not s.get("k")


@pytest.mark.parametrize("fmt", ["binary", "text"])
@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", float("nan"), {"k": object()}],
                         ids=["object", "set", "bytes", "nan", "nested"])
def test_json_unencodable_raises_nothing_written(tmp_path: Path, fmt: str, bad: Any) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format=fmt, serializer="json") as s:
        s["ok"] = 1
        before = log_bytes(p)
        with pytest.raises((TypeError, ValueError)):
            s["k"] = bad
        assert log_bytes(p) == before
        assert "k" not in s and len(s) == 1


def test_max_segment_bytes_rotates(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_segment_bytes=200) as s:
        for i in range(50):
            s[f"k{i}"] = "v" * 20
    files = segs(p)
    assert len(files) > 3
    assert all(f.stat().st_size <= 200 for f in files)
    with mpkv.Store(p) as s:
        assert len(s) == 50


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_record_that_cannot_fit_raises_nothing_written(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format=fmt, max_segment_bytes=64) as s:
        s["a"] = "1"
        before = tree(p)
        before_segs = [(f.name, f.read_bytes()) for f in segs(p)]
        with pytest.raises(ValueError):
            s["big"] = "x" * 100
        assert [(f.name, f.read_bytes()) for f in segs(p)] == before_segs
        assert "big" not in s
        with pytest.raises(ValueError):
            s.update({"b": "1", "big": "x" * 100})
        assert [(f.name, f.read_bytes()) for f in segs(p)] == before_segs
        assert dict(s) == {"a": "1"}
    assert set(tree(p)) >= {k for k in before if k.endswith(".seg")}


def test_text_limit_counted_in_characters(tmp_path: Path) -> None:
    # 'P|é|€\n' is 6 characters (9 bytes): two fit in 12 characters.
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=12) as s:
        s["é"] = "€"
        s["é"] = "€"
        s["ü"] = "€"
    assert log_text(p) == ["P|é|€\nP|é|€\n", "P|ü|€\n"]


def test_default_max_segment_bytes_is_64_mib(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        assert s.max_segment_bytes == 64 * 1024 * 1024


def test_segment_names_sort_in_creation_order(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=8) as s:
        for i in range(12):
            s[f"{i % 10}"] = "v"  # 'P|i|v\n' = 6 chars: one record per segment
    names = [f.name for f in segs(p)]
    assert len(names) == 12
    contents = log_text(p)
    assert contents == [f"P|{i % 10}|v\n" for i in range(12)]


# --- Data and operations -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_keys_any_unicode_including_empty(tmp_path: Path, fmt: str) -> None:
    keys = ["", " ", "é", "日本", "🙂", "a\tb", "x" * 100]
    with mpkv.Store(tmp_path / "s", format=fmt) as s:
        for k in keys:
            s[k] = k + "!"
    with mpkv.Store(tmp_path / "s") as s:
        assert {k: s[k] for k in keys} == {k: k + "!" for k in keys}


def test_binary_key_with_pipe_and_newline(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s["a|b\nc"] = "v|\n"
    with mpkv.Store(tmp_path / "s") as s:
        assert s["a|b\nc"] == "v|\n"


def test_get_returns_type_that_was_put(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s["s"] = "1"
        s["b"] = b"1"
        s["e"] = b""
        s["es"] = ""
    with mpkv.Store(tmp_path / "s") as s:
        assert type(s["s"]) is str and s["s"] == "1"
        assert type(s["b"]) is bytes and s["b"] == b"1"
        assert s["e"] == b"" and type(s["e"]) is bytes
        assert s["es"] == "" and type(s["es"]) is str


@pytest.mark.parametrize("bad", [1, 1.0, None, ["x"], bytearray(b"x"), True],
                         ids=["int", "float", "None", "list", "bytearray", "bool"])
def test_raw_non_str_value_raises_type_error_nothing_written(tmp_path: Path, bad: Any) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        before = log_bytes(p)
        with pytest.raises(TypeError):
            s.put("k", bad)
        with pytest.raises(TypeError):
            s["k"] = bad
        assert log_bytes(p) == before and "k" not in s


@pytest.mark.parametrize("bad", [1, None, b"k", ("k",)], ids=["int", "None", "bytes", "tuple"])
def test_non_str_key_raises_type_error_nothing_written(tmp_path: Path, bad: Any) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        before = log_bytes(p)
        with pytest.raises(TypeError):
            s.put(bad, "v")
        with pytest.raises(TypeError):
            s.delete(bad)
        assert log_bytes(p) == before


@pytest.mark.parametrize("key, value", [("a|b", "v"), ("a\nb", "v"), ("k", "v\nw"),
                                        ("k", b"bytes")],
                         ids=["pipe-key", "newline-key", "newline-value", "bytes-value"])
def test_text_format_rejects_with_value_error(tmp_path: Path, key: str, value: Any) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
        before = log_text(p)
        with pytest.raises(ValueError):
            s.put(key, value)
        assert log_text(p) == before
        assert key not in s


def test_text_format_rejects_bad_key_on_delete(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
        before = log_text(p)
        for key in ("a|b", "a\nb"):
            with pytest.raises(ValueError):
                s.delete(key)
        assert log_text(p) == before


def test_text_format_allows_pipe_in_value(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s["k"] = "a|b|"
    assert log_text(p) == ["P|k|a|b|\n"]
    with mpkv.Store(p) as s:
        assert s["k"] == "a|b|"


def test_put_get_delete_and_default(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        assert s.get("k") is None
        assert s.get("k", "d") == "d"
        s.put("k", "v")
        assert s.get("k", "d") == "v"
        assert s.delete("k") is True
        assert s.delete("k") is False
        assert s.get("k") is None


def test_every_put_and_delete_appends_one_text_record(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s.put("a", "1")
        s.put("a", "1")  # same value again: still a record
        assert s.delete("missing") is False
        assert s.delete("a") is True
        s["b"] = "2"
        s.get("b")
        _ = "b" in s
        s.refresh()
    assert log_text(p) == ["P|a|1\nP|a|1\nD|missing\nD|a\nP|b|2\n"]


def test_del_missing_raises_key_error_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
        with pytest.raises(KeyError):
            del s["missing"]
        with pytest.raises(KeyError):
            s["missing"]
        del s["a"]
    assert log_text(p) == ["P|a|1\nD|a\n"]


def test_store_is_mutable_mapping(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        assert isinstance(s, collections.abc.MutableMapping)
        s["b"] = "2"
        s["a"] = "1"
        assert "a" in s and "z" not in s
        assert len(s) == 2
        assert sorted(s) == ["a", "b"]
        assert sorted(s.keys()) == ["a", "b"]
        assert sorted(s.values()) == ["1", "2"]
        assert sorted(s.items()) == [("a", "1"), ("b", "2")]
        assert s == {"a": "1", "b": "2"}


def test_iteration_is_point_in_time_under_concurrent_writes(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        for i in range(200):
            s[f"k{i:03d}"] = "v"
        with writer_process(p, "for i in range(300):\n"
                               "    s[f'n{i:03d}']='x'; s.delete(f'k{i % 200:03d}')\n",
                            timeout=30) as proc:
            seen_lens = []
            while proc.poll() is None:
                keys = list(s)
                assert len(keys) == len(set(keys))
                items = list(s.items())
                assert len(items) == len({k for k, _ in items})
                seen_lens.append(len(keys))
                for _k in s:
                    pass


# --- incr and atomic helpers -------------------------------------------------------


def test_incr_raw_missing_counts_as_zero_and_keeps_decimal_str(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        assert s.incr("n") == 1
        assert s["n"] == "1"
        assert s.incr("n", 41) == 42
        assert s.incr("n", -50) == -8
        assert s["n"] == "-8"
    with mpkv.Store(p) as s:
        assert s["n"] == "-8"


def test_incr_json_stores_int(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s", serializer="json") as s:
        assert s.incr("n", 5) == 5
        assert s["n"] == 5 and type(s["n"]) is int
        s["m"] = 10
        assert s.incr("m") == 11
        assert s["m"] == 11


@pytest.mark.parametrize("serializer, bad", [("raw", "abc"), ("raw", "1.5"), ("raw", b"\xff"),
                                             ("raw", ""), ("json", "3"), ("json", 1.5),
                                             ("json", [1]), ("json", None), ("json", True)])
def test_incr_non_integer_raises_nothing_written(tmp_path: Path, serializer: str,
                                                 bad: Any) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, serializer=serializer) as s:
        s["k"] = bad
        before = log_bytes(p)
        with pytest.raises((TypeError, ValueError)):
            s.incr("k")
        assert log_bytes(p) == before
        assert s["k"] == bad


def test_incr_bad_delta_raises(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        before = log_bytes(p)
        for delta in ("1", 1.5, None):
            with pytest.raises((TypeError, ValueError)):
                s.incr("k", delta)  # type: ignore[arg-type]
        assert log_bytes(p) == before and "k" not in s


def _incr_worker(path: str, n: int) -> None:
    with mpkv.Store(path) as s:
        for _ in range(n):
            s.incr("c")


def test_incr_atomic_across_processes(tmp_path: Path) -> None:
    p = str(tmp_path / "s")
    mpkv.Store(p).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_incr_worker, args=(p, 100)) for _ in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    with mpkv.Store(p) as s:
        assert s["c"] == "300"


def test_update_pop_popitem_setdefault_clear(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s.update({"a": "1", "b": "2"})
        s.update([("c", "3")], d="4")
        assert dict(s) == {"a": "1", "b": "2", "c": "3", "d": "4"}
        assert s.pop("a") == "1"
        assert s.pop("a", "dflt") == "dflt"
        with pytest.raises(KeyError):
            s.pop("a")
        assert s.setdefault("b", "x") == "2"
        assert s.setdefault("e", "5") == "5"
        k, v = s.popitem()
        assert k not in s and v in {"2", "3", "4", "5"}
        s.clear()
        assert len(s) == 0
        with pytest.raises(KeyError):
            s.popitem()
    with mpkv.Store(p) as s:
        assert dict(s) == {}


def test_update_with_bad_value_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        before = log_bytes(p)
        with pytest.raises(TypeError):
            s.update({"b": "2", "c": 3})
        assert log_bytes(p) == before and dict(s) == {"a": "1"}


_WATCH_UNITS = (
    "import mpkv,sys,json\n"
    "s=mpkv.Store(sys.argv[1])\n"
    "print(json.dumps([[c.key,c.value,c.deleted,c.position] for c in "
    "s.watch(since=sys.argv[2],timeout=1.0)]))\n")


def test_update_and_clear_commit_as_one_unit(tmp_path: Path) -> None:
    # One atomic unit: every change of it shares its unit's place in the log, and a
    # reader in another process never sees half of it.
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        start = s.position()
        s.update({f"k{i}": str(i) for i in range(20)})
        mid = s.position()
        s.clear()
    with mpkv.Store(p) as s:
        changes = list(s.watch(since=start, timeout=0.2))
    assert len(changes) == 40
    first, second = changes[:20], changes[20:]
    assert all(not c.deleted for c in first) and all(c.deleted for c in second)
    assert first[-1].position == mid
    # the unit is named by where it starts: all changes of one unit share that part
    assert len({c.position.rsplit("-", 2)[0] for c in first}) == 1
    assert len({c.position.rsplit("-", 2)[0] for c in second}) == 1


def test_clear_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s.update({f"k{i}": "v" for i in range(100)})
        with writer_process(p, "for i in range(20):\n"
                               "    s.clear(); s.update({f'k{i}':'v' for i in range(100)})\n"
                            ) as proc:
            while proc.poll() is None:
                assert len(s) in (0, 100)
                assert len(list(s.items())) in (0, 100)


# --- transactions ------------------------------------------------------------------


def test_transaction_commits_on_exit_none_on_exception(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        with s.transaction() as tx:
            tx["a"] = "1"
            tx.put("b", "2")
        assert dict(s) == {"a": "1", "b": "2"}
        before = log_bytes(p)
        with pytest.raises(RuntimeError), s.transaction() as tx:
            tx["c"] = "3"
            tx.delete("a")
            raise RuntimeError("boom")
        assert dict(s) == {"a": "1", "b": "2"}
        assert log_bytes(p) == before


def test_transaction_is_full_mutable_mapping(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s.update({"a": "1", "b": "2"})
        with s.transaction() as tx:
            assert isinstance(tx, collections.abc.MutableMapping)
            assert tx.get("a") == "1" and tx.get("z", "d") == "d"
            assert tx["a"] == "1"
            with pytest.raises(KeyError):
                tx["z"]
            tx.put("c", "3")
            assert "c" in tx and len(tx) == 3
            assert tx.delete("b") is True and tx.delete("b") is False
            assert sorted(tx) == ["a", "c"]
            assert sorted(tx.keys()) == ["a", "c"]
            assert sorted(tx.values()) == ["1", "3"]
            assert sorted(tx.items()) == [("a", "1"), ("c", "3")]
            tx.update({"d": "4"})
            assert tx.pop("d") == "4"
            assert tx.setdefault("e", "5") == "5"
            assert tx.incr("n", 3) == 3
            with pytest.raises(KeyError):
                del tx["missing"]
            del tx["e"]
            assert dict(tx) == {"a": "1", "c": "3", "n": "3"}
            # the store does not see uncommitted writes from another thread's view
            seen: list[Any] = []
            t = threading.Thread(target=lambda: seen.append(mpkv.Store(s.path, lock_timeout=0)
                                                             .get("c")))
            t.start()
            t.join()
            tx.clear()
            assert len(tx) == 0
            tx["z"] = "26"
        assert dict(s) == {"z": "26"}


def test_transaction_clear_and_popitem(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s.update({"a": "1"})
        with s.transaction() as tx:
            k, v = tx.popitem()
            assert (k, v) == ("a", "1")
        assert dict(s) == {}


def test_transaction_sees_latest_committed_state(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_staleness=None) as s:
        assert s.get("k") is None
        subprocess.run([sys.executable, "-c",
                        "import mpkv,sys; mpkv.Store(sys.argv[1]).put('k','other')", str(p)],
                       check=True, timeout=30)
        with s.transaction() as tx:
            assert tx.get("k") == "other"


def test_tx_used_after_block_raises_closed_error(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        with s.transaction() as tx:
            tx["a"] = "1"
        for use in (lambda: tx.get("a"), lambda: tx.put("b", "2"), lambda: tx["a"],
                    lambda: len(tx), lambda: list(tx), lambda: "a" in tx,
                    lambda: tx.delete("a"), lambda: tx.incr("n")):
            with pytest.raises(mpkv.ClosedError):
                use()
        with pytest.raises(RuntimeError), s.transaction() as tx2:
            raise RuntimeError
        with pytest.raises(mpkv.ClosedError):
            tx2.get("a")
        assert dict(s) == {"a": "1"}


def test_savepoint_sees_outer_writes_and_rollback_only_inner(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        with s.transaction() as outer:
            outer["a"] = "1"
            with s.transaction() as inner:
                assert inner["a"] == "1"
                inner["b"] = "2"
            assert outer["b"] == "2"
            with pytest.raises(RuntimeError), s.transaction() as inner2:
                inner2["c"] = "3"
                del inner2["a"]
                raise RuntimeError
            assert "c" not in outer and outer["a"] == "1"
            # nothing commits until the outermost exits
            other = mpkv.Store(p)
            assert len(other) == 0
            other.close()
            assert log_bytes(p) == b""
        assert dict(s) == {"a": "1", "b": "2"}


def test_savepoint_commit_discarded_when_outer_fails(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        with pytest.raises(RuntimeError), s.transaction() as outer:
            outer["o"] = "0"
            with s.transaction() as inner:
                inner["a"] = "1"
            raise RuntimeError
        assert dict(s) == {}
        assert log_bytes(p) == b""


def test_store_put_inside_transaction_does_not_deadlock(tmp_path: Path) -> None:
    p = tmp_path / "s"
    code = (
        "import mpkv,sys\n"
        "s=mpkv.Store(sys.argv[1])\n"
        "with s.transaction() as tx:\n"
        "    tx['a']='1'\n"
        "    try:\n"
        "        s.put('b','2')\n"
        "    except mpkv.Error as e:\n"
        "        print('ERR', type(e).__name__)\n"
        "print(sorted(s.items()))\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr


def test_transactions_serializable_across_processes(tmp_path: Path) -> None:
    p = tmp_path / "s"
    code = (
        "import mpkv,sys\n"
        "s=mpkv.Store(sys.argv[1])\n"
        "for _ in range(50):\n"
        "    with s.transaction() as tx:\n"
        "        tx['n']=str(int(tx.get('n','0'))+1)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p)]) for _ in range(3)]
    for pr in procs:
        assert pr.wait(timeout=60) == 0
    with mpkv.Store(p) as s:
        assert s["n"] == "150"


# --- refresh / staleness -----------------------------------------------------------


def test_refresh_returns_records_applied(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_staleness=None) as s:
        s["mine"] = "1"
        assert s["mine"] == "1"  # own writes always visible
        subprocess.run([sys.executable, "-c",
                        "import mpkv,sys\ns=mpkv.Store(sys.argv[1])\n"
                        "s['a']='1'; s['b']='2'; s.delete('a')", str(p)],
                       check=True, timeout=30)
        assert "b" not in s  # None: only refresh moves the view
        assert s.refresh() == 3
        assert s["b"] == "2" and "a" not in s
        assert s.refresh() == 0


def test_default_read_after_write_across_processes(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        assert len(s) == 0
        for i in range(3):
            subprocess.run([sys.executable, "-m", "mpkv", "put", str(p), "k", str(i)],
                           check=True, timeout=30, capture_output=True)
            assert s["k"] == str(i)
            assert "k" in s and len(s) == 1 and list(s) == ["k"]


# --- serialize / deserialize -------------------------------------------------------


def test_serialize_deserialize_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "snap"
    with mpkv.Store(tmp_path / "a") as s:
        s.update({"": "x", "k": "v", "b": b"\x00\xff"})
        s.serialize(f)
    assert f.is_file()
    with mpkv.Store(tmp_path / "b") as t:
        t["old"] = "gone"
        t.deserialize(f)
        assert dict(t) == {"": "x", "k": "v", "b": b"\x00\xff"}
    with mpkv.Store(tmp_path / "b") as t:
        assert dict(t) == {"": "x", "k": "v", "b": b"\x00\xff"}


def test_serialize_overwrites_file_whole(tmp_path: Path) -> None:
    f = tmp_path / "snap"
    f.write_text("old contents")
    with mpkv.Store(tmp_path / "a") as s:
        s["k"] = "v"
        s.serialize(f)
    with mpkv.Store(tmp_path / "b") as t:
        t.deserialize(f)
        assert dict(t) == {"k": "v"}


def test_deserialize_visible_to_other_process(tmp_path: Path) -> None:
    f = tmp_path / "snap"
    with mpkv.Store(tmp_path / "a") as s:
        s.update({"x": "1"})
        s.serialize(f)
    p = tmp_path / "b"
    with mpkv.Store(p) as t:
        t.update({"y": "2", "z": "3"})
        t.deserialize(f)
    r = cli("dump", str(p))
    assert r.returncode == 0
    assert [json.loads(line) for line in r.stdout.splitlines()] == [{"key": "x", "value": "1"}]


def test_json_store_serialize_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "snap"
    with mpkv.Store(tmp_path / "a", serializer="json") as s:
        s["k"] = {"a": [1, None]}
        s.serialize(f)
        s.deserialize(f)
        assert s["k"] == {"a": [1, None]}


# --- compaction --------------------------------------------------------------------


def test_compact_keeps_live_data(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_segment_bytes=300, auto_compact=False) as s:
        for i in range(200):
            s[f"k{i % 10}"] = str(i)
        s.delete("k0")
        size_before = sum(f.stat().st_size for f in segs(p))
        s.compact()
        assert dict(s) == {f"k{i}": str(190 + i) for i in range(1, 10)}
    assert sum(f.stat().st_size for f in segs(p)) < size_before
    with mpkv.Store(p) as s:
        assert dict(s) == {f"k{i}": str(190 + i) for i in range(1, 10)}


# --- watch / Change / positions ----------------------------------------------------


def test_change_is_tuple_subclass(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        w = s.watch(timeout=0.5)
        s["a"] = "1"
        s.delete("a")
        changes = list(w)
    assert len(changes) == 2
    c, d = changes
    assert isinstance(c, tuple) and isinstance(c, mpkv.Change)
    key, value = c
    assert (key, value) == ("a", "1")
    assert (c.key, c.value, c.deleted) == ("a", "1", False)
    assert isinstance(c.position, str)
    k2, v2 = d
    assert (k2, v2) == ("a", None)
    assert (d.key, d.value, d.deleted) == ("a", None, True)
    assert c.position < d.position


def test_watch_sees_only_changes_after_call(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        s["before"] = "x"
        w = s.watch(timeout=0.3)
        s["after"] = "y"
        assert [c.key for c in w] == ["after"]


def test_watch_prefix(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        w = s.watch("user:", timeout=0.3)
        s["user:1"] = "a"
        s["other"] = "b"
        s["user:2"] = "c"
        assert [c.key for c in w] == ["user:1", "user:2"]


def test_watch_sees_other_processes_in_commit_order(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        w = s.watch(timeout=2.0)
        subprocess.run([sys.executable, "-c",
                        "import mpkv,sys\ns=mpkv.Store(sys.argv[1])\n"
                        "for i in range(5): s[f'k{i}']=str(i)\ns.delete('k0')", str(p)],
                       check=True, timeout=30)
        changes = list(w)
    assert [(c.key, c.value) for c in changes] == [(f"k{i}", str(i)) for i in range(5)] + [
        ("k0", None)]
    positions = [c.position for c in changes]
    assert positions == sorted(positions) and len(set(positions)) == 6


def test_watch_timeout_ends_iterator(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        assert list(s.watch(timeout=0.2)) == []


def test_position_sorts_in_commit_order(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_segment_bytes=100) as s:
        positions = [s.position()]
        for i in range(30):
            s[f"k{i}"] = "v" * (i % 7)
            positions.append(s.position())
            with s.transaction() as tx:
                tx["a"] = "1"
                tx["b"] = "2"
            positions.append(s.position())
        assert len(segs(p)) > 2
    assert all(isinstance(x, str) for x in positions)
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


def test_watch_since_replays_after_position(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        pos = s.position()
        s["b"] = "2"
        s.delete("a")
    with mpkv.Store(p) as s:
        replay = [(c.key, c.value, c.deleted) for c in s.watch(since=pos, timeout=0.2)]
    assert replay == [("b", "2", False), ("a", None, True)]


def test_watch_since_a_change_position_resumes_after_it(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s:
        start = s.position()
        with s.transaction() as tx:
            tx["a"] = "1"
            tx["b"] = "2"
            tx["c"] = "3"
        all_changes = list(s.watch(since=start, timeout=0.2))
        assert [c.key for c in all_changes] == ["a", "b", "c"]
        resumed = list(s.watch(since=all_changes[0].position, timeout=0.2))
        assert [c.key for c in resumed] == ["b", "c"]


def test_compacted_error_is_an_mpkv_error() -> None:
    assert issubclass(mpkv.CompactedError, mpkv.Error)


def test_watch_since_compacted_position_raises_compacted_error(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_segment_bytes=100, auto_compact=False) as s:
        s["k"] = "0"
        pos = s.position()
        for i in range(40):
            s["k"] = str(i)
        s.compact()
        with pytest.raises(mpkv.CompactedError):
            list(s.watch(since=pos, timeout=0.2))


def test_watch_since_garbage_raises(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s") as s, pytest.raises((ValueError, TypeError, mpkv.Error)):
        list(s.watch(since="not-a-position", timeout=0.1))


# --- close, readonly, errors -------------------------------------------------------


def test_use_after_close_raises_closed_error(tmp_path: Path) -> None:
    s = mpkv.Store(tmp_path / "s")
    s["a"] = "1"
    s.close()
    s.close()  # closing twice is harmless
    for use in (lambda: s.get("a"), lambda: s.put("a", "2"), lambda: s["a"],
                lambda: s.delete("a"), lambda: len(s), lambda: list(s), lambda: "a" in s,
                lambda: s.refresh(), lambda: s.incr("n"), lambda: s.transaction().__enter__(),
                lambda: s.compact(), lambda: s.serialize(tmp_path / "f"),
                lambda: list(s.watch(timeout=0.1)), lambda: s.position(),
                lambda: s.update({"x": "1"}), lambda: s.clear()):
        with pytest.raises(mpkv.ClosedError):
            use()
    assert issubclass(mpkv.ClosedError, mpkv.Error)


def test_context_manager_closes(tmp_path: Path) -> None:
    with mpkv.open(tmp_path / "s") as s:
        s["a"] = "1"
    with pytest.raises(mpkv.ClosedError):
        s.get("a")


def test_readonly_writes_raise_readonly_error(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
    before = tree(p)
    with mpkv.Store(p, readonly=True) as r:
        assert r["a"] == "1"
        for write in (lambda: r.put("b", "2"), lambda: r.__setitem__("b", "2"),
                      lambda: r.delete("a"), lambda: r.__delitem__("a"),
                      lambda: r.incr("n"), lambda: r.update({"b": "2"}),
                      lambda: r.pop("a"), lambda: r.popitem(), lambda: r.setdefault("b", "2"),
                      lambda: r.clear(), lambda: r.deserialize(tmp_path / "x")):
            with pytest.raises(mpkv.ReadOnlyError):
                write()
        with pytest.raises(mpkv.ReadOnlyError), r.transaction() as tx:
            tx["b"] = "2"
        assert dict(r) == {"a": "1"}
    assert {k: v for k, v in tree(p).items() if k.endswith(".seg")} == {
        k: v for k, v in before.items() if k.endswith(".seg")}


def test_readonly_on_missing_path_creates_nothing(tmp_path: Path) -> None:
    p = tmp_path / "nothing"
    with pytest.raises(mpkv.Error):
        mpkv.Store(p, readonly=True)
    assert not p.exists()


def test_error_hierarchy() -> None:
    for name in ("FormatError", "CorruptionError", "ClosedError", "LockTimeout",
                 "ReadOnlyError", "CompactedError"):
        assert issubclass(getattr(mpkv, name), mpkv.Error)
    assert issubclass(mpkv.Error, Exception)


def test_lock_timeout_raises_lock_timeout(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        with s.transaction() as tx:
            tx["b"] = "2"
            code = ("import mpkv,sys\ns=mpkv.Store(sys.argv[1],lock_timeout=0.2)\n"
                    "try:\n    s.put('c','3')\nexcept mpkv.LockTimeout:\n    print('timeout')\n")
            r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True,
                               text=True, timeout=30)
            assert r.stdout.strip() == "timeout", r.stderr
    with mpkv.Store(p) as s:
        assert dict(s) == {"a": "1", "b": "2"}


def test_corruption_error_names_file_and_offset(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=12) as s:
        s["a"] = "1"
        s["b"] = "2"
        s["c"] = "3"
    first = segs(p)[0]
    first.write_text("P|a|1\nXXXXX\n")
    with pytest.raises(mpkv.CorruptionError) as e:
        mpkv.Store(p)
    assert first.name in str(e.value)
    assert "6" in str(e.value)


def test_torn_tail_ignored(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
    with open(segs(p)[-1], "a") as f:
        f.write("P|b|2")  # no newline: torn
    with mpkv.Store(p, readonly=True) as r:
        assert dict(r) == {"a": "1"}
    with mpkv.Store(p) as s:
        s["c"] = "3"
    assert log_text(p) == ["P|a|1\nP|c|3\n"]


def test_repair_moves_damage_aside(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=12) as s:
        s["a"] = "1"
        s["b"] = "2"
        s["c"] = "3"
    segs(p)[0].write_text("P|a|1\nGARBAGE!\n")
    report = mpkv.repair(p)
    assert report is not None
    with mpkv.Store(p) as s:
        assert s["a"] == "1" and s["c"] == "3"
    found = [f for f in p.rglob("*") if f.is_file() and b"GARBAGE!" in f.read_bytes()]
    assert found, "damaged bytes must be moved aside, never deleted"


# --- pickling, fork, file modes ----------------------------------------------------


def _pickled_worker(store: mpkv.Store, q: Any) -> None:
    store["from_child"] = "yes"
    q.put(store.get("from_parent"))


def test_pickling_store_reopens_it(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", serializer="raw") as s:
        s["from_parent"] = "hi"
        clone = pickle.loads(pickle.dumps(s))
        try:
            assert isinstance(clone, mpkv.Store)
            assert clone["from_parent"] == "hi"
            assert clone.format == "text"
        finally:
            clone.close()
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        pr = ctx.Process(target=_pickled_worker, args=(s, q))
        pr.start()
        assert q.get(timeout=60) == "hi"
        pr.join(60)
        assert pr.exitcode == 0
        assert s["from_child"] == "yes"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_works_or_raises_clearly(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["a"] = "1"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            status = b"?"
            try:
                os.close(r)
                try:
                    s["child"] = "2"
                    status = b"ok" if s["a"] == "1" and s["child"] == "2" else b"bad"
                except mpkv.Error:
                    status = b"err"
                except BaseException:
                    status = b"other"
                os.write(w, status)
            finally:
                os._exit(0)
        os.close(w)
        result = os.read(r, 10)
        os.close(r)
        os.waitpid(pid, 0)
        assert result in (b"ok", b"err"), result
        s["parent"] = "3"
        assert s["a"] == "1"
        if result == b"ok":
            assert s["child"] == "2"
    with mpkv.Store(p) as s:
        assert s["parent"] == "3"
    assert mpkv.verify(p) is not None


def test_files_created_0666_minus_umask(tmp_path: Path) -> None:
    p = tmp_path / "s"
    old = os.umask(0o027)
    try:
        with mpkv.Store(p, max_segment_bytes=100) as s:
            for i in range(10):
                s[f"k{i}"] = "v" * 20
            s.serialize(tmp_path / "snap")
    finally:
        os.umask(old)
    files = [f for f in p.rglob("*") if f.is_file()] + [tmp_path / "snap"]
    assert files
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o640, f


# --- scenario functions ------------------------------------------------------------


def test_scenarios_part1_examples() -> None:
    assert single_file_restart([("put", "a", "1"), ("put", "b", "2"), ("get", "a")],
                               [("get", "b"), ("delete", "a"), ("get", "a")]) == (
        ["1", "2", None], [("b", "2")])
    assert single_file_restart([("put", "", "x"), ("put", "k", "old"), ("put", "k", "new")],
                               [("get", ""), ("get", "k")]) == (
        ["x", "new"], [("", "x"), ("k", "new")])
    assert single_file_restart([], [("get", "missing"), ("delete", "missing")]) == ([None], [])
    assert single_file_restart([("put", "x", "1"), ("delete", "x")], [("get", "x")]) == (
        [None], [])


def test_scenarios_part2_examples() -> None:
    assert multi_file_restart(
        10, [("put", "a", "1"), ("put", "bb", "2"), ("get", "a")],
        [("get", "bb"), ("delete", "a"), ("get", "a"), ("put", "c", "3")]) == (
        ["1", "2", None], ["P|a|1\n", "P|bb|2\n", "D|a\nP|c|3\n"], [("bb", "2"), ("c", "3")])
    assert multi_file_restart(
        8, [("put", "aa", "b"), ("put", "x", "y")],
        [("get", "aa"), ("put", "aa", "c"), ("get", "aa")]) == (
        ["b", "c"], ["P|aa|b\n", "P|x|y\n", "P|aa|c\n"], [("aa", "c"), ("x", "y")])
    assert multi_file_restart(10, [("put", "a", "1"), ("delete", "a")], [("get", "a")]) == (
        [None], ["P|a|1\nD|a\n"], [])
    assert multi_file_restart(
        12, [("put", "a", "1")], [("put", "b", "2"), ("get", "a"), ("get", "b")]) == (
        ["1", "2"], ["P|a|1\nP|b|2\n"], [("a", "1"), ("b", "2")])
    assert multi_file_restart(5, [], [("get", "z")]) == ([None], [], [])


def test_scenarios_accept_lists_and_results_are_plain() -> None:
    gets, files, items = multi_file_restart(
        6, [["put", "a", "1"], ["delete", "zz"]], [["get", "a"]])  # type: ignore[list-item]
    assert gets == ["1"]
    assert files == ["P|a|1\n", "D|zz\n"]
    assert items == [("a", "1")]
    assert all(type(t) is tuple for t in items)


# --- command line ------------------------------------------------------------------


def test_cli_version() -> None:
    r = cli("--version")
    assert r.returncode == 0
    assert mpkv.__version__ in r.stdout


def test_console_script_exists(tmp_path: Path) -> None:
    r = subprocess.run(["mpkv", "put", str(tmp_path / "s"), "k", "v"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["mpkv", "get", str(tmp_path / "s"), "k"], capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, "v")


def test_cli_put_get_delete_list(tmp_path: Path) -> None:
    p = str(tmp_path / "deep" / "s")
    assert cli("put", p, "user:1", "alice").returncode == 0
    assert cli("put", p, "user:2", "bob").returncode == 0
    assert cli("put", p, "other", "x").returncode == 0
    r = cli("get", p, "user:1")
    assert (r.returncode, r.stdout) == (0, "alice\n")
    r = cli("get", p, "nope")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cli("list", p, "--prefix", "user:")
    assert r.returncode == 0 and r.stdout.splitlines() == ["user:1", "user:2"]
    r = cli("list", p)
    assert sorted(r.stdout.splitlines()) == ["other", "user:1", "user:2"]
    assert cli("delete", p, "other").returncode == 0
    with mpkv.Store(p) as s:
        assert dict(s) == {"user:1": "alice", "user:2": "bob"}


def test_cli_dump_load_roundtrip(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with mpkv.Store(a) as s:
        s.update({"k1": "v1", "": "empty", "é": "ü\n|"})
    r = cli("dump", str(a))
    assert r.returncode == 0
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(set(d) == {"key", "value"} for d in lines)
    assert {d["key"]: d["value"] for d in lines} == {"k1": "v1", "": "empty", "é": "ü\n|"}
    b = tmp_path / "new" / "b"
    r = cli("load", str(b), stdin=r.stdout)
    assert r.returncode == 0, r.stderr
    with mpkv.Store(b) as s:
        assert dict(s) == {"k1": "v1", "": "empty", "é": "ü\n|"}


def test_cli_load_bad_input_fails_cleanly(tmp_path: Path) -> None:
    b = tmp_path / "b"
    r = cli("load", str(b), stdin="this is not json\n")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_backup_restore(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with mpkv.Store(a) as s:
        s.update({"x": "1", "y": "2"})
    f = tmp_path / "backup.file"
    assert cli("backup", str(a), str(f)).returncode == 0
    assert f.is_file()
    b = tmp_path / "restored"
    r = cli("restore", str(b), str(f))
    assert r.returncode == 0, r.stderr
    with mpkv.Store(b) as s:
        assert dict(s) == {"x": "1", "y": "2"}


def test_cli_stats_verify_repair_compact_on_store(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with mpkv.Store(a) as s:
        s.update({"x": "1"})
    for cmd in ("stats", "verify", "repair", "compact"):
        r = cli(cmd, str(a))
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_verify_damage_exits_1(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with mpkv.Store(a, format="text", max_segment_bytes=12) as s:
        s.update({"a": "1"})
        s.update({"b": "2"})
        s.update({"c": "3"})
    segs(a)[0].write_text("P|a|1\n%%%%%%\n")
    r = cli("verify", str(a))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr


NO_STORE_COMMANDS = [
    ["get", "{p}", "k"], ["delete", "{p}", "k"], ["list", "{p}"], ["dump", "{p}"],
    ["stats", "{p}"], ["verify", "{p}"], ["repair", "{p}"], ["compact", "{p}"],
    ["backup", "{p}", "{f}"], ["list", "{p}", "--prefix", "x"],
]


@pytest.mark.parametrize("argv", NO_STORE_COMMANDS, ids=lambda a: "-".join(a[:1] + a[2:3]))
@pytest.mark.parametrize("kind", ["missing", "empty-dir"])
def test_cli_commands_on_no_store_exit_1_create_nothing(tmp_path: Path, argv: list[str],
                                                       kind: str) -> None:
    p = tmp_path / "nostore"
    if kind == "empty-dir":
        p.mkdir()
    f = tmp_path / "backup.out"
    before = tree(tmp_path)
    r = cli(*[a.format(p=p, f=f) for a in argv])
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert tree(tmp_path) == before


def test_cli_commands_on_non_store_dir_touch_nothing(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    before = tree(tmp_path)
    for argv in (["put", str(d), "k", "v"], ["get", str(d), "k"], ["compact", str(d)],
                 ["repair", str(d)], ["load", str(d)]):
        r = cli(*argv, stdin="")
        assert r.returncode in (1, 2) and r.returncode != 0, argv
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    assert tree(tmp_path) == before


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    for argv in ([], ["frobnicate"], ["get"], ["put", str(tmp_path / "s"), "k"],
                 ["list", str(tmp_path / "s"), "--bogus"]):
        r = cli(*argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_cli_errors_one_line_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("put", str(f), "k", "v")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert f.read_text() == "x"


def test_cli_no_progress_bar_in_pipes(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with mpkv.Store(a, max_segment_bytes=200) as s:
        for i in range(100):
            s[f"k{i}"] = "v" * 10
    for cmd in ("compact", "verify", "dump"):
        r = cli(cmd, str(a))
        assert r.returncode == 0
        assert "\r" not in r.stderr and "\r" not in r.stdout


def test_cli_watch_waits_for_store_and_prints_json_lines(tmp_path: Path) -> None:
    p = tmp_path / "later"
    proc = subprocess.Popen([sys.executable, "-m", "mpkv", "watch", str(p), "--timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # it says once that it is waiting
        assert "waiting" in first
        assert not p.exists()  # watch creates no store
        with mpkv.Store(p) as s:
            s["a"] = "1"
            s["b"] = "2"
            s.delete("a")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["key"], d["value"], d["deleted"]) for d in lines] == [
        ("a", "1", False), ("b", "2", False), ("a", None, True)]
    assert all(set(d) == {"key", "value", "deleted", "position"} for d in lines)
    positions = [d["position"] for d in lines]
    assert positions == sorted(positions)


def test_cli_watch_since_and_prefix(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["u:1"] = "a"
        pos = s.position()
        s["x"] = "b"
        s["u:2"] = "c"
    r = cli("watch", str(p), "--since", pos, "--prefix", "u:", "--timeout", "0.5")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(d["key"], d["value"]) for d in lines] == [("u:2", "c")]


def test_cli_watch_existing_store_follows_new_changes(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        s["old"] = "0"
        proc = subprocess.Popen([sys.executable, "-m", "mpkv", "watch", str(p)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()
                                                              if proc.stdout else ""))
        reader.start()
        try:
            # We cannot tell when the watcher has started: write until it prints (its
            # start-up may take long on a loaded machine; the cap only stops a hang).
            deadline = time.monotonic() + 120
            i = 0
            while not lines and time.monotonic() < deadline:
                s[f"new{i}"] = "1"
                reader.join(0.2)
                i += 1
        finally:
            proc.kill()
            proc.communicate(timeout=30)
            reader.join(30)
    assert lines and json.loads(lines[0])["key"].startswith("new")


def test_cli_watch_bytes_value_is_one_json_line(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p) as s:
        pos = s.position()
        s["b"] = b"\xff\x00"
    r = cli("watch", str(p), "--since", pos, "--timeout", "0.3")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert json.loads(r.stdout)["key"] == "b"


def test_cli_dump_json_store(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, serializer="json") as s:
        s["k"] = {"a": [1, 2]}
    r = cli("dump", str(p))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["key"] == "k"
    assert d["value"] in ({"a": [1, 2]}, json.dumps({"a": [1, 2]}))


def test_cli_demo_temp_dir_and_rerun(tmp_path: Path) -> None:
    r = cli("demo", timeout=120)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "demo"
    r1 = cli("demo", str(d), timeout=120)
    assert r1.returncode == 0, r1.stderr
    r2 = cli("demo", str(d), timeout=120)
    assert r2.returncode == 0, r2.stderr


def test_cli_demo_never_writes_into_foreign_store(tmp_path: Path) -> None:
    p = tmp_path / "mine"
    with mpkv.Store(p) as s:
        s["precious"] = "1"
    before = {k: v for k, v in tree(p).items() if k.endswith(".seg")}
    r = cli("demo", str(p), timeout=120)
    assert "Traceback" not in r.stderr
    after = {k: v for k, v in tree(p).items() if k.endswith(".seg")}
    assert after == before
    with mpkv.Store(p) as s:
        assert dict(s) == {"precious": "1"}


def test_dangling_symlink_path_raises_format_error(tmp_path: Path) -> None:
    # Found by this file: os.makedirs raised a bare FileExistsError, not an mpkv.Error.
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(link)
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()
    r = cli("put", str(link), "k", "v")
    assert r.returncode == 1 and "link" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nowhere").exists()


def test_close_inside_own_transaction_raises_and_commits_nothing(tmp_path: Path) -> None:
    # Found by this file: close() inside the block closed the descriptors, and the
    # block's exit then failed with a bare OSError (EBADF) from the commit.
    p = tmp_path / "s"
    s = mpkv.Store(p)
    s["a"] = "1"
    with pytest.raises(mpkv.Error), s.transaction() as tx:
        tx["k"] = "1"
        s.close()
    assert dict(s) == {"a": "1"}
    s["b"] = "2"
    s.close()
    with pytest.raises(mpkv.ClosedError):
        s.get("a")
    with mpkv.Store(p) as again:
        assert dict(again) == {"a": "1", "b": "2"}


def test_close_from_another_thread_waits_for_an_open_transaction(tmp_path: Path) -> None:
    # Found by this file: close() on thread B while thread A was inside a transaction
    # closed A's descriptors; A's commit then failed with EBADF (or could write to
    # whatever file reused the descriptor number).
    p = tmp_path / "s"
    s = mpkv.Store(p)
    inside = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with s.transaction() as tx:
                tx["a"] = "1"
                inside.set()
                time.sleep(0.5)  # close() is called meanwhile
                tx["b"] = "2"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    assert inside.wait(30)
    s.close()
    t.join(30)
    assert errors == []
    with pytest.raises(mpkv.ClosedError):
        s.put("c", "3")
    with mpkv.Store(p) as again:
        assert dict(again) == {"a": "1", "b": "2"}


def test_lock_timeout_applies_to_threads_sharing_one_store(tmp_path: Path) -> None:
    # Found by this file: a second thread of the same Store waited for the holder's
    # transaction however long it took, ignoring lock_timeout.
    with mpkv.Store(tmp_path / "s", lock_timeout=0.2) as s:
        inside, leave = threading.Event(), threading.Event()

        def holder() -> None:
            with s.transaction() as tx:
                tx["a"] = "1"
                inside.set()
                leave.wait(30)

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert inside.wait(30)
            before = log_bytes(tmp_path / "s")
            with pytest.raises(mpkv.LockTimeout):
                s.put("b", "2")
            with pytest.raises(mpkv.LockTimeout), s.transaction() as tx:
                tx["c"] = "3"
            assert log_bytes(tmp_path / "s") == before
        finally:
            leave.set()
            t.join(30)
        assert dict(s) == {"a": "1"}


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_failed_write_file_too_large_leaves_log_as_before(tmp_path: Path, fmt: str) -> None:
    # A real failed write: RLIMIT_FSIZE makes the kernel refuse bytes past 150 (EFBIG).
    p = tmp_path / "s"
    with mpkv.Store(p, format=fmt) as s:
        s["a"] = "1" * 100
    before = [(f.name, f.read_bytes()) for f in segs(p)]
    code = (
        "import mpkv, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "s = mpkv.Store(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (150, 150))\n"
        "for write in (lambda: s.put('b', 'x' * 1000),\n"
        "              lambda: s.update({'c': 'y' * 30, 'd': 'z' * 40})):\n"
        "    try:\n"
        "        write()\n"
        "        print('no error')\n"
        "    except OSError:\n"
        "        print('raised')\n"
        "print(sorted(s))\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.splitlines() == ["raised", "raised", "['a']"], r.stderr
    assert [(f.name, f.read_bytes()) for f in segs(p)] == before
    with mpkv.Store(p) as s:
        assert dict(s) == {"a": "1" * 100}
        s["e"] = "5"
        assert s["e"] == "5"


def test_readonly_and_cli_watchers_see_every_change_across_compaction(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with mpkv.Store(p, max_segment_bytes=300, auto_compact=False) as w:
        pos = w.position()
        with mpkv.Store(p, readonly=True) as r:
            changes = r.watch(since=pos, timeout=0.5)
            for i in range(300):
                w[f"k{i % 7}"] = str(i)
                if i % 100 == 99:
                    w.compact()
            got = [(c.key, c.value) for c in changes]
    assert got == [(f"k{i % 7}", str(i)) for i in range(300)]
    out = cli("watch", str(p), "--since", pos, "--timeout", "0.5")
    assert out.returncode == 0, out.stderr
    # started after the compactions: every change since pos, or a loud CompactedError
    # (one line, exit 1); never a silent skip
    if out.returncode == 0:
        values = [json.loads(line)["value"] for line in out.stdout.splitlines()]
        assert values == [str(i) for i in range(300)]
    else:
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1


def test_text_limit_in_characters_survives_reopen(tmp_path: Path) -> None:
    # 'P|é|€\n' is 6 characters but 9 bytes: after a reopen the last file still has
    # room for 6 more characters of a 12-character limit.
    p = tmp_path / "s"
    with mpkv.Store(p, format="text", max_segment_bytes=12) as s:
        s["é"] = "€"
    with mpkv.Store(p) as s:
        s["ü"] = "€"
    assert log_text(p) == ["P|é|€\nP|ü|€\n"]
    assert multi_file_restart(12, [("put", "é", "€")], [("put", "ü", "€"), ("get", "é")]) == (
        ["€"], ["P|é|€\nP|ü|€\n"], [("é", "€"), ("ü", "€")])
