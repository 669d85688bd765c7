"""The Redis backend (``mpkv.open("redis://...")``) on real ``redis-server`` processes.

One set of contract tests runs against both backends (a file store in ``tmp_path`` and a
Redis namespace of its own), then Redis-specific ones: several processes on one server,
a server killed and restarted with ``appendfsync always``, connections dropped in the
middle of transactions, and clear errors for a wrong URL or a server that is down.

The fixtures start their own servers on free ports of 127.0.0.1 (never any other host)
and stop them afterwards. Without the ``redis`` package or a ``redis-server`` binary the
whole module is skipped.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

import mpkv  # noqa: E402
from mpkv.redis_store import RedisConnectionError, RedisStore, RedisURLError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
HOST = "127.0.0.1"


# --- servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """A redis-server child process on a loopback port, its files in ``dir``."""

    def __init__(self, dir: Path, *options: str) -> None:
        self.dir = dir
        self.options = options
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        for _ in range(5):  # another process may take the free port before redis binds it
            if not self.port or self.proc is not None:
                self.port = self.port or free_port()
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", HOST, "--dir",
                 str(self.dir), "--save", "", "--appendonly", "no", *self.options,
                 "--logfile", str(self.dir / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60  # generous: the machine may be loaded
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if redis.Redis(host=HOST, port=self.port, socket_timeout=1).ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.02)
            self.stop()
            self.port = 0
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def url(self, namespace: str | None = None) -> str:
        return f"redis://{HOST}:{self.port}/0?namespace={namespace or uuid.uuid4().hex}"

    def admin(self) -> Any:
        return redis.Redis(host=HOST, port=self.port)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def url(server: Server) -> str:
    return server.url()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Stores to close at the end of the test."""
    stores: list[Any] = []
    yield stores
    for s in stores:
        s.close()


Opener = Callable[..., Any]


@pytest.fixture(params=["file", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path, closing: list[Any]) -> Opener:
    """Opens handles on one store of the backend under test: ``opener(**options)``."""
    redis_ = request.param == "redis"
    target = request.getfixturevalue("url") if redis_ else str(tmp_path / "store")

    def open_(**options: Any) -> Any:
        store = mpkv.open(target, **options)
        closing.append(store)
        return store

    return open_


# --- the contract, on both backends ------------------------------------------------------


def test_put_get_delete(opener: Opener) -> None:
    s = opener()
    assert s.get("k") is None and s.get("k", "d") == "d"
    s.put("k", "v")
    assert s.get("k") == "v" and s["k"] == "v"
    s["k"] = "w"
    assert s["k"] == "w"
    assert s.delete("k") is True
    assert s.delete("k") is False
    assert "k" not in s and s.get("k") is None


def test_mutable_mapping(opener: Opener) -> None:
    s = opener()
    with pytest.raises(KeyError):
        s["missing"]
    with pytest.raises(KeyError):
        del s["missing"]
    s.update({"a": "1", "b": "2", "c": "3"})
    assert len(s) == 3 and sorted(s) == ["a", "b", "c"] and "a" in s
    assert sorted(s.keys()) == ["a", "b", "c"]
    assert sorted(s.values()) == ["1", "2", "3"]
    assert sorted(s.items()) == [("a", "1"), ("b", "2"), ("c", "3")]
    del s["a"]
    assert s.pop("b") == "2" and s.setdefault("d", "4") == "4" and s.setdefault("d", "x") == "4"
    assert dict(s.items()) == {"c": "3", "d": "4"}


def test_values_keep_their_type(opener: Opener) -> None:
    s = opener()
    cases: dict[str, str | bytes] = {
        "": "empty key", "str": "text", "bytes": b"\x00\xffraw", "empty str": "",
        "empty bytes": b"", "unicode ключ ✓": "значение ✓", "a|b\nc": "line\nbreak|pipe",
        "big": "x" * 1_000_000, "looks tagged": "s", "looks tagged b": b"b",
    }
    for k, v in cases.items():
        s[k] = v
    other = opener()
    for store in (s, other):
        for k, v in cases.items():
            got = store[k]
            assert got == v and type(got) is type(v), k
    assert dict(other.items()) == cases


def test_bad_keys_and_values_write_nothing(opener: Opener) -> None:
    s = opener()
    s["k"] = "v"
    for key, value in ((1, "v"), (None, "v"), ("k", 1.5), ("k", None), ("k", bytearray(b"x")),
                       (b"k", "v")):
        with pytest.raises(TypeError):
            s.put(key, value)
    with pytest.raises(TypeError):
        s[b"k"] = "v"
    for key, value in (("\ud800", "v"), ("k", "\udfff")):
        with pytest.raises(ValueError):
            s.put(key, value)
    with pytest.raises(TypeError), s.transaction() as tx:
        tx["ok"] = "1"
        tx["bad"] = 2
    assert dict(s.items()) == {"k": "v"}


def test_read_after_write_across_handles(opener: Opener) -> None:
    a, b = opener(), opener()
    for i in range(20):
        a[f"k{i}"] = str(i)
        assert b[f"k{i}"] == str(i)
        b[f"k{i}"] = f"b{i}"
        assert a[f"k{i}"] == f"b{i}"


def test_refresh_and_manual_staleness(opener: Opener) -> None:
    writer, manual = opener(), opener(max_staleness=None)
    writer["config"] = "v1"
    assert manual.get("config") is None and len(manual) == 0
    assert manual.refresh() == 1
    assert manual.get("config") == "v1"
    assert manual.refresh() == 0
    manual["note"] = "mine"
    assert manual["note"] == "mine" and writer["note"] == "mine"
    writer["config"] = "v2"
    writer["more"] = "x"
    with writer.transaction() as tx:
        tx["config"] = "v3"
        tx["tx"] = "y"
    assert manual["config"] == "v1"
    assert manual.refresh() == 3
    assert dict(manual.items()) == dict(writer.items())


def test_max_staleness_bounds_the_delay(opener: Opener) -> None:
    writer, lazy = opener(), opener(max_staleness=0.2)
    assert lazy.get("k") is None
    writer["k"] = "v"
    time.sleep(0.25)
    assert lazy.get("k") == "v"


def test_transaction_commit_and_abort(opener: Opener) -> None:
    s = opener()
    s.update({"alice": "100", "bob": "20"})

    def transfer(src: str, dst: str, amount: int) -> None:
        with s.transaction() as tx:
            balance = int(tx[src])
            if balance < amount:
                raise ValueError(f"{src} has only {balance}")
            tx[src] = str(balance - amount)
            tx[dst] = str(int(tx.get(dst, "0")) + amount)

    transfer("alice", "bob", 30)
    with pytest.raises(ValueError):
        transfer("bob", "carol", 1000)
    assert dict(s.items()) == {"alice": "70", "bob": "50"}


def test_transaction_view(opener: Opener) -> None:
    s, other = opener(), opener()
    other["x"] = "1"
    with s.transaction() as tx:
        assert tx["x"] == "1" and "x" in tx and "nope" not in tx
        tx["y"] = "2"
        assert tx["y"] == "2"
        assert tx.delete("x") is True and tx.get("x") is None
        assert tx.delete("never") is False
        with pytest.raises(KeyError):
            del tx["never"]
        assert other.get("y") is None and other["x"] == "1"  # not visible before commit
    assert dict(other.items()) == {"y": "2"}


def test_put_inside_transaction_does_not_deadlock(opener: Opener) -> None:
    s = opener(lock_timeout=5)
    other = opener()
    with s.transaction() as tx:
        tx["a"] = "tx"
        s.put("b", "direct")  # joins the transaction
        assert tx["b"] == "direct" and s["b"] == "direct"
        assert other.get("b") is None
    assert s["a"] == "tx" and s["b"] == "direct" and other["b"] == "direct"


def test_nested_transaction_commits_with_the_outermost_block(opener: Opener) -> None:
    s, other = opener(), opener()
    with s.transaction() as outer:
        outer["a"] = "1"
        with s.transaction() as inner:
            inner["b"] = "2"
        assert other.get("b") is None and other.get("a") is None
        assert outer["b"] == "2"
    assert (other["a"], other["b"]) == ("1", "2")


def test_lock_timeout(opener: Opener) -> None:
    s = opener()
    impatient = opener(lock_timeout=0.1)
    with s.transaction():
        start = time.monotonic()
        with pytest.raises(mpkv.LockTimeout):
            impatient["k"] = "late"
        with pytest.raises(mpkv.LockTimeout), impatient.transaction():
            pass
        assert time.monotonic() - start < 3
    impatient["k"] = "now"
    assert s["k"] == "now"


def test_transactions_serializable_across_threads(opener: Opener) -> None:
    handles = [opener() for _ in range(4)]
    handles[0]["n"] = "0"

    def work(h: Any) -> None:
        for _ in range(40):
            with h.transaction() as tx:
                tx["n"] = str(int(tx["n"]) + 1)

    threads = [threading.Thread(target=work, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handles[0]["n"] == "160"


def test_serialize_deserialize(opener: Opener, tmp_path: Path) -> None:
    s = opener()
    backup = tmp_path / "backup.mpkv"
    s.update({"a": "1", "b": b"\x00\x01", "": ""})
    s.serialize(backup)
    s["a"] = "changed"
    s["c"] = "added"
    watch = s.watch(timeout=0.3)
    s.deserialize(backup)
    assert dict(s.items()) == {"a": "1", "b": b"\x00\x01", "": ""}
    assert sorted(watch) == [("a", "1"), ("c", None)]  # only the differences
    other = opener()
    assert other["b"] == b"\x00\x01"
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a snapshot at all")
    with pytest.raises(mpkv.FormatError):
        s.deserialize(junk)
    assert dict(s.items()) == {"a": "1", "b": b"\x00\x01", "": ""}


def test_watch_in_commit_order(opener: Opener) -> None:
    s = opener()
    s["job:0"] = "before the call: not reported"
    # A long idle timeout, so that a producer thread slowed down by a loaded machine is
    # not taken for the end of the changes; the count of expected ones ends the read.
    changes = s.watch("job:", timeout=60)
    other = opener()

    def producer() -> None:
        other["job:1"] = "queued"
        other["log:1"] = "not matched by the prefix"
        with other.transaction() as tx:
            tx["job:1"] = "running"
            tx["job:2"] = "queued"
        del other["job:1"]
        for i in range(50):
            other[f"job:n{i}"] = str(i)

    expected = [("job:1", "queued"), ("job:1", "running"), ("job:2", "queued"),
                ("job:1", None)] + [(f"job:n{i}", str(i)) for i in range(50)]
    thread = threading.Thread(target=producer)
    thread.start()
    got = list(itertools.islice(changes, len(expected)))
    thread.join()
    assert got == expected
    assert list(s.watch("job:", since=got[-1].position, timeout=0)) == [], "more came after"


def test_watch_ends_after_timeout(opener: Opener) -> None:
    s = opener()
    start = time.monotonic()
    assert list(s.watch(timeout=0.2)) == []
    assert 0.15 < time.monotonic() - start < 2


def test_closed_error(opener: Opener) -> None:
    s = opener()
    s["k"] = "v"
    s.close()
    s.close()  # twice is fine
    for use in (lambda: s.get("k"), lambda: s.put("k", "v"), lambda: len(s),
                lambda: list(s), lambda: s.delete("k"), lambda: s.refresh(),
                lambda: s.watch(), lambda: s.transaction().__enter__()):
        with pytest.raises(mpkv.ClosedError):
            use()



def test_watcher_iterated_after_close_raises_closed_error(opener: Opener) -> None:
    s = opener()
    changes = s.watch(timeout=5)
    s.close()
    with pytest.raises(mpkv.ClosedError):
        next(changes)

def test_readonly(opener: Opener, tmp_path: Path) -> None:
    s = opener()
    s["k"] = "v"
    s.serialize(tmp_path / "snap")
    r = opener(readonly=True)
    assert r["k"] == "v"
    for write in (lambda: r.put("k", "x"), lambda: r.delete("k"), lambda: r.__delitem__("k"),
                  lambda: r.transaction().__enter__(), lambda: r.deserialize(tmp_path / "snap")):
        with pytest.raises(mpkv.ReadOnlyError):
            write()
    assert s["k"] == "v"


def test_pickle_reopens(opener: Opener) -> None:
    s = opener(lock_timeout=3)
    copy = pickle.loads(pickle.dumps(s))
    try:
        copy["via-pickle"] = "yes"
        assert s["via-pickle"] == "yes" and copy.lock_timeout == 3
    finally:
        copy.close()


def _child_put(store: Any) -> None:
    store["from-child"] = str(os.getpid())


def test_fork_child_uses_inherited_store(opener: Opener) -> None:
    s = opener()
    s["parent"] = "1"
    p = multiprocessing.get_context("fork").Process(target=_child_put, args=(s,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert "from-child" in s and s["parent"] == "1"
    s["after"] = "2"
    assert s["after"] == "2"


def _child_put_expecting_lock_timeout(store: Any) -> None:
    try:
        store["from-child"] = "must wait for the parent's transaction"
    except mpkv.LockTimeout:
        os._exit(7)
    os._exit(0)


def test_fork_inside_a_transaction_does_not_inherit_it(opener: Opener) -> None:
    s = opener(lock_timeout=0.3)
    with s.transaction() as tx:
        tx["parent"] = "tx"
        p = multiprocessing.get_context("fork").Process(
            target=_child_put_expecting_lock_timeout, args=(s,))
        p.start()
        p.join(30)
        assert p.exitcode == 7  # the child is another writer: it waits, then gives up
    assert s["parent"] == "tx" and "from-child" not in s


def test_iteration_while_others_write(opener: Opener) -> None:
    s, writer = opener(), opener()
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            with writer.transaction() as tx:
                tx[f"a{i % 50}"] = str(i)
                tx[f"b{i % 50}"] = str(i)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(30):
            items = dict(s.items())
            for j in range(50):  # a transaction is seen whole or not at all
                assert items.get(f"a{j}") == items.get(f"b{j}")
            len(s)
            list(s)
    finally:
        stop.set()
        thread.join()


# --- Redis only -----------------------------------------------------------------------


def test_import_mpkv_does_not_import_redis() -> None:
    code = ("import sys, mpkv, mpkv.cli\n"
            "assert 'redis' not in sys.modules, 'redis imported'\n"
            "assert mpkv.RedisStore.__name__ == 'RedisStore' and 'redis' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=60)


def test_without_the_redis_package_a_url_says_what_to_install() -> None:
    code = ("import sys\n"
            "sys.modules['redis'] = None  # as if not installed\n"
            "import mpkv\n"
            "try:\n"
            "    mpkv.open('redis://127.0.0.1:1/0')\n"
            "except ImportError as exc:\n"
            "    assert \"pip install 'mpkv[redis]'\" in str(exc), exc\n"
            "else:\n"
            "    raise AssertionError('no ImportError')\n"
            "from mpkv.cli import main\n"
            "sys.exit(main(['get', 'redis://127.0.0.1:1/0', 'k']))\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "mpkv[redis]" in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_open_dispatches_urls_and_keeps_namespaces_apart(server: Server,
                                                         closing: list[Any]) -> None:
    ns1, ns2 = uuid.uuid4().hex, uuid.uuid4().hex
    a, b = mpkv.open(server.url(ns1)), mpkv.RedisStore(server.url(ns2))
    closing += [a, b]
    assert isinstance(a, RedisStore) and isinstance(a, mpkv.RedisStore)
    a["k"], b["k"] = "a", "b"
    assert (a["k"], b["k"]) == ("a", "b") and len(a) == len(b) == 1
    keys = sorted(server.admin().keys(f"mpkv:{{{ns1}}}:*"))
    assert keys == [f"mpkv:{{{ns1}}}:{n}".encode() for n in ("data", "log", "meta", "seq")]
    assert server.admin().type(f"mpkv:{{{ns1}}}:data") == b"hash"
    default = mpkv.open(f"redis://{HOST}:{server.port}")
    closing.append(default)
    assert default.namespace == "default" and "127.0.0.1" in repr(default)


def test_options_that_do_not_apply(url: str) -> None:
    for bad in ({"fsync": "always"}, {"format": "text"}, {"max_segment_bytes": 100},
                {"lock_ttl": 0}, {"stream_maxlen": 0}, {"max_staleness": -1}):
        with pytest.raises(ValueError):
            mpkv.open(url, **bad)
    with pytest.raises(RedisURLError):
        mpkv.open(f"redis://{HOST}:6379/0?namespace=a{{b}}")
    mpkv.open(url, format="binary").close()


def test_scripts_flushed_from_the_server_are_loaded_again(server: Server, url: str,
                                                          closing: list[Any]) -> None:
    s = mpkv.open(url)
    closing.append(s)
    server.admin().script_flush()
    s["k"] = "v"
    server.admin().script_flush()
    with s.transaction() as tx:
        tx["k2"] = tx["k"]
    assert dict(s.items()) == {"k": "v", "k2": "v"}


def test_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    if len(str(sock)) > 100:  # the limit of a unix socket path is about 107 bytes
        sock = Path(tempfile.mkdtemp(prefix="mpkv-", dir="/tmp")) / "redis.sock"
    srv = Server(tmp_path, "--unixsocket", str(sock)).start()
    try:
        with mpkv.RedisStore(f"unix://{sock}?db=1&namespace=u") as s:
            s["k"] = b"v"
            assert s["k"] == b"v" and "?db=1&namespace=u" in s.path
    finally:
        srv.stop()


def test_not_an_mpkv_namespace(server: Server) -> None:
    ns = uuid.uuid4().hex
    server.admin().set(f"mpkv:{{{ns}}}:data", "a string, not a hash")
    with pytest.raises(mpkv.FormatError, match="not an mpkv hash"):
        mpkv.open(server.url(ns))


def test_delete_of_a_missing_key_is_logged_but_del_writes_nothing(url: str,
                                                                  closing: list[Any]) -> None:
    s = mpkv.open(url)
    closing.append(s)
    changes = s.watch(timeout=0.3)
    assert s.delete("ghost") is False
    with pytest.raises(KeyError):
        del s["ghost2"]
    assert list(changes) == [("ghost", None)]


WORKER = r"""
import sys
import mpkv
url, count = sys.argv[1], int(sys.argv[2])
with mpkv.open(url) as store:
    for _ in range(count):
        with store.transaction() as tx:
            tx["counter"] = str(int(tx.get("counter", "0")) + 1)
        store["last:" + str(__import__("os").getpid())] = "done"
"""


def test_four_processes_transactional_increments(url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, "100"], env=ENV)
             for _ in range(4)]
    for p in procs:
        assert p.wait(120) == 0
    with mpkv.open(url) as s:
        assert s["counter"] == "400"
        assert sum(k.startswith("last:") for k in s) == 4


def test_restart_with_aof_always_loses_nothing_acknowledged(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        url = srv.url("durable")
        store = mpkv.open(url, lock_ttl=1)
        acked: list[int] = []
        errors: list[Exception] = []

        def write() -> None:
            i = 0
            while True:
                try:
                    if i % 2:
                        store[f"p{i}"] = str(i)
                    else:
                        with store.transaction() as tx:
                            tx[f"a{i}"] = str(i)
                            tx[f"b{i}"] = str(i)
                except mpkv.Error as exc:
                    errors.append(exc)
                    return
                acked.append(i)
                i += 1

        thread = threading.Thread(target=write)
        thread.start()
        # Killed once over 50 writes were acknowledged (and 0.8 s passed), however slowly
        # a loaded machine lets the always-fsyncing server go; the cap only stops a hang.
        started = time.monotonic()
        while (time.monotonic() - started < 0.8 or len(acked) <= 50) and not errors:
            assert time.monotonic() - started < 120, f"only {len(acked)} writes in 120 s"
            time.sleep(0.01)
        srv.stop(signal.SIGKILL)
        thread.join(30)
        assert isinstance(errors[0], RedisConnectionError), errors
        assert f"127.0.0.1:{srv.port}" in str(errors[0])
        assert len(acked) > 50
        srv.start()
        with mpkv.open(url) as fresh:
            items = dict(fresh.items())
        for i in acked:
            if i % 2:
                assert items[f"p{i}"] == str(i)
            else:
                assert items[f"a{i}"] == items[f"b{i}"] == str(i)
        for key in items:  # nothing half committed, nothing beyond the write in flight
            i = int(key[1:])
            assert i <= len(acked)
            if key[0] in "ab":
                assert items[f"a{i}"] == items[f"b{i}"]
        store["after"] = "restart"  # the old handle reconnects by itself
        assert store["after"] == "restart"
        store.close()
    finally:
        srv.stop()


def test_client_connections_killed_mid_transaction(server: Server, url: str,
                                                   closing: list[Any]) -> None:
    s = mpkv.open(url, lock_ttl=1)
    closing.append(s)
    admin = server.admin()
    with s.transaction() as tx:
        tx["a"] = "1"
        assert tx.get("x") is None
        admin.client_kill_filter(_type="normal", skipme=True)
        tx["b"] = "2"
    assert (s.get("a"), s.get("b")) == ("1", "2")

    # Connections killed over and over while transactions run: each one is all or
    # nothing, and every acknowledged one is there.
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            admin.client_kill_filter(_type="normal", skipme=True)
            time.sleep(0.003)

    thread = threading.Thread(target=killer)
    thread.start()
    acked, failed = [], 0
    try:
        # At least 1.5 s, and on until a transaction was cut and one got through (a
        # loaded machine may fit neither into 1.5 s); the cap only stops a hang.
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 1.5 or not (failed and acked):
            assert time.monotonic() - started < 120, (
                f"in 120 s: {len(acked)} transactions acknowledged, {failed} failed")
            try:
                with s.transaction() as tx:
                    tx[f"x{i}"] = str(i)
                    tx.get(f"x{i - 1}")
                    tx[f"y{i}"] = str(i)
                acked.append(i)
            except mpkv.Error:
                failed += 1
            i += 1
    finally:
        stop.set()
        thread.join()
    items = dict(s.items())
    for j in range(i):
        assert items.get(f"x{j}") == items.get(f"y{j}")
    assert all(items[f"x{j}"] == str(j) for j in acked)
    assert failed > 0 and acked  # the test did drop connections, and work went on


HOLDER = r"""
import sys, time
import mpkv
store = mpkv.open(sys.argv[1], lock_ttl=1)
with store.transaction() as tx:
    for i in range(100):
        tx[f"half{i}"] = "x"
    print("inside", flush=True)
    time.sleep(60)
"""


def test_client_killed_mid_transaction_leaves_nothing(url: str) -> None:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, url], env=ENV, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "inside\n"
        with mpkv.open(url, lock_timeout=0.1) as s, pytest.raises(mpkv.LockTimeout):
            s["blocked"] = "while the holder lives"
        p.kill()
        p.wait(10)
        start = time.monotonic()
        with mpkv.open(url, lock_timeout=10) as s:
            with s.transaction() as tx:  # the dead client's lock expires (lock_ttl=1)
                tx["after"] = "ok"
            assert time.monotonic() - start < 3
            assert list(s) == ["after"]
    finally:
        p.kill()
        p.wait(10)


def test_exception_in_transaction_releases_the_lock(url: str, closing: list[Any]) -> None:
    s, other = mpkv.open(url), mpkv.open(url, lock_timeout=1)
    closing += [s, other]
    with pytest.raises(RuntimeError), s.transaction() as tx:
        tx["k"] = "v"
        raise RuntimeError("boom")
    other["k2"] = "free at once"
    assert dict(s.items()) == {"k2": "free at once"}


def test_wrong_url_or_server_down(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RedisConnectionError, match=f"127.0.0.1:{port}"):
        mpkv.open(f"redis://{HOST}:{port}/0?namespace=x")
    assert time.monotonic() - start < 3
    with pytest.raises(RedisURLError):
        mpkv.open(f"redis://{HOST}:notaport/0")
    with pytest.raises(mpkv.Error, match="database"):
        mpkv.open(f"redis://{HOST}:{port}/zero")

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind((HOST, 0))
        silent.listen(8)
        silent_port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RedisConnectionError, match=f"127.0.0.1:{silent_port}"):
            mpkv.open(f"redis://{HOST}:{silent_port}/0?namespace=x&socket_timeout=1")
        assert time.monotonic() - start < 4

    srv = Server(tmp_path).start()
    store = mpkv.open(srv.url())
    store["k"] = "v"
    srv.stop()
    start = time.monotonic()
    for use in (lambda: store.get("k"), lambda: store.put("k", "w"), lambda: len(store),
                lambda: store.transaction().__enter__(), lambda: list(store.watch(timeout=1))):
        with pytest.raises(RedisConnectionError, match=f"127.0.0.1:{srv.port}"):
            use()
    assert time.monotonic() - start < 5
    store.close()


def test_watch_reports_a_gap_and_views_reload_after_trimming(url: str,
                                                            closing: list[Any]) -> None:
    s = mpkv.open(url, stream_maxlen=10)
    manual = mpkv.open(url, max_staleness=None)
    closing += [s, manual]
    changes = s.watch(timeout=0.5)
    for i in range(500):
        s[f"k{i % 7}"] = str(i)
    with pytest.raises(mpkv.CompactedError, match="trimmed"):
        list(changes)
    assert manual.refresh() == 500
    assert dict(manual.items()) == dict(s.items())


def test_staleness_view_with_several_threads(url: str, closing: list[Any]) -> None:
    """Own writes of many threads through one lazy handle land in commit order."""
    lazy = mpkv.open(url, max_staleness=None)
    other = mpkv.open(url)
    closing += [lazy, other]

    def work(t: int) -> None:
        for i in range(30):
            lazy[f"t{t}"] = str(i)
            other[f"o{t}"] = str(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in range(4):
        assert lazy[f"t{t}"] == "29"
    lazy.refresh()
    assert dict(lazy.items()) == dict(other.items())


def test_cli_takes_a_redis_url(url: str, tmp_path: Path) -> None:
    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mpkv", *args], input=input, text=True,
                              capture_output=True, env=ENV, timeout=60)

    assert run("put", url, "greeting", "hello").returncode == 0
    r = run("get", url, "greeting")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    r = run("get", url, "nothing")
    assert r.returncode == 1 and "not found" in r.stderr
    assert run("list", url).stdout == "greeting\n"
    dump = run("dump", url).stdout
    other = url.replace("namespace=", "namespace=copy-")
    assert run("load", other, input=dump).returncode == 0
    assert run("dump", other).stdout == dump
    snap = str(tmp_path / "snap")
    assert run("backup", url, snap).returncode == 0
    assert run("delete", url, "greeting").returncode == 0
    assert run("restore", url, snap).returncode == 0
    assert run("get", url, "greeting").stdout == "hello\n"
    r = run("watch", url, "--timeout", "0.2")
    assert (r.returncode, r.stdout) == (0, "")
    for command in ("stats", "verify", "repair", "compact"):
        r = run(command, url)
        assert r.returncode == 1 and "does not apply to redis" in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    r = run("get", f"redis://{HOST}:{free_port()}/0", "k")
    assert r.returncode == 1 and "cannot connect" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


# --- change feed: Change, positions, since, CompactedError --------------------------------


def test_redis_watch_yields_changes_with_positions_that_resume(url: str,
                                                               closing: list[Any]) -> None:
    s = mpkv.open(url)
    closing.append(s)
    start = s.position()
    changes = s.watch(timeout=0.3)
    s["a"] = "1"
    with s.transaction() as tx:
        tx["b"] = b"\x00"
        del tx["a"]
    got = list(changes)
    assert got == [("a", "1"), ("b", b"\x00"), ("a", None)]
    assert all(isinstance(c, mpkv.Change) for c in got)
    assert [c.deleted for c in got] == [False, False, True]
    positions = [c.position for c in got]
    assert start < positions[0] and positions == sorted(positions)
    assert s.position() == positions[-1]
    for n, change in enumerate(got):
        assert list(s.watch(since=change.position, timeout=0)) == got[n + 1:]
    assert list(s.watch(since=start, timeout=0)) == got
    with pytest.raises(ValueError, match="since"):
        s.watch(since="000000000001-000000000000-0000000000-0000000000")


def test_redis_watch_since_a_trimmed_position_raises_compacted_error(
        url: str, closing: list[Any]) -> None:
    s = mpkv.open(url, stream_maxlen=10)
    closing.append(s)
    s["a"] = "1"
    old = s.position()
    for i in range(500):
        s[f"k{i % 7}"] = str(i)
    with pytest.raises(mpkv.CompactedError):
        next(iter(s.watch(since=old, timeout=0)))
    assert list(s.watch(since=s.position(), timeout=0)) == []


def test_update_takes_a_key_named_self_as_a_keyword(opener: Opener) -> None:
    s = opener()
    s.update(self="1")
    with s.transaction() as tx:
        tx.update(self="2")
    assert dict(s) == {"self": "2"}
