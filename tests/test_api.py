"""The API a shelve/diskcache user expects, on both backends: JSON values, atomic
counters and read-modify-write helpers, full transactions with savepoints, typing.

The Redis half starts its own ``redis-server`` on a free loopback port and is skipped
without the ``redis`` package or the binary.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mpkv

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
HAVE_REDIS = importlib.util.find_spec("redis") is not None and bool(shutil.which("redis-server"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not HAVE_REDIS:
        pytest.skip("redis package or redis-server missing")
    import redis

    folder = tmp_path_factory.mktemp("redis")
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", HOST, "--dir",
                                 str(folder), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60  # generous: the machine may be loaded
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if redis.Redis(host=HOST, port=port, socket_timeout=1).ping():
                    yield port
                    proc.terminate()
                    proc.wait(10)
                    return
            except redis.RedisError:
                time.sleep(0.02)
        proc.kill()
        proc.wait(10)
    raise RuntimeError("redis-server did not start")


Opener = Callable[..., Any]


@pytest.fixture(params=["file", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One new store of the backend under test: a directory, or a fresh namespace."""
    if request.param == "redis":
        port = request.getfixturevalue("redis_port")
        return f"redis://{HOST}:{port}/0?namespace={uuid.uuid4().hex}"
    return str(tmp_path / "store")


@pytest.fixture
def opener(target: str) -> Iterator[Opener]:
    """``opener(**options)`` opens a handle on ``target``, closed at teardown."""
    opened: list[Any] = []

    def open_(**options: Any) -> Any:
        store = mpkv.open(target, **options)
        opened.append(store)
        return store

    yield open_
    for s in opened:
        s.close()


def log_bytes(path: str) -> bytes:
    return b"".join(Path(path, f).read_bytes() for f in sorted(os.listdir(path))
                    if f.endswith(".seg"))


def run_workers(code: str, n: int, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                              stderr=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode(errors="replace")


# --- serializer="json" -------------------------------------------------------------------


def test_json_store_holds_objects_and_get_returns_a_fresh_copy(opener: Opener) -> None:
    s = opener(serializer="json")
    user = {"name": "Ada", "langs": ["en", "fr"], "age": 36, "admin": False, "x": None,
            "pi": 3.25, "line": "a\nb|c", "uni": "é\u2028"}
    s["user"] = user
    s.put("n", 7)
    s["list"] = [1, [2, {"3": 4}]]
    got = s["user"]
    assert got == user and got is not user
    got["langs"].append("de")
    assert s["user"]["langs"] == ["en", "fr"]  # a fresh object on every read
    assert s.get("n") == 7 and s.get("missing", {"d": 1}) == {"d": 1}
    again = opener()  # serializer=None: what the store has
    assert again.serializer == "json" and again["user"] == user and again["list"][1][1] == {
        "3": 4}


def test_json_values_are_decoded_on_every_read_path(opener: Opener, tmp_path: Path) -> None:
    s = opener(serializer="json")
    s.update({"a": {"v": 1}, "b": [2]})
    assert dict(s.items()) == {"a": {"v": 1}, "b": [2]}
    assert list(s.values()) == [{"v": 1}, [2]] and sorted(s) == ["a", "b"]
    assert s == {"a": {"v": 1}, "b": [2]}
    with s.transaction() as tx:
        assert tx["a"] == {"v": 1} and dict(tx.items())["b"] == [2]
        assert tx.pop("b") == [2]
    assert s.setdefault("a", None) == {"v": 1}
    snap = tmp_path / "snap"
    s.serialize(snap)
    s.clear()
    s.deserialize(snap)
    assert dict(s.items()) == {"a": {"v": 1}}


def test_json_store_refuses_what_json_cannot_encode_and_writes_nothing(
        opener: Opener) -> None:
    s = opener(serializer="json")
    s["keep"] = 1
    bad: list[Any] = [object(), {1, 2}, b"bytes", float("nan"), float("inf"), {"k": object()},
                      {(1, 2): "tuple key"}]
    for value in bad:
        with pytest.raises((TypeError, ValueError)):
            s.put("k", value)
        with pytest.raises((TypeError, ValueError)):
            s.update({"ok": 1, "k": value})
        with pytest.raises((TypeError, ValueError)), s.transaction() as tx:
            tx["ok"] = 1
            tx["k"] = value
    assert dict(s.items()) == {"keep": 1}
    assert dict(opener().items()) == {"keep": 1}


def test_json_text_format_values_never_break_the_line_format(tmp_path: Path) -> None:
    path = str(tmp_path / "text")
    value = {"a": "line1\nline2\r\n", "b": "pipe|pipe", "c": ["\u2028", "\ud800"]}
    with mpkv.Store(path, format="text", serializer="json") as s:
        s["k"] = value
        s["n"] = 12
    text = log_bytes(path).decode("utf-8")
    assert text.count("\n") == 2 and all(line.startswith("P|") for line in text.splitlines())
    with mpkv.Store(path) as s:
        assert s["k"] == value and s["n"] == 12


def test_serializer_is_recorded_at_creation_and_a_conflict_raises(opener: Opener) -> None:
    with pytest.raises(ValueError, match="serializer"):
        opener(serializer="pickle")
    s = opener(serializer="json")
    with pytest.raises(ValueError, match="serializer"):
        opener(serializer="raw")
    assert opener(serializer="json").serializer == "json"
    assert opener(readonly=True).serializer == "json"
    assert "json" in repr(s)


def test_raw_is_the_default_and_still_refuses_other_values(opener: Opener) -> None:
    s = opener()
    assert s.serializer == "raw"
    for value in (1, {"a": 1}, None, ["x"]):
        with pytest.raises(TypeError):
            s.put("k", value)
    s["s"], s["b"] = "text", b"\x00bytes"
    assert s["s"] == "text" and s["b"] == b"\x00bytes"
    with pytest.raises(ValueError, match="serializer"):
        opener(serializer="json")


def test_a_meta_file_without_serializer_field_is_raw(tmp_path: Path) -> None:
    path = tmp_path / "old"
    mpkv.Store(path).close()
    meta_file = path / ".mpkv" / "meta"
    meta = json.loads(meta_file.read_text())
    assert meta["serializer"] == "raw"
    del meta["serializer"]
    meta_file.write_text(json.dumps(meta))
    with mpkv.Store(path) as s:
        assert s.serializer == "raw"
    with pytest.raises(ValueError, match="serializer"):
        mpkv.Store(path, serializer="json")


def test_deserialize_refuses_a_snapshot_that_is_not_json_for_a_json_store(
        opener: Opener, tmp_path: Path) -> None:
    raw = mpkv.Store(tmp_path / "raw")
    raw["k"] = "not json {"
    raw.serialize(tmp_path / "snap")
    raw.close()
    s = opener(serializer="json")
    s["keep"] = [1]
    with pytest.raises(ValueError):
        s.deserialize(tmp_path / "snap")
    assert dict(s.items()) == {"keep": [1]}


def test_snapshot_of_a_json_store_restores_objects_and_a_raw_store_refuses_it(
        opener: Opener, tmp_path: Path) -> None:
    s = opener(serializer="json")
    s["user"] = {"name": "ada", "tags": ["x"]}
    s.serialize(tmp_path / "snap")
    fresh = opener(serializer="json")
    fresh.deserialize(tmp_path / "snap")
    assert fresh["user"] == {"name": "ada", "tags": ["x"]}
    # A raw store would hold the JSON text as strings: refused, nothing written.
    raw = mpkv.Store(tmp_path / "raw")
    raw["keep"] = "1"
    with pytest.raises(ValueError, match="serializer"):
        raw.deserialize(tmp_path / "snap")
    assert dict(raw.items()) == {"keep": "1"}
    raw.close()


def test_version_1_snapshot_is_still_read(tmp_path: Path) -> None:
    import struct
    import zlib
    body = struct.pack("<8sIQ", b"MPKVSNAP", 1, 1) + struct.pack("<BII", 1, 1, 3) + b"k[1]"
    (tmp_path / "v1").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with mpkv.Store(tmp_path / "s", serializer="json") as s:
        s.deserialize(tmp_path / "v1")
        assert s["k"] == [1]


# --- incr -------------------------------------------------------------------------------


def test_incr_counts_from_zero_and_keeps_each_serializers_type(
        opener: Opener, target: str) -> None:
    s = opener()
    assert s.incr("hits") == 1 and s.incr("hits", 41) == 42 and s.incr("hits", -2) == 40
    assert s["hits"] == "40"
    s["neg"] = "-5"
    assert s.incr("neg") == -4
    j = mpkv.open(target.replace("store", "jstore") if "://" not in target
                  else target + "j", serializer="json")
    try:
        assert j.incr("hits") == 1 and j.incr("hits", 10) == 11
        assert j["hits"] == 11 and isinstance(j["hits"], int)
    finally:
        j.close()


@pytest.mark.parametrize("serializer,value", [
    ("raw", "12.5"), ("raw", "twelve"), ("raw", b"12"), ("raw", " 12"), ("raw", ""),
    ("json", 1.5), ("json", "12"), ("json", True), ("json", None), ("json", [1]),
])
def test_incr_on_a_non_integer_raises_and_writes_nothing(
        opener: Opener, serializer: str, value: Any) -> None:
    s = opener(serializer=serializer)
    s["k"] = value
    before = len(s)
    with pytest.raises((TypeError, ValueError)):
        s.incr("k")
    assert s["k"] == value and len(s) == before
    assert opener().refresh() == 0


def test_incr_rejects_a_delta_that_is_not_an_int(opener: Opener) -> None:
    s = opener()
    for delta in (1.0, True, "1", None):
        with pytest.raises(TypeError):
            s.incr("k", delta)
    assert "k" not in s


def test_incr_is_one_record_in_the_log(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s.incr("k")
        one = len(log_bytes(path))
        s.incr("k")
        assert len(log_bytes(path)) == 2 * one  # one put record each, nothing else


INCR_WORKER = """
import sys, mpkv
with mpkv.open(sys.argv[1], serializer=sys.argv[2]) as s:
    for _ in range(int(sys.argv[3])):
        s.incr("counter")
        s.incr("other", 2)
"""


@pytest.mark.parametrize("serializer", ["raw", "json"])
def test_incr_loses_no_increment_across_processes(
        opener: Opener, target: str, serializer: str) -> None:
    s = opener(serializer=serializer)
    run_workers(INCR_WORKER, 4, target, serializer, "150")
    assert int(s["counter"]) == 600 and int(s["other"]) == 1200


# --- atomic read-modify-write helpers ----------------------------------------------------


def test_update_pop_popitem_setdefault_clear_each_commit_once(opener: Opener) -> None:
    s, other = opener(), opener(max_staleness=None)
    s.update({"a": "1", "b": "2"}, c="3")
    assert other.refresh() == 1 and dict(other.items()) == {"a": "1", "b": "2", "c": "3"}
    s.update([("d", "4"), ("e", "5")])
    assert other.refresh() == 1
    assert s.pop("a") == "1" and other.refresh() == 1
    assert s.pop("a", "gone") == "gone" and other.refresh() == 0
    with pytest.raises(KeyError):
        s.pop("a")
    key, value = s.popitem()
    assert s.get(key) is None and value in "2345" and other.refresh() == 1
    assert s.setdefault("z", "26") == "26" and s.setdefault("z", "no") == "26"
    assert other.refresh() == 1
    s.clear()
    assert other.refresh() == 1 and len(other) == 0 and len(s) == 0
    with pytest.raises(KeyError):
        s.popitem()
    s.clear()
    assert other.refresh() == 0


def test_clear_of_many_keys_is_one_commit_not_one_per_key(opener: Opener) -> None:
    s, other = opener(), opener(max_staleness=None)
    s.update((f"k{i}", "v") for i in range(20_000))
    other.refresh()
    s.clear()
    assert other.refresh() == 1 and len(other) == 0 and len(s) == 0


def test_update_with_one_bad_value_writes_nothing(opener: Opener) -> None:
    s = opener()
    with pytest.raises(TypeError):
        s.update({"a": "1", "b": 2})
    with pytest.raises(TypeError):
        s.update([("a", "1"), (3, "x")])
    with pytest.raises(ValueError):
        s.update([("a", "1", "extra")])
    assert len(s) == 0 and opener().refresh() == 0


def test_del_of_a_missing_key_raises_keyerror_and_writes_nothing(opener: Opener) -> None:
    s = opener()
    with pytest.raises(KeyError):
        del s["missing"]
    assert opener().refresh() == 0


# --- transactions ------------------------------------------------------------------------


def test_using_tx_after_its_block_raises_closederror(opener: Opener) -> None:
    s = opener()
    with s.transaction() as tx:
        tx["a"] = "1"
    uses: list[Callable[[], Any]] = [
        lambda: tx.put("b", "2"), lambda: tx.__setitem__("b", "2"), lambda: tx.get("a"),
        lambda: tx.delete("a"), lambda: list(tx), lambda: len(tx), lambda: "a" in tx,
        lambda: tx.incr("n"), lambda: tx.update(b="2"), lambda: tx.pop("a"), lambda: tx.clear()]
    for use in uses:
        with pytest.raises(mpkv.ClosedError):
            use()
    with pytest.raises(RuntimeError), s.transaction() as failed:
        raise RuntimeError
    with pytest.raises(mpkv.ClosedError):
        failed["x"] = "1"
    assert dict(s.items()) == {"a": "1"} and "closed" in repr(tx)


def test_tx_is_a_full_mutable_mapping(opener: Opener) -> None:
    s = opener()
    s.update(a="1", b="2")
    with s.transaction() as tx:
        assert sorted(tx) == ["a", "b"] and len(tx) == 2 and "a" in tx
        tx["c"] = "3"
        del tx["b"]
        assert sorted(tx.keys()) == ["a", "c"] and sorted(tx.values()) == ["1", "3"]
        assert dict(tx.items()) == {"a": "1", "c": "3"} and len(tx) == 2
        tx.update({"d": "4"}, e="5")
        assert tx.pop("e") == "5" and tx.pop("e", None) is None
        assert tx.setdefault("a", "x") == "1" and tx.setdefault("f", "6") == "6"
        assert tx.incr("n", 3) == 3 and tx["n"] == "3"
        assert tx.popitem() in {("n", "3"), ("f", "6"), ("d", "4"), ("c", "3"), ("a", "1")}
        assert "pending" in repr(tx) and s.path in repr(tx)
        tx.clear()
        assert len(tx) == 0 and list(tx) == []
        tx["last"] = "1"
    assert dict(s.items()) == {"last": "1"}


def test_nested_transaction_is_a_savepoint(opener: Opener) -> None:
    s, other = opener(), opener()
    with s.transaction() as outer:
        outer["a"] = "1"
        with s.transaction() as inner:
            assert inner["a"] == "1"  # sees the outer block's writes
            inner["b"] = "2"
        assert outer["b"] == "2"
        with pytest.raises(KeyError), s.transaction() as failing:
            failing["c"] = "3"
            del failing["a"]
            raise KeyError("boom")
        assert outer.get("c") is None and outer["a"] == "1"  # only its own writes dropped
        assert other.get("a") is None and other.get("b") is None  # nothing committed yet
    assert dict(other.items()) == {"a": "1", "b": "2"}


def test_an_aborted_outer_block_drops_the_inner_blocks_writes(opener: Opener) -> None:
    s = opener()
    with pytest.raises(ValueError), s.transaction() as outer:
        outer["a"] = "1"
        with s.transaction() as inner:
            inner["b"] = "2"
        raise ValueError
    assert len(s) == 0 and len(opener()) == 0


def test_store_calls_inside_a_transaction_join_it_without_deadlock(opener: Opener) -> None:
    s, other = opener(lock_timeout=5), opener()
    with pytest.raises(RuntimeError), s.transaction():
        s["a"] = "1"
        s.incr("n")
        assert s["a"] == "1" and s["n"] == "1" and len(s) == 2  # reads its own writes
        raise RuntimeError
    assert len(s) == 0 and len(other) == 0
    with s.transaction() as tx:
        s.update(a="1", b="2")
        assert s.delete("b") and s.pop("a") == "1"
        tx["c"] = "3"
        s.clear()
        s["d"] = "4"
        assert dict(s.items()) == {"d": "4"} and other.get("d") is None
    assert dict(other.items()) == {"d": "4"}


def test_atomic_helpers_inside_a_transaction_commit_with_it(opener: Opener) -> None:
    s = opener()
    with pytest.raises(KeyError), s.transaction():
        s.incr("n")
        s.setdefault("k", "v")
        raise KeyError
    assert len(opener()) == 0


# --- typing and help ---------------------------------------------------------------------


def test_py_typed_ships_with_the_package() -> None:
    assert (Path(mpkv.__file__).parent / "py.typed").exists()
    assert "py.typed" in (REPO / "pyproject.toml").read_text()


def test_open_names_every_option_for_help_and_ides() -> None:
    params = inspect.signature(mpkv.open).parameters
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    store_options = {n for n in inspect.signature(mpkv.Store).parameters if n != "path"}
    assert store_options <= set(params)
    assert {"serializer", "format", "readonly", "lock_timeout", "max_staleness"} <= set(params)


def test_public_methods_have_docstrings() -> None:
    classes: list[type] = [mpkv.Store, mpkv.Transaction]
    if HAVE_REDIS:
        classes += [mpkv.RedisStore, mpkv.RedisTransaction]
    names = ["get", "put", "delete", "incr", "transaction", "watch", "compact", "refresh",
             "serialize", "deserialize", "close", "update", "pop", "popitem", "setdefault",
             "clear", "position"]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name in names
               if hasattr(cls, name) and not (getattr(cls, name).__doc__ or "").strip()]
    assert missing == []
    assert mpkv.open.__doc__ and mpkv.Store.__doc__


def test_repr_shows_readonly(opener: Opener) -> None:
    opener()["k"] = "v"
    r = opener(readonly=True)
    assert repr(r).endswith(" readonly>") and not repr(opener()).endswith(" readonly>")


def test_watch_yields_decoded_json_values(opener: Opener) -> None:
    s = opener(serializer="json")
    changes = s.watch(timeout=5)
    s["a"] = {"x": [1, 2]}
    del s["a"]
    first, second = next(changes), next(changes)
    assert first.value == {"x": [1, 2]} and tuple(first) == ("a", {"x": [1, 2]})
    assert second.deleted and second.value is None


TYPED_USE = '''
from pathlib import Path

import mpkv

reveal_type(mpkv.open("some/dir"))
reveal_type(mpkv.open(Path("some/dir"), serializer="json"))
reveal_type(mpkv.open(mpkv.RedisURL("redis://localhost:6379/0?namespace=app")))
with mpkv.open("some/dir") as store:
    reveal_type(store.incr("k"))
    with store.transaction() as tx:
        reveal_type(tx)
mpkv.open("some/dir", serialiser="json")  # a typo an IDE now catches
'''


def test_type_checkers_see_store_for_paths_and_redisstore_for_redis_urls(
        tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    (tmp_path / "use.py").write_text(TYPED_USE)
    env = {**os.environ, "MYPYPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                        "--cache-dir", str(tmp_path / "cache"), "use.py"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    revealed = [line.split("Revealed type is ")[1] for line in r.stdout.splitlines()
                if "Revealed type is" in line]
    assert revealed == ['"mpkv.store.Store"', '"mpkv.store.Store"',
                        '"mpkv.redis_store.RedisStore"', '"int"',
                        '"mpkv.store.Transaction"'], r.stdout
    assert "use.py:13: error: No overload variant" in r.stdout, r.stdout  # the typo
