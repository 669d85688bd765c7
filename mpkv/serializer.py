"""How a store turns the values users give into the str/bytes its log holds, and back.

A store's serializer is chosen when the store is created and recorded in its metadata.
The log, the in-memory view, snapshots and the Redis hash all hold *encoded* values;
every read path decodes. ``"raw"`` stores str/bytes as they are. ``"json"`` stores any
value ``json`` can encode as compact JSON text, which never contains a raw newline (the
text format's record separator), and never runs code when decoding (unlike pickle).
"""

from __future__ import annotations

import json
from typing import Any

from .codec import Value

NAMES = ("raw", "json")


class Serializer:
    """``encode(value)`` raises TypeError/ValueError for a value it cannot store;
    ``decode(encoded)`` returns a fresh object each call. ``identity`` is True when both
    are the identity (the hot paths then skip them)."""

    name = ""
    identity = False

    def encode(self, value: Any) -> Value:
        raise NotImplementedError

    def decode(self, raw: Value) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<mpkv serializer {self.name!r}>"


class RawSerializer(Serializer):
    """Values are str or bytes, stored as they are."""

    name = "raw"
    identity = True

    def encode(self, value: Any) -> Value:
        if not isinstance(value, (str, bytes)):
            raise TypeError(f"value must be str or bytes, not {type(value).__name__} "
                            "(open the store with serializer='json' to store other values)")
        return value

    def decode(self, raw: Value) -> Any:
        return raw


class JsonSerializer(Serializer):
    """Any value ``json.dumps`` accepts (dict keys become str, tuples lists), without
    NaN/Infinity (not JSON: other readers reject them)."""

    name = "json"

    def encode(self, value: Any) -> Value:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"))
        except RecursionError:
            raise ValueError("value nests too deeply to encode as JSON") from None
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: keep it as a \u escape
                text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        return text

    def decode(self, raw: Value) -> Any:
        return json.loads(raw)


RAW = RawSerializer()
JSON = JsonSerializer()


def serializer_for(name: str) -> Serializer:
    """The serializer named ``name``; ValueError for an unknown name."""
    if name == "raw":
        return RAW
    if name == "json":
        return JSON
    raise ValueError(f"serializer must be 'raw', 'json' or None, not {name!r}")
