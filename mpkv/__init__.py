"""mpkv: a persistent key-value store that many processes share through one directory."""

import os
from typing import TYPE_CHECKING, Any

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

__all__ = ["Store", "Transaction", "open", "Error", "FormatError", "CorruptionError",
           "ClosedError", "LockTimeout", "ReadOnlyError", "CompactedError", "Change", "repair",
           "verify", "Report"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .redis_store import RedisStore

# Names served by mpkv.redis_store, imported on first use: `import mpkv` never needs redis.
_REDIS_NAMES = ("RedisStore", "RedisTransaction", "RedisConnectionError", "RedisURLError",
                "LockLost")


def open(path: str | os.PathLike[str], **options: Any) -> "Store | RedisStore":
    """Open (creating if needed) the store at ``path``; usable as a context manager.

    A ``redis://host:port/db?namespace=NAME`` URL (or ``rediss://``) opens a
    :class:`RedisStore` instead: the same API on a Redis server (docs/scale-out.md)."""
    if isinstance(path, str) and path.startswith(("redis://", "rediss://")):
        from .redis_store import RedisStore

        return RedisStore(path, **options)
    return Store(path, **options)


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        from . import redis_store

        return getattr(redis_store, name)
    raise AttributeError(f"module 'mpkv' has no attribute {name!r}")
