"""Values left in their files, attacked: each test hunts one way the keydir, the hints or
the one-key reader (``mpkv get``) could give wrong data, crash, hang or leak, when
another program edits the files, another process compacts, or a careless user does
what the API allows."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import mpkv
from mpkv import hints, keydir
from mpkv.errors import CorruptionError
from mpkv.store import KeyReader
from tests.conftest import fd_count, in_child, outputs, reseal_hint

BIG = "v" * 1000  # out of line: over keydir.INLINE_MAX encoded bytes


# --- the one-key reader (``mpkv get``) --------------------------------------------


@pytest.mark.parametrize("keys", [[], ["x"], ["", "a"], ["a", ""]],
                         ids=["no-keys", "other-key", "empty-first", "empty-last"])
def test_key_reader_of_the_empty_key_does_not_crash_on_a_hint(tmp_path, keys):
    """``mpkv get STORE ""``: the empty key's lookup in a hint of joined keys found
    "\\0\\0" in an empty key blob and indexed past the end of the kinds."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s["gone"] = "x"
        del s["gone"]
        s.update({k: f"value of {k!r}" for k in keys})
        s.compact()
    assert hints.names(path), "the compaction wrote a hint"
    with KeyReader(path, "") as reader:
        assert reader.get("", "MISSING") == ("value of ''" if "" in keys else "MISSING")
    got = subprocess.run([sys.executable, "-m", "mpkv", "get", path, ""],
                         capture_output=True, text=True)
    assert "unexpected" not in got.stderr
    assert got.returncode == (0 if "" in keys else 1), got.stderr


def _spoil_hints(path: str, how: str) -> None:
    for name in hints.names(path):
        file = hints.hint_path(path, name)
        if how == "damaged":
            data = bytearray(Path(file).read_bytes())
            data[len(data) // 2] ^= 0x40
            Path(file).write_bytes(bytes(data))
        elif how == "stale":  # the output rewritten with the same bytes: another inode
            output = os.path.join(path, name)
            shutil.copy2(output, output + ".new")
            os.replace(output + ".new", output)
        elif how == "none":
            os.unlink(file)


@pytest.mark.parametrize("fmt", ["binary", "text"])
@pytest.mark.parametrize("serializer", ["raw", "json"])
@pytest.mark.parametrize("how", ["valid", "damaged", "stale", "none"])
def test_key_reader_agrees_with_a_full_open_whatever_the_hints_state(tmp_path, fmt, serializer,
                                                                     how):
    """Keys joined in the hint (no key holds U+0000): the C-level lookup, on ASCII and
    non-ASCII values (cut from bytes or from decoded text), keys that are substrings of
    others, deletes and overwrites after the compaction."""
    path = str(tmp_path / "s")
    values: dict[str, object] = {
        "": "empty key", "a": "A" * 200, "ab": "é" * 150, "b": "b", "ba": "x" * 129,
        "ключ": "значение" * 30, "🔑": "🔒", "gone": BIG, "later": "old",
    }
    if serializer == "json":
        values = {k: {"v": v, "n": [1, 2]} for k, v in values.items()}
    with mpkv.Store(path, format=fmt, serializer=serializer, fsync="never",
                    auto_compact=False) as s:
        s.update(values)
        s.compact()
        del s["gone"]
        s["later"] = values["later"] = "new" * 100 if serializer == "raw" else {"new": 1}
        s["tail"] = values["tail"] = "t"
    values.pop("gone")
    _spoil_hints(path, how)
    with mpkv.Store(path, readonly=True) as full:
        assert dict(full.items()) == values
    for key in [*values, "gone", "absent", "k", "\0", "a\0b"]:
        with KeyReader(path, key) as reader:
            assert reader.get(key, "MISSING") == values.get(key, "MISSING"), (key, how)


# --- files edited by another program ----------------------------------------------


def test_hint_locations_swapped_with_recomputed_checksums_are_found_by_verify(tmp_path):
    """Someone who can write the directory can make a hint that checks out and points a
    key at another value (as they could rewrite records and their checksums): open
    trusts a hint bound to its output (docs/format.md says so); verify must find it."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s.update({"k1": "1" * 300, "k2": "2" * 300})
        s.compact()
    name = outputs(path)[0]
    file = hints.hint_path(path, name)
    data = Path(file).read_bytes()
    hint = hints.parse(data)
    assert not isinstance(hint, str) and len(hint.offsets) == 2
    nref = len(hint.offsets)
    at = len(data) - 4 - len(b"".join(k.encode() for k in hint.keys)) - (len(hint.keys) - 1) \
        - sum(len(s.encode()) for s in hint.strs) - sum(map(len, hint.raws)) - 16 * nref
    offsets = struct.unpack_from(f"<{nref}Q", data, at)
    crcs_at = at + 12 * nref
    crcs = struct.unpack_from(f"<{nref}I", data, crcs_at)
    swapped = bytearray(data)
    struct.pack_into(f"<{nref}Q", swapped, at, *reversed(offsets))
    struct.pack_into(f"<{nref}I", swapped, crcs_at, *reversed(crcs))
    Path(file).write_bytes(reseal_hint(bytes(swapped)))
    report = mpkv.verify(path)
    assert not report.ok
    assert "is not at offset" in str(report.damage[0]) and file in str(report.damage[0])
    mpkv.repair(path)
    with mpkv.Store(path) as s:
        assert (s["k1"], s["k2"]) == ("1" * 300, "2" * 300)


def test_hint_of_another_store_copied_in_under_the_same_name_is_ignored(tmp_path):
    mine, theirs = str(tmp_path / "mine"), str(tmp_path / "theirs")
    for path, tag in ((mine, "mine"), (theirs, "theirs")):
        with mpkv.Store(path, fsync="never", auto_compact=False) as s:
            s.update({f"k{i}": f"{tag}{i}" * 60 for i in range(20)})
            s.compact()
    assert outputs(mine) == outputs(theirs)
    name = outputs(mine)[0]
    shutil.copyfile(hints.hint_path(theirs, name), hints.hint_path(mine, name))
    with mpkv.Store(mine, readonly=True) as s:
        assert dict(s.items()) == {f"k{i}": f"mine{i}" * 60 for i in range(20)}
    assert any("stale hint" in note for note in mpkv.verify(mine).notes)


@pytest.mark.parametrize("where", ["log", "output", "hinted-output"])
@pytest.mark.parametrize("serializer", ["raw", "json"])
def test_value_rewritten_in_place_after_a_reader_mapped_it_is_corruption(tmp_path, where,
                                                                          serializer):
    """Same length, same inode, other bytes: the map shows the new bytes; the read must
    raise CorruptionError, never return them."""
    path = str(tmp_path / "s")
    value = "q" * 400 if serializer == "raw" else {"q": "q" * 400}
    with mpkv.Store(path, serializer=serializer, fsync="never", auto_compact=False) as s:
        s.update({"victim": value, "other": "o" * 400, "small": "s"})
        if where != "log":
            s.compact()
    if where == "output":
        _spoil_hints(path, "none")
    with mpkv.Store(path, serializer=serializer, readonly=True, max_staleness=None) as r:
        assert r["victim"] == value and r["other"] == "o" * 400  # mapped now
        for name in os.listdir(path):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                data = Path(file).read_bytes()
                if b"q" * 400 in data:
                    with open(file, "r+b") as f:
                        f.seek(data.index(b"q" * 400) + 10)
                        f.write(b"Q")
        for _ in range(2):
            with pytest.raises(CorruptionError):
                r["victim"]
        assert r["other"] == "o" * 400 and r["small"] == "s"


def test_segment_replaced_by_an_edited_copy_gives_old_value_or_the_new_files(tmp_path):
    """A program replaces a sealed segment by an edited copy (new inode, same name): a
    reader that mapped the old one keeps its value, as does one whose view must not
    move (it keeps the file open); another reads the new file's state (it rebuilds its
    view), never a mix, never the old bytes' offsets in the new file."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=3000) as s:
        s["a"] = "a" * 1000
        s["b"] = "b" * 1000
        s["c"] = "c" * 1000  # rotates: the first segment is sealed
    first = os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".seg"))[0])
    mapped = mpkv.Store(path, readonly=True, max_staleness=None)
    unmapped = mpkv.Store(path, readonly=True)
    kept = mpkv.Store(path, readonly=True, max_staleness=None)
    try:
        assert mapped["a"] == "a" * 1000
        # the copy holds one more byte before the values (a record is re-framed):
        # every offset moves by one; the values themselves are the same
        with mpkv.Store(str(tmp_path / "t"), fsync="never", auto_compact=False,
                        max_segment_bytes=3000) as t:
            t["a"] = "a" * 1000 + "!"
            t["b"] = "b" * 1000
        donor = os.path.join(str(tmp_path / "t"), sorted(os.listdir(tmp_path / "t"))[-1])
        shutil.copyfile(donor, first + ".new")
        os.replace(first + ".new", first)
        assert mapped["a"] == "a" * 1000 and mapped["b"] == "b" * 1000
        assert unmapped["a"] == "a" * 1000 + "!"  # the files' state now
        assert unmapped["b"] == "b" * 1000 and unmapped["c"] == "c" * 1000
        assert kept["a"] == "a" * 1000 and kept["b"] == "b" * 1000
    finally:
        mapped.close()
        unmapped.close()
        kept.close()


# --- processes and threads --------------------------------------------------------


def test_refresh_after_a_rebuild_counts_no_unchanged_value_as_changed(tmp_path):
    """A writer keeps a value whose code points fit the inline limit but whose UTF-8
    bytes do not inline; a rebuild from the files holds it as a handle. That is the
    same value: refresh() must not count it as a change."""
    path = str(tmp_path / "s")
    w = mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=4096)
    try:
        w["k"] = "é" * 100  # 100 code points, 200 bytes
        with w.transaction() as tx:  # two records: stays in the writer's view
            tx["t1"] = "t" * 300
            tx["t2"] = b"u" * 300

        def other() -> None:
            with mpkv.Store(path, fsync="never", auto_compact=False,
                            max_segment_bytes=4096) as s:
                for i in range(20):
                    s["other"] = str(i) * 300
                s.compact()

        assert in_child(other) == ("ok", None)
        assert w.refresh() == 1  # "other" alone
        assert (w["k"], w["t1"], w["t2"]) == ("é" * 100, "t" * 300, b"u" * 300)
    finally:
        w.close()


@pytest.mark.parametrize("staleness", [None, 0.0])
def test_reader_threads_see_whole_values_while_another_process_compacts(tmp_path, staleness):
    """Threads reading (one also refreshing) while another process overwrites and
    compacts: views are rebuilt under them (refresh, or a read whose file is gone)."""
    path = str(tmp_path / "s")
    n = 30
    with mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=20000) as s:
        s.update({f"k{i}": f"{i:03d}:{0:05d}|" * 40 for i in range(n)})
    r = mpkv.Store(path, readonly=True, max_staleness=staleness)
    errors: list[str] = []
    stop = threading.Event()

    def read(refresher: bool) -> None:
        while not stop.is_set():
            try:
                if refresher:
                    r.refresh()
                for i in range(n):
                    v = r[f"k{i}"]
                    if v != v[:10] * 40 or not v.startswith(f"{i:03d}:"):
                        errors.append(f"k{i}: {v[:24]!r}")
                items = dict(r.items())
                if len(items) != n or any(v != v[:10] * 40 for v in items.values()):
                    errors.append("items() torn")
            except Exception as exc:  # any error is the finding
                errors.append(repr(exc))

    def write() -> None:
        with mpkv.Store(path, fsync="never", auto_compact=False,
                        max_segment_bytes=20000) as w:
            for round_ in range(1, 121):
                w.update({f"k{i}": f"{i:03d}:{round_:05d}|" * 40 for i in range(0, n, 4)})
                if round_ % 8 == 0:
                    w.compact()

    threads = [threading.Thread(target=read, args=(i == 0,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        assert in_child(write) == ("ok", None)
    finally:
        stop.set()
        for t in threads:
            t.join()
    r.refresh()
    assert r["k0"] == f"{0:03d}:{120:05d}|" * 40
    r.close()
    assert not errors, errors[:5]


def test_descriptors_stay_bounded_through_many_rebuilds(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=2000) as s:
        s.update({f"k{i}": BIG + str(i) for i in range(10)})
    r = mpkv.Store(path, readonly=True, max_staleness=None)
    try:
        assert all(r[f"k{i}"] == BIG + str(i) for i in range(10))
        before = fd_count()

        def rewrite_and_compact(round_: int) -> None:
            with mpkv.Store(path, fsync="never", auto_compact=False,
                            max_segment_bytes=2000) as w:
                w.update({f"k{i}": BIG + f"{i}.{round_}" for i in range(10)})
                w.compact()

        for round_ in range(8):
            assert in_child(lambda n=round_: rewrite_and_compact(n))[0] == "ok"
            r.refresh()
            assert all(r[f"k{i}"] == BIG + f"{i}.{round_}" for i in range(10))
        assert fd_count() - before <= 12  # the maps of one view, not of every view
    finally:
        r.close()


def test_transaction_reads_values_whose_segment_another_process_compacted(tmp_path):
    """The writer's view holds handles into a segment another process compacted away
    (never mapped here): every transaction operation must read the values from the
    new files, and commit."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, fsync="never", auto_compact=False)
    try:
        s.update({f"k{i}": BIG + str(i) for i in range(6)})
        s["small"] = "x"
        snap = str(tmp_path / "snap")
        with mpkv.Store(str(tmp_path / "other"), fsync="never") as o:
            o.update({"k0": BIG + "snap", "new": BIG + "new"})
            o.serialize(snap)

        def compact() -> None:
            with mpkv.Store(path, fsync="never", auto_compact=False) as c:
                c["bump"] = "y"
                c.compact()

        def again() -> None:
            assert in_child(compact) == ("ok", None)

        again()
        with s.transaction() as tx:
            assert tx["k1"] == BIG + "1"
            assert dict(tx.items())["k2"] == BIG + "2"
            key, value = tx.popitem()
            assert value == (BIG + key[1:] if key.startswith("k") else {"small": "x",
                                                                         "bump": "y"}[key])
            tx.update({"k3": tx["k3"] + "!"})
        assert s["k3"] == BIG + "3!" and key not in s
        state = dict(s.items())
        again()
        with s.transaction() as tx:
            assert sorted(tx.values()) == sorted({**state, "bump": "y"}.values())
            tx.clear()
            tx["after"] = BIG
        assert dict(s.items()) == {"after": BIG}
        s.update({f"k{i}": BIG + str(i) for i in range(6)})
        again()
        s.deserialize(snap)
        assert dict(s.items()) == {"k0": BIG + "snap", "new": BIG + "new"}
    finally:
        s.close()


def test_pickled_and_forked_stores_read_and_write_values_in_files(tmp_path):
    path = str(tmp_path / "s")
    s = mpkv.Store(path, fsync="never", auto_compact=False)
    try:
        s.update({f"k{i}": BIG + str(i) for i in range(10)})
        assert s["k1"] == BIG + "1"  # a live map
        copy = pickle.loads(pickle.dumps(s))
        try:
            assert copy["k2"] == BIG + "2"
            copy["k2"] = BIG + "copy"
        finally:
            copy.close()

        def child() -> dict[str, str]:
            s["k3"] = BIG + "child"
            s.compact()
            return dict(s.items())

        status, seen = in_child(child)
        assert status == "ok"
        want = {f"k{i}": BIG + str(i) for i in range(10)} | {"k2": BIG + "copy",
                                                             "k3": BIG + "child"}
        assert seen == want and dict(s.items()) == want
        s["k4"] = BIG + "parent"
        assert s["k4"] == BIG + "parent" and s["k1"] == BIG + "1"
    finally:
        s.close()


def test_values_spread_over_more_segments_than_maps_read_back_in_every_order(tmp_path):
    path = str(tmp_path / "s")
    n = keydir.MAX_MAPPED * 2 + 5
    with mpkv.Store(path, fsync="never", max_segment_bytes=1200, auto_compact=False) as s:
        for i in range(n):
            s[f"k{i}"] = str(i) * (300 // len(str(i)))
    before = fd_count()
    with mpkv.Store(path, readonly=True) as r:
        order = list(range(n)) + list(reversed(range(n))) + list(range(0, n, 7)) * 3
        errors: list[str] = []

        def read(offset: int) -> None:
            for i in order[offset:] + order[:offset]:
                if r[f"k{i}"] != str(i) * (300 // len(str(i))):
                    errors.append(f"k{i}")

        threads = [threading.Thread(target=read, args=(k * 50,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert fd_count() - before <= keydir.MAX_MAPPED + 8


# --- what must read no value file -------------------------------------------------


def _damage(path: str, marker: bytes) -> None:
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            data = Path(file).read_bytes()
            if marker in data:
                with open(file, "r+b") as f:
                    f.seek(data.index(marker) + len(marker) // 2)
                    f.write(b"\x00")
                return
    raise AssertionError(f"{marker!r} not found")


def test_transaction_len_in_iteration_delete_and_clear_read_no_value_file(tmp_path,
                                                                          monkeypatch):
    """Inside a block (and through store calls that join it) counting, membership,
    iterating keys, deleting and clearing need no value: a damaged value must not stop
    them (clear() is how a user gets rid of it), and none may read every value."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s.update({"victim": "d" * 500, "other": "o" * 500, "small": "s"})
        _damage(path, b"d" * 500)
        with pytest.raises(CorruptionError):
            s["victim"]
        reads: list[int] = []
        real = keydir.ValueFiles.read
        monkeypatch.setattr(keydir.ValueFiles, "read",
                            lambda self, handle: reads.append(handle) or real(self, handle))
        with s.transaction() as tx:
            assert len(tx) == 3 and len(s) == 3
            assert "victim" in tx and "victim" in s and "nope" not in tx
            assert sorted(tx) == sorted(tx.keys()) == sorted(s) == ["other", "small", "victim"]
            tx["new"] = "n" * 500
            assert len(tx) == 4 and "new" in tx
            assert tx.delete("other") is True and "other" not in tx
            del tx["victim"]
            assert sorted(tx) == ["new", "small"]
        assert not reads, "a value file was read"
        assert sorted(s) == ["new", "small"]
        s["victim2"] = "e" * 500
        _damage(path, b"e" * 500)
        s.clear()
        assert not reads and len(s) == 0


def test_deserialize_replaces_a_store_holding_a_damaged_value(tmp_path):
    """Restoring a backup is how a user recovers from a damaged value: deserialize must
    not stop at reading it (it only compares old values to skip unchanged ones)."""
    path, snap = str(tmp_path / "s"), str(tmp_path / "snap")
    with mpkv.Store(str(tmp_path / "good"), fsync="never") as good:
        good.update({"victim": "d" * 500, "other": "o" * 500})
        good.serialize(snap)
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s.update({"victim": "d" * 500, "other": "o" * 500, "extra": "x" * 500})
        _damage(path, b"d" * 500)
        with pytest.raises(CorruptionError):
            s["victim"]
        s.deserialize(snap)
        assert dict(s.items()) == {"victim": "d" * 500, "other": "o" * 500}


def test_damaged_value_can_be_overwritten_and_deleted(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as s:
        s.update({"a": "d" * 500, "b": "e" * 500})
        _damage(path, b"d" * 500)
        _damage(path, b"e" * 500)
        s["a"] = "fixed"
        assert s["a"] == "fixed"
        assert s.delete("b") is True and "b" not in s


def test_reader_with_no_staleness_limit_sees_no_write_before_refresh_after_a_compaction(
        tmp_path):
    """max_staleness=None: only refresh() moves the view. A value whose segment another
    process compacted away (never read here, so never mapped) must still read as of
    the view, not send the reader to the new files' newer state."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, fsync="never", auto_compact=False) as w:
        w.update({"k": "old" * 100, "j": "j" * 300})
    r = mpkv.Store(path, readonly=True, max_staleness=None)
    try:
        def rewrite_and_compact() -> None:
            with mpkv.Store(path, fsync="never", auto_compact=False) as w:
                w["k"] = "new" * 100
                w["added"] = "a" * 300
                w.compact()

        assert in_child(rewrite_and_compact) == ("ok", None)
        assert r["k"] == "old" * 100 and "added" not in r and r["j"] == "j" * 300
        assert dict(r.items()) == {"k": "old" * 100, "j": "j" * 300}
        assert r.refresh() == 2
        assert r["k"] == "new" * 100 and r["added"] == "a" * 300
    finally:
        r.close()


@pytest.mark.parametrize("staleness", [0.0, None])
def test_child_forked_while_a_thread_maps_a_file_does_not_hang(tmp_path, staleness):
    """A thread of the parent holds the map mutex (mapping a file) when another forks:
    the child inherits the mutex held by a thread that does not exist there. Its first
    call reopens the store and must not wait on it."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, fsync="never", auto_compact=False, max_staleness=staleness)
    try:
        s.update({f"k{i}": BIG + str(i) for i in range(4)})
        assert s["k1"] == BIG + "1"

        def child() -> str:
            signal.alarm(20)  # a hang is a SIGALRM death, not a stuck suite
            value = s["k2"]
            s["k3"] = BIG + "child"
            return value

        with s._values._mutex:  # what a thread inside ValueFiles._map holds
            status, got = in_child(child)
        assert (status, got) == ("ok", BIG + "2")
        s.refresh()
        assert s["k3"] == BIG + "child" and s["k1"] == BIG + "1"
    finally:
        s.close()


def _deleted_maps(path: str) -> list[str]:
    """Files of the store this process still maps or holds open after they were deleted:
    disk space a compaction cannot give back while the process lives."""
    held = [line.split(None, 5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()]
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted({h for h in held if h.startswith(path) and h.endswith("(deleted)")})


@pytest.mark.parametrize("who", ["reader", "writer", "compacting-writer"])
def test_segments_a_compaction_removed_are_let_go_once_the_view_moves_on(tmp_path, who):
    """A process that read values before another (or it) compacted must not keep the
    removed segments mapped for ever: compaction exists to give their space back."""
    path = str(tmp_path / "s")
    w = mpkv.Store(path, fsync="never", auto_compact=False, max_segment_bytes=60000)
    r = mpkv.Store(path, readonly=True)
    try:
        for round_ in range(4):
            w.update({f"k{i}": str(round_) * 1000 for i in range(40)})
        store = r if who == "reader" else w
        (w if who == "reader" else r).close()  # the other holds nothing of the log now
        assert all(store[f"k{i}"] == "3" * 1000 for i in range(40))  # maps the segments
        if who == "compacting-writer":
            w.compact()
        else:
            assert in_child(lambda: mpkv.Store(path).compact()["segments_before"])[0] == "ok"
        with mpkv.Store(path, fsync="never", max_segment_bytes=60000) as other:
            other["after"] = "a" * 300
        if store is w:
            w["mine"] = "m" * 300  # catches up under the writer lock, then lets go
        for _ in range(2):
            assert all(store[f"k{i}"] == "3" * 1000 for i in range(40))
            assert store["after"] == "a" * 300
        assert _deleted_maps(path) == []
    finally:
        r.close()
        w.close()
