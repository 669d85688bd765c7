"""The ``mpkv`` command line, run as real subprocesses on real stores (CONTRACT.md,
"Command line"): every subcommand, exit codes, one-line errors, no progress bars in
pipes."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mpkv

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
PY = [sys.executable, "-m", "mpkv"]


def run(*args: object, input: str | bytes | None = None, cmd: list[str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mpkv ARGS`` (or ``cmd + ARGS``) with stdout/stderr as pipes."""
    text = not isinstance(input, bytes)
    return subprocess.run([*(cmd or PY), *map(str, args)], input=input, capture_output=True,
                          text=text, env=ENV, timeout=timeout, cwd=str(REPO))


def ok(*args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    r = run(*args, **kw)  # type: ignore[arg-type]
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def fails(code: int, *args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    """Exit ``code`` and exactly one non-empty line on stderr, no traceback."""
    r = run(*args, **kw)  # type: ignore[arg-type]
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one stderr line, got {r.stderr!r}"
    return r


def no_progress_bar(stderr: str) -> None:
    assert "%|" not in stderr and "\r" not in stderr, repr(stderr)


def dump_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --- get / put / delete / list --------------------------------------------------------


def test_put_get_delete_roundtrip(store: Path) -> None:
    ok("put", store, "greeting", "hello world")
    assert store.is_dir()
    assert ok("get", store, "greeting").stdout == "hello world\n"
    ok("put", store, "greeting", "bye")
    assert ok("get", store, "greeting").stdout == "bye\n"
    ok("delete", store, "greeting")
    r = fails(1, "get", store, "greeting")
    assert r.stdout == ""
    with mpkv.Store(store) as s:
        assert "greeting" not in s


def test_values_written_by_cli_are_seen_by_python_and_back(store: Path) -> None:
    ok("put", store, "ключ ☃", "значение ✓")
    with mpkv.Store(store) as s:
        assert s["ключ ☃"] == "значение ✓"
        s["from-python"] = "yes"
        s[""] = "empty key"
    assert ok("get", store, "from-python").stdout == "yes\n"
    assert ok("get", store, "ключ ☃").stdout == "значение ✓\n"
    assert ok("get", store, "").stdout == "empty key\n"


def test_get_bytes_value_writes_raw_bytes(store: Path) -> None:
    with mpkv.Store(store) as s:
        s["blob"] = b"\x00\xff\x10raw"
    r = subprocess.run([*PY, "get", str(store), "blob"], capture_output=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"\x00\xff\x10raw")


def test_get_missing_key_exits_1(store: Path) -> None:
    ok("put", store, "a", "1")
    r = fails(1, "get", store, "nope")
    assert "nope" in r.stderr


def test_delete_missing_key_still_logs_a_record(store: Path) -> None:
    ok("put", store, "a", "1")
    before = mpkv.verify(store).records
    r = run("delete", store, "missing")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    assert mpkv.verify(store).records == before + 1


def test_list_and_prefix(store: Path) -> None:
    with mpkv.Store(store) as s:
        for k in ["user:2", "user:1", "item:9", "user:10", "u", "ключ"]:
            s[k] = "x"
    assert ok("list", store).stdout.splitlines() == sorted(
        ["user:2", "user:1", "item:9", "user:10", "u", "ключ"])
    assert ok("list", store, "--prefix", "user:").stdout.splitlines() == [
        "user:1", "user:10", "user:2"]
    assert ok("list", store, "--prefix", "nothing").stdout == ""


def test_console_script(store: Path) -> None:
    exe = shutil.which("mpkv")
    if exe is None:
        pytest.skip("the mpkv console script is not installed on PATH")
    ok("put", store, "k", "via script", cmd=[exe])
    assert ok("get", store, "k", cmd=[exe]).stdout == "via script\n"
    assert ok("list", store, cmd=[exe]).stdout == "k\n"
    fails(1, "get", store, "missing", cmd=[exe])
    r = run("no-such-command", cmd=[exe])
    assert r.returncode == 2 and "Traceback" not in r.stderr


# --- dump / load ---------------------------------------------------------------------


def test_dump_load_round_trip(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data: dict[str, str | bytes] = {
        "plain": "value",
        "ключ ☃ 🔑": "значение ✓ 🎉",
        "": "empty key",
        "quote\"and\\backslash": "line\nbreak\ttab",
        "blob": b"\x00\x01\xfe\xffbinary",
        "empty-bytes": b"",
        "empty-str": "",
    }
    data.update({f"n:{i:04d}": str(i) for i in range(2500)})  # more than one load chunk
    with mpkv.Store(src) as s:
        for k, v in data.items():
            s[k] = v
        s["gone"] = "x"
        del s["gone"]

    r = ok("dump", src)
    no_progress_bar(r.stderr)
    lines = dump_lines(r.stdout)
    assert len(lines) == len(data)
    by_key = {d["key"]: d for d in lines}
    assert by_key["blob"] == {"key": "blob", "value": base64.b64encode(
        b"\x00\x01\xfe\xffbinary").decode(), "bytes": True}
    assert by_key["ключ ☃ 🔑"]["value"] == "значение ✓ 🎉"
    assert not by_key["plain"].get("bytes")
    assert "gone" not in by_key

    r = ok("load", dst, input=r.stdout)
    no_progress_bar(r.stderr)
    with mpkv.Store(dst) as s:
        assert dict(s.items()) == data
        assert isinstance(s["blob"], bytes) and isinstance(s["plain"], str)
    assert ok("dump", dst).stdout == ok("dump", src).stdout


def test_load_into_text_store(tmp_path: Path) -> None:
    dst = tmp_path / "t"
    lines = "".join(json.dumps({"key": f"k{i}", "value": f"v{i}"}) + "\n" for i in range(10))
    ok("load", dst, "--format", "text", input=lines)
    with mpkv.Store(dst) as s:
        assert s.format == "text" and s["k7"] == "v7"


def test_load_malformed_json_fails_cleanly(store: Path) -> None:
    ok("put", store, "keep", "me")
    r = fails(1, "load", store, input='{"key": "a", "value": "1"}\n{not json\n')
    assert "line 2" in r.stderr or "2" in r.stderr
    no_progress_bar(r.stderr)
    assert ok("get", store, "keep").stdout == "me\n"


@pytest.mark.parametrize("line", ['{"key": "a"}', '{"value": "a"}', '{"key": 1, "value": "x"}',
                                  '{"key": "a", "value": 3}', '[1, 2]',
                                  '{"key": "a", "value": "!!", "bytes": true}'])
def test_load_bad_records_fail_cleanly(store: Path, line: str) -> None:
    fails(1, "load", store, input=line + "\n")


# --- stats / verify / repair / compact ------------------------------------------------


def many_segments(path: Path, n: int = 200) -> dict[str, str]:
    data = {f"key{i:05d}": f"v{i:05d}" + "v" * 40 for i in range(n)}
    with mpkv.Store(path, max_segment_bytes=1024) as s:
        for k, v in data.items():
            s[k] = v
    return data


def test_stats(store: Path) -> None:
    many_segments(store)
    with mpkv.Store(store) as s:
        for i in range(50):
            s[f"key{i:05d}"] = "overwritten"
    r = ok("stats", store)
    out = r.stdout.lower()
    for word in ("segments", "records", "live keys", "bytes", "garbage ratio"):
        assert word in out, (word, r.stdout)
    fields = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    assert int(fields["records"]) == 250
    assert int(fields["live keys"]) == 200
    assert int(fields["segments"]) > 1
    assert 0.0 < float(fields["garbage ratio"]) < 1.0


def test_verify_good_store(store: Path) -> None:
    many_segments(store)
    r = ok("verify", store)
    no_progress_bar(r.stderr)


def flip_old_byte(store: Path) -> Path:
    segs = sorted(p for p in store.iterdir() if p.name.endswith(".seg"))
    assert len(segs) >= 3, segs
    first = segs[0]
    data = bytearray(first.read_bytes())
    at = data.index(b"vvvvvvvv") + 3  # inside a value of an old record
    data[at] ^= 0x01
    first.write_bytes(bytes(data))
    return first


def test_verify_detects_damage_then_repair(store: Path) -> None:
    data = many_segments(store)
    flip_old_byte(store)
    r = run("verify", store)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    no_progress_bar(r.stderr)

    # opening the damaged store fails cleanly: one line naming the problem
    fails(1, "get", store, "key00199")

    r = ok("repair", store)
    no_progress_bar(r.stderr)
    assert ok("verify", store).returncode == 0
    quarantine = [p for p in store.rglob("*") if p.is_file() and "quarantine" in str(p)]
    assert quarantine, "damaged bytes must be moved aside, never deleted"
    with mpkv.Store(store) as s:
        got = dict(s.items())
    lost = set(data) - set(got)
    assert len(lost) <= 1, lost  # only the record with the flipped byte
    assert all(got[k] == data[k] for k in got)
    assert ok("get", store, "key00199").stdout.strip() == data["key00199"]


def test_repair_good_store_is_noop(store: Path) -> None:
    many_segments(store, 50)
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.name.endswith(".seg")}
    ok("repair", store)
    after = {p.name: p.read_bytes() for p in store.iterdir() if p.name.endswith(".seg")}
    assert before == after


def test_compact(store: Path) -> None:
    data = many_segments(store)
    with mpkv.Store(store) as s:
        for i in range(0, 200, 2):
            del s[f"key{i:05d}"]
            data.pop(f"key{i:05d}")
    size = sum(p.stat().st_size for p in store.iterdir() if p.name.endswith(".seg"))
    ok("compact", store)
    after = sum(p.stat().st_size for p in store.iterdir() if p.name.endswith(".seg"))
    assert after < size
    with mpkv.Store(store) as s:
        assert dict(s.items()) == data
    ok("verify", store)


# --- backup / restore ------------------------------------------------------------------


def test_backup_restore_replaces_everything(tmp_path: Path) -> None:
    store, file = tmp_path / "s", tmp_path / "backup.snap"
    with mpkv.Store(store) as s:
        s["a"] = "1"
        s["b"] = b"\x00bytes"
        s["ключ"] = "☃"
    ok("backup", store, file)
    assert file.is_file()
    with mpkv.Store(store) as s:
        s["a"] = "changed"
        s["c"] = "added later"
        del s["b"]
    ok("restore", store, file)
    with mpkv.Store(store) as s:
        assert dict(s.items()) == {"a": "1", "b": b"\x00bytes", "ключ": "☃"}
    # restore into a brand-new store too
    other = tmp_path / "other"
    ok("restore", other, file)
    assert ok("dump", other).stdout == ok("dump", store).stdout


def test_restore_from_garbage_fails_cleanly(tmp_path: Path) -> None:
    store, garbage = tmp_path / "s", tmp_path / "garbage"
    ok("put", store, "keep", "me")
    garbage.write_bytes(b"this is not a snapshot at all\n" * 10)
    fails(1, "restore", store, garbage)
    fails(1, "restore", store, tmp_path / "does-not-exist")
    assert ok("get", store, "keep").stdout == "me\n"
    assert ok("list", store).stdout == "keep\n"


# --- watch --------------------------------------------------------------------------


def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def test_watch_prints_changes_in_order(store: Path) -> None:
    with mpkv.Store(store) as s:
        s["before"] = "not reported"
    proc = subprocess.Popen([*PY, "watch", str(store), "--timeout", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    try:
        with mpkv.Store(store) as s:
            # the watcher starts at an unknown moment: ping until it reports something
            deadline = time.monotonic() + 30
            n = 0
            while q.empty():
                assert time.monotonic() < deadline, "watch never reported a change"
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                s[f"ping:{n}"] = "p"
                n += 1
                time.sleep(0.05)
            expected = []
            for i in range(30):
                s[f"k:{i:02d}"] = f"v{i} ☃"
                expected.append({"key": f"k:{i:02d}", "value": f"v{i} ☃"})
            s["blob"] = b"\x00\x01"
            expected.append({"key": "blob", "value": base64.b64encode(b"\x00\x01").decode(),
                             "bytes": True})
            del s["k:03"]
            expected.append({"key": "k:03", "value": None})
            with s.transaction() as tx:
                tx["t:1"] = "one"
                tx["t:2"] = "two"
            expected += [{"key": "t:1", "value": "one"}, {"key": "t:2", "value": "two"}]
        lines = []
        while True:
            line = q.get(timeout=30)
            if line is None:
                break
            lines.append(json.loads(line))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    positions = [d.pop("position") for d in lines]
    assert positions == sorted(positions), "positions sort in commit order"
    assert all(d.pop("deleted") is (d["value"] is None) for d in lines)
    pings = [d for d in lines if d["key"].startswith("ping:")]
    rest = [d for d in lines if not d["key"].startswith("ping:")]
    assert lines[: len(pings)] == pings, "pings all come before the later writes"
    assert [d["key"] for d in pings] == sorted(d["key"] for d in pings) or len(pings) < 10
    assert rest == expected
    assert all(d["key"] != "before" for d in lines)


def test_watch_prefix_and_timeout(store: Path) -> None:
    ok("put", store, "x", "1")
    started = time.monotonic()
    # The idle timeout is well above the gap between the pings and the last writes,
    # which a loaded machine may stretch.
    proc = subprocess.Popen([*PY, "watch", str(store), "--prefix", "a:", "--timeout", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    try:
        with mpkv.Store(store) as s:
            n = 0
            while q.empty():
                assert time.monotonic() - started < 30 and proc.poll() is None
                s[f"b:{n}"] = "other prefix"
                s[f"a:ping{n}"] = "p"
                n += 1
                time.sleep(0.05)
            s["b:last"] = "no"
            s["a:last"] = "yes"
        lines = []
        while (line := q.get(timeout=30)) is not None:
            lines.append(json.loads(line))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines and all(d["key"].startswith("a:") for d in lines)
    assert {k: lines[-1][k] for k in ("key", "value", "deleted")} == {
        "key": "a:last", "value": "yes", "deleted": False}
    assert time.monotonic() - started >= 4  # ended by the idle timeout


# --- demo ---------------------------------------------------------------------------


def demo_store(stdout: str) -> Path:
    """The store a demo run says it used."""
    m = re.search(r"into the store (\S+)", stdout)
    assert m, stdout
    return Path(m.group(1))


def test_demo_twice_on_the_same_dir_is_verified_each_time(tmp_path: Path) -> None:
    stores = []
    for _ in range(2):
        r = ok("demo", tmp_path / "demo", timeout=180)
        assert "result VERIFIED" in r.stdout, r.stdout
        stores.append(demo_store(r.stdout))
        assert f"mpkv stats {stores[-1]}" in r.stdout  # where to look afterwards
    assert stores[0] != stores[1] and stores[0].parent == stores[1].parent == tmp_path / "demo"
    counts = []
    for path in stores:
        with mpkv.Store(path, readonly=True) as s:
            counts.append({k: v for k, v in s.items() if k.startswith("count:")})
    assert counts[0] == counts[1]
    # real words, not generated tokens
    assert int(counts[0]["count:the"]) > 100 and "count:python" in counts[0]
    assert not any(re.fullmatch(r"count:w\d+", k) for k in counts[0])


def test_demo_never_writes_into_a_store_it_did_not_create(tmp_path: Path) -> None:
    store = tmp_path / "mine"
    ok("put", store, "precious", "data")
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    r = fails(1, "demo", store)
    assert str(store) in r.stderr
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before
    with mpkv.Store(store, readonly=True) as s:
        assert dict(s.items()) == {"precious": "data"}
    (tmp_path / "file").write_text("x")
    fails(1, "demo", tmp_path / "file")


def test_demo_without_dir_uses_a_new_temporary_directory(tmp_path: Path) -> None:
    r = subprocess.run([*PY, "demo"], capture_output=True, text=True, timeout=180,
                       env={**ENV, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and "result VERIFIED" in r.stdout, (r.stdout, r.stderr)
    path = demo_store(r.stdout)
    assert path.parent.parent == tmp_path and path.parent.name.startswith("mpkv-demo-")
    ok("verify", path)


# --- failures: exit codes, one line, never a traceback --------------------------------


@pytest.mark.parametrize("args", [
    [],
    ["no-such-command"],
    ["get"],
    ["get", "PATH"],
    ["put", "PATH", "k"],
    ["restore", "PATH"],
    ["list", "PATH", "--bogus-option"],
    ["put", "PATH", "k", "v", "--format", "xml"],
])
def test_usage_errors_exit_2(store: Path, args: list[str]) -> None:
    r = run(*[str(store) if a == "PATH" else a for a in args])
    assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.strip()
    assert not store.exists(), "a usage error must not create anything"


def test_usage_errors_print_exactly_one_line(store: Path) -> None:
    """CONTRACT: "any failure prints one clear line on stderr" -- usage errors too."""
    offenders = {}
    for args in (["no-such-command"], ["get", str(store)], ["put", str(store), "k"]):
        r = run(*args)
        assert r.returncode == 2
        if len(r.stderr.splitlines()) != 1:
            offenders[" ".join(args[:1])] = r.stderr
    assert not offenders, f"usage errors print more than one stderr line: {offenders}"


def test_path_is_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "plain-file"
    f.write_text("not a store")
    for args in (["get", f, "k"], ["put", f, "k", "v"], ["dump", f], ["verify", f],
                 ["compact", f]):
        fails(1, *args)
    assert f.read_text() == "not a store"


def test_non_store_directory_is_untouched(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"meow")
    fails(1, "put", d, "k", "v")
    fails(1, "verify", d)
    assert sorted(p.name for p in d.iterdir()) == ["cat.jpg"]


def test_read_commands_on_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    fails(1, "get", missing, "k")
    fails(1, "verify", missing)


def test_text_store_rejects_pipe_in_key(store: Path) -> None:
    ok("put", store, "ok", "fine", "--format", "text")
    fails(1, "put", store, "a|b", "v")
    fails(1, "put", store, "a|b", "v", "--format", "text")
    fails(1, "put", store, "k", "line\nbreak")
    fails(1, "put", store, "k", "v", "--format", "binary")  # conflicts with the store
    assert ok("list", store).stdout == "ok\n"
    segs = sorted(p for p in store.iterdir() if p.name.endswith(".seg"))
    assert b"".join(p.read_bytes() for p in segs) == b"P|ok|fine\n"


def test_load_bytes_into_text_store_fails_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "t"
    ok("put", store, "ok", "fine", "--format", "text")
    line = json.dumps({"key": "b", "value": base64.b64encode(b"\x00").decode(), "bytes": True})
    fails(1, "load", store, input=line + "\n")
    assert ok("list", store).stdout == "ok\n"


# --- a CLI that cannot hurt: no store created by mistake, no traceback ------------------

NON_CREATING = [
    ["get", "PATH", "k"], ["delete", "PATH", "k"], ["list", "PATH"], ["dump", "PATH"],
    ["stats", "PATH"], ["verify", "PATH"], ["repair", "PATH"], ["compact", "PATH"],
    ["backup", "PATH", "BACKUP"],
]


@pytest.mark.parametrize("args", NON_CREATING, ids=lambda a: a[0])
@pytest.mark.parametrize("where", ["missing", "empty-dir", "missing-parent"])
def test_commands_that_do_not_create_refuse_a_path_without_store(
        tmp_path: Path, args: list[str], where: str) -> None:
    path = {"missing": tmp_path / "typo", "empty-dir": tmp_path / "empty",
            "missing-parent": tmp_path / "no" / "such" / "dir"}[where]
    if where == "empty-dir":
        path.mkdir()
    r = fails(1, *[path if a == "PATH" else tmp_path / "b.snap" if a == "BACKUP" else a
                   for a in args])
    assert str(path) in r.stderr and "no mpkv store" in r.stderr
    if where == "empty-dir":
        assert list(path.iterdir()) == [], "nothing may be created inside"
    else:
        assert not path.exists() and not (tmp_path / "no").exists()
    assert not (tmp_path / "b.snap").exists()


def test_creating_commands_still_create(tmp_path: Path) -> None:
    ok("put", tmp_path / "a" / "nested", "k", "v")
    ok("load", tmp_path / "b", input='{"key": "k", "value": "v"}\n')
    ok("load", tmp_path / "c", input="")  # empty input: an empty store all the same
    ok("backup", tmp_path / "a" / "nested", tmp_path / "snap")
    ok("restore", tmp_path / "d", tmp_path / "snap")
    for name in ("b", "c", "d"):
        assert ok("verify", tmp_path / name).returncode == 0
    assert ok("get", tmp_path / "d", "k").stdout == "v\n"


def test_restore_of_a_bad_file_into_a_new_path_creates_nothing(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a snapshot")
    fails(1, "restore", tmp_path / "new", garbage)
    fails(1, "restore", tmp_path / "new2", tmp_path / "missing-file")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


def test_restore_of_a_json_backup_into_a_new_path_keeps_the_objects(tmp_path: Path) -> None:
    with mpkv.Store(tmp_path / "s", serializer="json") as s:
        s["user"] = {"name": "ada"}
    ok("backup", tmp_path / "s", tmp_path / "snap")
    ok("restore", tmp_path / "new", tmp_path / "snap")
    with mpkv.Store(tmp_path / "new", readonly=True) as s:
        assert s.serializer == "json" and s["user"] == {"name": "ada"}


def test_load_of_a_bad_first_line_into_a_new_path_creates_nothing(tmp_path: Path) -> None:
    fails(1, "load", tmp_path / "new", input="{oops\n")
    assert not (tmp_path / "new").exists()


def test_version() -> None:
    r = ok("--version")
    assert r.stdout.strip() == f"mpkv {mpkv.__version__}"


HELP_COMMANDS = [[], ["get"], ["put"], ["delete"], ["list"], ["dump"], ["load"], ["stats"],
                 ["verify"], ["repair"], ["compact"], ["backup"], ["restore"], ["watch"],
                 ["demo"], ["bench"], ["stress"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: c[0] if c else "mpkv")
def test_every_help_ends_with_an_example(command: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mpkv import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    tail = lines[lines.index("example:") + 1:] if "example:" in lines else []
    assert tail and all(ln.startswith("  mpkv ") for ln in tail), lines[-3:]
    assert lines[-len(tail) - 1] == "example:"


def test_positional_arguments_have_help() -> None:
    from mpkv import cli

    missing = []
    subparsers = next(a for a in cli.parser()._actions
                      if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings and not action.help:
                missing.append(f"{name} {action.dest}")
    assert not missing, missing


# --- load: progress with a total, how far a failed load got, --atomic, deep JSON ---------


def jsonl(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"key": f"k{i:05d}", "value": f"v{i}"}) + "\n"
                   for i in range(start, start + n))


def test_failed_load_says_how_many_lines_were_committed(store: Path) -> None:
    lines = jsonl(2499) + "{broken\n" + jsonl(10, 5000)
    r = fails(1, "load", store, input=lines)
    assert "line 2500" in r.stderr and "2499 records" in r.stderr, r.stderr
    assert "tail -n +2500" in r.stderr
    with mpkv.Store(store) as s:
        assert len(s) == 2499 and s["k02498"] == "v2498" and "k05000" not in s


def test_failed_load_counts_lines_the_store_rejected(tmp_path: Path) -> None:
    store = tmp_path / "t"
    ok("put", store, "ok", "fine", "--format", "text")
    lines = jsonl(1500) + json.dumps({"key": "a|b", "value": "pipe in key"}) + "\n" + jsonl(5)
    r = fails(1, "load", store, input=lines)
    assert "line 1501" in r.stderr and "1500 records" in r.stderr, r.stderr
    with mpkv.Store(store) as s:
        assert len(s) == 1501 and "a|b" not in s


def test_load_atomic_is_all_or_nothing(store: Path) -> None:
    ok("put", store, "keep", "me")
    r = fails(1, "load", store, "--atomic", input=jsonl(2500) + "[]\n")
    assert "nothing was loaded" in r.stderr
    with mpkv.Store(store) as s:
        assert dict(s.items()) == {"keep": "me"}
    ok("load", store, "--atomic", input=jsonl(2500))
    with mpkv.Store(store) as s:
        assert len(s) == 2501
    # one transaction: every line is one atomic unit of the log
    ok("load", tmp := store.parent / "atomic-new", "--atomic", input=jsonl(3000))
    with mpkv.Store(tmp) as s:
        assert len(s) == 3000


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_load_deeply_nested_json_is_one_line_not_a_traceback(store: Path, depth: int) -> None:
    ok("put", store, "keep", "me")
    deep = '{"key": "k", "value": ' + "[" * depth + "]" * depth + "}\n"
    r = fails(1, "load", store, input=jsonl(3) + deep)
    assert "line 4" in r.stderr and "nested" in r.stderr
    with mpkv.Store(store) as s:
        assert len(s) == 4


def run_with_tty_stderr(args: list[object], stdin_file: Path | None = None,
                        extra_env: dict[str, str] | None = None,
                        tty_stdout: bool = False) -> tuple[int, str]:
    """Run mpkv with stderr (and, if asked, stdout) on a pseudo-terminal; return the exit
    status and everything the terminal received."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    stdin = open(stdin_file, "rb") if stdin_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen([*PY, *map(str, args)], stdin=stdin,
                                stdout=slave if tty_stdout else subprocess.DEVNULL,
                                stderr=slave, env={**ENV, "COLUMNS": "120",
                                                   **(extra_env or {})}, cwd=str(REPO))
    finally:
        os.close(slave)
        if stdin_file:
            stdin.close()  # type: ignore[union-attr]
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


def test_load_progress_bar_shows_a_total_when_stdin_is_a_file(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    src = tmp_path / "in.jsonl"
    src.write_text(jsonl(3000))
    code, out = run_with_tty_stderr(["load", tmp_path / "s"], stdin_file=src)
    assert code == 0, out
    # with a total, tqdm shows "done/total" and a percentage from the first frame on
    assert "100%|" in out and re.search(r"0\.00/\d+(\.\d+)?k ", out), out
    assert "loaded 3000 records" in out


def test_without_tqdm_there_is_no_bar_and_no_error(tmp_path: Path) -> None:
    """tqdm is an optional extra: on a terminal without it, commands work, silently."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "tqdm.py").write_text("raise ImportError('tqdm is not installed')\n")
    src = tmp_path / "in.jsonl"
    src.write_text(jsonl(100))
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{ENV['PYTHONPATH']}"}
    code, out = run_with_tty_stderr(["load", tmp_path / "s"], stdin_file=src, extra_env=env)
    assert code == 0 and "Traceback" not in out and "%|" not in out, out
    assert "loaded 100 records" in out
    code, out = run_with_tty_stderr(["verify", tmp_path / "s"], extra_env=env)
    assert code == 0 and "Traceback" not in out, out


# --- list: terminal escapes -----------------------------------------------------------------

HOSTILE_KEYS = ["plain", "esc\x1b]0;pwned\x07title", "csi\x9b31mred", "new\nline",
                "bidi\u202egnp.exe", "tab\there", "ünï☃"]


def test_list_escapes_control_characters_on_a_terminal(store: Path) -> None:
    with mpkv.Store(store) as s:
        for k in HOSTILE_KEYS:
            s[k] = "x"
    code, out = run_with_tty_stderr(["list", store], tty_stdout=True)
    assert code == 0
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out, repr(out)
    shown = out.replace("\r\n", "\n").splitlines()
    assert shown == [
        "bidi\\u202egnp.exe", "csi\\x9b31mred", "esc\\x1b]0;pwned\\x07title", "new\\nline",
        "plain", "tab\\there", "ünï☃"], shown


def test_list_in_a_pipe_writes_keys_as_they_are_and_null_separates(store: Path) -> None:
    with mpkv.Store(store) as s:
        for k in HOSTILE_KEYS:
            s[k] = "x"
    r = subprocess.run([*PY, "list", str(store)], capture_output=True, env=ENV, timeout=60)
    assert r.stdout == "".join(k + "\n" for k in sorted(HOSTILE_KEYS)).encode()
    r = subprocess.run([*PY, "list", str(store), "-0"], capture_output=True, env=ENV, timeout=60)
    assert r.stdout.split(b"\0")[:-1] == [k.encode() for k in sorted(HOSTILE_KEYS)]


# --- stats: records are puts and deletes; live bytes within bytes -------------------------


def stats_fields(path: Path) -> dict[str, str]:
    out = ok("stats", path).stdout
    return {k.strip(): v.strip() for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def test_stats_counts_records_not_transactions(store: Path) -> None:
    with mpkv.Store(store) as s:
        with s.transaction() as tx:
            for i in range(100):
                tx[f"k{i}"] = "v"
        s["one"] = "more"
        s.delete("k0")
    fields = stats_fields(store)
    assert int(fields["records"]) == 102
    assert int(fields["live keys"]) == 100


@pytest.mark.parametrize("shape", ["one put", "one transaction", "compacted", "text"])
def test_stats_live_bytes_never_exceed_bytes(tmp_path: Path, shape: str) -> None:
    store = tmp_path / "s"
    with mpkv.Store(store, format="text" if shape == "text" else None) as s:
        if shape == "one put":
            s["k"] = "v"
        else:
            with s.transaction() as tx:
                for i in range(2000):
                    tx[f"key{i}"] = f"value{i}" * 3
        if shape == "compacted":
            s.compact()
    fields = stats_fields(store)
    assert int(fields["live bytes"]) <= int(fields["bytes"]), fields
    assert float(fields["garbage ratio"]) < 0.01, fields


# --- failures never print a traceback ------------------------------------------------------


def test_a_directory_as_backup_file_or_restore_file(tmp_path: Path) -> None:
    store = tmp_path / "s"
    ok("put", store, "k", "v")
    fails(1, "backup", store, tmp_path)
    fails(1, "restore", store, tmp_path)
    fails(1, "backup", store, tmp_path / "no" / "dir" / "f")


def test_unreadable_store_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    store = tmp_path / "s"
    ok("put", store, "k", "v")
    store.chmod(0)
    try:
        fails(1, "get", store, "k")
        fails(1, "put", store, "k", "v")
    finally:
        store.chmod(0o755)


def test_a_store_file_that_is_not_readable_as_data(tmp_path: Path) -> None:
    """Metadata replaced by a directory: a clear line, whatever the command."""
    store = tmp_path / "s"
    ok("put", store, "k", "v")
    meta = store / ".mpkv" / "meta"
    meta.unlink()
    meta.mkdir()
    for args in (["get", store, "k"], ["put", store, "k", "v"], ["stats", store]):
        fails(1, *args)


def test_broken_pipe_into_head_is_quiet(store: Path) -> None:
    with mpkv.Store(store) as s, s.transaction() as tx:
        for i in range(50_000):
            tx[f"key{i:06d}"] = "v" * 50
    for command in ("dump", "list"):
        r = subprocess.run(f"{sys.executable} -m mpkv {command} {store} | head -1",
                           shell=True, capture_output=True, text=True, env=ENV, timeout=120)
        assert r.stdout.count("\n") == 1, r.stdout[:200]
        assert r.stderr == "", r.stderr


def test_interrupt_prints_one_line_and_exits_130(store: Path) -> None:
    import signal

    ok("put", store, "k", "v")
    # As from a terminal: SIGINT at its default in the child, whatever this process
    # inherited (a job started in the background of a non-interactive shell, as a CI
    # runner may start the suite, ignores SIGINT, and so would the child: it never stopped).
    proc = subprocess.Popen([*PY, "load", str(store)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(jsonl(1000))  # one whole chunk: committed while stdin stays open
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while True:  # until the load is running: its first chunk is committed
        with mpkv.Store(store, readonly=True) as s:
            if len(s) >= 1001:
                break
        assert time.monotonic() < deadline and proc.poll() is None, (
            proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)  # a failure, not a hang, if it goes on loading
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("mpkv load went on after SIGINT") from None
    err = proc.stderr.read()
    assert code == 130 and "Traceback" not in err and len(err.splitlines()) == 1, (code, err)
    proc.stdin.close()


# --- JSON stores from the command line ----------------------------------------------------


def test_json_store_through_load_get_and_dump(tmp_path: Path) -> None:
    records = [{"key": "cfg", "value": {"name": "ada", "tags": [1, 2]}},
               {"key": "n", "value": 3}, {"key": "nothing", "value": None},
               {"key": "text", "value": "plain"}]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    store = tmp_path / "j"
    r = fails(1, "load", tmp_path / "raw", input=lines)  # a raw store takes no objects
    assert "line 1" in r.stderr and "serializer" in r.stderr
    ok("load", store, "--serializer", "json", input=lines)
    assert json.loads(ok("get", store, "cfg").stdout) == {"name": "ada", "tags": [1, 2]}
    assert ok("get", store, "nothing").stdout == "null\n"  # a stored null is not a missing key
    assert ok("get", store, "text").stdout == "plain\n"
    fails(1, "get", store, "missing")
    assert dump_lines(ok("dump", store).stdout) == records
    fails(1, "put", store, "k", "v", "--serializer", "raw")  # conflicts with the store
    with mpkv.Store(store) as s:
        assert s["n"] == 3 and s.serializer == "json"


def test_a_store_being_created_is_not_called_a_foreign_directory(tmp_path: Path) -> None:
    """Between a creator's mkdir of .mpkv/ and its metadata, the path is not a store
    yet, and not someone else's directory either (watch waits on exactly this)."""
    from mpkv import cli

    path = tmp_path / "s"
    (path / ".mpkv").mkdir(parents=True)
    assert cli._holds_store(str(path)) is False
    r = fails(1, "get", path, "k")
    assert "no mpkv store" in r.stderr
    assert sorted(p.name for p in path.rglob("*")) == [".mpkv"]
