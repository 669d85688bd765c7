"""Compaction takes the state of the sealed segments from the compacting store's own
view, copied at the seal, instead of replaying the segments (docs/compaction.md). These
tests hunt what that could break: outputs, hints or horizon that differ from what a
replay of the same log gives (values of every size, kind and encoding, transactions,
deletes, former outputs, views built by writing, by reading and from hints, a copied
directory's untrusted shared state), a horizon that lets a watcher skip changes or
refuses one that lost nothing, a view that is not the whole state (stale, one key's,
holding values in segments already removed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import flip_byte, view_left_on_removed_segments

import mpkv
from mpkv import compaction, hints
from mpkv.keydir import ValueFiles
from mpkv.segments import AUX, HORIZON, list_log, parse_name

LIMIT = 4096  # bytes (characters for text) a segment: many segments, outputs in parts


class ReplaySpy:
    """Counts the calls of ``compaction.replay`` while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = compaction.replay

        def replay(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(compaction, "replay", replay)


def _replay_horizon(path: str, names: list[str]) -> tuple[int, int, int]:
    last: list[tuple[int, int, int]] = []
    compaction.replay(path, mpkv.Store(path, readonly=True)._codec, names, last)
    return last[0]


def _view_horizon(path: str, store: mpkv.Store, names: list[str]) -> tuple[int, int, int]:
    """The horizon compaction takes from ``store``'s view if ``names`` were its inputs."""
    taken = compaction.Taken({}, ValueFiles(), [], {}, store._cursor.position)
    served = compaction.from_view(path, taken, names)
    assert served is not None
    return served[1]


def _value(fmt: str, serializer: str, i: int) -> Any:
    """Values of every size class (inline in both, between compaction's and the view's
    thresholds, out of line; a str of few characters but many bytes) and kind."""
    kinds: list[Any] = [f"s{i}", "m" * (40 + i % 80), "L" * 300 + str(i), "é" * 100 + str(i),
                        "ü" * (20 + i % 30)]
    if fmt == "binary" and serializer == "raw":
        kinds += [b"\xff" * 200 + b"%d" % i, b"\x00b%d" % i, bytes(range(256))]
    if serializer == "json":
        kinds += [{"n": i, "big": ["L" * 150] * 2}, [i, None, True], i]
    return kinds[i % len(kinds)]


def _key(i: int) -> str:
    return ["k{}", "ключ-{}", "鍵{}", "emoji-😀{}", "e\u0301{}"][i % 5].format(i)


def _fill(s: mpkv.Store, other: mpkv.Store, round_: int, model: dict[str, Any]) -> None:
    """Puts, overwrites, deletes, a transaction spanning records (several segments in
    binary, several lines in text) and writes of another store the first reads while
    catching up."""
    fmt, ser = s.format, s.serializer
    for i in range(80):
        k = _key(i + round_ * 7)
        model[k] = _value(fmt, ser, i + round_)
        s[k] = model[k]
        if i % 9 == round_ % 3:
            s.delete(_key(i // 2))
            model.pop(_key(i // 2), None)
    with s.transaction() as tx:  # about 12 KB: spans segments of LIMIT bytes in binary
        for i in range(40):
            k = _key(200 + i)
            model[k] = _value(fmt, ser, 2 + i * 3)
            tx[k] = model[k]
        del tx[_key(201)]
        del model[_key(201)]
    for i in range(15):
        k = _key(300 + i + round_)
        model[k] = _value(fmt, ser, i * 5 + round_)
        other[k] = model[k]
    other.delete(_key(3))
    model.pop(_key(3), None)


def _compacted(path: str) -> dict[str, Any]:
    """The outputs' bytes, the hints' bytes (but the inode and modification time of the
    output each is bound to, and the CRC over them) and the horizon of a store that was
    just compacted."""
    out: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".seg") and parse_name(name) and parse_name(name)[1]:  # type: ignore[index]
            with open(os.path.join(path, name), "rb") as f:
                out[name] = f.read()
    folder = os.path.join(path, AUX, hints.HINTS)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        head = list(hints.HEAD.unpack_from(data))
        head[7] = head[8] = 0  # st_ino, st_mtime_ns: of each copy's own file
        out["hint " + name] = (head, data[hints.HEAD.size:-4])
    with open(os.path.join(path, AUX, HORIZON), "rb") as f:
        out["horizon"] = f.read()
    return out


@pytest.mark.parametrize(("fmt", "serializer"), [("binary", "raw"), ("binary", "json"),
                                                 ("text", "raw")])
def test_compaction_from_the_view_writes_the_bytes_replay_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, serializer: str) -> None:
    """The same log compacted three ways: by the store that wrote it (its view built by
    writing and by catching up with another store's writes), by a fresh open (its view
    loaded from hints and read from the segments; the copied directory's shared state
    is untrusted, so it reads to the end of the files) and by replaying the segments:
    the same outputs, hints and horizon, byte for byte; the first two replay nothing."""
    d1, d2, d3 = (str(tmp_path / n) for n in ("writer", "replay", "fresh"))
    opts: dict[str, Any] = dict(format=fmt, serializer=serializer, max_segment_bytes=LIMIT,
                                fsync="never", auto_compact=False)
    model: dict[str, Any] = {}
    s = mpkv.Store(d1, **opts)
    other = mpkv.Store(d1, **opts)
    _fill(s, other, 0, model)
    s.compact()  # the next compaction has former outputs among its inputs
    _fill(s, other, 1, model)
    other.close()
    s.refresh()
    shutil.copytree(d1, d2)
    shutil.copytree(d1, d3)
    spy = ReplaySpy(monkeypatch)
    s.compact()
    assert spy.calls == 0, "the writer's view held the state, yet the inputs were replayed"
    with mpkv.Store(d3, **opts) as fresh:
        fresh.compact()
    assert spy.calls == 0, "a fresh view held the state, yet the inputs were replayed"
    with monkeypatch.context() as m, mpkv.Store(d2, **opts) as replaying:
        m.setattr(compaction, "from_view", lambda *args: None)
        replaying.compact()
    assert spy.calls == 1
    want = _compacted(d2)
    assert len([n for n in want if n.endswith(".seg")]) > 1, "outputs in one part only"
    assert _compacted(d1) == want
    assert _compacted(d3) == want
    assert dict(s.items()) == model
    s.close()
    with mpkv.Store(d1, readonly=True) as r:
        assert dict(r.items()) == model


@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_view_horizon_is_the_one_replay_computes(tmp_path: Path, fmt: str) -> None:
    """At every step of a log (empty; puts; a transaction spanning records; a delete
    last; compacted, with nothing after the outputs and with units after them; an empty
    segment sealed; another store's writes caught up with), the horizon taken from the
    writer's view and from a fresh open's is the one replay computes over the log. A
    smaller one would make a watcher resuming after the last unit fail with
    CompactedError; a larger one would let a watcher skip changes."""
    path = str(tmp_path / "s")
    opts: dict[str, Any] = dict(format=fmt, max_segment_bytes=LIMIT, fsync="never",
                                auto_compact=False)
    s = mpkv.Store(path, **opts)
    other = mpkv.Store(path, **opts)
    seen: list[tuple[int, int, int]] = []

    def check(step: str) -> None:
        s.refresh()
        names = list_log(path)
        want = _replay_horizon(path, names) if names else (1, 0, 0)
        assert _view_horizon(path, s, names) == want, f"writer's view, {step}"
        with mpkv.Store(path, readonly=True) as fresh:
            assert _view_horizon(path, fresh, names) == want, f"fresh view, {step}"
        seen.append(want)

    check("empty store")
    for i in range(30):
        s[_key(i)] = "v" * (i * 7)
    check("puts")
    with s.transaction() as tx:
        for i in range(40):
            tx[_key(100 + i)] = "T" * 300
    check("a transaction spanning records last")
    s.delete(_key(3))
    check("a delete last")
    s.compact()
    check("compacted, nothing after the outputs")
    s.compact()
    check("compacted again: an empty sealed segment after the outputs")
    s["after"] = "1"
    check("a put after the outputs")
    with s.transaction() as tx:
        for i in range(40):
            tx[_key(200 + i)] = "U" * 300
    check("a transaction spanning records after the outputs")
    s.compact()
    other["x"] = "y" * 500
    other.delete("after")
    check("another store's writes after the outputs")
    s.compact()
    check("compacted again")
    # A view that moves only on refresh() is not moved to the outputs of its own
    # compaction: it never entered them, its last unit is one of the inputs.
    lazy = mpkv.Store(path, max_staleness=None, **opts)
    lazy["last"] = "z" * 400
    lazy.compact()
    names = list_log(path)
    assert lazy._cursor.position < (parse_name(names[0])[0] + 1, 0, 0)  # type: ignore[index]
    assert _view_horizon(path, lazy, names) == _replay_horizon(path, names)
    assert len(set(seen)) >= 8, seen
    lazy.close()
    other.close()
    s.close()


def test_refresh_only_view_compacts_what_other_stores_wrote(tmp_path: Path) -> None:
    """A ``max_staleness=None`` view moves only on refresh(): compacting from it as it
    was before the seal would drop what another store wrote since. The seal catches it
    up under the writer lock first, so the outputs hold every write."""
    path = str(tmp_path / "s")
    lazy = mpkv.Store(path, max_staleness=None, max_segment_bytes=LIMIT, auto_compact=False)
    lazy["mine"] = "1"
    with mpkv.Store(path) as other:
        for i in range(50):
            other[f"o{i}"] = "x" * (i * 10)
        other.delete("mine")
    assert lazy.get("mine") == "1"  # not refreshed yet
    lazy.compact()
    lazy.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == {f"o{i}": "x" * (i * 10) for i in range(50)}


def test_view_holding_values_in_removed_segments_is_not_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another store compacted; a ``max_staleness=None`` view then caught up only under
    the writer lock (an empty transaction), where it does not move: it still holds
    values in the removed segments (its descriptors of them kept). Its compaction
    cannot read them back from the log, and replays its inputs instead."""
    path = str(tmp_path / "s")
    lazy, model = view_left_on_removed_segments(path, LIMIT, max_staleness=None)
    assert any(not os.path.exists(vf.file) for vf in lazy._values.files.values()), \
        "the view was to keep values in the removed inputs"
    spy = ReplaySpy(monkeypatch)
    lazy.compact()
    assert spy.calls == 1, "the view's values in removed segments were to be read back"
    assert dict(lazy.items()) == model
    lazy.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == model


class ReloadSpy:
    """Counts the rebuilds of any store's view while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = mpkv.Store._reload

        def reload(store: mpkv.Store, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(store, *args, **kwargs)

        monkeypatch.setattr(mpkv.Store, "_reload", reload)


@pytest.mark.parametrize("staleness", [0.0, None])
@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_view_points_into_the_outputs_and_keeps_writes_made_during_compaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
        staleness: float | None) -> None:
    """After compacting from its view, the store points the view's handles into the
    outputs instead of rebuilding the view (a full load beside the old view): no
    rebuild, no table of a removed input left, every value right. Keys this store and
    another one overwrote or deleted while the outputs were written keep their new
    values: only entries still holding the copy's very handle move. Then the next
    compaction takes its state from the view again, even one that moves only on
    refresh() (it used to keep the removed inputs open and replay)."""
    path = str(tmp_path / "s")
    opts: dict[str, Any] = dict(format=fmt, max_segment_bytes=LIMIT, fsync="never",
                                auto_compact=False)
    s = mpkv.Store(path, max_staleness=staleness, **opts)
    other = mpkv.Store(path, **opts)
    model: dict[str, Any] = {}
    for i in range(120):
        k = _key(i)
        model[k] = _value(fmt, "raw", i) if i % 3 else f"{i}-" + "é" * 90  # many bytes
        s[k] = model[k]
    real_write = compaction.write_outputs

    def write_outputs(*args: Any, **kwargs: Any) -> Any:
        for i in range(0, 120, 7):  # after the seal: into the new active segment
            model[_key(i)] = f"new {i} " + "N" * 300
            s[_key(i)] = model[_key(i)]
        other[_key(2)] = model[_key(2)] = "other's " + "O" * 300
        other.delete(_key(5))
        del model[_key(5)]
        s.delete(_key(8))
        del model[_key(8)]
        return real_write(*args, **kwargs)

    monkeypatch.setattr(compaction, "write_outputs", write_outputs)
    reloads = ReloadSpy(monkeypatch)
    s.compact()
    monkeypatch.setattr(compaction, "write_outputs", real_write)
    assert reloads.calls == 0, "the view was rebuilt"
    assert all(os.path.exists(vf.file) for vf in s._values.files.values()), \
        "the view still has tables of removed inputs"
    outputs = {os.path.join(path, n) for n in list_log(path) if parse_name(n)[1]}  # type: ignore[index]
    moved = sum(1 for v in s._view.values() if type(v) is int
                and s._values.files[v >> 32].file in outputs)
    assert moved >= 10, "the values were to be read from the outputs"
    s.refresh()
    assert dict(s.items()) == model
    spy = ReplaySpy(monkeypatch)
    s["later"] = model["later"] = "Z" * 300
    s.compact()
    assert spy.calls == 0, "the view held the state, yet the inputs were replayed"
    assert dict(s.items()) == model
    other.close()
    s.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == model


def test_readers_never_see_a_value_go_back_while_the_view_is_pointed_into_outputs(
        tmp_path: Path) -> None:
    """Reader threads read without a lock while a writer thread of the same store
    overwrites keys and the store compacts over and over: each key's version seen by a
    reader never decreases (an entry pointed into an output after the writer replaced
    it would bring an old value back) and every value is whole."""
    import threading
    path = str(tmp_path / "s")
    s = mpkv.Store(path, max_segment_bytes=64 << 10, fsync="never", auto_compact=False)
    keys = [f"k{i}" for i in range(60)]
    for k in keys:
        s[k] = f"{k}:0:" + "L" * 300
    stop = threading.Event()
    errors: list[str] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            for k in keys[n % 3::3]:
                s[k] = f"{k}:{n}:" + "L" * 300

    def read() -> None:
        seen = dict.fromkeys(keys, 0)
        while not stop.is_set():
            for k in keys:
                value = s.get(k)
                name, version, rest = value.split(":")
                if name != k or rest != "L" * 300 or int(version) < seen[k]:
                    errors.append(f"{k}: {value[:20]} after version {seen[k]}")
                seen[k] = int(version)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read)
                                                  for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            s.compact()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    s.close()


def test_view_left_on_removed_segments_under_the_writer_lock_moves_before_compacting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another store compacted; this one then caught up only under the writer lock (an
    empty transaction), where it does not rebuild its view: it still holds values in
    the removed segments. Its compaction moves the view to the new files first, then
    takes the state from it: no replay, and every value is kept."""
    path = str(tmp_path / "s")
    s, model = view_left_on_removed_segments(path, LIMIT)
    assert s._let_go, "the view was to hold values in removed segments"
    spy = ReplaySpy(monkeypatch)
    s.compact()
    assert spy.calls == 0
    assert dict(s.items()) == model
    s.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == model


def test_one_key_view_cannot_compact(tmp_path: Path) -> None:
    """A KeyReader's view holds one key exactly and others partly: compacting from it
    would lose data. It is readonly, so compact() refuses before anything is sealed."""
    path = str(tmp_path / "s")
    with mpkv.Store(path, max_segment_bytes=LIMIT) as s:
        s.update({f"k{i}": "v" * 50 for i in range(200)})
        s.compact()
        s["k1"] = "new"
    names = sorted(os.listdir(path))
    reader = mpkv.store.KeyReader(path, "k1")
    assert reader.get("k1") == "new"
    with pytest.raises(mpkv.ReadOnlyError):
        reader.compact()
    reader.close()
    assert sorted(os.listdir(path)) == names


def test_view_holding_values_in_a_segment_repair_rewrote_still_compacts(
        tmp_path: Path) -> None:
    """Another process repaired the store while this one had it open: it rewrote a
    sealed segment under the same name (a new file, without the damaged record; the
    live values after it moved). This store's view still holds values at their places
    in the file that was replaced: it cannot give the state, so compaction replays the
    inputs, and every live value is kept, in this store's view and in the log."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, max_segment_bytes=LIMIT, auto_compact=False)
    s["dead"] = "D" * 300
    model = {f"k{i}": f"{i}-" + "L" * 300 for i in range(20)}
    for k, v in model.items():  # one record each: the view leaves the values in the file
        s[k] = v
    s["dead"] = model["dead"] = "gone"
    assert dict(s.items()) == model  # every value read: the view maps the segments
    first = os.path.join(path, list_log(path)[0])
    with open(first, "rb") as f:
        at = f.read().find(b"D" * 300)
    assert at >= 0
    flip_byte(first, at + 150)  # damage in a dead record, before live values of the file
    code = "import mpkv, sys\nassert mpkv.repair(sys.argv[1]).damage\n"
    subprocess.run([sys.executable, "-c", code, path], check=True)
    s.compact()
    assert dict(s.items()) == model
    assert {k: s.get(k) for k in model} == model
    s.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == model
    assert mpkv.verify(path).ok


def test_record_repair_dropped_does_not_come_back_through_compaction_from_an_older_view(
        tmp_path: Path) -> None:
    """Another process repaired the store while this one had it open, dropping a
    damaged record from a sealed segment this store's view had read (and holds no
    value of in the file: small values only). The view is older than the repaired
    log; compacting from it would put the dropped key back for every process. The
    compaction replays the inputs instead: the log keeps what repair left."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, max_segment_bytes=LIMIT, auto_compact=False)
    for i in range(100):
        s[f"k{i}"] = f"v{i}-" + "s" * 40
    s["target"] = "TARGET" * 5
    for i in range(100, 200):
        s[f"k{i}"] = f"v{i}-" + "s" * 40
    found = None
    for name in list_log(path):
        with open(os.path.join(path, name), "rb") as f:
            at = f.read().find(b"TARGET" * 5)
        if at >= 0:
            found = (os.path.join(path, name), at)
    assert found is not None and found[0] != os.path.join(path, list_log(path)[-1])
    flip_byte(found[0], found[1] + 3)
    code = "import mpkv, sys\nassert mpkv.repair(sys.argv[1]).damage\n"
    subprocess.run([sys.executable, "-c", code, path], check=True)
    with mpkv.Store(path, readonly=True) as r:
        repaired = dict(r.items())
    assert "target" not in repaired
    s.compact()
    s.close()
    with mpkv.Store(path, readonly=True) as r:
        assert dict(r.items()) == repaired


def test_compaction_that_cannot_switch_leaves_no_outputs_nor_hints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outputs are written, then the writer lock is not had within ``lock_timeout``
    (another thread's transaction holds it): compaction raises LockTimeout and removes
    what it wrote (temporary outputs, their hints), as for any other error; the
    directory is as the seal left it."""
    path = str(tmp_path / "s")
    s = mpkv.Store(path, max_segment_bytes=LIMIT, auto_compact=False, lock_timeout=0.2)
    for i in range(200):
        s[f"k{i % 50}"] = f"{i}-" + "L" * (i % 300)
    holder = mpkv.Store(path, auto_compact=False)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.transaction():
            held.set()
            done.wait()

    real = compaction.write_outputs

    def write_outputs(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        thread.start()
        held.wait()
        return out

    thread = threading.Thread(target=hold)
    monkeypatch.setattr(compaction, "write_outputs", write_outputs)
    try:
        with pytest.raises(mpkv.LockTimeout):
            s.compact()
    finally:
        done.set()
        if held.is_set():
            thread.join()
    aux = os.path.join(path, AUX)
    assert not [n for n in os.listdir(aux) if n.endswith(".tmp")]
    assert os.listdir(os.path.join(aux, hints.HINTS)) == []
    holder.close()
    s.close()
