"""The Store API on a Redis server, for workers spread over several machines.

A directory of files and ``flock`` serve the processes of one machine; when workers
spread over several, the data has to live in a server they all reach. This module keeps
mpkv's API and puts the data in Redis (``mpkv.open("redis://host:port/db?namespace=N")``).

Layout of one namespace ``N`` (every key carries the hash tag ``{N}``, so Redis Cluster
keeps a namespace in one slot and a script may touch all of them atomically):

- ``mpkv:{N}:data``: a hash, key -> value tagged ``s`` (UTF-8 str) or ``b`` (bytes);
- ``mpkv:{N}:log``: a stream, one entry per change, id ``<commit>-<index in commit>``,
  fields ``k`` (key) and ``v`` (tagged value; absent for a delete): what ``watch()``
  and the local views of ``max_staleness > 0`` read;
- ``mpkv:{N}:seq``: the number of the last commit;
- ``mpkv:{N}:lock``: the transaction lock, a random token with an expiry;
- ``mpkv:{N}:meta``: a hash; field ``serializer`` (``raw`` or ``json``) is recorded by
  the first writable handle to open the namespace (``raw`` when it already holds data
  from before the field existed) and never changed. Values of a JSON namespace are
  stored as the tagged str of their JSON text.

Every write is one Lua script (atomic: the hash, the stream and the counter change
together or not at all, also in the AOF). A transaction holds the lock for its whole
block, so it is serializable whatever the block does between its reads and writes; plain
writes run the same script, which refuses (and the client waits) while another client's
transaction holds the lock. docs/scale-out.md explains the choices.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
import uuid
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
)
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mpkv's Redis store needs the redis package: "
                      "pip install 'mpkv[redis]'") from exc

from . import snapshot
from .codec import Op, Value
from .common import check_options, fork_epoch
from .errors import (
    ClosedError,
    CompactedError,
    CorruptionError,
    Error,
    FormatError,
    LockTimeout,
    ReadOnlyError,
)
from .mapping import (
    MISSING,
    StoreMapping,
    TransactionMapping,
    open_block,
    savepoint,
    update_pairs,
)
from .serializer import serializer_for
from .watch import Change, check_prefix, check_timeout

SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_NAMESPACE = "default"
DEFAULT_LOCK_TTL = 5.0
DEFAULT_STREAM_MAXLEN = 100_000
_MAX_SUB = 2**64 - 1  # the largest stream id sequence part: "after all of commit N"

# KEYS: data, log, seq, lock. ARGV: token, mode, maxlen, then key/value pairs (value ""
# deletes). Modes: "p" plain write; "x" delete only if the key exists; "t" commit of a
# transaction holding the lock; "r" the same, then release the lock. Returns
# -1 when another client's transaction holds the lock, -2 when this transaction lost its
# lock (nothing written either way), else 2 * commit number + whether the last op's key
# existed (0 when mode "x" found no key and wrote nothing). Nothing can fail after the
# first write (a script is not rolled back). The stream is trimmed (to about maxlen
# entries, never into this commit) every 64 commits, and after any commit of 64+ ops.
_COMMIT = """
local lock = redis.call('GET', KEYS[4])
local mode = ARGV[2]
if mode == 't' or mode == 'r' then
  if lock ~= ARGV[1] then return -2 end
elseif lock and lock ~= ARGV[1] then
  return -1
end
if mode == 'x' and redis.call('HEXISTS', KEYS[1], ARGV[4]) == 0 then return 0 end
local seq = redis.call('INCR', KEYS[3])
if seq == 1 then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then
    seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1
    redis.call('SET', KEYS[3], seq)
  end
end
local existed = 0
local n = 0
for i = 4, #ARGV, 2 do
  local id = string.format('%d-%d', seq, n)
  if ARGV[i + 1] == '' then
    existed = redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('XADD', KEYS[2], id, 'k', ARGV[i])
  else
    existed = 1 - redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('XADD', KEYS[2], id, 'k', ARGV[i], 'v', ARGV[i + 1])
  end
  n = n + 1
end
local maxlen = tonumber(ARGV[3])
if maxlen > 0 and (seq % 64 == 0 or n >= 64) then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', math.max(maxlen, n))
end
if mode == 'r' then redis.call('DEL', KEYS[4]) end
return 2 * seq + existed
"""
# KEYS: lock. ARGV: token, op ("a" acquire, "k" keep alive, "r" release), ttl in ms.
# Returns 1 when the token holds the lock (after "a" or "k"), or released it. Every op
# is idempotent, so one lost reply can be retried safely.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == 'a' and not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
if holder ~= ARGV[1] then return 0 end
if ARGV[2] == 'r' then redis.call('DEL', KEYS[1]) return 1 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: meta, data, log. ARGV: the serializer to record ("" records nothing: readonly).
# Returns the namespace's serializer.
_META = """
local s = redis.call('HGET', KEYS[1], 'serializer')
if s then return s end
if ARGV[1] == '' then return 'raw' end
s = ARGV[1]
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then s = 'raw' end
redis.call('HSET', KEYS[1], 'serializer', s)
return s
"""
_SHA = {name: hashlib.sha1(text.encode()).hexdigest().encode()
        for name, text in (("commit", _COMMIT), ("lock", _LOCK))}


def _arg(value: bytes) -> bytes:
    """One bulk string of the Redis protocol (RESP)."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class RedisConnectionError(Error):
    """The Redis server cannot be reached: wrong address, down, or gone mid-operation.
    A write that fails this way may or may not have been applied."""


class RedisURLError(Error, ValueError):
    """The URL is not a usable ``redis://host:port/db?namespace=NAME``."""


class LockLost(LockTimeout):
    """A transaction's lock expired before it committed (the lock refresher could not
    run for ``lock_ttl`` seconds); nothing of the transaction was written."""


def _enc_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"key is not encodable as UTF-8: {exc}") from None


def _enc_value(value: object) -> bytes:
    """The stored form: a one-byte type tag, so ``get`` returns the type that was put."""
    if isinstance(value, str):
        try:
            return b"s" + value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"value is not encodable as UTF-8: {exc}") from None
    if isinstance(value, bytes):
        return b"b" + value
    raise TypeError(f"value must be str or bytes, not {type(value).__name__}")


def _dec_value(raw: bytes) -> Value:
    tag = raw[:1]
    if tag == b"s":
        return raw[1:].decode("utf-8")
    if tag == b"b":
        return raw[1:]
    raise FormatError(f"not an mpkv value (no type tag): {raw[:20]!r}")


def _token(commit: int, index: int) -> str:
    """A stream id as a position that sorts as a string (docs/scale-out.md)."""
    return f"{commit:020d}-{index:020d}"


def _parse_token(token: object) -> tuple[int, int]:
    commit, _, index = token.partition("-") if isinstance(token, str) else ("", "", "")
    if len(commit) != 20 or len(index) != 20 or not (commit + index).isdigit() \
            or int(index) > _MAX_SUB:
        raise ValueError(f"since: not a position of a Redis store: {token!r} (expected a "
                         "token from Change.position or store.position())")
    return int(commit), int(index)


def _parse_id(entry_id: bytes) -> tuple[int, int]:
    commit, _, index = entry_id.partition(b"-")
    return int(commit), int(index)


def _parse_url(url: str) -> tuple[str, str, str]:
    """Split off mpkv's query parameter: (url for redis-py, namespace, address shown in
    messages, without credentials)."""
    if not url.startswith(SCHEMES):
        raise RedisURLError(f"{_redact(url)!r}: a Redis URL starts with redis://, rediss:// "
                            "or unix://")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        namespace = DEFAULT_NAMESPACE
        rest = []
        for name, value in query:
            if name == "namespace":
                namespace = value
            else:
                rest.append((name, value))
        dbs = [v for n, v in rest if n == "db"]
        if parts.scheme == "unix":
            address = f"unix://{parts.path}"
        else:
            host, port = parts.hostname or "localhost", parts.port or 6379
            address = f"{parts.scheme}://{host}:{port}"
            if parts.path.strip("/"):
                if dbs:
                    raise ValueError("the database is given twice (path and ?db=)")
                dbs = [parts.path.strip("/")]
        if dbs:
            if not dbs[0].isdigit():
                raise ValueError(f"the database must be a number >= 0, not {dbs[0]!r}")
            address += f"{'?db=' if parts.scheme == 'unix' else '/'}{int(dbs[0])}"
    except ValueError as exc:
        raise RedisURLError(f"bad Redis URL {_redact(url)!r}: {exc}") from None
    if not namespace or "{" in namespace or "}" in namespace:
        raise RedisURLError(f"bad namespace {namespace!r} in {address}: it must be non-empty "
                            "and without braces (it is the keys' cluster hash tag)")
    query_rest = urlencode(rest)
    clean = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query_rest}" if rest else "")
    return clean, namespace, address


#: Query parameters whose value is a credential: never shown in a message.
_SECRET_PARAMS = ("password", "pass", "passwd", "token", "secret", "auth", "username", "user")


def _redact(url: str) -> str:
    """``url`` fit for an error message: user info and credential parameters masked."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[-1]
    clean = [(n, "***" if n.lower() in _SECRET_PARAMS else v) for n, v in query]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(clean, safe="*"), ""))


class RedisStore(StoreMapping):
    """The mpkv Store API on one namespace of a Redis server, shared by every process
    (on any machine) that opens the same URL.

    Options as for :class:`Store` (``serializer``, ``max_staleness``, ``readonly``,
    ``lock_timeout``); ``lock_ttl``: seconds a transaction's lock outlives a client
    that stopped renewing it; ``stream_maxlen``: about how many changes the change
    stream keeps for ``watch``. ``format``, ``fsync`` and ``max_segment_bytes`` are
    accepted only as None (they do not apply), ``fsync_interval`` and ``auto_compact``
    are ignored."""

    def __init__(self, url: str, *, max_staleness: float | None = 0.0,
                 readonly: bool = False, lock_timeout: float | None = None,
                 lock_ttl: float = DEFAULT_LOCK_TTL,
                 stream_maxlen: int | None = DEFAULT_STREAM_MAXLEN,
                 format: str | None = None, serializer: str | None = None,
                 fsync: str | None = None, max_segment_bytes: int | None = None,
                 fsync_interval: float = 1.0, auto_compact: bool = True) -> None:
        check_options(None, None, None, fsync_interval, max_staleness, lock_timeout)
        if serializer is not None:
            serializer_for(serializer)  # ValueError for an unknown name
        if format not in (None, "binary"):
            raise ValueError(f"format={format!r} does not apply to a Redis store (it stores "
                             "any str key and str or bytes value, like the binary format)")
        if fsync is not None:
            raise ValueError("fsync does not apply to a Redis store: durability is the "
                             "server's appendonly/appendfsync setting (docs/scale-out.md)")
        if max_segment_bytes is not None:
            raise ValueError("max_segment_bytes does not apply to a Redis store")
        if not isinstance(lock_ttl, (int, float)) or not lock_ttl > 0:
            raise ValueError(f"lock_ttl must be a positive number, not {lock_ttl!r}")
        if stream_maxlen is not None and (
                not isinstance(stream_maxlen, int) or isinstance(stream_maxlen, bool)
                or stream_maxlen < 1):
            raise ValueError(f"stream_maxlen must be None or a positive int, not "
                             f"{stream_maxlen!r}")
        redis_url, self.namespace, self.address = _parse_url(url)
        self.url = url
        sep = "&" if "?" in self.address else "?"
        self.path = f"{self.address}{sep}namespace={self.namespace}"  # what messages show
        self.format = "redis"
        self.max_staleness = max_staleness
        self.readonly = bool(readonly)
        self.lock_timeout = lock_timeout
        self.lock_ttl = float(lock_ttl)
        self.stream_maxlen = stream_maxlen
        self._options = dict(max_staleness=max_staleness, readonly=readonly,
                             lock_timeout=lock_timeout, lock_ttl=lock_ttl,
                             stream_maxlen=stream_maxlen, serializer=serializer)
        self._wanted_serializer = serializer
        self.serializer = "raw"  # set by _open from the namespace's meta
        self._serializer = serializer_for("raw")
        self._open_tx = 0  # open outermost transactions; guarded by _held_mutex
        tag = f"mpkv:{{{self.namespace}}}:"
        self._meta = (tag + "meta").encode()
        self._data, self._log, self._seq, self._lock_key = (
            (tag + name).encode() for name in ("data", "log", "seq", "lock"))
        self._keys = (self._data, self._log, self._seq, self._lock_key)
        self._maxlen = str(stream_maxlen or 0).encode()
        self._ttl_ms = str(max(1, int(self.lock_ttl * 1000))).encode()
        self._epoch = fork_epoch[0]  # -1 once closed; behind the fork epoch in a child
        # .token: the lock this thread's transaction holds; .tx: its innermost block
        self._local = threading.local()
        self._held: dict[bytes, None] = {}  # tokens held by this handle: kept alive
        self._held_mutex = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._keeper_pid = 0
        self._stop = threading.Event()
        try:
            # No automatic retries: a write whose reply was lost must not run twice.
            # Stale pooled connections (server restarted, connection killed) are
            # replaced by the pool before use.
            # Options in the URL's query (socket_timeout=...) win over these defaults.
            self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0,
                                                socket_timeout=5.0, retry=Retry(NoBackoff(), 0))
        except (ValueError, TypeError) as exc:
            raise RedisURLError(f"bad Redis URL for {self.address}: {exc}") from None
        self._run: Callable[..., Any] = self._client.execute_command
        # The hot path (get, put, delete, commits) encodes its commands itself and uses
        # redis-py's pool and connections directly: about 10 µs less per call.
        self._pool = self._client.connection_pool
        params = inspect.signature(self._pool.get_connection).parameters
        name = params.get("command_name")
        self._conn_args: tuple[str, ...] = (
            ("EVALSHA",) if name is not None and name.default is inspect.Parameter.empty
            else ())  # redis-py < 5.3 wants a command name
        self._hget_head = b"*3\r\n" + _arg(b"HGET") + _arg(self._data)
        self._commit_head = b"".join(_arg(a) for a in (b"EVALSHA", _SHA["commit"], b"4",
                                                        *self._keys))
        self._lock_head = b"".join(_arg(a) for a in (b"EVALSHA", _SHA["lock"], b"1",
                                                      self._lock_key))
        self._put_head = b"*12\r\n" + self._commit_head + _arg(b"") + _arg(b"p") + \
            _arg(self._maxlen)
        # Views of max_staleness != 0: a local copy of the data at commit ``_view_seq``,
        # moved forward by reading the stream.
        self._view: dict[str, Value] | None = None
        self._view_seq = 0
        self._view_mutex = threading.RLock()
        self._last_refresh = 0.0
        try:
            self._open()
        except BaseException:
            self._client.close()
            raise

    def _open(self) -> None:
        """Check the server answers and the namespace's keys are mpkv's."""
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.type(self._data)
            pipe.type(self._log)
            pipe.type(self._meta)
            pipe.get(self._seq)
            pipe.script_load(_COMMIT)
            pipe.script_load(_LOCK)
            data_type, log_type, meta_type, seq, *_ = pipe.execute()
        except redis.RedisError as exc:
            raise self._fail(exc, "connect") from None
        for key, kind, want in ((self._data, data_type, b"hash"), (self._log, log_type,
                                                                    b"stream"),
                                (self._meta, meta_type, b"hash")):
            if kind not in (b"none", want):
                raise FormatError(f"{self.path}: key {key.decode()!r} is a "
                                  f"{kind.decode()}, not an mpkv {want.decode()}")
        record = "" if self.readonly else (self._wanted_serializer or "raw")
        try:
            name = self._run("EVAL", _META, 3, self._meta, self._data, self._log, record)
        except redis.RedisError as exc:
            raise self._fail(exc, "read the namespace's metadata") from None
        self.serializer = name.decode() if isinstance(name, bytes) else str(name)
        try:
            self._serializer = serializer_for(self.serializer)
        except ValueError:
            raise FormatError(f"{self.path}: unknown serializer {self.serializer!r} in "
                              f"{self._meta.decode()!r}") from None
        wanted = self._wanted_serializer
        if wanted is not None and wanted != self.serializer:
            raise ValueError(f"{self.path}: the namespace's serializer is "
                             f"{self.serializer!r}, not {wanted!r}")
        self._seen = self._seq_value(seq)
        if self.max_staleness != 0:
            self._reload()

    # --- errors -----------------------------------------------------------------------

    def _seq_value(self, raw: bytes | None) -> int:
        """The commit counter, which another client of the server could have overwritten."""
        try:
            return int(raw or 0)
        except ValueError:
            shown = (raw or b"")[:40]
            raise CorruptionError(f"{self.path}: key {self._seq.decode()!r} holds {shown!r}, "
                                  "not a commit count") from None

    def _fail(self, exc: redis.RedisError, doing: str) -> Error:
        """One clear mpkv error naming the server for anything redis-py raises."""
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return RedisConnectionError(f"{self.address}: cannot {doing}: {exc}")
        if "WRONGTYPE" in str(exc):
            return FormatError(f"{self.path}: not an mpkv namespace: {exc}")
        return Error(f"{self.path}: {doing} failed: {exc}")

    def _check(self) -> None:
        """Closed, or first use in a child after fork()."""
        if self._epoch == fork_epoch[0]:
            return
        if self._epoch == -1:
            raise ClosedError(f"{self.path}: store is closed")
        # Locks held by the parent's other threads at the fork would never be released
        # here, and a transaction of the forking thread is the parent's, not ours: start
        # over with fresh ones (redis-py's pool opens new connections by itself).
        self._local = threading.local()
        self._open_tx = 0
        self._held = {}
        self._held_mutex = threading.Lock()
        self._view_mutex = threading.RLock()
        self._keeper = None
        self._stop = threading.Event()
        self._epoch = fork_epoch[0]

    def _writable(self) -> None:
        if self._epoch != fork_epoch[0]:
            self._check()
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store opened with readonly=True")

    def _call(self, packed: bytes) -> Any:
        """Send one encoded command on a pooled connection, return the parsed reply.
        A connection that failed mid-way is closed, never reused."""
        pool = self._pool
        conn: Any = pool.get_connection(*self._conn_args)  # redis-py: partly untyped
        try:
            conn.send_packed_command([packed], check_health=False)
            return conn.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _read(self, *command: Any) -> Any:
        """Run a read, once more on a dropped connection (reads are idempotent)."""
        try:
            return self._run(*command)
        except redis.ConnectionError:
            try:
                return self._run(*command)
            except redis.RedisError as exc:
                raise self._fail(exc, "read") from None
        except redis.RedisError as exc:
            raise self._fail(exc, "read") from None

    def _hget(self, key: str) -> bytes | None:
        """HGET on the hot path, once more on a dropped connection."""
        packed = self._hget_head + _arg(_enc_key(key))
        try:
            return self._call(packed)  # type: ignore[no-any-return]
        except redis.ConnectionError:
            try:
                return self._call(packed)  # type: ignore[no-any-return]
            except redis.RedisError as exc:
                raise self._fail(exc, "read") from None
        except redis.RedisError as exc:
            raise self._fail(exc, "read") from None

    def _lock_op(self, token: bytes, op: bytes) -> bool:
        """Acquire, keep or release the transaction lock (idempotent: retried once)."""
        packed = b"*7\r\n" + self._lock_head + _arg(token) + _arg(op) + _arg(self._ttl_ms)
        try:
            return bool(self._script(packed))
        except redis.ConnectionError:
            return bool(self._script(packed))

    def _script(self, packed: bytes) -> Any:
        """Run an encoded EVALSHA, loading the scripts again when the server lost them
        (it restarted without persistence, or SCRIPT FLUSH)."""
        try:
            return self._call(packed)
        except NoScriptError:
            self._client.script_load(_COMMIT)
            self._client.script_load(_LOCK)
            return self._call(packed)

    # --- reads ------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a fresh object each call for JSON), or ``default``."""
        if self._epoch != fork_epoch[0]:
            self._check()
        if self._open_tx:
            tx = self._joined()
            if tx is not None:
                return tx.get(key, default)
        if self._view is not None:
            self._fresh()
            with self._view_mutex:
                if not isinstance(key, str):
                    raise TypeError(f"key must be str, not {type(key).__name__}")
                value = self._view.get(key, MISSING)
            if value is MISSING:
                return default
            return self._serializer.decode(value)
        raw = self._hget(key)
        return default if raw is None else self._serializer.decode(_dec_value(raw))

    def __len__(self) -> int:
        self._check()
        tx = self._joined()
        if tx is not None:
            return len(tx)
        if self._view is not None:
            self._fresh()
            return len(self._view)
        return int(self._read("HLEN", self._data))

    def _copy(self) -> dict[str, Value]:
        """A point-in-time copy (HGETALL is atomic): iteration never tears or raises."""
        self._check()
        if self._view is not None:
            self._fresh()
            with self._view_mutex:
                return dict(self._view)
        return self._server_items()

    # --- freshness: max_staleness and refresh ---------------------------------------

    def _fresh(self) -> None:
        """Move the local view forward when it is older than ``max_staleness``."""
        if self.max_staleness is not None and (
                time.monotonic() - self._last_refresh >= self.max_staleness):
            with self._view_mutex:
                self._pull()

    def refresh(self) -> int:
        """Apply what other processes wrote since the last refresh; return the number of
        commits. (With ``max_staleness=0`` there is no local view: reads go to the server,
        and this only counts.)"""
        self._check()
        if self._view is not None:
            with self._view_mutex:
                return self._pull()
        seq = self._seq_value(self._read("GET", self._seq))
        applied, self._seen = max(seq - self._seen, 0), seq
        return applied

    def _reload(self) -> int:
        """Rebuild the view from the hash and the commit counter, read atomically."""
        started = time.monotonic()
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.get(self._seq)
            pipe.hgetall(self._data)
            seq, raw = pipe.execute()
        except redis.RedisError as exc:
            raise self._fail(exc, "read") from None
        view = {k.decode("utf-8"): _dec_value(v) for k, v in raw.items()}
        with self._view_mutex:
            old = self._view_seq
            self._view, self._view_seq = view, self._seq_value(seq)
            self._last_refresh = started
        return max(self._view_seq - old, 0)

    def _pull(self) -> int:
        """Apply the stream's entries past the view's commit, in order; reload instead
        when entries were trimmed away (or the namespace was reset). View mutex held."""
        started = time.monotonic()
        assert self._view is not None
        last = (self._view_seq, _MAX_SUB)
        ops: list[Op] = []
        try:
            while True:
                pipe = self._client.pipeline(transaction=False)
                pipe.get(self._seq)
                pipe.xread({self._log: f"{last[0]}-{last[1]}"}, count=10_000)
                seq_raw, reply = pipe.execute()
                seq = self._seq_value(seq_raw)
                if seq < self._view_seq:
                    return self._reload()
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    now = _parse_id(entry_id)
                    if now != (last[0], last[1] + 1) and now != (last[0] + 1, 0):
                        return self._reload()  # a gap: trimmed before we read it
                    last = now
                    value = fields.get(b"v")
                    ops.append((fields[b"k"].decode("utf-8"),
                                None if value is None else _dec_value(value)))
                if last[0] >= seq and len(entries) < 10_000:  # (a full batch may end
                    break  # in the middle of the last commit: read on)
                if not entries and last[0] >= seq:
                    break
                if not entries:
                    return self._reload()
        except redis.RedisError as exc:
            raise self._fail(exc, "read") from None
        view = self._view
        for key, value in ops:
            if value is None:
                view.pop(key, None)
            else:
                view[key] = value
        applied = max(last[0], self._view_seq) - self._view_seq
        self._view_seq = max(last[0], self._view_seq)
        self._last_refresh = started
        return applied

    def _own(self, ops: list[Op], seq: int) -> None:
        """A handle reads its own writes: apply them to the view in commit order."""
        assert self._view is not None
        with self._view_mutex:
            if seq <= self._view_seq:
                return
            if seq != self._view_seq + 1:
                self._pull()  # others committed in between: take theirs, and ours, in order
                return
            for key, value in ops:
                if value is None:
                    self._view.pop(key, None)
                else:
                    self._view[key] = value
            self._view_seq = seq

    # --- writes ---------------------------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (one commit). TypeError/ValueError, nothing written,
        for a key or value the store's serializer cannot hold."""
        self._writable()
        if self._open_tx:
            tx = self._joined()
            if tx is not None:
                tx.put(key, value)
                return
        encoded = self._serializer.encode(value)
        self._write([(key, encoded)], [_enc_key(key), _enc_value(encoded)], b"p")

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed. Logged (and watched) even when not."""
        self._writable()
        tx = self._joined()
        if tx is not None:
            return tx.delete(key)
        return self._write([(key, None)], [_enc_key(key), b""], b"p") == 1

    def update(self, /, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``, committed as one atomic script (all or nothing)."""
        self._writable()
        if self._joined() is not None:
            super().update(*args, **kwargs)
            return
        ops: list[Op] = []
        argv: list[bytes] = []
        for key, value in update_pairs(args, kwargs):
            encoded = self._serializer.encode(value)
            argv += (_enc_key(key), _enc_value(encoded))
            ops.append((key, encoded))
        if ops:
            self._write(ops, argv, b"p")

    def __delitem__(self, key: str) -> None:
        self._writable()
        tx = self._joined()
        if tx is not None:
            del tx[key]
            return
        if self._write([(key, None)], [_enc_key(key), b""], b"x") != 1:
            raise KeyError(key)

    def _write(self, ops: list[Op], args: list[bytes], mode: bytes,
               token: bytes | None = None) -> int:
        """Run the commit script; wait (up to ``lock_timeout``) while another client's
        transaction holds the lock. Returns 1 when the last op's key existed, else 0."""
        if token is None:
            token = getattr(self._local, "token", None) or b""
        if not token and mode == b"p" and len(args) == 2:
            packed = self._put_head + _arg(args[0]) + _arg(args[1])
        else:
            packed = b"".join([b"*%d\r\n" % (10 + len(args)), self._commit_head, _arg(token),
                               _arg(mode), _arg(self._maxlen), *map(_arg, args)])
        deadline = None if self.lock_timeout is None else time.monotonic() + self.lock_timeout
        pause = 0.0005
        while True:
            try:
                reply: int = self._script(packed)
            except redis.RedisError as exc:
                raise self._fail(exc, "write (it may or may not have been applied)") from None
            if reply != -1:
                break
            pause = self._pause(deadline, pause)
        if reply == -2:
            raise LockLost(f"{self.path}: the transaction lost its lock (held over "
                           f"lock_ttl={self.lock_ttl} s without renewal); nothing written")
        seq, existed = divmod(reply, 2)
        if seq and self._view is not None:
            self._own(ops, seq)
        return existed

    def _pause(self, deadline: float | None, pause: float) -> float:
        """Sleep before trying the lock again, or raise LockTimeout past the deadline."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{self.path}: writer lock not acquired within "
                                  f"{self.lock_timeout} s")
            pause = min(pause, left)
        time.sleep(pause)
        return min(pause * 2, 0.01)

    # --- transactions ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[RedisTransaction]:
        """Hold the namespace's lock for the block; commit its writes as one atomic
        script on normal exit, none on an exception. Serializable across all clients:
        every write of every client checks the lock. Using ``tx`` after the block
        raises ClosedError.

        Opened inside an open block on the same thread, it is a savepoint: it sees the
        outer block's writes, an exception discards only its own, and nothing commits
        before the outermost block exits. Store calls made inside a block on its thread
        (``store.put``, ``store.get``, ``store.incr``...) join it."""
        self._writable()
        outer = self._joined()
        if outer is not None:
            with savepoint(self, outer) as inner:
                yield inner  # type: ignore[misc]
            return
        token = self._acquire()
        self._local.token = token
        done = False
        try:
            with open_block(self, RedisTransaction(self), self._held_mutex) as tx:
                yield tx
            if tx._ops:
                args: list[bytes] = []
                for key, value in tx._ops:
                    args += (_enc_key(key), b"" if value is None else _enc_value(value))
                self._write(tx._ops, args, b"r", token)
                done = True  # the script released the lock
        finally:
            self._local.token = None
            with self._held_mutex:
                self._held.pop(token, None)
            if not done:
                try:
                    self._lock_op(token, b"r")
                except redis.RedisError:
                    pass  # it expires within lock_ttl

    def _acquire(self) -> bytes:
        """Take the lock (a random token with an expiry), retried until ``lock_timeout``;
        a background thread renews held locks every ``lock_ttl / 3`` seconds."""
        token = uuid.uuid4().hex.encode()
        deadline = None if self.lock_timeout is None else time.monotonic() + self.lock_timeout
        pause = 0.0005
        while True:
            try:
                if self._lock_op(token, b"a"):
                    break
            except redis.RedisError as exc:
                try:
                    self._lock_op(token, b"r")  # in case it was taken after all
                except redis.RedisError:
                    pass
                raise self._fail(exc, "take the transaction lock") from None
            pause = self._pause(deadline, pause)
        with self._held_mutex:
            self._held[token] = None
            if self._keeper is None or self._keeper_pid != os.getpid():
                self._keeper_pid = os.getpid()
                self._keeper = threading.Thread(target=self._keep_locks, daemon=True,
                                                name=f"mpkv-redis-lock {self.path}")
                self._keeper.start()
        return token

    def _keep_locks(self) -> None:
        while not self._stop.wait(self.lock_ttl / 3):
            with self._held_mutex:
                tokens = list(self._held)
            for token in tokens:
                try:
                    self._lock_op(token, b"k")
                except redis.RedisError:
                    pass  # the commit checks the lock is still ours

    # --- whole-namespace operations -------------------------------------------------

    def serialize(self, file_path: str | os.PathLike[str]) -> None:
        """Write the current state (one atomic HGETALL) to one file, atomically (a link
        at ``file_path`` is followed, as ``Store.serialize`` does)."""
        snapshot.write(os.fspath(file_path),
                       snapshot.encode(self._server_items(), self._serializer.name))

    def _server_items(self) -> dict[str, Value]:
        self._check()
        raw: dict[bytes, bytes] = self._read("HGETALL", self._data)
        return {k.decode("utf-8"): _dec_value(v) for k, v in raw.items()}

    def deserialize(self, file_path: str | os.PathLike[str]) -> None:
        """Replace the whole contents with the file's state: one transaction, so every
        client sees all old or all new. ValueError/TypeError (nothing written) when a
        value does not suit this store (e.g. not JSON text for a JSON store)."""
        self._writable()
        items = snapshot.read_for(os.fspath(file_path), self._serializer)
        for key, value in items.items():
            _enc_key(key)
            _enc_value(value)
        with self.transaction() as tx:
            current = self._server_items()
            for key in current:
                if key not in items:
                    tx._stage(key, None)  # no round trip to ask if it exists
            for key, value in items.items():
                if current.get(key, MISSING) != value:
                    tx._stage(key, value)

    def compact(self, *, progress: Callable[[list[str]], Iterable[str]] | None = None
                ) -> dict[str, int]:
        """Nothing to do: Redis reclaims memory itself and rewrites its AOF
        (BGREWRITEAOF); the change stream is trimmed to ``stream_maxlen`` as it grows.
        (``progress`` is accepted for the file store's signature; nothing to show.)"""
        self._writable()
        return {}

    def watch(self, prefix: str = "", *, since: str | None = None,
              timeout: float | None = None) -> Iterator[Change]:
        """An iterator of :class:`Change` for every change committed by any client after
        this call (or after position ``since``), in commit order; it ends after
        ``timeout`` idle seconds. Positions are the stream ids, zero-padded
        (``CCCCCCCCCCCCCCCCCCCC-IIIIIIIIIIIIIIIIIIII``: commit, index in it). CompactedError
        when the stream was trimmed (``stream_maxlen``) past ``since`` -- raised by the
        first ``next()``, or later if the watcher falls that far behind."""
        self._check()
        prefix = check_prefix(prefix)
        timeout = check_timeout(timeout)
        if since is None:
            start = (self._seq_value(self._read("GET", self._seq)), _MAX_SUB)
        else:
            start = _parse_token(since)
        return self._watching(start, prefix, timeout)

    def position(self) -> str:
        """The position of the last change applied: the newest stream entry (with
        ``max_staleness != 0``, the newest one the local view has applied)."""
        self._check()
        upto = "+"
        if self._view is not None:
            self._fresh()
            upto = f"{self._view_seq}-{_MAX_SUB}"
        last = self._read("XREVRANGE", self._log, upto, "-", "COUNT", 1)
        if last:
            return _token(*_parse_id(last[0][0]))
        seq = self._view_seq if self._view is not None else \
            self._seq_value(self._read("GET", self._seq))
        return _token(seq, _MAX_SUB)

    def _watching(self, start: tuple[int, int], prefix: str,
                  timeout: float | None) -> Iterator[Change]:
        last = start
        idle_since = time.monotonic()
        while True:
            self._check()  # iterating after close is a use after close, not the end
            left = None if timeout is None else timeout - (time.monotonic() - idle_since)
            block = None if left is not None and left <= 0 else \
                max(1, int(1000 * min(1.0 if left is None else left, 1.0)))
            blocking = () if block is None else ("BLOCK", block)
            try:
                reply = self._run("XREAD", "COUNT", 1000, *blocking, "STREAMS", self._log,
                                  f"{last[0]}-{last[1]}")
            except redis.RedisError as exc:
                self._check()  # closed meanwhile: ClosedError, not a connection error
                raise self._fail(exc, "watch") from None
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                now = _parse_id(entry_id)
                if now != (last[0], last[1] + 1) and now != (last[0] + 1, 0):
                    raise CompactedError(
                        f"{self.path}: changes after position {_token(*last)} were trimmed "
                        f"from the stream (stream_maxlen={self.stream_maxlen}); reread the "
                        "state and watch from a fresh position")
                last = now
                key = fields[b"k"].decode("utf-8")
                if key.startswith(prefix):
                    raw = fields.get(b"v")
                    value = None if raw is None else self._serializer.decode(_dec_value(raw))
                    yield Change(key, value, deleted=raw is None, position=_token(*now))
                    idle_since = time.monotonic()
            if not entries and left is not None and left <= 0:
                return

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Release the connections; later use raises ClosedError."""
        if self._epoch == -1:
            return
        self._epoch = -1
        self._stop.set()
        self._client.close()
        self._client.connection_pool.disconnect()

    def __reduce__(self) -> tuple[Callable[..., RedisStore], tuple[str, dict[str, Any]]]:
        return _reopen, (self.url, self._options)

    def __repr__(self) -> str:
        if self.closed:
            return f"<mpkv.RedisStore {self.path!r} closed>"
        mode = " readonly" if self.readonly else ""
        return f"<mpkv.RedisStore {self.path!r} {self.serializer}{mode}>"


def _reopen(url: str, options: dict[str, Any]) -> RedisStore:
    return RedisStore(url, **options)


class RedisTransaction(TransactionMapping):
    """The view of one ``transaction()`` block: the server's committed state (nobody
    else can commit while the lock is held) plus the block's own buffered writes.
    A full mutable mapping; used by the block's thread only."""

    _store: RedisStore

    def _committed(self, key: str) -> Any:
        store = self._store
        store._check()
        raw = store._hget(key)
        return MISSING if raw is None else _dec_value(raw)

    def _committed_items(self) -> dict[str, Value]:
        return self._store._server_items()

    def _check_op(self, key: str, encoded: Value | None) -> None:
        _enc_key(key)
        if encoded is not None:
            _enc_value(encoded)
