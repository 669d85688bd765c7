"""Values left in their segment files (the keydir): each test hunts one way a value read
through a map could be wrong, lost or leaked."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc

import pytest

import mpkv
from mpkv import keydir, shm
from mpkv.errors import CorruptionError
from mpkv.store import KeyReader
from tests.conftest import die, in_child

BIG = "v" * 1000  # out of line: over keydir.INLINE_MAX encoded bytes


def _segments(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def _flip_in_value(path: str, marker: bytes) -> str:
    """Flip one byte inside the value that contains ``marker``; the file changed."""
    for name in _segments(path):
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            data = f.read()
        at = data.find(marker)
        if at >= 0:
            with open(file, "r+b") as f:
                f.seek(at + len(marker) // 2)
                f.write(bytes([data[at + len(marker) // 2] ^ 0x20]))
            return file
    raise AssertionError(f"{marker!r} not found")


@pytest.mark.parametrize("fmt", ["binary", "text"])
@pytest.mark.parametrize("compacted", [False, True])
def test_damaged_out_of_line_value_is_corruption_error_not_wrong_data(tmp_path, fmt, compacted):
    path = str(tmp_path / "s")
    value = "ab" * 300
    with mpkv.Store(path, format=fmt, fsync="never", auto_compact=False) as s:
        s["victim"] = value
        s["other"] = BIG
        if compacted:
            s.compact()
    with mpkv.Store(path, readonly=True) as r:
        assert isinstance(r._view["victim"], int), "a large value stays in its file"
        file = _flip_in_value(path, value.encode())
        with pytest.raises(CorruptionError) as info:
            r.get("victim")
        assert info.value.path == file
        assert "damaged value at offset" in str(info.value)
        assert r["other"] == BIG  # the rest of the store still reads
        with pytest.raises(CorruptionError):
            dict(r.items())
    if fmt == "binary":  # text has no checksums on disk: only the read-time check
        report = mpkv.verify(path)
        assert not report.ok and any(d.file == file for d in report.damage)


def test_reader_keeps_reading_a_compacted_segment_it_has_mapped(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s["a"] = BIG
        s["a"] = BIG + "2"
        s["b"] = BIG + "b"
    r = mpkv.Store(path, readonly=True, max_staleness=None)  # sees only what refresh shows
    try:
        assert r["a"] == BIG + "2"
        before = _segments(path)
        assert in_child(lambda: mpkv.Store(path).compact()["segments_before"]) == ("ok", 1)
        assert not set(before) & set(_segments(path)), "compaction removed the old segment"
        # The segment is gone from the directory; the map this reader holds is not.
        assert r["a"] == BIG + "2" and r["b"] == BIG + "b"
        r.refresh()
        assert r["a"] == BIG + "2" and r["b"] == BIG + "b"
    finally:
        r.close()


def test_reader_without_a_map_reads_the_new_files_after_compaction(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        for i in range(20):
            s[f"k{i}"] = BIG + str(i)
        s["k3"] = BIG + "new"
    r = mpkv.Store(path, readonly=True, max_staleness=None)
    try:
        assert in_child(lambda: mpkv.Store(path).compact()["segments_before"])[0] == "ok"
        # Nothing of the old segment was mapped: the reader moves to the new files.
        assert r["k3"] == BIG + "new"
        assert {k: r[k] for k in r} == {f"k{i}": BIG + ("new" if i == 3 else str(i))
                                        for i in range(20)}
    finally:
        r.close()


def test_mapped_value_survives_the_next_writer_truncating_a_crashed_write(tmp_path):
    path = str(tmp_path / "s")
    w = mpkv.Store(path, fsync="never", auto_compact=False)
    w["k1"] = BIG + "1"
    r = mpkv.Store(path, readonly=True)

    def crash_before_publishing() -> None:
        with mpkv.Store(path, fsync="never", auto_compact=False) as c:
            c["warm"] = "up"  # the writer has checked the log's tail and published
            shm.SharedState.publish = lambda *a, **k: die()  # type: ignore[method-assign]
            c["k2"] = "x" * 5000  # written, never published

    assert in_child(crash_before_publishing)[0] == "killed"
    segment = os.path.join(path, _segments(path)[-1])
    grown = os.path.getsize(segment)
    assert r["k1"] == BIG + "1"  # maps the segment, unpublished bytes included
    w.close()
    with mpkv.Store(path, fsync="never", auto_compact=False) as w2:
        w2["k3"] = BIG + "3"  # cuts the unpublished record first, then appends
    assert os.path.getsize(segment) < grown
    assert r["k1"] == BIG + "1"
    assert r["k3"] == BIG + "3" and "k2" not in r and r["warm"] == "up"
    r.close()


def test_forked_child_and_parent_both_read_values_through_their_own_maps(tmp_path):
    path = str(tmp_path / "s")
    s = mpkv.Store(path, fsync="never", auto_compact=False)
    s.update({f"k{i}": BIG + str(i) for i in range(50)})
    assert s["k7"] == BIG + "7"  # the parent has a live map

    def child() -> dict[str, str]:
        s["k50"] = BIG + "child"
        s.compact()
        return {k: s[k] for k in s}

    status, seen = in_child(child)
    assert status == "ok"
    expected = {f"k{i}": BIG + str(i) for i in range(50)} | {"k50": BIG + "child"}
    assert seen == expected
    assert {k: s[k] for k in s} == expected
    s.close()


def test_writer_keeps_no_private_copy_of_the_large_values_it_writes(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never") as s:
        s["one"] = BIG
        s.update({"many": b"b" * 500, "small": "tiny"})
        with s.transaction() as tx:
            tx["tx"] = BIG + "tx"
        assert all(isinstance(s._view[k], int) for k in ("one", "many", "tx"))
        assert s._view["small"] == "tiny"
        assert (s["one"], s["many"], s["tx"]) == (BIG, b"b" * 500, BIG + "tx")


@pytest.mark.parametrize("serializer", ["raw", "json"])
def test_values_around_the_inline_limit_read_back_exactly(tmp_path, serializer):
    path = str(tmp_path / "s")
    limit = keydir.INLINE_MAX
    values: dict[str, object] = {}
    for n in range(limit - 3, limit + 4):
        values[f"s{n}"] = "é" * (n // 2) + "a" * (n % 2)  # 2-byte UTF-8: bytes != chars
        values[f"a{n}"] = "a" * n
        if serializer == "raw":
            values[f"b{n}"] = bytes(range(256))[:n] if n <= 256 else b"x" * n
        else:
            values[f"j{n}"] = {"list": list(range(n // 3))}
    with mpkv.Store(path, serializer=serializer, fsync="never") as s:
        s.update(values)
        assert {k: s[k] for k in values} == values
    with mpkv.Store(path) as s:
        assert {k: s[k] for k in values} == values
        s.compact()
    with mpkv.Store(path) as s:
        assert {k: s[k] for k in values} == values


def test_maps_stay_bounded_with_many_segments(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", max_segment_bytes=1200, auto_compact=False) as s:
        for i in range(keydir.MAX_MAPPED * 3):
            s[f"k{i}"] = BIG + str(i)
    assert len(_segments(path)) >= keydir.MAX_MAPPED * 3
    fds = len(os.listdir("/proc/self/fd"))
    with mpkv.Store(path, readonly=True) as r:
        for _ in range(2):
            assert all(r[f"k{i}"] == BIG + str(i) for i in range(keydir.MAX_MAPPED * 3))
        # one descriptor per map at most, plus the store's own few
        assert len(os.listdir("/proc/self/fd")) - fds <= keydir.MAX_MAPPED + 8


def test_threads_reading_large_values_during_puts_and_compaction_see_whole_values(tmp_path):
    path = str(tmp_path / "s")
    s = mpkv.Store(path, fsync="never", auto_compact=False)
    s.update({f"k{i}": f"{i:04d}" * 100 for i in range(40)})
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for i in range(40):
                v = s[f"k{i}"]
                if v != v[:4] * 100:
                    errors.append(f"k{i}: torn value {v[:12]!r}...")

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(30):
            s.update({f"k{i}": f"{round_ * 40 + i:04d}" * 100 for i in range(0, 40, 3)})
            if round_ % 10 == 9:
                s.compact()
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.close()
    assert not errors


def test_keys_len_and_membership_read_no_value_file(tmp_path):
    path = str(tmp_path / "s")
    value = "cd" * 300
    with mpkv.Store(path, fsync="never") as s:
        s.update({"victim": value, "small": "x"})
    with mpkv.Store(path, readonly=True) as r:
        _flip_in_value(path, value.encode())
        # None of these may read the damaged value's bytes...
        assert sorted(r) == ["small", "victim"] and sorted(r.keys()) == ["small", "victim"]
        assert len(r) == 2 and "victim" in r and "nope" not in r
        # ...which a read of the value does.
        with pytest.raises(CorruptionError):
            r["victim"]


# --- one key's lookup (`mpkv get`): hints give that key alone ----------------------

def _hinted_store(path: str, serializer: str = "raw") -> dict[str, object]:
    """A compacted store with hints, then changes after the compaction; its state."""
    values: dict[str, object] = {
        "inline": "small", "long": BIG, "uni": "é" * 200, "tiny-uni": "ü",
        "gone-later": BIG + "g", "changed-later": "before", "k\0nul": "nul key",
    }
    if serializer == "raw":
        values.update({"raw": b"\x00\xff" * 10, "raw-long": bytes(range(256)) * 2})
    else:
        values.update({"doc": {"a": [1, 2, 3]}, "big-doc": {"x": "y" * 500}})
    values.update({f"fill{i}": str(i) * (i % 300) for i in range(300)})
    with mpkv.Store(path, serializer=serializer, fsync="never", auto_compact=False) as s:
        s.update(values)
        s.compact()
        s.delete("gone-later")
        s["changed-later"] = "after" * 40
        s["tail-only"] = "t"
    values.pop("gone-later")
    values.update({"changed-later": "after" * 40, "tail-only": "t"})
    return values


@pytest.mark.parametrize("serializer", ["raw", "json"])
def test_key_reader_gives_what_a_full_open_gives_for_every_kind_of_key(tmp_path, serializer):
    path = str(tmp_path / "s")
    values = _hinted_store(path, serializer)
    assert os.listdir(os.path.join(path, ".mpkv", "hints")), "the compaction wrote hints"
    for key in [*values, "gone-later", "absent", "fill"]:
        with KeyReader(path, key) as reader:
            assert reader.get(key, "MISSING") == values.get(key, "MISSING"), key


def test_key_reader_loads_no_other_key_from_a_hint(tmp_path):
    path = str(tmp_path / "s")
    _hinted_store(path)
    with KeyReader(path, "fill7") as reader:
        # the one key from the hint; the rest only from the log after the compaction
        assert set(reader._view) == {"fill7", "changed-later", "tail-only"}
        assert reader["fill7"] == "7" * 7


def test_mpkv_get_prints_a_value_found_through_a_hint(tmp_path):
    path = str(tmp_path / "s")
    values = _hinted_store(path)
    out = subprocess.run([sys.executable, "-m", "mpkv", "get", path, "uni"],
                         capture_output=True, text=True, check=True).stdout
    assert out.rstrip("\n") == values["uni"]
    gone = subprocess.run([sys.executable, "-m", "mpkv", "get", path, "gone-later"],
                          capture_output=True, text=True)
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_values_read_on_a_file_system_that_cannot_map_files(tmp_path, monkeypatch):
    path = str(tmp_path / "s")

    real = keydir.mmap.mmap

    def no_mmap(fd: int, size: int, **kwargs: object) -> object:
        if "prot" in kwargs:  # the value maps; the shared state file still maps
            raise OSError(19, "No such device (mmap)")
        return real(fd, size, **kwargs)

    monkeypatch.setattr(keydir.mmap, "mmap", no_mmap)
    with mpkv.Store(path, fsync="never") as s:
        s.update({f"k{i}": BIG + str(i) for i in range(20)})
        s["k3"] = b"b" * 300
        assert s["k3"] == b"b" * 300 and s["k7"] == BIG + "7"
    with mpkv.Store(path, readonly=True) as r:
        assert {k: r[k] for k in r} == {**{f"k{i}": BIG + str(i) for i in range(20)},
                                        "k3": b"b" * 300}
        value = (BIG + "5").encode()
        _flip_in_value(path, value)
        with pytest.raises(CorruptionError):
            r["k5"]


def test_open_never_holds_every_record_of_the_log_at_once(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        for r in range(300):  # 300,000 puts of 100-byte values over 1,000 keys: 37 MB
            s.update({f"k{i}": f"{r:03d}{i:05d}" + "v" * 92 for i in range(1000)})
    tracemalloc.start()
    try:
        with mpkv.Store(path, readonly=True) as r:
            _, peak = tracemalloc.get_traced_memory()
            assert len(r) == 1000 and r["k7"] == "29900007" + "v" * 92
    finally:
        tracemalloc.stop()
    # Before: every unit of the log decoded into one list, then applied (about 78 MB);
    # now about one 4 MiB chunk's units at a time (about 22 MB).
    assert peak < 40 << 20, f"opening took {peak >> 20} MB"
