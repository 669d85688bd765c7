"""How the log is read and framed: which files make up the log after a crash inside
compaction, a compaction marker that does not check out, missing segments, torn tails
whose values hold record bytes, record types, unbounded resync work, non-regular
files named as segments and how often the directory is listed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mpkv
from mpkv.segments import AUX, list_segments

SWITCH = os.path.join(AUX, "compacted")


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (same PYTHONPATH): for a real SIGKILL."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


def state(path: Path | str, **kw: object) -> dict[str, object]:
    with mpkv.Store(path, **kw) as s:  # type: ignore[arg-type]
        return dict(s.items())


def outputs(path: Path) -> list[str]:
    return [n for n in list_segments(str(path)) if n.count(".") == 2]


# ------------------------------------------------ a crash between compaction outputs

KILL_AT_RENAME = """
import os, signal, mpkv
renames = 0
real = os.rename
def rename(src, dst, *a, **kw):
    global renames
    if str(dst).endswith(".seg"):
        renames += 1
        if renames == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **kw)
s = mpkv.Store({path!r}, max_segment_bytes=100, format={fmt!r})
for k in {keys!r}:
    s[k] = k * {vlen}
os.rename = rename
s.compact()
"""


@pytest.mark.parametrize(("fmt", "keys", "vlen"), [("binary", "ab", 30), ("text", "abc", 40)])
def test_crash_between_compaction_outputs_loses_nothing(tmp_path: Path, fmt: str, keys: str,
                                                        vlen: int) -> None:
    """The live keys need two compaction outputs (binary: of segment 1 alone, so the
    first output sorts first in the directory); the compactor dies by SIGKILL just
    before renaming the second into place. The first output is then in the directory
    beside the segments it was to replace: it must be ignored (the switch was not
    committed), every key survives, and the next compact() removes the stray output and
    keeps every key."""
    path = tmp_path / "s"
    proc = run_child(KILL_AT_RENAME.format(n=2, path=str(path), fmt=fmt, keys=keys,
                                           vlen=vlen))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(outputs(path)) == 1  # the crash left one output
    want = {k: k * vlen for k in keys}
    assert state(path) == want
    assert state(path, readonly=True) == want
    assert mpkv.verify(str(path)).ok
    with mpkv.Store(path) as s:
        s.compact()
        assert dict(s.items()) == want
    assert state(path) == want
    assert len({n.split(".")[0] for n in outputs(path)}) == 1  # the stray one is gone
    assert mpkv.verify(str(path)).ok


# ------------------------------------------------ the compaction marker is checked


def _small_store(path: Path, n: int = 20) -> dict[str, object]:
    with mpkv.Store(path, max_segment_bytes=100) as s:
        for i in range(n):
            s[f"k{i}"] = f"v{i}" * 5
        return dict(s.items())


@pytest.mark.parametrize("content", [b"5", b"5\n", b"", b"1 1\n0 00000000\nffffffff\n"])
def test_stray_compaction_marker_is_damage_not_an_order(tmp_path: Path,
                                                        content: bytes) -> None:
    """A marker written by hand (or torn) must not hide the log: opening raises
    CorruptionError naming the marker, verify reports it, compact() deletes nothing,
    and repair moves it aside so the whole log is back."""
    path = tmp_path / "s"
    want = _small_store(path)
    before = list_segments(str(path))
    (path / SWITCH).write_bytes(content)
    with pytest.raises(mpkv.CorruptionError, match="compacted"):
        mpkv.Store(path)
    with pytest.raises(mpkv.CorruptionError, match="compacted"):
        mpkv.Store(path, readonly=True)
    report = mpkv.verify(str(path))
    assert not report.ok
    assert any("compacted" in d.file for d in report.damage), report.summary()
    assert list_segments(str(path)) == before
    fixed = mpkv.repair(str(path))
    assert any("compacted" in q for q in fixed.quarantined), fixed.summary()
    assert state(path) == want
    with mpkv.Store(path) as s:
        s.compact()
    assert state(path) == want
    assert mpkv.verify(str(path)).ok


def test_copy_taken_mid_compaction_does_not_hide_the_log(tmp_path: Path) -> None:
    """A copy of the directory taken during a switch can hold the marker but not every
    output it announces (or a shorter one): that is damage, never a reason to drop the
    inputs, which are all in the copy."""
    path = tmp_path / "s"
    want = _small_store(path, 6)
    with mpkv.Store(path) as s:
        s.compact()
    with mpkv.Store(path) as s:
        for i in range(6, 12):
            s[f"k{i}"] = f"v{i}" * 5
        want = dict(s.items())
    # A marker as a compaction of every sealed segment would have written it, but the
    # copy has none of its outputs yet.
    from mpkv.segments import Switch, parse_name
    newest = parse_name(list_segments(str(path))[-1])[0]  # type: ignore[index]
    (path / SWITCH).write_bytes(Switch(newest - 1, ((120, 0), (80, 0))).encode())
    with pytest.raises(mpkv.CorruptionError, match="compacted"):
        mpkv.Store(path)
    assert not mpkv.verify(str(path)).ok
    mpkv.repair(str(path))
    assert state(path) == want


# ------------------------------------------------ missing segments


def _many_segments(path: Path) -> dict[str, object]:
    want = _small_store(path, 30)
    assert len(list_segments(str(path))) >= 5
    return want


@pytest.mark.parametrize("which", ["first", "middle"])
def test_missing_segment_is_corruption_naming_the_gap(tmp_path: Path, which: str) -> None:
    path = tmp_path / "s"
    _many_segments(path)
    names = list_segments(str(path))
    i = 0 if which == "first" else 2
    os.unlink(path / names[i])
    after = names[i + 1]
    for kw in ({}, {"readonly": True}):
        with pytest.raises(mpkv.CorruptionError) as err:
            mpkv.Store(path, **kw)  # type: ignore[arg-type]
        assert after in str(err.value)
        if which == "middle":
            assert names[i - 1] in str(err.value)
    report = mpkv.verify(str(path))
    assert not report.ok
    assert any(after in str(d) for d in report.damage), report.summary()


@pytest.mark.parametrize("which", ["first", "middle"])
def test_repair_bridges_a_missing_segment(tmp_path: Path, which: str) -> None:
    """repair cannot bring the missing records back, but it makes the store open again
    with every record the other segments hold, and says what was lost."""
    from mpkv.codec import CODECS, apply
    path = tmp_path / "s"
    want = _many_segments(path)
    names = list_segments(str(path))
    i = 0 if which == "first" else 2
    lost: dict[str, object] = {}
    for batch in CODECS["binary"].decode((path / names[i]).read_bytes()).batches:
        apply(lost, batch)  # type: ignore[arg-type]
    os.unlink(path / names[i])
    report = mpkv.repair(str(path))
    assert any(names[i + 1] in str(d) for d in report.damage), report.summary()
    assert state(path) == {k: v for k, v in want.items() if k not in lost}
    assert mpkv.verify(str(path)).ok


# ------------------------------------------------ record types


@pytest.mark.parametrize("rtype", [0, 4, 9, 255])
def test_record_of_unknown_type_is_damage_not_applied(tmp_path: Path, rtype: int) -> None:
    """A record with a valid checksum but a type that is not 1, 2 or 3, holding a single
    put of a str (what the fast path decodes), is damage wherever it is."""
    import struct
    import zlib
    path = tmp_path / "s"
    with mpkv.Store(path) as s:
        s["before"] = "1"
    seg = path / list_segments(str(path))[0]
    good = seg.read_bytes()
    records = mpkv.codec.CODECS["binary"].encode([("evil", "x")])
    rec = bytearray(records[0][0])
    rec[8] = rtype
    rec[0:4] = struct.pack("<I", zlib.crc32(bytes(rec[4:])))
    with mpkv.Store(path) as s:
        s["after"] = "2"
    tail = seg.read_bytes()[len(good):]
    seg.write_bytes(good + bytes(rec) + tail)
    with pytest.raises(mpkv.CorruptionError) as err:
        mpkv.Store(path, readonly=True)
    assert str(seg) in str(err.value) and f"offset {len(good)}" in str(err.value)
    assert not mpkv.verify(str(path)).ok


# ------------------------------------------------ listing the directory


def _count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = os.listdir

    def listdir(path: object = ".") -> list[str]:
        calls.append(str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    return calls


@pytest.mark.parametrize("readonly", [False, True])
def test_open_lists_the_directory_a_bounded_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: bool) -> None:
    """Opening a store of 300 segments lists its directory a few times, not once per
    segment (that made open time quadratic in the number of segments); so does a
    refresh that reads 100 new segments."""
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=40, auto_compact=False, fsync="never") as s:
        for i in range(300):
            s[f"k{i}"] = "v" * 10
    assert len(list_segments(str(path))) >= 300
    calls = _count_listings(monkeypatch)
    with mpkv.Store(path, readonly=readonly) as s:
        assert len(s) == 300
        assert len([c for c in calls if c == str(path)]) <= 4, calls
        with mpkv.Store(path, fsync="never", auto_compact=False) as w:
            for i in range(300, 400):
                w[f"k{i}"] = "v" * 10
        calls.clear()
        s.refresh()
        assert len(s) == 400
        assert len([c for c in calls if c == str(path)]) <= 2, calls


# ------------------------------------------------ torn tails whatever the values hold


def _records_of(ops: list[tuple[str, object]]) -> bytes:
    codec = mpkv.codec.CODECS["binary"]
    return b"".join(r for op in ops for r, _ in codec.encode([op]))  # type: ignore[list-item]


def test_value_holding_records_cut_at_every_byte_still_opens(tmp_path: Path) -> None:
    """The last put's bytes value holds whole valid records (a user storing segment
    files, or a hostile value). A crash cutting that put's write at any byte leaves a
    prefix of it: the store must open with the state before the put, readonly and
    writable, and take the next write; verify is clean."""
    path = tmp_path / "s"
    with mpkv.Store(path, fsync="never") as s:
        s["a"] = "1"
        s["b"] = b"2"
    seg = path / list_segments(str(path))[-1]
    before = seg.read_bytes()
    embedded = _records_of([("evil", "x"), ("a", None), ("c", b"\x00" * 5)])
    value = b"pad" + embedded + embedded[:20] + embedded + b"end"
    with mpkv.Store(path, fsync="never") as s:
        s["hostile"] = value
    full = seg.read_bytes()
    assert full.startswith(before)
    want = {"a": "1", "b": b"2"}
    for cut in range(len(before), len(full)):
        seg.write_bytes(full[:cut])
        (path / AUX / "shm").unlink(missing_ok=True)  # as after a reboot: read to the end
        assert state(path, readonly=True) == want, cut
        with mpkv.Store(path, fsync="never") as s:
            assert dict(s.items()) == want, cut
            s["after"] = "x"
        assert state(path) == {**want, "after": "x"}, cut
        assert mpkv.verify(str(path)).ok, cut


def test_damaged_length_mid_segment_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    """A length field damaged in the newest segment, records after it: not mistaken
    for a record cut short (which would silently drop, then truncate, the records
    after it), whether the length now runs past the end of the file or not."""
    path = tmp_path / "s"
    with mpkv.Store(path, fsync="never") as s:
        for i in range(5):
            s[f"k{i}"] = f"v{i}" * 10
    seg = path / list_segments(str(path))[-1]
    full = seg.read_bytes()
    rec = len(full) // 5
    for length in (1 << 30, 3, rec + 7):
        data = bytearray(full)
        data[2 * rec + 4 : 2 * rec + 8] = length.to_bytes(4, "little")
        seg.write_bytes(bytes(data))
        (path / AUX / "shm").unlink(missing_ok=True)
        with pytest.raises(mpkv.CorruptionError, match=f"offset {2 * rec}"):
            mpkv.Store(path, readonly=True)
        with pytest.raises(mpkv.CorruptionError):
            mpkv.Store(path)
        assert seg.read_bytes() == bytes(data)  # nothing truncated
        assert not mpkv.verify(str(path)).ok


# ------------------------------------------------ bounded work on damaged tails


def _count_crc_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import zlib
    counted = [0]
    real = zlib.crc32

    def crc32(data: bytes, value: int = 0) -> int:
        counted[0] += len(data)
        return real(data, value)

    monkeypatch.setattr(zlib, "crc32", crc32)
    return counted


def _crafted_tail(n: int) -> bytes:
    """Headers that all check out, every 16 bytes, each claiming a payload reaching
    (almost) the end: a naive resync checksums O(n^2) bytes."""
    import struct
    import zlib

    from mpkv.codec import SYNC
    out = bytearray()
    while len(out) + 16 <= n:
        length = n - len(out) - 16
        head = struct.pack("<IB", length, 1) + SYNC
        out += struct.pack("<I", 0) + head + struct.pack("<I", zlib.crc32(head))
    out[12:16] = b"\0\0\0\0"  # the first header fails its check: a scan for a valid record
    return bytes(out)


@pytest.mark.parametrize("kind", ["crafted", "zeros"])
def test_resync_over_a_damaged_tail_is_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              kind: str) -> None:
    """Opening (and verifying) a store whose newest segment ends in a crafted or zeroed
    tail checks checksums over a number of bytes linear in the tail (it used to check a
    CRC at every offset over the claimed length: minutes for a crafted megabyte)."""
    path = tmp_path / "s"
    with mpkv.Store(path, fsync="never") as s:
        s["a"] = "1"
    seg = path / list_segments(str(path))[-1]
    n = 1_000_000 if kind == "crafted" else 4 << 20
    tail = _crafted_tail(n) if kind == "crafted" else bytes(n)
    seg.write_bytes(seg.read_bytes() + tail)
    (path / AUX / "shm").unlink()
    counted = _count_crc_bytes(monkeypatch)
    if kind == "zeros":  # what a power loss leaves: a torn tail
        assert state(path, readonly=True) == {"a": "1"}
    else:  # candidates past the scan's budget are taken as valid: damage, not torn
        with pytest.raises(mpkv.CorruptionError, match=seg.name):
            state(path, readonly=True)
    # (a few passes over the tail; checking a CRC at every offset would be ~n*n/32)
    assert counted[0] <= 8 * n + (4 << 20), counted[0]
    counted[0] = 0
    assert mpkv.verify(str(path)).ok == (kind == "zeros")
    assert counted[0] <= 8 * n + (4 << 20), counted[0]


def test_huge_sparse_newest_segment_is_read_within_the_segment_limit(tmp_path: Path) -> None:
    """A 3 GiB sparse file as the newest segment (limit 1 MiB): opening and verify read
    at most one segment's worth (in a child limited to 512 MiB of memory), take it for a
    torn tail, and the next writer cuts it."""
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=1 << 20) as s:
        s["a"] = "1"
    (path / AUX / "shm").unlink()
    huge = path / "000000000002.seg"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)
    proc = run_child(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
        import mpkv
        with mpkv.Store({str(path)!r}, readonly=True) as s:
            assert dict(s.items()) == {{"a": "1"}}
        assert mpkv.verify({str(path)!r}).ok  # a torn tail, read no further than the limit
        with mpkv.Store({str(path)!r}) as s:
            s["b"] = "2"
        print("ok")
    """)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert huge.stat().st_size < 1 << 20
    assert state(path) == {"a": "1", "b": "2"}


def test_sealed_segment_over_the_limit_is_damage(tmp_path: Path) -> None:
    """A sealed segment larger than max_segment_bytes was not written by the store,
    even when its extra bytes are valid records: CorruptionError naming it."""
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=100) as s:
        for i in range(6):
            s[f"k{i}"] = "v" * 20
    first = path / list_segments(str(path))[0]
    first.write_bytes(first.read_bytes() + _records_of([("x", "y" * 60)]))
    assert first.stat().st_size > 100
    with pytest.raises(mpkv.CorruptionError, match=first.name):
        mpkv.Store(path, readonly=True)
    report = mpkv.verify(str(path))
    assert not report.ok and any(d.file == str(first) for d in report.damage)


@pytest.mark.parametrize("which", ["newest", "sealed"])
def test_fifo_named_as_a_segment_is_refused_not_waited_on(tmp_path: Path, which: str) -> None:
    path = tmp_path / "s"
    with mpkv.Store(path, max_segment_bytes=60) as s:
        for i in range(4):
            s[f"k{i}"] = "v" * 20
    names = list_segments(str(path))
    fifo = path / (names[-1] if which == "newest" else names[1])
    fifo.unlink()
    os.mkfifo(fifo)
    proc = run_child(f"""
        import mpkv
        for call in (lambda: mpkv.Store({str(path)!r}, readonly=True),
                     lambda: mpkv.verify({str(path)!r})):
            try:
                call()
            except (mpkv.FormatError, mpkv.CorruptionError) as exc:
                assert {fifo.name!r} in str(exc), exc
            else:
                raise SystemExit("accepted a FIFO")
        print("refused")
    """)
    assert proc.stdout.strip() == "refused", proc.stderr[-2000:]


def test_version_1_store_is_still_read_and_written(tmp_path: Path) -> None:
    """A store written by an earlier release (format version 1: binary records without
    the header check) opens, takes writes in its own framing, compacts and verifies."""
    import json

    from mpkv.codec import BinaryCodec
    path = tmp_path / "s"
    (path / AUX).mkdir(parents=True)
    (path / AUX / "meta").write_text(json.dumps(
        {"magic": "mpkv", "version": 1, "format": "binary", "max_segment_bytes": 200}))
    v1 = BinaryCodec(1)
    (path / "000000000001.seg").write_bytes(b"".join(
        r for op in [("a", "1"), ("b", b"\x00"), ("a", None), ("c", "3")]
        for r, _ in v1.encode([op])))  # type: ignore[list-item]
    want: dict[str, object] = {"b": b"\x00", "c": "3"}
    assert state(path, readonly=True) == want
    with mpkv.Store(path) as s:
        for i in range(10):
            s[f"k{i}"] = "v" * 30
        s.compact()
    want.update({f"k{i}": "v" * 30 for i in range(10)})
    assert state(path) == want
    assert json.loads((path / AUX / "meta").read_text())["version"] == 1
    for name in list_segments(str(path)):
        data = (path / name).read_bytes()
        assert not v1.decode(data).problem, name  # every record in framing 1
    assert mpkv.verify(str(path)).ok
