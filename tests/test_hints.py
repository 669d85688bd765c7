"""Hint files (docs/format.md, "Hint files"): compaction writes, with each output, its
keys and where its values are, so that opening a compacted store reads keys only.

A hint is a cache: opening through one must give exactly the view replay gives, and any
hint that does not check out (damaged, of another file, hostile) must be ignored, never
obeyed; ``verify`` reports it and ``repair`` removes it.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import SegmentReads, replayed, view_entries

import mpkv
from mpkv import hints
from mpkv.keydir import INLINE_MAX, ValueFiles

MAXSEG = 20000  # a few outputs per compaction


def _items(fmt: str, serializer: str) -> dict[str, Any]:
    """Keys and values that exercise every column: non-ASCII, empty, str and bytes,
    sizes on both sides of the inline limit (encoded bytes, not code points)."""
    items: dict[str, Any] = {"nul\0key": "its output cuts keys by length"}
    top = INLINE_MAX + 11
    for i in range(150):
        n = 3000 + i if i % 3 == 1 else i * 7 % top  # large values: hints pay off
        key = ["k", "ключ-", "🔑", "a b"][i % 4] + str(i)
        if serializer == "json":
            items[key] = {"n": i, "s": "é" * (n // 2), "l": list(range(n % 7))}
        elif fmt == "binary" and i % 3 == 0:
            items[key] = (bytes(range(256)) * (1 + n // 256))[:n]
        else:
            items[key] = ("x" if i % 2 else "é") * (n // (1 + i % 2))
    quotes = 0 if serializer == "raw" else 2  # a JSON string is encoded with its quotes
    items[""] = "" if serializer == "raw" else 0
    items["edge-inline"] = "y" * (INLINE_MAX - quotes)
    items["edge-in-file"] = "y" * (INLINE_MAX + 1 - quotes)
    items["utf8-inline"] = "é" * (INLINE_MAX // 2 - quotes)  # half the code points
    items["utf8-in-file"] = "é" * (INLINE_MAX // 2 + 1)  # 2 bytes over the limit
    return items


def _build(path: str, fmt: str = "binary", serializer: str = "raw") -> dict[str, Any]:
    """A store compacted into several outputs, then written some more; its items."""
    items = _items(fmt, serializer)
    with mpkv.Store(path, format=fmt, serializer=serializer, max_segment_bytes=MAXSEG,
                    auto_compact=False) as s:
        for k, v in items.items():
            s[k] = v
            s[k] = v  # garbage for the compaction
        s.delete("k4")
        s.compact()
        s["after"] = "x" * 1000
        return dict(s.items())


def _outputs(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.count(".") == 2)


@pytest.mark.parametrize("serializer", ["raw", "json"])
@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_open_through_hints_gives_the_view_replay_gives(tmp_path: Path, fmt: str,
                                                        serializer: str) -> None:
    path = str(tmp_path / "s")
    expect = _build(path, fmt, serializer)
    outputs = _outputs(path)
    assert len(outputs) >= 2
    assert sorted(hints.names(path)) == outputs
    with SegmentReads() as reads, mpkv.Store(path) as s:
        entries, items = view_entries(s), dict(s.items())
    assert not set(reads.files) & set(outputs), "an output was replayed despite its hint"
    assert (entries, items) == replayed(path)
    assert items == expect
    assert any(v[0] == "in file" for _, v in entries if isinstance(v, tuple))
    assert mpkv.verify(path).ok and not mpkv.verify(path).notes


def test_an_empty_compacted_store_opens_through_its_hint(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with mpkv.Store(path, auto_compact=False) as s:
        s["gone"] = "x" * 1000
        del s["gone"]
        s.compact()
    (output,) = _outputs(path)
    assert hints.names(path) == [output]
    with SegmentReads() as reads, mpkv.Store(path) as s:
        assert dict(s.items()) == {}
    assert output not in reads.files


def test_open_through_hints_leaves_large_values_in_the_file(tmp_path: Path) -> None:
    """Open reads keys only: large values are handles into an output nobody has read
    or mapped yet; a get maps it and checks the value's CRC."""
    path = str(tmp_path / "s")
    expect = _build(path)
    with SegmentReads() as reads, mpkv.Store(path) as s:
        assert not set(reads.files) & set(_outputs(path))
        handles = [k for k, v in s._view.items() if type(v) is int]
        assert "utf8-in-file" in handles and "utf8-inline" not in handles
        assert "edge-in-file" in handles and "edge-inline" not in handles
        files = {s._values.files[s._view[k] >> 32] for k in handles}  # type: ignore[operator]
        assert all(vf.map is None for vf in files)
        assert {k: s[k] for k in handles} == {k: expect[k] for k in handles}


def test_a_damaged_out_of_line_value_read_through_a_hint_is_corruption(
        tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    _build(path)
    with mpkv.Store(path) as s:
        handle = s._view["utf8-in-file"]
        assert type(handle) is int
        vf = s._values.files[handle >> 32]
        offset, file = vf.offsets[handle & 0xFFFFFFFF], vf.file
    with mpkv.Store(path) as s:
        fd = os.open(file, os.O_RDWR)  # damaged after the open through the hint
        try:
            os.pwrite(fd, b"\xff", offset + 3)
        finally:
            os.close(fd)
        with pytest.raises(mpkv.CorruptionError):
            s.get("utf8-in-file")


# --- hints that must be ignored -------------------------------------------------------


def _reseal(data: bytes) -> bytes:
    """``data`` with its trailing CRC-32 made right again (what a hostile writer does)."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def _first_offset_at(data: bytes) -> int:
    """Where the offsets column of a hint starts."""
    count, nstr, nraw = hints.HEAD.unpack_from(data)[10:13]
    return hints.HEAD.size + 5 * count + 4 * nstr + 4 * nraw


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :]


def _flip_byte(path: str, hint: str) -> str:
    data = Path(hint).read_bytes()
    Path(hint).write_bytes(_flip(data, len(data) // 2))
    return "checksum mismatch"


def _truncate(path: str, hint: str) -> str:
    data = Path(hint).read_bytes()
    Path(hint).write_bytes(data[: len(data) - 7])
    return "checksum mismatch"


def _wrong_magic(path: str, hint: str) -> str:
    Path(hint).write_bytes(_reseal(b"MPKVHINT" + Path(hint).read_bytes()[8:]))
    return "bad magic"


def _wrong_version(path: str, hint: str) -> str:
    data = Path(hint).read_bytes()
    Path(hint).write_bytes(_reseal(data[:8] + struct.pack("<I", 99) + data[12:]))
    return "unknown hint version 99"


def _copied_from_another_output(path: str, hint: str) -> str:
    other = os.path.join(os.path.dirname(hint), hints.names(path)[-1])
    assert other != hint
    shutil.copyfile(other, hint)
    return "describes another output"


def _output_rewritten(path: str, hint: str) -> str:
    output = os.path.join(path, os.path.basename(hint))
    shutil.copy2(output, output + ".new")  # same bytes and mtime, another inode
    os.replace(output + ".new", output)
    return "describes another file"


def _offset_out_of_range(path: str, hint: str) -> str:
    data = Path(hint).read_bytes()
    at = _first_offset_at(data)
    size = os.path.getsize(os.path.join(path, os.path.basename(hint)))
    Path(hint).write_bytes(_reseal(data[:at] + struct.pack("<Q", size) + data[at + 8 :]))
    return "past the end of the output"


def _symlinked(path: str, hint: str) -> str:
    elsewhere = os.path.join(os.path.dirname(path), "elsewhere")
    os.replace(hint, elsewhere)  # a valid hint, but reached through a link
    os.symlink(elsewhere, hint)
    return "symbolic link"


#: how to spoil the first output's hint; damage (verify fails) or stale (a note)
SPOILERS = [(_flip_byte, True), (_truncate, True), (_wrong_magic, True),
            (_wrong_version, True), (_copied_from_another_output, False),
            (_output_rewritten, False), (_offset_out_of_range, True), (_symlinked, True)]


@pytest.mark.parametrize("fmt", ["binary", "text"])
@pytest.mark.parametrize(("spoil", "damage"), SPOILERS, ids=[f.__name__ for f, _ in SPOILERS])
def test_a_bad_hint_is_ignored_reported_and_repaired(tmp_path: Path, fmt: str, spoil: Any,
                                                     damage: bool) -> None:
    path = str(tmp_path / "s")
    _build(path, fmt)
    first = _outputs(path)[0]
    hint = hints.hint_path(path, first)
    said = spoil(path, hint)
    with SegmentReads() as reads, mpkv.Store(path) as s:
        got = view_entries(s), dict(s.items())
    assert first in reads.files, "the bad hint was used: its output was not replayed"
    assert got == replayed(path)
    report = mpkv.verify(path)
    found = [str(d) for d in report.damage] if damage else report.notes
    assert report.ok is not damage
    assert len(found) == 1 and hint in found[0] and said in found[0], (found, said)
    before = os.readlink(hint) if os.path.islink(hint) else Path(hint).read_bytes()
    fixed = mpkv.repair(path)
    if damage:  # repair never deletes damaged bytes: they go to the quarantine
        moved = os.path.join(path, ".mpkv", "quarantine", f"hint-{first}.bad")
        assert f"moved {hint} aside to {moved}" in fixed.actions
        assert fixed.quarantined == [moved]
        assert (os.readlink(moved) if os.path.islink(moved)
                else Path(moved).read_bytes()) == before
    else:
        assert f"removed {hint}" in fixed.actions
    assert not os.path.lexists(hint)
    assert mpkv.verify(path).ok and not mpkv.verify(path).notes
    with mpkv.Store(path) as s:
        assert (view_entries(s), dict(s.items())) == got



def test_repair_moves_a_folder_at_a_hint_path_aside_instead_of_failing(tmp_path: Path) -> None:
    # repair stopped with "Is a directory" (exit 1) while verify kept asking for it
    path = str(tmp_path / "s")
    _build(path, "binary")
    first = _outputs(path)[0]
    hint = hints.hint_path(path, first)
    os.unlink(hint)
    os.mkdir(hint)
    Path(hint, "inside").write_text("kept")
    assert not mpkv.verify(path).ok
    fixed = mpkv.repair(path)
    moved = os.path.join(path, ".mpkv", "quarantine", f"hint-{first}.bad")
    assert fixed.quarantined == [moved]
    assert Path(moved, "inside").read_text() == "kept"
    assert not os.path.lexists(hint)
    assert mpkv.verify(path).ok

def test_verify_finds_a_hint_that_disagrees_with_its_output(tmp_path: Path) -> None:
    """A hint bound to its output, with a valid CRC, that names another key: open
    trusts it (it is bound to that exact file), verify compares it with the records."""
    path = str(tmp_path / "s")
    _build(path)
    hint = hints.hint_path(path, _outputs(path)[0])
    data = Path(hint).read_bytes()
    parsed = hints.parse(data)
    assert not isinstance(parsed, str)
    key = parsed.keys[0].encode()
    at = data.index(key, hints.HEAD.size)
    Path(hint).write_bytes(_reseal(data[:at] + _flip(key, 0) + data[at + len(key) :]))
    report = mpkv.verify(path)
    assert not report.ok
    assert "its keys are not the output's keys" in str(report.damage[0])


# --- when hints are written and removed ------------------------------------------------


def test_hints_of_a_compaction_that_did_not_commit_are_tidied(tmp_path: Path) -> None:
    """Outputs and hints written, then the compaction died before its switch: the log
    ignores them, verify says nothing, the next compaction removes them."""
    from mpkv import compaction
    from mpkv.segments import Meta, read_meta

    path = str(tmp_path / "s")
    _build(path)
    with mpkv.Store(path, auto_compact=False) as s:
        for i in range(2 * MAXSEG // 1500):  # rotates: the segment compaction seals first
            s[f"fill{i}"] = "f" * 1500
        expect = dict(s.items())
    meta = read_meta(path)
    assert isinstance(meta, Meta)
    number = max(int(n[:12]) for n in os.listdir(path) if n.endswith(".seg")) - 1
    zombie = compaction.State({"zombie": "z" * 1000}, ValueFiles())
    outs = compaction.write_outputs(path, meta.codec, zombie, meta.max_segment_bytes, number)
    os.rename(outs[0].path, os.path.join(path, f"{number:012d}.0001.seg"))
    stray = f"{number:012d}.0001.seg"
    assert stray in hints.names(path)
    with mpkv.Store(path) as s:
        assert dict(s.items()) == expect
    report = mpkv.verify(path)
    assert report.ok and not report.notes, report.summary()
    with mpkv.Store(path, auto_compact=False) as s:
        s.compact()
        assert dict(s.items()) == expect
    assert stray not in hints.names(path)
    assert sorted(hints.names(path)) == _outputs(path)


def test_a_later_compaction_removes_the_hints_of_its_inputs(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    _build(path)
    before = set(hints.names(path))
    Path(path, ".mpkv", "hints", ".hint-0123.tmp").write_bytes(b"left by a crash")
    with mpkv.Store(path, auto_compact=False) as s:
        s["more"] = "m" * 1000
        s.compact()
    after = set(hints.names(path))
    assert after == set(_outputs(path)) and not after & before


def test_a_hints_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """Compaction writes and deletes in .mpkv/hints: a link there would make it write
    or delete elsewhere, so opening refuses the store, as for the other folders."""
    path = str(tmp_path / "s")
    _build(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / _outputs(path)[0]).write_bytes(b"not mpkv's")
    shutil.rmtree(os.path.join(path, ".mpkv", "hints"))
    os.symlink(outside, os.path.join(path, ".mpkv", "hints"))
    with pytest.raises(mpkv.FormatError, match="hints"):
        mpkv.Store(path)
    assert [p.name for p in outside.iterdir()] == [_outputs(path)[0]]


def _small_values_store(path: str) -> tuple[str, dict[str, bytes]]:
    """A compacted store of 60,000 keys with 100-byte values (all inline in its hint,
    whose value blob is most of it); its one output's hint and its items."""
    items = {f"k{i}": bytes([i % 251]) * 100 for i in range(60_000)}
    with mpkv.Store(path, auto_compact=False) as s:
        s.update(items)
        s.compact()
    (output,) = _outputs(path)
    return hints.hint_path(path, output), items


def test_one_key_lookup_does_not_hold_the_whole_hint(tmp_path: Path) -> None:
    # mpkv get read the whole hint into one bytes object to check its checksum: most
    # of it values it does not want (116 MB for 1M keys x 100 B)
    import tracemalloc

    path = str(tmp_path / "s")
    hint, items = _small_values_store(path)
    size = os.path.getsize(hint)
    tracemalloc.start()
    try:
        with mpkv.store.KeyReader(path, "k12345") as reader:
            got = reader.get("k12345")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == items["k12345"]
    assert peak < size * 3 // 4, f"{peak} bytes traced for a hint of {size}"


@pytest.mark.parametrize("where", ["value blob", "key blob", "checksum"])
def test_one_key_lookup_checks_the_whole_hint(tmp_path: Path, where: str) -> None:
    # a lookup that reads the value blobs in passing must still check every byte
    path = str(tmp_path / "s")
    hint, items = _small_values_store(path)
    data = bytearray(Path(hint).read_bytes())
    fields = hints.HEAD.unpack_from(data)
    values_at = len(data) - 4 - fields[15] - fields[16]
    at = {"value blob": values_at + 100 * 12345 + 7, "key blob": values_at - 3,
          "checksum": len(data) - 1}[where]
    data[at] ^= 0x01
    st = os.stat(hint)
    Path(hint).write_bytes(bytes(data))
    os.utime(hint, ns=(st.st_atime_ns, st.st_mtime_ns))
    with SegmentReads() as reads, mpkv.store.KeyReader(path, "k12345") as reader:
        got = reader.get("k12345")
    assert reads.files, "the damaged hint was used: its output was not replayed"
    assert got == items["k12345"]
