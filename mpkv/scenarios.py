"""The two parts of the original problem, run on the real ``Store``.

Ops are ``("put", k, v)``, ``("get", k)``, ``("delete", k)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from .segments import list_segments
from .store import Store


def _run(store: Store, ops: Sequence[Sequence[Any]], gets: list[Any]) -> None:
    for op in ops:
        if op[0] == "put":
            store.put(op[1], op[2])
        elif op[0] == "get":
            gets.append(store.get(op[1]))
        elif op[0] == "delete":
            store.delete(op[1])
        else:
            raise ValueError(f"unknown operation {op[0]!r} (expected put, get or delete)")


def single_file_restart(before_restart_ops: Sequence[Sequence[Any]],
                        after_restart_ops: Sequence[Sequence[Any]]
                        ) -> tuple[list[Any], list[tuple[str, Any]]]:
    """Part 1: run, ``serialize`` to one file, restart on a fresh store, ``deserialize``, run."""
    gets: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mpkv-part1-") as tmp:
        snapshot = os.path.join(tmp, "state.snapshot")
        with Store(os.path.join(tmp, "before"), fsync="never") as store:
            _run(store, before_restart_ops, gets)
            store.serialize(snapshot)
        with Store(os.path.join(tmp, "after"), fsync="never") as store:
            store.deserialize(snapshot)
            _run(store, after_restart_ops, gets)
            return gets, sorted(store.items())


def multi_file_restart(max_file_size: int, before_restart_ops: Sequence[Sequence[Any]],
                       after_restart_ops: Sequence[Sequence[Any]]
                       ) -> tuple[list[Any], list[str], list[tuple[str, Any]]]:
    """Part 2: the text log over size-limited files; close, reopen (replay), continue."""
    gets: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mpkv-part2-") as tmp:
        options: dict[str, Any] = dict(format="text", max_segment_bytes=max_file_size,
                                       fsync="never")
        with Store(tmp, **options) as store:
            _run(store, before_restart_ops, gets)
        with Store(tmp, **options) as store:
            _run(store, after_restart_ops, gets)
            items = sorted(store.items())
        contents = []
        for name in list_segments(tmp):
            with open(os.path.join(tmp, name), encoding="utf-8", newline="") as f:
                contents.append(f.read())
        return gets, contents, items
