"""The mapping and lifecycle syntax every mpkv store and transaction shares.

A backend provides ``get``, ``_copy`` (a point-in-time dict), ``close`` and ``_check``
(a transaction: ``get``, ``put``, ``delete``); these classes derive the rest, so the
file store and the Redis store behave the same way by construction.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import Any, TypeVar

from .codec import Value

MISSING: Any = object()  # a default no value can equal
S = TypeVar("S", bound="StoreMapping")


class KeyAccess:
    """``x[k]`` (KeyError when missing) and ``k in x`` from ``get``."""

    def get(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Value:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return self.get(key, MISSING) is not MISSING  # type: ignore[arg-type]


class TransactionMapping(KeyAccess):
    """``tx[k] = v`` and ``del tx[k]`` for a transaction with ``put`` and ``delete``."""

    def put(self, key: str, value: Value) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def __setitem__(self, key: str, value: Value) -> None:
        self.put(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.delete(key)


class StoreMapping(KeyAccess, MutableMapping[str, Value]):
    """Iteration over point-in-time copies, and the context-manager lifecycle.
    ``_epoch`` is -1 once closed (0 while opening)."""

    _epoch: int

    def _copy(self) -> dict[str, Value]:
        raise NotImplementedError

    def _check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self._copy())

    def keys(self) -> KeysView[str]:
        return self._copy().keys()

    def values(self) -> ValuesView[Value]:
        return self._copy().values()

    def items(self) -> ItemsView[str, Value]:
        return self._copy().items()

    @property
    def closed(self) -> bool:
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
