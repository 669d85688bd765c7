"""The ``mpkv`` command line, run as real subprocesses on real stores (CONTRACT.md,
"Command line"): every subcommand, exit codes, one-line errors, no progress bars in
pipes."""

from __future__ import annotations

import base64
import json
import os
import queue
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
    pings = [d for d in lines if d["key"].startswith("ping:")]
    rest = [d for d in lines if not d["key"].startswith("ping:")]
    assert lines[: len(pings)] == pings, "pings all come before the later writes"
    assert [d["key"] for d in pings] == sorted(d["key"] for d in pings) or len(pings) < 10
    assert rest == expected
    assert all(d["key"] != "before" for d in lines)


def test_watch_prefix_and_timeout(store: Path) -> None:
    ok("put", store, "x", "1")
    started = time.monotonic()
    proc = subprocess.Popen([*PY, "watch", str(store), "--prefix", "a:", "--timeout", "1.5"],
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
    assert lines[-1] == {"key": "a:last", "value": "yes"}
    assert time.monotonic() - started >= 1.5  # ended by the idle timeout


# --- demo ---------------------------------------------------------------------------


def test_demo_with_dir(tmp_path: Path) -> None:
    r = ok("demo", tmp_path / "demo-store", timeout=120)
    assert "VERIFIED" in r.stdout
    assert (tmp_path / "demo-store").is_dir()
    with mpkv.Store(tmp_path / "demo-store") as s:
        assert len(s) > 0


def test_demo_without_dir() -> None:
    r = ok("demo", timeout=120)
    assert "VERIFIED" in r.stdout


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
