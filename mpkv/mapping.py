"""The mapping and lifecycle syntax every mpkv store and transaction shares.

A backend's store provides ``get``, ``_copy`` (a point-in-time dict of *encoded*
values), ``close``, ``_check``, ``transaction`` and ``_serializer``; its transaction
provides ``_committed`` and ``_committed_items`` (the state the block started from).
These classes derive the rest, so the file store and the Redis store behave the same
way by construction: every read-modify-write helper of a store (``incr``, ``pop``,
``update``, ``clear``...) is the same helper run inside one ``transaction()``, which
commits it as one atomic unit.
"""

from __future__ import annotations

import re
import threading
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from .codec import Value
from .errors import ClosedError
from .serializer import Serializer

MISSING: Any = object()  # a default no value can equal
S = TypeVar("S", bound="StoreMapping")
TX = TypeVar("TX", bound="TransactionMapping")
_DECIMAL = re.compile(r"[+-]?[0-9]+\Z")


def _check_delta(delta: object) -> int:
    if not isinstance(delta, int) or isinstance(delta, bool):
        raise TypeError(f"incr delta must be an int, not {type(delta).__name__}")
    return delta


def update_pairs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of ``update``'s arguments, like ``dict.update``."""
    if len(args) > 1:
        raise TypeError(f"update expected at most 1 positional argument, got {len(args)}")
    pairs: list[tuple[Any, Any]] = []
    if args:
        other = args[0]
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]  # noqa: SIM118 (dict.update's rule)
        else:
            pairs = [tuple(p) for p in other]
            for p in pairs:
                if len(p) != 2:
                    raise ValueError(f"update sequence element has length {len(p)}; 2 is "
                                     "required")
    return pairs + list(kwargs.items())


class KeyAccess:
    """``x[k]`` (KeyError when missing) and ``k in x`` from ``get``."""

    def get(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, MISSING) is not MISSING  # type: ignore[arg-type]


class CopyViews(KeyAccess):
    """Iteration and ``keys/values/items`` over a point-in-time copy of the encoded
    items (``_encoded_items``), values decoded by ``_serializer``: one definition for
    stores and transactions of both backends."""

    _serializer: Serializer

    def _encoded_items(self) -> dict[str, Value]:
        raise NotImplementedError

    def _key_items(self) -> dict[str, Any]:
        """A point-in-time copy holding at least the keys (values may be anything): a
        backend whose values are costly to copy gives the keys alone."""
        return self._encoded_items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_items())

    def keys(self) -> KeysView[str]:
        """The keys, from a point-in-time copy."""
        return self._key_items().keys()

    def values(self) -> ValuesView[Any]:
        """The (decoded) values, from a point-in-time copy."""
        return self.items_dict().values()

    def items(self) -> ItemsView[str, Any]:
        """The ``(key, value)`` pairs, from a point-in-time copy."""
        return self.items_dict().items()

    def items_dict(self) -> dict[str, Any]:
        """A point-in-time copy of every key and (decoded) value, as a dict."""
        items = self._encoded_items()
        if self._serializer.identity:
            return items
        decode = self._serializer.decode
        return {k: decode(v) for k, v in items.items()}


class TransactionMapping(CopyViews, MutableMapping[str, Any]):
    """The view of one ``transaction()`` block: the state it started from plus the
    block's own writes, kept encoded until the block commits.

    A block opened inside another on the same thread is a savepoint: it shares the outer
    block's writes (``_ops``, ``_writes``) and on an exception restores them to what
    they were when it began. Only the thread running the block uses these objects."""

    def __init__(self, store: Any, outer: TransactionMapping | None = None) -> None:
        self._store = store
        self._serializer: Serializer = store._serializer
        self._outer = outer
        self._open = True
        if outer is None:
            self._ops: list[tuple[str, Value | None]] = []  # encoded, in call order
            self._writes: dict[str, Value | None] = {}  # the last of _ops per key
            self._undo: tuple[int, dict[str, Value | None]] | None = None
        else:
            self._ops, self._writes = outer._ops, outer._writes
            self._undo = (len(self._ops), dict(self._writes))

    # --- what a backend provides ------------------------------------------------------

    def _committed(self, key: str) -> Any:
        """The encoded committed value of ``key``, MISSING when absent."""
        raise NotImplementedError

    def _committed_items(self) -> dict[str, Value]:
        """A copy of the whole committed state, encoded."""
        raise NotImplementedError

    def _check_op(self, key: str, encoded: Value | None) -> None:
        """Raise TypeError/ValueError when the backend cannot store this op."""
        raise NotImplementedError

    def _committed_keys(self) -> Iterator[str]:
        """The committed keys, lazily where the backend can (``popitem`` needs one)."""
        return iter(self._committed_items())

    def _committed_has(self, key: str) -> bool:
        """Whether ``key`` is committed; a backend that can tell without reading the
        value says so (counting, membership and deletes need no value)."""
        return self._committed(key) is not MISSING

    # --- lifecycle --------------------------------------------------------------------

    def _live(self) -> None:
        if not self._open:
            raise ClosedError(f"{self._store.path}: transaction used after its with block")

    def _end(self, failed: bool) -> None:
        """Close this block; a failed savepoint drops the writes made inside it."""
        self._open = False
        if failed and self._undo is not None:
            mark, writes = self._undo
            del self._ops[mark:]
            self._writes.clear()
            self._writes.update(writes)

    def __repr__(self) -> str:
        kind = "savepoint" if self._outer is not None else "transaction"
        state = f"{len(self._ops)} pending writes" if self._open else "closed"
        return f"<mpkv.{type(self).__name__} ({kind}) on {self._store.path!r}: {state}>"

    # --- encoded access -----------------------------------------------------------------

    def _encoded(self, key: str) -> Any:
        self._live()
        if key in self._writes:
            value = self._writes[key]
            return MISSING if value is None else value
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        return self._committed(key)

    def _encoded_items(self) -> dict[str, Value]:
        self._live()
        return self._with_writes(self._committed_items())

    def _key_items(self) -> dict[str, Any]:
        """The keys this block sees, in ``_encoded_items``' order; committed values are
        not read (True stands for them): iterating, counting and clearing read none."""
        self._live()
        return self._with_writes(dict.fromkeys(self._committed_keys(), True))

    def _with_writes(self, items: dict[str, Any]) -> dict[str, Any]:
        """``items`` (a copy of the committed state) with this block's writes applied."""
        for key, value in self._writes.items():
            if value is None:
                items.pop(key, None)
            else:
                items[key] = value
        return items

    def _has(self, key: object) -> bool:
        """Whether ``key`` is live in this block, without reading its value."""
        self._live()
        if key in self._writes:
            return self._writes[key] is not None
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        return self._committed_has(key)

    def _stage(self, key: str, encoded: Value | None) -> None:
        """Buffer one checked write (``None`` deletes)."""
        self._ops.append((key, encoded))
        self._writes[key] = encoded

    def _encode(self, key: str, value: Any) -> Value:
        encoded = self._serializer.encode(value)
        self._check_op(key, encoded)
        return encoded

    # --- the mapping ----------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as this block sees it, or ``default``."""
        value = self._encoded(key)
        return default if value is MISSING else self._serializer.decode(value)

    def __contains__(self, key: object) -> bool:
        return self._has(key)

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` when the block commits (TypeError/ValueError now, nothing
        buffered, for a value the store cannot hold)."""
        self._live()
        self._stage(key, self._encode(key, value))

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str) -> bool:
        """Remove ``key`` when the block commits (logged even when missing); True when
        it exists now."""
        self._live()
        self._check_op(key, None)
        existed = self._has(key)
        self._stage(key, None)
        return existed

    def __delitem__(self, key: str) -> None:
        if not self._has(key):
            raise KeyError(key)
        self._stage(key, None)

    def __len__(self) -> int:
        return len(self._key_items())

    def update(self, /, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``; every value is checked before any is buffered."""
        self._live()
        encoded = [(k, self._encode(k, v)) for k, v in update_pairs(args, kwargs)]
        for key, value in encoded:
            self._stage(key, value)

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value; ``default`` (or KeyError) when missing,
        and then nothing is written."""
        value = self._encoded(key)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        self._stage(key, None)
        return self._serializer.decode(value)

    def popitem(self) -> tuple[str, Any]:
        """Remove and return some ``(key, value)``; KeyError when empty."""
        self._live()
        found = next(((k, v) for k, v in reversed(self._writes.items()) if v is not None),
                     None)
        if found is None:
            key = next((k for k in self._committed_keys() if k not in self._writes), None)
            if key is not None:
                found = key, self._committed(key)
        if found is None:
            raise KeyError("popitem(): the store is empty")
        key, value = found
        self._stage(key, None)
        return key, self._serializer.decode(value)

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of ``key``; when missing, put ``default`` and return it."""
        value = self._encoded(key)
        if value is not MISSING:
            return self._serializer.decode(value)
        self._stage(key, self._encode(key, default))
        return default

    def clear(self) -> None:
        """Delete every key (one delete per live key, none for an empty store)."""
        for key in list(self._key_items()):
            self._stage(key, None)

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the integer at ``key`` (missing counts as 0); return the sum.
        A raw store keeps the decimal string, a JSON store an int; TypeError/ValueError
        for a value that is not an integer, and then nothing is written."""
        _check_delta(delta)
        value = self._encoded(key)
        if value is MISSING:
            current = 0
        elif self._serializer.identity:
            if not isinstance(value, str):
                raise TypeError(f"incr: the value of {key!r} is bytes, not a decimal str")
            if not _DECIMAL.match(value):
                raise ValueError(f"incr: the value of {key!r} is not a decimal integer: "
                                 f"{value[:40]!r}")
            current = int(value)
        else:
            decoded = self._serializer.decode(value)
            if not isinstance(decoded, int) or isinstance(decoded, bool):
                raise TypeError(f"incr: the value of {key!r} is a "
                                f"{type(decoded).__name__}, not an int")
            current = decoded
        total = current + delta
        self._stage(key, self._encode(key, str(total) if self._serializer.identity else total))
        return total


class StoreMapping(CopyViews, MutableMapping[str, Any]):
    """Iteration over point-in-time copies, the atomic read-modify-write helpers, and
    the context-manager lifecycle. ``_epoch`` is -1 once closed (0 while opening).

    ``_local.tx`` is the innermost open transaction of the calling thread; ``_open_tx``
    counts open outermost transactions in this process, so that the hot paths look at
    the thread-local only while one is open. A store call made inside an open
    transaction on the same thread joins it: it reads the block's writes and its writes
    commit (or not) with the block."""

    _epoch: int
    _serializer: Serializer
    _local: threading.local
    _open_tx: int
    path: str

    def _copy(self) -> dict[str, Value]:
        raise NotImplementedError

    def _check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _joined(self) -> TransactionMapping | None:
        """This thread's open transaction, if any."""
        if not self._open_tx:
            return None
        return getattr(self._local, "tx", None)

    def _encoded_items(self) -> dict[str, Value]:
        tx = self._joined()
        return self._copy() if tx is None else tx._encoded_items()

    def _copy_keys(self) -> dict[str, Any]:
        """``_copy`` with at least the keys right (values need not be read)."""
        return self._copy()

    def _key_items(self) -> dict[str, Any]:
        tx = self._joined()
        return self._copy_keys() if tx is None else tx._key_items()


    # --- atomic read-modify-write: one transaction each ----------------------------------

    def _atomically(self, work: Callable[[Any], Any]) -> Any:
        with self.transaction() as tx:
            return work(tx)

    def incr(self, key: str, delta: int = 1) -> int:
        """Atomically add ``delta`` (an int) to the integer at ``key`` and return the new
        value; a missing key counts as 0. A raw store keeps the decimal string, a JSON
        store an int. TypeError/ValueError (nothing written) for a value that is not an
        integer. Costs one write under the writer lock."""
        _check_delta(delta)
        return self._atomically(lambda tx: tx.incr(key, delta))  # type: ignore[no-any-return]

    def update(self, /, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``, committed as one atomic unit (all or nothing)."""
        pairs = update_pairs(args, kwargs)
        if pairs:
            self._atomically(lambda tx: tx.update(pairs))

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Atomically remove ``key`` and return its value; ``default`` (or KeyError) when
        missing, and then nothing is written."""
        return self._atomically(lambda tx: tx.pop(key, default))

    def popitem(self) -> tuple[str, Any]:
        """Atomically remove and return some ``(key, value)``; KeyError when empty."""
        return self._atomically(lambda tx: tx.popitem())  # type: ignore[no-any-return]

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of ``key``; when missing, atomically put ``default`` and return it."""
        value = self.get(key, MISSING)
        if value is not MISSING:
            return value
        return self._atomically(lambda tx: tx.setdefault(key, default))

    def clear(self) -> None:
        """Delete every key, as one atomic unit."""
        self._atomically(lambda tx: tx.clear())

    # --- lifecycle --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._epoch == -1

    def __enter__(self: S) -> S:
        self._check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_epoch", -1) not in (-1, 0):
                self.close()
        except Exception:
            pass


@contextmanager
def savepoint(store: StoreMapping, outer: TX) -> Iterator[TX]:
    """A ``transaction()`` opened inside ``outer`` on the same thread."""
    with open_block(store, type(outer)(store, outer)) as tx:
        yield tx


@contextmanager
def open_block(store: StoreMapping, tx: TX, counted: AbstractContextManager[Any] | None = None
               ) -> Iterator[TX]:
    """Make ``tx`` the calling thread's open transaction (store calls join it) for one
    block, and end it, failed or not, however the block exits; the thread's enclosing
    transaction, if any, is its own again afterwards. An outermost block is also
    counted in ``store._open_tx``, under ``counted`` (the counter's guard)."""
    outer = getattr(store._local, "tx", None)
    store._local.tx = tx
    if counted is not None:
        with counted:
            store._open_tx += 1
    failed = True
    try:
        yield tx
        failed = False
    finally:
        if counted is not None:
            with counted:
                store._open_tx -= 1
        tx._end(failed)
        store._local.tx = outer
