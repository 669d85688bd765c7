"""A store directory is input, not trust: links, special files, odd permissions and
damaged side files planted by anyone who can write the directory never make mpkv write,
truncate or delete anything outside it, and never destroy data inside it."""

from __future__ import annotations

import json
import os
import stat
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


# --- permissions: the umask decides ------------------------------------------------


def modes(path: str) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = stat.S_IMODE(os.lstat(full).st_mode)
    return out


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_every_file_is_created_0666_minus_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = str(tmp_path / "s")
        with mpkv.Store(p, max_segment_bytes=100) as s:
            for i in range(30):
                s[f"k{i}"] = f"v{i}"
            watcher = s.watch(timeout=0)  # registers in .mpkv/readers
            s.compact()
            s.serialize(tmp_path / "backup.snap")
            list(watcher)
        with open(os.path.join(p, segs(p)[-1]), "ab") as f:
            f.write(b"\xff" * 20)  # damage for repair to quarantine
        mpkv.repair(p)
        backup = stat.S_IMODE(os.stat(tmp_path / "backup.snap").st_mode)
    finally:
        os.umask(old)
    found = modes(p)
    assert {".mpkv/lock", ".mpkv/shm", ".mpkv/dirlock", ".mpkv/meta",
            ".mpkv/compact.lock", ".mpkv/quarantine"} <= set(found)
    assert any(".0001.seg" in n for n in found)  # a compaction output
    for name, mode in found.items():
        isdir = os.path.isdir(os.path.join(p, name))
        assert mode == (0o777 if isdir else 0o666) & ~umask, (name, oct(mode))
    assert backup == 0o666 & ~umask


# --- metadata and side files are checked ------------------------------------------


def write_meta(p: str, **fields) -> None:
    meta = {"magic": "mpkv", "version": 1, "format": "binary", "max_segment_bytes": 4096}
    meta.update(fields)
    Path(p, ".mpkv", "meta").write_text(json.dumps(meta))


def files_of(p: str) -> dict[str, bytes]:
    return {n: Path(p, n).read_bytes() for n in segs(p)}


@pytest.mark.parametrize("fmt,other", [("binary", "text"), ("text", "binary")])
def test_meta_naming_the_wrong_format_is_refused_before_anything_is_truncated(
        tmp_path, fmt, other):
    p = str(tmp_path / "s")
    with mpkv.Store(p, format=fmt, max_segment_bytes=4096) as s:
        for i in range(100):
            s[f"key{i}"] = f"value{i}"
    before = files_of(p)
    write_meta(p, format=other)
    for opener in (mpkv.Store, mpkv.verify, mpkv.repair):
        with pytest.raises(mpkv.FormatError, match=f"holds {fmt} records"):
            opener(p)
    assert files_of(p) == before


@pytest.mark.parametrize("fmt,other", [("binary", "text"), ("text", "binary")])
def test_lost_meta_is_recreated_from_the_segments_not_from_a_wrong_option(
        tmp_path, fmt, other):
    p = str(tmp_path / "s")
    with mpkv.Store(p, format=fmt, max_segment_bytes=4096) as s:
        for i in range(100):
            s[f"key{i}"] = f"value{i}"
    before = files_of(p)
    os.unlink(os.path.join(p, ".mpkv", "meta"))
    with pytest.raises(mpkv.FormatError, match=f"holds {fmt} records"):
        mpkv.Store(p, format=other)
    assert files_of(p) == before
    assert not os.path.exists(os.path.join(p, ".mpkv", "meta"))
    with mpkv.Store(p) as s:  # no option: the segments say which format
        assert s.format == fmt and len(s) == 100
        s["x"] = "y"
    with mpkv.Store(p) as s:
        assert len(s) == 101


@pytest.mark.parametrize("bad", [True, False, 1.5, "100", None, 0])
def test_meta_with_a_non_integer_limit_is_refused(tmp_path, bad):
    p = make_store(tmp_path / "s")
    write_meta(p, max_segment_bytes=bad)
    with pytest.raises(mpkv.FormatError, match="max_segment_bytes"):
        mpkv.Store(p)


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_deeply_nested_meta_is_a_format_error(tmp_path, depth):
    p = make_store(tmp_path / "s")
    Path(p, ".mpkv", "meta").write_text("[" * depth + "]" * depth)
    with pytest.raises(mpkv.FormatError, match="meta"):
        mpkv.Store(p)
    with pytest.raises(mpkv.FormatError, match="meta"):
        mpkv.verify(p)


SIDE_FILES = [("meta", "binary"), ("txn", "text"), ("compacted", "binary")]


def open_in_child(p: str) -> subprocess.CompletedProcess[str]:
    """Open ``p`` in a child limited to 1 GiB of memory: a side file read whole from
    /dev/zero or a huge file kills it instead of the test run."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "import mpkv\n"
            "try:\n    with mpkv.Store(sys.argv[1]) as s:\n        s['x'] = 'y'\n"
            "    print('opened')\n"
            "except (mpkv.FormatError, mpkv.CorruptionError) as e:\n    print('refused', e)\n")
    return subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name,fmt", SIDE_FILES)
def test_side_file_linked_to_dev_zero_is_refused(tmp_path, name, fmt):
    p = make_store(tmp_path / "s", format=fmt)
    side = os.path.join(p, ".mpkv", name)
    if os.path.exists(side):
        os.unlink(side)
    os.symlink("/dev/zero", side)
    out = open_in_child(p)
    assert out.stdout.startswith("refused") and name in out.stdout, out.stderr[-500:]


@pytest.mark.parametrize("name,fmt", SIDE_FILES)
def test_huge_side_file_is_refused_not_read_whole(tmp_path, name, fmt):
    p = make_store(tmp_path / "s", format=fmt)
    side = os.path.join(p, ".mpkv", name)
    with open(side, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB of zeros, no disk used
    out = open_in_child(p)
    assert out.stdout.startswith("refused") and name in out.stdout, out.stderr[-500:]


# --- Redis: credentials stay secret, server contents are checked ----------------------


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/x?password=hunter2",
    "redis://127.0.0.1:6379/0?db=1&password=hunter2",
    "redis://:hunter2@127.0.0.1:6379/x",
    "redis://admin:hunter2@127.0.0.1:6379/x",
    "redis://hunter2@127.0.0.1:6379/x",
    "redis://127.0.0.1:6379/0?namespace=a{b}&password=hunter2",
    "redis://127.0.0.1:6379/0?namespace=&password=hunter2",
    "redis://127.0.0.1:6379/0?password=hunter2&socket_timeout=bad",
    "http://:hunter2@127.0.0.1/0",
])
def test_bad_redis_url_error_never_shows_the_password(url):
    pytest.importorskip("redis")
    from mpkv.redis_store import RedisStore

    with pytest.raises(mpkv.Error) as info:
        RedisStore(url)
    assert "hunter2" not in str(info.value)


@pytest.fixture
def redis_url(tmp_path):
    redis = pytest.importorskip("redis")
    if not os.path.exists("/usr/bin/redis-server"):
        pytest.skip("no redis-server")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 60  # generous: the machine may be loaded
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "redis-server did not start")
                time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0?namespace=ns"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("staleness", [0.0, None])
def test_non_integer_redis_sequence_key_is_a_corruption_error(redis_url, staleness):
    import redis

    with mpkv.open(redis_url) as s:
        s["a"] = "1"
        client = redis.Redis.from_url(redis_url.split("?")[0])
        [seq_key] = [k for k in client.keys("*") if k.endswith(b"seq")]
        client.set(seq_key, b"not a number")
        client.close()
        with pytest.raises(mpkv.CorruptionError, match="seq"):
            s.refresh()
    with pytest.raises(mpkv.CorruptionError, match="seq"):
        mpkv.open(redis_url, max_staleness=staleness)


# --- repair is loss-free ------------------------------------------------------------


def flip(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def quarantined(p: str) -> dict[str, bytes]:
    folder = Path(p, ".mpkv", "quarantine")
    return {f.name: f.read_bytes() for f in folder.iterdir()} if folder.exists() else {}


def test_second_repair_of_damage_at_the_same_offset_keeps_the_first_quarantine_file(tmp_path):
    p = make_store(tmp_path / "s", n=40)
    first = os.path.join(p, segs(p)[0])
    for round_ in range(2):
        flip(first, 12)  # inside the first record's payload
        with pytest.raises(mpkv.CorruptionError):
            mpkv.Store(p)
        report = mpkv.repair(p)
        assert not mpkv.repair(p).damage
        assert len(quarantined(p)) == round_ + 1
        assert len(report.quarantined) == 1
    saved = quarantined(p)
    assert len(set(saved.values())) == 2  # two different records, both kept
    with mpkv.Store(p) as s:
        assert len(s) == 38


def test_unit_whose_closing_record_is_damaged_is_moved_aside_whole_not_glued(tmp_path):
    p = str(tmp_path / "s")
    with mpkv.Store(p, max_segment_bytes=200) as s:
        s["before"] = "1"
        with s.transaction() as tx:  # too big for one segment: chained records
            for i in range(6):
                tx[f"tx{i}"] = "x" * 60
        s["after"] = "2"
        s["later"] = "3"
    sizes = {n: os.path.getsize(os.path.join(p, n)) for n in segs(p)}
    whole = b"".join(Path(p, n).read_bytes() for n in segs(p))
    # The unit's closing record: the last record holding tx keys.
    closing = max(n for n in segs(p) if b"tx" in Path(p, n).read_bytes())
    flip(os.path.join(p, closing), 12)
    report = mpkv.repair(p)
    assert not report.ok
    with mpkv.Store(p) as s:
        assert not [k for k in s if k.startswith("tx")]  # none of the unit, not half
        assert s["before"] == "1" and s["after"] == "2" and s["later"] == "3"
    assert mpkv.verify(p).ok
    kept = b"".join(Path(p, n).read_bytes() for n in segs(p))
    assert len(kept) + sum(map(len, quarantined(p).values())) == len(whole) == sum(sizes.values())


def test_repair_cuts_an_unfinished_text_transaction_into_quarantine(tmp_path):
    p = str(tmp_path / "s")
    with mpkv.Store(p, format="text") as s:
        s["a"] = "1"
        s["b"] = "2"
    seg = os.path.join(p, segs(p)[-1])
    end = os.path.getsize(seg)
    Path(p, ".mpkv", "txn").write_text(f"1 {end} 21\n")  # start and length (format.md)
    with open(seg, "a") as f:  # a commit of three lines died after two
        f.write("P|t1|x\nP|t2|y\n")
    assert mpkv.verify(p).ok  # an unfinished commit is a torn tail, not damage
    report = mpkv.repair(p)
    assert any("unfinished" in a for a in report.actions)
    assert not os.path.exists(os.path.join(p, ".mpkv", "txn"))
    assert Path(seg).read_text() == "P|a|1\nP|b|2\n"
    assert b"P|t1|x\nP|t2|y\n" in quarantined(p).values()
    with mpkv.Store(p) as s:
        assert dict(s) == {"a": "1", "b": "2"}


@pytest.mark.parametrize("fmt,content", [("text", "7 0\n"), ("text", "1 999999\n"),
                                         ("binary", "1 0\n")])
def test_repair_moves_aside_an_intent_that_cannot_apply_and_cuts_nothing(tmp_path, fmt, content):
    p = make_store(tmp_path / "s", format=fmt)
    before = files_of(p)
    Path(p, ".mpkv", "txn").write_text(content)
    mpkv.repair(p)
    assert files_of(p) == before
    assert not os.path.exists(os.path.join(p, ".mpkv", "txn"))
    assert content.encode() in quarantined(p).values()


@pytest.mark.parametrize("entry", ["README", "notes-1", "12x-3", "99999999999999999999999-1"])
def test_stray_entries_in_readers_are_ignored_by_compaction(tmp_path, entry):
    p = make_store(tmp_path / "s", n=50)
    folder = Path(p, ".mpkv", "readers")
    folder.mkdir(exist_ok=True)
    (folder / entry).write_text("not a number")
    with mpkv.Store(p) as s:
        assert s.compact()["segments_before"] > 0
        assert len(s) == 50
    assert (folder / entry).read_text() == "not a number"
