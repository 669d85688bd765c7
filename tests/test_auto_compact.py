"""Automatic compaction: a writer compacts in the background once dead records dominate."""

import os

import mpkv
from mpkv.segments import list_segments


def _disk(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in list_segments(path))


def _overwrite(path, rounds, **options):
    expected = {}
    with mpkv.Store(path, max_segment_bytes=256 * 1024, fsync="never", **options) as s:
        for r in range(rounds):
            for i in range(4000):
                s[f"k{i:05d}"] = expected[f"k{i:05d}"] = f"{r}-" + "v" * 100
    return expected


def test_auto_compaction_bounds_disk_use(tmp_path):
    path = str(tmp_path / "s")
    expected = _overwrite(path, 25)
    live = sum(len(k) + len(v) for k, v in expected.items())
    # 25 overwrites of everything would be > 25x the live data without compaction.
    assert _disk(path) < 12 * live
    assert any(".0001." in n for n in list_segments(path))  # a compaction output exists
    with mpkv.Store(path) as s:
        assert dict(s) == expected
    assert mpkv.verify(path).ok


def test_auto_compact_false_never_compacts(tmp_path):
    path = str(tmp_path / "s")
    expected = _overwrite(path, 8, auto_compact=False)
    assert not any(".0001." in n for n in list_segments(path))
    with mpkv.Store(path) as s:
        assert dict(s) == expected
