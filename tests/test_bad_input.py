"""Every bad input raises the documented error and leaves every byte of the store
directory as it was (segments and metadata compared exactly; the shm and lock files'
contents are ignored)."""

from __future__ import annotations

import os

import pytest
from conftest import dir_state as snapshot

import mpkv


def segs(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".seg"))


LIMIT = 64  # max_segment_bytes of the fixture stores


@pytest.fixture(params=["binary", "text"])
def store(request, tmp_path):
    p = str(tmp_path / "s")
    s = mpkv.Store(p, format=request.param, max_segment_bytes=LIMIT)
    s.put("a", "1")
    s.put("b", "2")
    s.delete("zz")
    s.get("a")
    yield s, p, request.param
    try:
        s.close()
    except Exception:
        pass


def check_rejected(s, p, action, exc):
    before = snapshot(p)
    items = sorted(s.items())
    with pytest.raises(exc):
        action()
    assert snapshot(p) == before, "a rejected call changed the store directory"
    assert sorted(s.items()) == items
    # the store is still usable afterwards, and the rejected call left nothing behind
    s.put("ok", "1")
    assert s.get("ok") == "1"
    s.close()
    s2 = mpkv.Store(p)
    try:
        assert sorted(s2.items()) == sorted([*items, ("ok", "1")])
    finally:
        s2.close()


# --- wrong types --------------------------------------------------------------------

BAD_KEYS = {
    "None": None,
    "int": 1,
    "float": 1.5,
    "bytes": b"a",
    "bytearray": bytearray(b"a"),
    "tuple": ("a",),
    "list": ["a"],
    "object": object(),
}

KEY_CALLS = {
    "put": lambda s, k: s.put(k, "v"),
    "delete": lambda s, k: s.delete(k),
    "setitem": lambda s, k: s.__setitem__(k, "v"),
    "delitem": lambda s, k: s.__delitem__(k),
    "get": lambda s, k: s.get(k),
    "tx.put": lambda s, k: _tx(s, lambda tx: tx.put(k, "v")),
    "tx.delete": lambda s, k: _tx(s, lambda tx: tx.delete(k)),
}


def _tx(s, body):
    with s.transaction() as tx:
        tx.put("fine", "before the bad call")  # must not be committed either
        body(tx)


@pytest.mark.parametrize("call", sorted(KEY_CALLS))
@pytest.mark.parametrize("key", sorted(BAD_KEYS))
def test_bad_key_type(store, call, key):
    s, p, _ = store
    check_rejected(s, p, lambda: KEY_CALLS[call](s, BAD_KEYS[key]), TypeError)


BAD_VALUES = {
    "None": None,
    "int": 1,
    "float": 1.5,
    "bytearray": bytearray(b"x"),
    "memoryview": memoryview(b"x"),
    "list": ["x"],
    "dict": {"x": 1},
    "object": object(),
}

VALUE_CALLS = {
    "put": lambda s, v: s.put("k", v),
    "setitem": lambda s, v: s.__setitem__("k", v),
    "tx.put": lambda s, v: _tx(s, lambda tx: tx.put("k", v)),
}


@pytest.mark.parametrize("call", sorted(VALUE_CALLS))
@pytest.mark.parametrize("value", sorted(BAD_VALUES))
def test_bad_value_type(store, call, value):
    s, p, _ = store
    check_rejected(s, p, lambda: VALUE_CALLS[call](s, BAD_VALUES[value]), TypeError)


def test_put_none_is_not_a_delete(store):
    s, p, _ = store
    check_rejected(s, p, lambda: s.put("a", None), TypeError)


# --- text format restrictions -------------------------------------------------------

TEXT_BAD = {
    "key-pipe": lambda s: s.put("a|b", "v"),
    "key-only-pipe": lambda s: s.put("|", "v"),
    "key-newline": lambda s: s.put("a\nb", "v"),
    "key-only-newline": lambda s: s.put("\n", "v"),
    "value-newline": lambda s: s.put("k", "x\ny"),
    "value-only-newline": lambda s: s.put("k", "\n"),
    "value-trailing-newline": lambda s: s.put("a", "1\n"),
    "bytes-value": lambda s: s.put("k", b"bytes"),
    "empty-bytes-value": lambda s: s.put("k", b""),
    "setitem-key-pipe": lambda s: s.__setitem__("a|b", "v"),
    "setitem-value-newline": lambda s: s.__setitem__("k", "x\n"),
    "setitem-bytes": lambda s: s.__setitem__("k", b"x"),
    "delete-key-pipe": lambda s: s.delete("a|b"),
    "delete-key-newline": lambda s: s.delete("a\n"),
    "tx-key-pipe": lambda s: _tx(s, lambda tx: tx.put("a|b", "v")),
    "tx-value-newline": lambda s: _tx(s, lambda tx: tx.put("k", "v\n")),
    "tx-bytes": lambda s: _tx(s, lambda tx: tx.put("k", b"v")),
    "tx-delete-key-newline": lambda s: _tx(s, lambda tx: tx.delete("\n")),
}


@pytest.fixture
def text_store(tmp_path):
    p = str(tmp_path / "t")
    s = mpkv.Store(p, format="text", max_segment_bytes=LIMIT)
    s.put("a", "1")
    s.delete("gone")
    yield s, p
    try:
        s.close()
    except Exception:
        pass


@pytest.mark.parametrize("case", sorted(TEXT_BAD))
def test_text_format_rejects(text_store, case):
    s, p = text_store
    check_rejected(s, p, lambda: TEXT_BAD[case](s), ValueError)


@pytest.mark.parametrize("key", ["a|b", "a\nb"])
def test_text_format_delitem_of_impossible_key(text_store, key):
    s, p = text_store
    check_rejected(s, p, lambda: s.__delitem__(key), (KeyError, ValueError))


def test_text_rejection_on_new_store_creates_no_segment(tmp_path):
    p = str(tmp_path / "new")
    s = mpkv.Store(p, format="text")
    try:
        before = snapshot(p)
        for bad in (lambda: s.put("a|b", "v"), lambda: s.put("k", "v\n"), lambda: s.put("k", b"v"),
                    lambda: s.delete("x\n"), lambda: s.put(1, "v")):
            with pytest.raises((ValueError, TypeError)):
                bad()
        assert segs(p) == []
        assert snapshot(p) == before
    finally:
        s.close()


# --- records over the limit ---------------------------------------------------------


def _too_big(fmt):
    # text: 'P|k|' + value + '\n' is LIMIT + 1 characters; binary: 18 + 1 + 46 = LIMIT + 1
    return "x" * (LIMIT - 4) if fmt == "text" else "x" * (LIMIT - 18)


OVER = {
    "put": lambda s, fmt: s.put("k", _too_big(fmt)),
    "put-existing-key": lambda s, fmt: s.put("a", _too_big(fmt)),
    "setitem": lambda s, fmt: s.__setitem__("k", _too_big(fmt)),
    "put-huge": lambda s, fmt: s.put("k", "y" * 10_000),
    "put-wide-chars": lambda s, fmt: s.put("k", "é" * (LIMIT - 4)),
    "delete-long-key": lambda s, fmt: s.delete("k" * LIMIT),
    "tx-put": lambda s, fmt: _tx(s, lambda tx: tx.put("k", _too_big(fmt))),
    "tx-delete": lambda s, fmt: _tx(s, lambda tx: tx.delete("k" * LIMIT)),
}


@pytest.mark.parametrize("case", sorted(OVER))
def test_record_over_limit(store, case):
    s, p, fmt = store
    check_rejected(s, p, lambda: OVER[case](s, fmt), ValueError)


def test_binary_bytes_value_over_limit(tmp_path):
    p = str(tmp_path / "b")
    s = mpkv.Store(p, max_segment_bytes=LIMIT)
    overhead = 16 + 9 + 1  # record header, entry header, key (docs/format.md)
    s.put("a", b"\x00" * (LIMIT - overhead))  # exactly LIMIT bytes: fits
    check_rejected(s, p, lambda: s.put("a", b"\x00" * (LIMIT - overhead + 1)), ValueError)


def test_over_limit_on_new_store_creates_no_segment(tmp_path):
    for fmt in ("text", "binary"):
        p = str(tmp_path / fmt)
        s = mpkv.Store(p, format=fmt, max_segment_bytes=LIMIT)
        try:
            before = snapshot(p)
            with pytest.raises(ValueError):
                s.put("k", _too_big(fmt))
            assert segs(p) == []
            assert snapshot(p) == before
            assert len(s) == 0
        finally:
            s.close()


# --- lone surrogates: either stored faithfully or rejected without a trace ------------


def test_lone_surrogate_key_is_all_or_nothing(store):
    s, p, _ = store
    before = snapshot(p)
    items = sorted(s.items())
    try:
        s.put("\ud800", "v")
    except (TypeError, ValueError, mpkv.Error):
        assert snapshot(p) == before
        assert sorted(s.items()) == items
    else:
        s.close()
        s2 = mpkv.Store(p)
        try:
            assert s2.get("\ud800") == "v"
        finally:
            s2.close()


# --- paths that are not stores ------------------------------------------------------

OPEN_VARIANTS = [
    pytest.param({}, id="defaults"),
    pytest.param({"format": "text"}, id="text"),
    pytest.param({"format": "binary", "max_segment_bytes": 100}, id="binary-limit"),
    pytest.param({"readonly": True}, id="readonly"),
]


@pytest.mark.parametrize("opts", OPEN_VARIANTS)
def test_path_is_a_regular_file(tmp_path, opts):
    f = tmp_path / "plain"
    f.write_bytes(b"precious data\n")
    before = snapshot(tmp_path)
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(str(f), **opts)
    with pytest.raises(mpkv.FormatError), mpkv.open(str(f), **opts):
        pass
    assert f.read_bytes() == b"precious data\n"
    assert snapshot(tmp_path) == before  # nothing created next to it either


@pytest.mark.parametrize("opts", OPEN_VARIANTS)
@pytest.mark.parametrize(
    "contents",
    [
        pytest.param({"notes.txt": b"hello"}, id="one-file"),
        pytest.param({"data.json": b"{}", "sub/x.bin": b"\x00\x01"}, id="file-and-subdir"),
        pytest.param({"empty-subdir/": None}, id="empty-subdir"),
        pytest.param({"000000000001.txt": b"P|a|1\n"}, id="log-like-file"),
    ],
)
def test_non_empty_foreign_directory(tmp_path, opts, contents):
    d = tmp_path / "foreign"
    d.mkdir()
    for name, data in contents.items():
        target = d / name
        if data is None:
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    before = snapshot(d)
    with pytest.raises(mpkv.FormatError):
        mpkv.Store(str(d), **opts)
    assert snapshot(d) == before
    assert not (d / ".mpkv").exists()


def test_format_error_is_an_mpkv_error():
    assert issubclass(mpkv.FormatError, mpkv.Error)


# --- conflicting options on reopen --------------------------------------------------

CONFLICTS = [
    pytest.param({}, {"format": "text"}, id="binary-store-opened-as-text"),
    pytest.param({"format": "text"}, {"format": "binary"}, id="text-store-opened-as-binary"),
    pytest.param({"max_segment_bytes": 100}, {"max_segment_bytes": 200}, id="bigger-limit"),
    pytest.param({"max_segment_bytes": 100}, {"max_segment_bytes": 50}, id="smaller-limit"),
    pytest.param({"format": "text", "max_segment_bytes": 100},
                 {"format": "text", "max_segment_bytes": 101}, id="text-other-limit"),
    pytest.param({}, {"max_segment_bytes": 1000}, id="default-limit-then-explicit"),
    pytest.param({}, {"format": "json"}, id="unknown-format"),
    pytest.param({"format": "text"}, {"format": "text", "max_segment_bytes": 0}, id="zero-limit"),
]


@pytest.mark.parametrize("created, reopened", CONFLICTS)
def test_conflicting_options_on_reopen(tmp_path, created, reopened):
    p = str(tmp_path / "s")
    s = mpkv.Store(p, **created)
    s.put("a", "1")
    s.delete("b")
    s.close()
    before = snapshot(p)
    with pytest.raises(ValueError):
        mpkv.Store(p, **reopened)
    with pytest.raises(ValueError), mpkv.open(p, **reopened):
        pass
    with pytest.raises(ValueError):
        mpkv.Store(p, readonly=True, **reopened)
    assert snapshot(p) == before
    s = mpkv.Store(p)
    try:
        assert dict(s.items()) == {"a": "1"}
    finally:
        s.close()


def test_conflicting_options_while_store_is_open(tmp_path):
    p = str(tmp_path / "s")
    s = mpkv.Store(p, format="text", max_segment_bytes=100)
    try:
        s.put("a", "1")
        before = snapshot(p)
        with pytest.raises(ValueError):
            mpkv.Store(p, format="binary")
        with pytest.raises(ValueError):
            mpkv.Store(p, max_segment_bytes=10)
        assert snapshot(p) == before
        s.put("b", "2")
        assert s.get("b") == "2"
    finally:
        s.close()


# --- invalid options on a new path --------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param({"format": "json"}, id="unknown-format"),
        pytest.param({"format": "TEXT"}, id="format-wrong-case"),
        pytest.param({"max_segment_bytes": 0}, id="zero-limit"),
        pytest.param({"max_segment_bytes": -5}, id="negative-limit"),
        pytest.param({"fsync": "sometimes"}, id="unknown-fsync"),
    ],
)
def test_invalid_options_create_nothing(tmp_path, opts):
    p = tmp_path / "parent" / "store"
    with pytest.raises(ValueError):
        mpkv.Store(str(p), **opts)
    assert not p.exists()
