"""Behaviour of mpkv.Store on real files, as CONTRACT.md states it."""

from __future__ import annotations

import collections.abc
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import dir_state as snapshot

import mpkv

REPO = Path(__file__).resolve().parents[1]
SEG_RE = re.compile(r"^\d{12}\.seg$")


# --- helpers ----------------------------------------------------------------------


def segs(path) -> list[str]:
    """Segment file names in replay order."""
    return sorted(f for f in os.listdir(path) if f.endswith(".seg"))


def seg_bytes(path) -> list[bytes]:
    return [Path(path, f).read_bytes() for f in segs(path)]


def seg_texts(path) -> list[str]:
    return [b.decode("utf-8") for b in seg_bytes(path)]




HSIZE = 16  # bytes of a binary record header (docs/format.md)


def parse_binary(data: bytes) -> list[bytes]:
    """Split a binary segment into records, checking every header and checksum."""
    recs, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= HSIZE, f"short header at {pos}"
        crc, length, rtype, sync, hcrc = struct.unpack_from("<IIB3sI", data, pos)
        assert sync == b"\x9d\xe3\x1f" and zlib.crc32(data[pos + 4 : pos + 12]) == hcrc
        end = pos + HSIZE + length
        assert end <= len(data), f"record at {pos} runs past the end"
        assert zlib.crc32(data[pos + 4 : end]) == crc, f"bad crc at {pos}"
        assert rtype == 1
        recs.append(data[pos:end])
        pos = end
    return recs


def bsize(key: str, value=None) -> int:
    """Size of the binary record of one put (or, value None, one delete)."""
    v = b"" if value is None else (value if isinstance(value, bytes) else value.encode())
    return HSIZE + 9 + len(key.encode()) + len(v)


def run_py(code: str, *args: str, input: bytes | None = None, timeout: float = 60) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        input=input,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode()


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def mk():
    """Open stores that are closed again at teardown."""
    opened = []

    def _mk(p, **kw):
        s = mpkv.Store(p, **kw)
        opened.append(s)
        return s

    yield _mk
    for s in opened:
        try:
            s.close()
        except Exception:
            pass


# --- opening ------------------------------------------------------------------------


def test_creates_directory_with_parents_and_no_segment_before_first_write(tmp_path, mk):
    p = str(tmp_path / "a" / "b" / "c")
    s = mk(p)
    assert os.path.isdir(p)
    assert s.get("x") is None
    assert len(s) == 0
    assert list(s) == []
    assert "x" not in s
    s.refresh()
    assert segs(p) == []
    s.close()
    s = mk(p)
    assert len(s) == 0
    assert segs(p) == []
    s.put("k", "v")
    assert len(segs(p)) == 1


def test_empty_existing_directory_is_a_new_store(tmp_path, mk):
    p = tmp_path / "empty"
    p.mkdir()
    s = mk(str(p))
    s.put("a", "1")
    assert s.get("a") == "1"


def test_pathlike_path(tmp_path, mk):
    p = tmp_path / "pl"
    s = mk(p)
    s.put("a", "1")
    s.close()
    assert mk(str(p)).get("a") == "1"


def test_store_is_a_mutable_mapping(path, mk):
    assert isinstance(mk(path), collections.abc.MutableMapping)


def test_mpkv_open_is_a_context_manager(path):
    with mpkv.open(path, format="text", max_segment_bytes=100) as s:
        assert isinstance(s, mpkv.Store)
        s.put("a", "1")
    with pytest.raises(mpkv.ClosedError):
        s.get("a")
    assert seg_texts(path) == ["P|a|1\n"]
    with mpkv.open(path) as s:
        assert s.get("a") == "1"


def test_store_context_manager_closes_on_exit_and_on_exception(path):
    with mpkv.Store(path) as s:
        assert isinstance(s, mpkv.Store)
        s.put("a", "1")
    with pytest.raises(mpkv.ClosedError):
        s.put("b", "2")
    with pytest.raises(RuntimeError, match="boom"), mpkv.Store(path) as s2:
        s2.put("b", "2")
        raise RuntimeError("boom")
    with pytest.raises(mpkv.ClosedError):
        s2.get("a")
    with mpkv.Store(path) as s3:
        assert dict(s3.items()) == {"a": "1", "b": "2"}


# --- put / get / delete -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_put_get_delete(path, mk, fmt):
    s = mk(path, format=fmt)
    assert s.get("a") is None
    assert s.get("a", "dflt") == "dflt"
    s.put("a", "1")
    assert s.get("a") == "1"
    assert s.get("a", "dflt") == "1"
    s.put("a", "2")
    assert s.get("a") == "2"
    s.put("e", "")
    assert s.get("e", "dflt") == ""
    assert s.delete("a") is True
    assert s.get("a") is None
    assert s.delete("a") is False
    assert s.delete("never") is False
    s.close()
    s = mk(path)
    assert s.get("a") is None
    assert s.get("e") == ""
    assert dict(s.items()) == {"e": ""}


def test_str_and_bytes_values_round_trip_in_binary(path, mk):
    values = {
        "s": "text",
        "b": b"bytes",
        "es": "",
        "eb": b"",
        "raw": bytes(range(256)),
        "nl": "line1\nline2|x",
        "bnl": b"\n|\n",
        "uni": "é🙂\u2028",
        "big": b"\x00" * 100_000,
    }
    s = mk(path)
    for k, v in values.items():
        s.put(k, v)

    def check(st):
        for k, v in values.items():
            got = st.get(k)
            assert got == v and type(got) is type(v), k
            assert type(st[k]) is type(v)
        assert dict(st.items()) == values

    check(s)
    s.close()
    check(mk(path))


BINARY_KEYS = ["", "|", "\n", "a|b\nc", "P|x|y", "D|x", "é", "日本語", "🙂", "\x00", "\r\n",
               "\u2028", "k" * 5000]


def test_any_unicode_keys_in_binary(path, mk):
    s = mk(path)
    for i, k in enumerate(BINARY_KEYS):
        s.put(k, str(i))
    for i, k in enumerate(BINARY_KEYS):
        assert s.get(k) == str(i)
        assert k in s
    assert sorted(s) == sorted(BINARY_KEYS)
    s.close()
    s = mk(path)
    for i, k in enumerate(BINARY_KEYS):
        assert s[k] == str(i)
    assert len(s) == len(BINARY_KEYS)
    for k in BINARY_KEYS[::2]:
        assert s.delete(k) is True
    s.close()
    s = mk(path)
    assert sorted(s) == sorted(BINARY_KEYS[1::2])


def test_text_format_allowed_odd_characters(path, mk):
    """Only '|' and '\\n' in keys and '\\n' in values are forbidden in text format."""
    data = {"": "empty key", "k": "", "pipe": "a|b|c", "cr": "x\ry", "\r": "cr key",
            "ls": "a\u2028b\x85c", "é": "ü🙂", "nul": "\x00", "sp": " lead and trail "}
    s = mk(path, format="text", max_segment_bytes=10_000)
    for k, v in data.items():
        s.put(k, v)
    s.delete("")
    s.close()
    expected_log = "".join(f"P|{k}|{v}\n" for k, v in data.items()) + "D|\n"
    assert seg_texts(path) == [expected_log]
    s = mk(path)
    del data[""]
    assert dict(s.items()) == data
    for k, v in data.items():
        assert s.get(k) == v


# --- MutableMapping -----------------------------------------------------------------


def test_mapping_protocol(path, mk):
    s = mk(path)
    with pytest.raises(KeyError):
        s["a"]
    s["a"] = "1"
    s["b"] = b"2"
    s["c"] = "3"
    assert s["a"] == "1" and s["b"] == b"2"
    assert "a" in s and "zz" not in s
    assert len(s) == 3
    assert sorted(iter(s)) == ["a", "b", "c"]
    assert sorted(s.keys()) == ["a", "b", "c"]
    assert "b" in s.keys()  # noqa: SIM118 (the keys view itself is under test)
    assert len(s.keys()) == 3
    assert sorted(s.values(), key=repr) == sorted(["1", b"2", "3"], key=repr)
    assert sorted(s.items()) == [("a", "1"), ("b", b"2"), ("c", "3")]
    assert ("a", "1") in s.items()
    assert s == {"a": "1", "b": b"2", "c": "3"}
    del s["a"]
    assert "a" not in s
    with pytest.raises(KeyError):
        s["a"]
    assert len(s) == 2
    assert s.pop("b") == b"2"
    assert s.pop("b", "gone") == "gone"
    assert s.setdefault("d", "4") == "4"
    assert s.setdefault("d", "5") == "4"
    s.update({"e": "5"}, f="6")
    assert dict(s) == {"c": "3", "d": "4", "e": "5", "f": "6"}
    s.clear()
    assert len(s) == 0 and list(s) == []
    s.close()
    assert len(mk(path)) == 0


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_del_missing_raises_keyerror_and_writes_nothing(path, mk, fmt):
    s = mk(path, format=fmt)
    s.put("a", "1")
    s.delete("a")
    before = snapshot(path)
    with pytest.raises(KeyError):
        del s["a"]
    with pytest.raises(KeyError):
        del s["never"]
    assert snapshot(path) == before
    s.close()
    if fmt == "text":
        assert seg_texts(path) == ["P|a|1\nD|a\n"]


def test_del_missing_on_new_store_creates_no_segment(path, mk):
    s = mk(path, format="text")
    with pytest.raises(KeyError):
        del s["x"]
    assert segs(path) == []


# --- one record per mutating call ---------------------------------------------------


def test_every_put_and_delete_appends_one_text_record(path, mk):
    s = mk(path, format="text", max_segment_bytes=10_000)
    expected = ""
    steps = [
        (lambda: s.put("a", "1"), "P|a|1\n"),
        (lambda: s.put("a", "1"), "P|a|1\n"),  # same value again: still a record
        (lambda: s.delete("a"), "D|a\n"),
        (lambda: s.delete("a"), "D|a\n"),  # missing key: still a record
        (lambda: s.delete("zzz"), "D|zzz\n"),
        (lambda: s.__setitem__("b", "2"), "P|b|2\n"),
        (lambda: s.__delitem__("b"), "D|b\n"),
        (lambda: s.put("", ""), "P||\n"),
    ]
    for action, line in steps:
        action()
        expected += line
        assert seg_texts(path) == [expected]
    s.close()
    assert seg_texts(path) == [expected]


def test_every_put_and_delete_appends_one_binary_record(path, mk):
    s = mk(path)
    sizes = []
    steps = [
        (lambda: s.put("a", "1"), bsize("a", "1")),
        (lambda: s.put("a", "1"), bsize("a", "1")),
        (lambda: s.put("é", b"\x00\xff"), bsize("é", b"\x00\xff")),
        (lambda: s.delete("a"), bsize("a")),
        (lambda: s.delete("a"), bsize("a")),
        (lambda: s.delete("missing"), bsize("missing")),
        (lambda: s.__setitem__("b", ""), bsize("b", "")),
        (lambda: s.__delitem__("b"), bsize("b")),
    ]
    for action, size in steps:
        action()
        sizes.append(size)
        (data,) = seg_bytes(path)
        recs = parse_binary(data)
        assert [len(r) for r in recs] == sizes
    s.close()
    recs = parse_binary(seg_bytes(path)[0])
    assert b"missing" in recs[5]
    assert "é".encode() in recs[2] and b"\x00\xff" in recs[2]


def test_default_format_is_binary(path, mk):
    s = mk(path)
    s.put("key", "value")
    s.close()
    (data,) = seg_bytes(path)
    assert not data.startswith(b"P|")
    assert [len(r) for r in parse_binary(data)] == [bsize("key", "value")]


# --- segments and rotation ----------------------------------------------------------


def test_segment_names_sort_in_creation_order(path, mk):
    s = mk(path, format="text", max_segment_bytes=6)
    for i in range(12):
        s.put(chr(ord("a") + i), "1")
        names = segs(path)
        assert len(names) == i + 1
        assert all(SEG_RE.match(n) for n in names), names
    assert seg_texts(path) == [f"P|{chr(ord('a') + i)}|1\n" for i in range(12)]
    # nothing but segments (and the hidden .mpkv directory) in the store directory
    assert set(os.listdir(path)) - set(segs(path)) <= {".mpkv"}


def test_text_rotation_rule(path, mk):
    s = mk(path, format="text", max_segment_bytes=10)
    s.put("a", "1")  # 6
    assert seg_texts(path) == ["P|a|1\n"]
    s.put("bb", "2")  # 7: 13 > 10 -> new segment
    assert seg_texts(path) == ["P|a|1\n", "P|bb|2\n"]
    s.delete("a")  # 4: 11 > 10 -> new segment
    assert seg_texts(path) == ["P|a|1\n", "P|bb|2\n", "D|a\n"]
    s.put("c", "3")  # 6: 10 == 10 fits
    assert seg_texts(path) == ["P|a|1\n", "P|bb|2\n", "D|a\nP|c|3\n"]
    s.delete("x")  # full -> new segment
    assert seg_texts(path) == ["P|a|1\n", "P|bb|2\n", "D|a\nP|c|3\n", "D|x\n"]
    s.close()
    assert dict(mk(path).items()) == {"bb": "2", "c": "3"}


@pytest.mark.parametrize("fmt, rec", [("text", 6), ("binary", bsize("a", "1"))])
def test_record_equal_to_limit_fits_an_empty_segment(path, mk, fmt, rec):
    s = mk(path, format=fmt, max_segment_bytes=rec)
    s.put("a", "1")
    assert len(segs(path)) == 1
    s.put("b", "2")
    assert len(segs(path)) == 2
    assert [len(b) for b in seg_bytes(path)] == [rec, rec]
    s.close()
    assert dict(mk(path).items()) == {"a": "1", "b": "2"}


def test_text_limit_counted_in_characters(path, mk):
    s = mk(path, format="text", max_segment_bytes=12)
    s.put("é", "ü")  # 6 characters, 8 bytes
    s.put("a", "b")  # 6 characters: 12 characters total fits (14 bytes)
    assert seg_texts(path) == ["P|é|ü\nP|a|b\n"]
    s.put("日", "本")  # 6 characters, new segment
    s.put("x", "🙂")  # 6 characters
    assert seg_texts(path) == ["P|é|ü\nP|a|b\n", "P|日|本\nP|x|🙂\n"]
    s.close()
    s = mk(path)
    s.put("c", "1")
    assert seg_texts(path)[-1] == "P|c|1\n"
    assert len(segs(path)) == 3


def test_binary_rotation_rule(path, mk):
    r = bsize("k", "v")
    s = mk(path, max_segment_bytes=2 * r + 5)
    s.put("k", "v")
    s.put("k", "v")
    assert [len(b) for b in seg_bytes(path)] == [2 * r]
    s.delete("k")  # 2 * r + r - 1 > 2 * r + 5 -> new segment
    assert [len(b) for b in seg_bytes(path)] == [2 * r, bsize("k")]
    s.put("k", "vvvvvvv")  # (r - 1) + (r + 6) = 2 * r + 5 fits exactly
    assert [len(b) for b in seg_bytes(path)] == [2 * r, 2 * r + 5]
    s.put("k", "")  # r - 1 -> new segment
    assert [len(b) for b in seg_bytes(path)] == [2 * r, 2 * r + 5, bsize("k", "")]
    for b in seg_bytes(path):
        parse_binary(b)
    s.close()
    assert dict(mk(path).items()) == {"k": ""}


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_too_big_record_raises_and_writes_nothing(tmp_path, mk, fmt):
    p = str(tmp_path / "s")
    limit = 5 if fmt == "text" else bsize("a", "1") - 1
    s = mk(p, format=fmt, max_segment_bytes=limit)
    before = snapshot(p)
    with pytest.raises(ValueError):
        s.put("a", "1")
    with pytest.raises(ValueError):
        s["a"] = "1"
    assert segs(p) == []
    assert snapshot(p) == before
    if fmt == "text":
        s.put("", "")  # 4 characters: fits
    else:
        s.delete("")  # bsize("") bytes: fits
    before = snapshot(p)
    with pytest.raises(ValueError):
        s.put("a", "1")
    with pytest.raises(ValueError):
        s.delete("abcdefgh")
    assert snapshot(p) == before
    assert "a" not in s


def test_reopen_continues_appending_to_last_segment(path, mk):
    s = mk(path, format="text", max_segment_bytes=18)
    s.put("a", "1")
    s.close()
    s = mk(path)
    s.put("b", "2")
    assert seg_texts(path) == ["P|a|1\nP|b|2\n"]
    s.close()
    s = mk(path, format="text", max_segment_bytes=18)
    s.put("c", "3")
    assert seg_texts(path) == ["P|a|1\nP|b|2\nP|c|3\n"]
    s.close()
    s = mk(path)  # last segment is exactly full now
    s.put("d", "4")
    assert seg_texts(path) == ["P|a|1\nP|b|2\nP|c|3\n", "P|d|4\n"]


def test_reopen_continues_appending_binary(path, mk):
    r = bsize("a", "1")
    s = mk(path, max_segment_bytes=3 * r)
    s.put("a", "1")
    s.put("b", "2")
    s.close()
    s = mk(path)
    s.put("c", "3")
    assert [len(b) for b in seg_bytes(path)] == [3 * r]
    s.close()
    s = mk(path)
    s.put("d", "4")
    assert [len(b) for b in seg_bytes(path)] == [3 * r, r]
    assert dict(s.items()) == {"a": "1", "b": "2", "c": "3", "d": "4"}


def test_format_and_limit_remembered(path, mk):
    s = mk(path, format="text", max_segment_bytes=10)
    s.put("a", "1")
    s.close()
    s = mk(path)  # None: what the store has
    s.put("bb", "2")  # 13 > 10 -> new segment, text line
    assert seg_texts(path) == ["P|a|1\n", "P|bb|2\n"]
    with pytest.raises(ValueError):
        s.put("k", b"bytes")  # still text format
    s.close()


def test_format_and_limit_remembered_without_any_write(path, mk):
    s = mk(path, format="text", max_segment_bytes=10)
    s.close()
    s = mk(path)
    s.put("a", "1")
    s.put("b", "2")
    assert seg_texts(path) == ["P|a|1\n", "P|b|2\n"]


@pytest.mark.parametrize(
    "created, reopened",
    [
        ({}, {"format": "text"}),
        ({"format": "text"}, {"format": "binary"}),
        ({"format": "binary", "max_segment_bytes": 100}, {"max_segment_bytes": 101}),
        ({"format": "text", "max_segment_bytes": 100}, {"format": "text", "max_segment_bytes": 99}),
        ({}, {"max_segment_bytes": 1000}),
    ],
)
def test_conflicting_explicit_options_raise(path, mk, created, reopened):
    s = mk(path, **created)
    s.put("a", "1")
    s.close()
    with pytest.raises(ValueError):
        mpkv.Store(path, **reopened)
    s = mk(path, **created)  # the same explicit values are fine
    assert s.get("a") == "1"


def test_default_limit_is_large(path, mk):
    s = mk(path)
    for i in range(500):
        s.put(f"k{i}", "v" * 100)
    assert len(segs(path)) == 1


# --- serialize / deserialize --------------------------------------------------------


def test_serialize_deserialize_round_trip(tmp_path, mk):
    a = mk(str(tmp_path / "a"))
    data = {"s": "1", "b": b"\x00\x01", "": "", "eb": b"", "nl": "x\ny|z", "é": "🙂"}
    for k, v in data.items():
        a.put(k, v)
    a.put("gone", "x")
    a.delete("gone")
    snap = tmp_path / "snaps" / "snap.bin"
    snap.parent.mkdir()
    a.serialize(str(snap))
    assert snap.is_file()
    assert os.listdir(snap.parent) == ["snap.bin"]  # one file, no leftovers
    b = mk(str(tmp_path / "b"))
    b.deserialize(str(snap))
    assert dict(b.items()) == data
    for k, v in data.items():
        assert type(b[k]) is type(v)
    b.close()
    b = mk(str(tmp_path / "b"))
    assert dict(b.items()) == data
    assert dict(a.items()) == data  # the source is unchanged


def test_deserialize_replaces_whole_contents(tmp_path, mk):
    a = mk(str(tmp_path / "a"))
    a.put("x", "1")
    a.put("shared", "from-a")
    snap = str(tmp_path / "snap")
    a.serialize(snap)
    b = mk(str(tmp_path / "b"))
    b.put("shared", "from-b")
    b.put("only-b", b"zz")
    b.deserialize(snap)
    assert dict(b.items()) == {"x": "1", "shared": "from-a"}
    assert b.get("only-b") is None
    b.put("after", "ok")
    b.close()
    b = mk(str(tmp_path / "b"))
    assert dict(b.items()) == {"x": "1", "shared": "from-a", "after": "ok"}


def test_snapshot_moves_between_formats(tmp_path, mk):
    t = mk(str(tmp_path / "t"), format="text")
    t.put("a", "1")
    t.put("b", "x|y")
    snap = str(tmp_path / "snap")
    t.serialize(snap)
    b = mk(str(tmp_path / "b"))
    b.put("other", b"\x00")
    b.deserialize(snap)
    assert dict(b.items()) == {"a": "1", "b": "x|y"}
    b.put("c", "3")
    b.serialize(snap)
    t2 = mk(str(tmp_path / "t2"), format="text", max_segment_bytes=100)
    t2.deserialize(snap)
    assert dict(t2.items()) == {"a": "1", "b": "x|y", "c": "3"}
    t2.close()
    t2 = mk(str(tmp_path / "t2"))
    assert dict(t2.items()) == {"a": "1", "b": "x|y", "c": "3"}


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_deserialize_state_larger_than_one_segment(tmp_path, mk, fmt):
    """Every entry fits a segment, the whole state does not: deserialize must still work
    (the contract gives deserialize no size limit; only a single oversized record may
    raise ValueError)."""
    limit = 100
    src = mk(str(tmp_path / "src"), format=fmt, max_segment_bytes=limit)
    data = {f"key{i:02d}": f"value-{i:02d}" for i in range(20)}
    for k, v in data.items():
        src.put(k, v)
    assert len(segs(str(tmp_path / "src"))) > 1
    snap = str(tmp_path / "snap")
    src.serialize(snap)
    dst = mk(str(tmp_path / "dst"), format=fmt, max_segment_bytes=limit)
    dst.put("old", "x")
    dst.deserialize(snap)
    assert dict(dst.items()) == data
    dst.close()
    assert dict(mk(str(tmp_path / "dst")).items()) == data


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_deserialize_empty_snapshot_clears_many_keys(tmp_path, mk, fmt):
    limit = 40
    empty = mk(str(tmp_path / "empty"))
    snap = str(tmp_path / "snap")
    empty.serialize(snap)
    s = mk(str(tmp_path / "s"), format=fmt, max_segment_bytes=limit)
    for i in range(10):
        s.put(f"k{i}", "v")
    s.deserialize(snap)
    assert len(s) == 0
    s.close()
    assert len(mk(str(tmp_path / "s"))) == 0


def test_serialize_empty_store_and_overwrite(tmp_path, mk):
    a = mk(str(tmp_path / "a"))
    snap = tmp_path / "snap"
    snap.write_bytes(b"old contents")
    a.serialize(str(snap))
    b = mk(str(tmp_path / "b"))
    b.put("k", "v")
    b.deserialize(str(snap))
    assert len(b) == 0 and b.get("k") is None
    b.close()
    assert len(mk(str(tmp_path / "b"))) == 0


@pytest.mark.parametrize(
    "garbage",
    [b"\x00garbage\xff" * 20, b"not a snapshot, just some words\n"],
    ids=["binary-junk", "text-junk"],
)
def test_garbage_snapshot_raises_and_leaves_store_unchanged(tmp_path, mk, garbage):
    p = str(tmp_path / "s")
    s = mk(p)
    s.put("a", "1")
    s.put("b", b"2")
    snap = tmp_path / "garbage"
    snap.write_bytes(garbage)
    before = {f: b for f, b in snapshot(p).items() if f.endswith(".seg")}
    with pytest.raises(mpkv.Error):
        s.deserialize(str(snap))
    assert dict(s.items()) == {"a": "1", "b": b"2"}
    assert {f: b for f, b in snapshot(p).items() if f.endswith(".seg")} == before
    assert snap.read_bytes() == garbage
    s.close()
    assert dict(mk(p).items()) == {"a": "1", "b": b"2"}


def test_truncated_snapshot_raises_and_leaves_store_unchanged(tmp_path, mk):
    src = mk(str(tmp_path / "src"))
    for i in range(200):
        src.put(f"key{i:04d}", f"value-{i}" * 3)
    snap = tmp_path / "snap"
    src.serialize(str(snap))
    whole = snap.read_bytes()
    half = tmp_path / "half"
    half.write_bytes(whole[: len(whole) // 2])
    s = mk(str(tmp_path / "s"))
    s.put("mine", "1")
    with pytest.raises(mpkv.Error):
        s.deserialize(str(half))
    assert dict(s.items()) == {"mine": "1"}
    s.close()
    assert dict(mk(str(tmp_path / "s")).items()) == {"mine": "1"}


# --- closed -------------------------------------------------------------------------


def _consume(x):
    if isinstance(x, collections.abc.Iterator) or hasattr(x, "__next__"):
        return next(x)
    return x


CLOSED_CALLS = {
    "get": lambda s, t: s.get("a"),
    "put": lambda s, t: s.put("a", "1"),
    "delete": lambda s, t: s.delete("a"),
    "getitem": lambda s, t: s["a"],
    "setitem": lambda s, t: s.__setitem__("a", "1"),
    "delitem": lambda s, t: s.__delitem__("a"),
    "contains": lambda s, t: "a" in s,
    "len": lambda s, t: len(s),
    "iter": lambda s, t: list(s),
    "keys": lambda s, t: list(s.keys()),
    "values": lambda s, t: list(s.values()),
    "items": lambda s, t: list(s.items()),
    "transaction": lambda s, t: s.transaction().__enter__(),
    "refresh": lambda s, t: s.refresh(),
    "serialize": lambda s, t: s.serialize(str(t / "out")),
    "deserialize": lambda s, t: s.deserialize(str(t / "snap")),
    "compact": lambda s, t: s.compact(),
    "watch": lambda s, t: _consume(iter(s.watch(timeout=0.2))),
}


@pytest.mark.parametrize("call", sorted(CLOSED_CALLS))
def test_use_after_close_raises_closed_error(tmp_path, call):
    p = str(tmp_path / "s")
    s = mpkv.Store(p)
    s.put("a", "1")
    s.serialize(str(tmp_path / "snap"))
    s.close()
    before = snapshot(p)
    with pytest.raises(mpkv.ClosedError):
        CLOSED_CALLS[call](s, tmp_path)
    assert snapshot(p) == before
    assert not (tmp_path / "out").exists()


def test_closed_error_is_an_mpkv_error():
    for name in ("FormatError", "CorruptionError", "ClosedError", "LockTimeout", "ReadOnlyError"):
        assert issubclass(getattr(mpkv, name), mpkv.Error)


# --- transactions -------------------------------------------------------------------


def test_transaction_commits_on_normal_exit(path, mk):
    s = mk(path)
    s.put("old", "x")
    with s.transaction() as tx:
        tx.put("a", "1")
        tx.put("b", b"2")
        tx.delete("old")
    assert dict(s.items()) == {"a": "1", "b": b"2"}
    s.close()
    assert dict(mk(path).items()) == {"a": "1", "b": b"2"}


def test_transaction_sees_committed_state_and_own_writes(path, mk):
    s = mk(path)
    s.put("a", "1")
    s.put("d", "4")
    with s.transaction() as tx:
        assert tx.get("a") == "1"
        assert tx["a"] == "1"
        assert tx.get("missing") is None
        assert tx.get("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            tx["missing"]
        tx.put("a", "2")
        assert tx.get("a") == "2"
        assert tx["a"] == "2"
        tx.put("n", b"new")
        assert tx.get("n") == b"new"
        tx.delete("d")
        assert tx.get("d") is None
        tx.put("d", "again")
        assert tx.get("d") == "again"
    assert dict(s.items()) == {"a": "2", "d": "again", "n": b"new"}


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_transaction_writes_nothing_on_exception(path, mk, fmt):
    s = mk(path, format=fmt)
    s.put("a", "1")
    s.put("b", "2")
    before = snapshot(path)
    with pytest.raises(KeyError, match="boom"), s.transaction() as tx:
        tx.put("a", "changed")
        tx.put("c", "3")
        tx.delete("b")
        raise KeyError("boom")
    assert dict(s.items()) == {"a": "1", "b": "2"}
    assert snapshot(path) == before
    s.close()
    assert dict(mk(path).items()) == {"a": "1", "b": "2"}


def test_text_transaction_logs_every_call_in_order(path, mk):
    s = mk(path, format="text", max_segment_bytes=1000)
    with s.transaction() as tx:
        tx.put("a", "1")
        tx.put("b", "2")
        tx.delete("a")
        tx.delete("nope")
    assert seg_texts(path) == ["P|a|1\nP|b|2\nD|a\nD|nope\n"]
    assert dict(s.items()) == {"b": "2"}


def test_store_put_inside_transaction_same_thread_does_not_deadlock(path, mk):
    s = mk(path)
    outcome = {}

    def body():
        try:
            with s.transaction() as tx:
                tx.put("a", "1")
                try:
                    s.put("b", "2")
                    outcome["put"] = "ok"
                except Exception as exc:  # a clear error is acceptable, a hang is not
                    outcome["put"] = exc
            outcome["done"] = True
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive(), "store.put inside an open transaction deadlocked"
    assert "error" not in outcome, outcome
    assert outcome.get("done")
    assert s.get("a") == "1"
    if outcome["put"] == "ok":
        assert s.get("b") == "2"
    else:
        assert isinstance(outcome["put"], Exception)


def test_store_reads_inside_transaction_same_thread_do_not_deadlock(path, mk):
    """Not spelled out in the contract; a serious store must not hang here either."""
    s = mk(path)
    s.put("a", "1")
    outcome = {}

    def body():
        try:
            with s.transaction() as tx:
                tx.put("b", "2")
                outcome["get"] = s.get("a")
                outcome["len"] = len(s)
            outcome["done"] = True
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive(), "store.get inside an open transaction deadlocked"
    assert outcome.get("done"), outcome
    assert outcome["get"] == "1"
    assert dict(s.items()) == {"a": "1", "b": "2"}


def test_transaction_holds_writer_lock_across_processes(path, mk):
    s = mk(path, lock_timeout=0.3)
    s.put("base", "0")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import sys, mpkv\n"
        "s = mpkv.Store(sys.argv[1])\n"
        "with s.transaction() as tx:\n"
        "    tx.put('held', '1')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
        "s.close()\n"
        "print('done', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        before = snapshot(path)
        t0 = time.monotonic()
        with pytest.raises(mpkv.LockTimeout):
            s.put("x", "1")
        assert time.monotonic() - t0 < 10
        assert snapshot(path) == before
        assert s.get("base") == "0"
    finally:
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
        except OSError:
            pass
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "done" in out
    assert s.get("held") == "1"
    s.put("x", "1")
    assert s.get("x") == "1"


# --- other processes: refresh, staleness --------------------------------------------

WRITER = (
    "import sys, mpkv\n"
    "s = mpkv.Store(sys.argv[1])\n"
    "s.put('a', '1')\n"
    "s.put('b', '2')\n"
    "s.delete('a')\n"
    "s.close()\n"
)


def test_refresh_returns_number_of_records_applied(path, mk):
    s = mk(path, max_staleness=None)
    s.put("mine", "0")
    assert s.refresh() == 0  # own writes are already applied
    run_py(WRITER, path)
    assert s.get("b") is None  # max_staleness=None: only refresh() moves the view
    assert "b" not in s
    assert s.refresh() == 3
    assert s.get("b") == "2"
    assert s.get("a") is None
    assert dict(s.items()) == {"mine": "0", "b": "2"}
    assert s.refresh() == 0


def test_read_after_write_across_processes_by_default(path, mk):
    s = mk(path)
    s.put("mine", "0")
    run_py(WRITER, path)
    assert s.get("b") == "2"
    assert dict(s.items()) == {"mine": "0", "b": "2"}


# --- pickling -----------------------------------------------------------------------


def test_pickled_store_reopens_on_same_path(path, mk):
    s = mk(path, format="text", max_segment_bytes=100)
    s.put("a", "1")
    s2 = pickle.loads(pickle.dumps(s))
    try:
        assert s2 is not s
        assert isinstance(s2, mpkv.Store)
        assert s2.get("a") == "1"
        s2.put("b", "2")
        assert s2.get("b") == "2"
        assert s.get("b") == "2"
    finally:
        s2.close()
    assert seg_texts(path) == ["P|a|1\nP|b|2\n"]


def test_pickled_store_works_in_another_process(path, mk):
    s = mk(path)
    s.put("a", "from-parent")
    code = (
        "import pickle, sys\n"
        "s = pickle.loads(sys.stdin.buffer.read())\n"
        "print(s.get('a'))\n"
        "s.put('c', 'from-child')\n"
        "s.close()\n"
    )
    out = run_py(code, input=pickle.dumps(s))
    assert out.strip() == "from-parent"
    assert s.get("c") == "from-child"


def test_pickle_keeps_options(path, mk):
    w = mk(path)
    w.put("a", "1")
    w.close()
    ro = mk(path, readonly=True)
    ro2 = pickle.loads(pickle.dumps(ro))
    try:
        assert ro2.get("a") == "1"
        with pytest.raises(mpkv.ReadOnlyError):
            ro2.put("b", "2")
    finally:
        ro2.close()


# --- readonly -----------------------------------------------------------------------


def test_readonly_rejects_writes(path, mk):
    w = mk(path, format="text")
    w.put("a", "1")
    w.put("b", "2")
    w.serialize(os.path.join(os.path.dirname(path), "snap"))
    w.close()
    before = snapshot(path)
    ro = mk(path, readonly=True)
    assert ro.get("a") == "1"
    assert ro["b"] == "2"
    assert dict(ro.items()) == {"a": "1", "b": "2"}
    assert len(ro) == 2
    writes = [
        lambda: ro.put("c", "3"),
        lambda: ro.put("a", "1"),
        lambda: ro.delete("a"),
        lambda: ro.delete("missing"),
        lambda: ro.__setitem__("c", "3"),
        lambda: ro.__delitem__("a"),
        lambda: ro.deserialize(os.path.join(os.path.dirname(path), "snap")),
    ]
    for w_ in writes:
        with pytest.raises(mpkv.ReadOnlyError):
            w_()
    with pytest.raises(mpkv.ReadOnlyError), ro.transaction() as tx:
        tx.put("c", "3")
    assert dict(ro.items()) == {"a": "1", "b": "2"}
    ro.close()
    assert snapshot(path) == before


# --- threads ------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["iter", "keys", "values", "items"])
def test_iteration_is_a_point_in_time_view(path, mk, view):
    s = mk(path)
    original = {f"k{i:03d}": "v" for i in range(100)}
    for k, v in original.items():
        s.put(k, v)
    it = {"iter": lambda: iter(s), "keys": lambda: iter(s.keys()),
          "values": lambda: iter(s.values()), "items": lambda: iter(s.items())}[view]()
    seen = [next(it)]

    def writer():
        for i in range(50):
            s.put(f"new{i}", "x")
        for i in range(0, 100, 2):
            s.delete(f"k{i:03d}")
        for i in range(1, 100, 2):
            s.put(f"k{i:03d}", "changed")

    t = threading.Thread(target=writer)
    t.start()
    t.join(30)
    assert not t.is_alive()
    seen += list(it)
    expected = {"iter": list(original), "keys": list(original),
                "values": list(original.values()), "items": list(original.items())}[view]
    assert sorted(seen) == sorted(expected)
    assert len(s) == 100


def test_concurrent_thread_writers(path, mk):
    s = mk(path, format="text", max_segment_bytes=200)
    errors = []

    def worker(n):
        try:
            for i in range(50):
                s.put(f"t{n}-{i}", str(i))
                assert s.get(f"t{n}-{i}") == str(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(s) == 200
    lines = "".join(seg_texts(path)).splitlines()
    assert len(lines) == 200
    assert all(len(t) <= 200 for t in seg_texts(path))
    s.close()
    assert len(mk(path)) == 200
