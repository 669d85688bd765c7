"""CONTRACT.md read to the letter by an outside auditor: each test hunts one place where
the code disagreed with a sentence of it."""

from __future__ import annotations

from pathlib import Path

import pytest

import mpkv


@pytest.mark.parametrize("name", ["self", "other", "args", "kwargs"])
def test_update_takes_any_str_key_as_a_keyword(tmp_path: Path, name: str) -> None:
    # A Store is a MutableMapping: update(**kw) takes every str key, as dict.update does
    # (a key named "self" used to collide with the method's own parameter).
    with mpkv.Store(tmp_path / "s") as s:
        s.update({"a": "1"}, **{name: "2"})
        with s.transaction() as tx:
            tx.update(**{name: "3"})
        assert dict(s) == {"a": "1", name: "3"}
