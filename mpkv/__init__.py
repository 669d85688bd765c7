"""mpkv: a persistent key-value store that many processes share through one directory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, overload

from .errors import (
    ClosedError,
    CompactedError,
    CorruptionError,
    Error,
    FormatError,
    LockTimeout,
    ReadOnlyError,
)
from .recovery import Report, repair, verify
from .store import Store, Transaction
from .watch import Change

__all__ = ["Store", "Transaction", "open", "RedisURL", "Error", "FormatError", "CorruptionError",
           "ClosedError", "LockTimeout", "ReadOnlyError", "CompactedError", "Change", "repair",
           "verify", "Report"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .redis_store import RedisStore

# Names served by mpkv.redis_store, imported on first use: `import mpkv` never needs redis.
_REDIS_NAMES = ("RedisStore", "RedisTransaction", "RedisConnectionError", "RedisURLError",
                "LockLost")


class RedisURL(str):
    """A ``redis://``/``rediss://``/``unix://`` URL, marked as one for type checkers:
    ``mpkv.open(mpkv.RedisURL(url))`` is typed :class:`RedisStore` (a plain str is typed
    :class:`Store`, whatever it holds: a type checker cannot see inside a string)."""

    def __new__(cls, url: str) -> RedisURL:
        if not isinstance(url, str) or not url.startswith(_REDIS_SCHEMES):
            raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {url!r}")
        return super().__new__(cls, url)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


# A RedisURL is also a str, which the second overload types Store: mypy calls that an
# unsafe overlap, but the first match wins, and a plain str holding a Redis URL is
# typed Store either way (documented on RedisURL).
@overload
def open(  # type: ignore[overload-overlap]
         path: RedisURL, *, max_segment_bytes: int | None = None, format: str | None = None,
         serializer: str | None = None, fsync: str | None = None,
         fsync_interval: float = 1.0, max_staleness: float | None = 0.0,
         readonly: bool = False, lock_timeout: float | None = None,
         auto_compact: bool = True, lock_ttl: float = 5.0,
         stream_maxlen: int | None = 100_000) -> RedisStore: ...


@overload
def open(path: str | os.PathLike[str], *, max_segment_bytes: int | None = None,
         format: str | None = None, serializer: str | None = None, fsync: str | None = None,
         fsync_interval: float = 1.0, max_staleness: float | None = 0.0,
         readonly: bool = False, lock_timeout: float | None = None,
         auto_compact: bool = True, lock_ttl: float = 5.0,
         stream_maxlen: int | None = 100_000) -> Store: ...


def open(path: str | os.PathLike[str], *, max_segment_bytes: int | None = None,
         format: str | None = None, serializer: str | None = None, fsync: str | None = None,
         fsync_interval: float = 1.0, max_staleness: float | None = 0.0,
         readonly: bool = False, lock_timeout: float | None = None,
         auto_compact: bool = True, lock_ttl: float = 5.0,
         stream_maxlen: int | None = 100_000) -> Store | RedisStore:
    """Open (creating if needed) the store at ``path``; usable as a context manager.

    The options are :class:`Store`'s (``serializer="json"`` stores any JSON value;
    ``format``, ``serializer`` and ``max_segment_bytes`` are fixed when the store is
    created, ``None`` meaning what it has). A ``redis://host:port/db?namespace=NAME``
    URL (or ``rediss://``, ``unix://``) opens a :class:`RedisStore` instead: the same
    API on a Redis server (docs/scale-out.md), where ``lock_ttl`` and ``stream_maxlen``
    also apply. Type checkers see a :class:`Store` for a path and a :class:`RedisStore`
    for a :class:`RedisURL`."""
    options: dict[str, Any] = dict(
        max_segment_bytes=max_segment_bytes, format=format, serializer=serializer,
        fsync=fsync, fsync_interval=fsync_interval, max_staleness=max_staleness,
        readonly=readonly, lock_timeout=lock_timeout, auto_compact=auto_compact)
    if isinstance(path, str) and path.startswith(_REDIS_SCHEMES):
        from .redis_store import RedisStore

        return RedisStore(str(path), lock_ttl=lock_ttl, stream_maxlen=stream_maxlen, **options)
    if lock_ttl != 5.0 or stream_maxlen != 100_000:
        raise TypeError("lock_ttl and stream_maxlen apply only to a Redis store")
    return Store(path, **options)


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        from . import redis_store

        return getattr(redis_store, name)
    raise AttributeError(f"module 'mpkv' has no attribute {name!r}")
