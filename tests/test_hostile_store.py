"""A store directory is input, not trust: links, special files, odd permissions and
damaged side files planted by anyone who can write the directory never make mpkv write,
truncate or delete anything outside it, and never destroy data inside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mpkv

OUTSIDE = b"precious bytes that live outside the store\n" * 4


def make_store(path: Path, n: int = 20, **options) -> str:
    p = str(path)
    with mpkv.Store(p, max_segment_bytes=100, **options) as s:
        for i in range(n):
            s[f"k{i}"] = f"v{i}"
    return p


def segs(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".seg"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file of someone else's, outside every store."""
    f = tmp_path / "victim" / "file"
    f.parent.mkdir()
    f.write_bytes(OUTSIDE)
    return f


# --- links are never followed ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_newest_segment_linked_outside_is_not_truncated_or_written(tmp_path, outside, fmt):
    p = make_store(tmp_path / "s", format=fmt)
    newest = os.path.join(p, segs(p)[-1])
    os.unlink(newest)
    os.symlink(outside, newest)
    with pytest.raises(mpkv.FormatError, match=segs(p)[-1]), mpkv.Store(p) as s:
        s["x"] = "y"
    assert outside.read_bytes() == OUTSIDE
    assert os.path.islink(newest)


@pytest.mark.parametrize("name", ["shm", "lock", "dirlock", "compact.lock"])
def test_side_file_linked_outside_is_not_written(tmp_path, outside, name):
    p = make_store(tmp_path / "s")
    side = os.path.join(p, ".mpkv", name)
    if os.path.exists(side):
        os.unlink(side)
    os.symlink(outside, side)
    with pytest.raises(mpkv.FormatError, match=name), mpkv.Store(p) as s:
        s.compact()
    assert outside.read_bytes() == OUTSIDE


@pytest.mark.parametrize("name", ["lock", "dirlock", "shm"])
def test_dangling_side_link_creates_nothing_outside(tmp_path, name):
    p = make_store(tmp_path / "s")
    side = os.path.join(p, ".mpkv", name)
    os.unlink(side)
    target = tmp_path / "elsewhere" / "created"
    target.parent.mkdir()
    os.symlink(target, side)
    with pytest.raises(mpkv.FormatError, match=name):
        mpkv.Store(p)
    assert not target.exists()


def test_readers_folder_linked_out_is_refused_at_open(tmp_path):
    p = make_store(tmp_path / "s")
    other = tmp_path / "other"
    other.mkdir()
    (other / "999999999-1").write_text("1")  # looks like a dead reader's entry
    readers = os.path.join(p, ".mpkv", "readers")
    if os.path.isdir(readers):
        os.rmdir(readers)
    os.symlink(other, readers)
    with pytest.raises(mpkv.FormatError, match="readers"):
        mpkv.Store(p)
    assert (other / "999999999-1").read_text() == "1"


def test_readers_folder_swapped_for_link_while_open_makes_compact_delete_nothing(tmp_path):
    p = make_store(tmp_path / "s")
    other = tmp_path / "other"
    other.mkdir()
    (other / "999999999-1").write_text("1")
    with mpkv.Store(p, max_segment_bytes=100) as s:
        readers = os.path.join(p, ".mpkv", "readers")
        if os.path.isdir(readers):
            os.rmdir(readers)
        os.symlink(other, readers)
        with pytest.raises(mpkv.FormatError, match="readers"):
            s.compact()
    assert (other / "999999999-1").read_text() == "1"


@pytest.mark.parametrize("folder", [".mpkv", ".mpkv/retained", ".mpkv/quarantine"])
def test_store_folders_that_are_links_are_refused(tmp_path, folder):
    p = make_store(tmp_path / "s")
    real = tmp_path / "real"
    link = os.path.join(p, folder)
    if os.path.isdir(link):
        os.rename(link, real)
    else:
        real.mkdir()
    os.symlink(real, link)
    with pytest.raises(mpkv.FormatError, match=os.path.basename(folder)):
        mpkv.Store(p)
    with pytest.raises(mpkv.FormatError, match=os.path.basename(folder)):
        mpkv.repair(p)


def test_planted_link_at_the_old_txn_temp_name_is_not_written_through(tmp_path, outside):
    p = str(tmp_path / "s")
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
        for pid in {os.getpid(), os.getppid()}:
            os.symlink(outside, os.path.join(p, ".mpkv", f"txn.{pid}.tmp"))
        with s.transaction() as tx:  # a multi-line text commit writes the intent file
            tx["b"], tx["c"] = "2", "3"
        assert dict(s) == {"a": "1", "b": "2", "c": "3"}
    assert outside.read_bytes() == OUTSIDE


def test_fifo_as_newest_segment_is_refused_not_waited_on(tmp_path):
    p = make_store(tmp_path / "s")
    newest = os.path.join(p, segs(p)[-1])
    os.unlink(newest)
    os.mkfifo(newest)
    code = ("import mpkv, sys\n"
            "try:\n    mpkv.Store(sys.argv[1], readonly=True)\n"
            "except mpkv.FormatError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith("refused") and segs(p)[-1] in out.stdout


def test_backup_to_a_symlink_replaces_the_linked_file_and_keeps_the_link(tmp_path):
    p = make_store(tmp_path / "s")
    target = tmp_path / "backups" / "2026.snap"
    target.parent.mkdir()
    target.write_bytes(b"old backup")
    link = tmp_path / "latest.snap"
    link.symlink_to(target)
    with mpkv.Store(p) as s:
        s.serialize(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    fresh = str(tmp_path / "fresh")
    with mpkv.Store(fresh) as s:
        s.deserialize(target)
        assert len(s) == 20
    assert not [f for f in os.listdir(target.parent) if f != "2026.snap"]  # no temp left
