"""Property tests: random operation sequences against a dict model, with the exact
segment layout predicted by the rotation rule of CONTRACT.md."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import dir_state
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mpkv
from mpkv.scenarios import multi_file_restart, single_file_restart

# Each example opens real stores (~0.1 s a sequence), so shrinking a failure would take
# minutes: the store-backed tests skip the shrink phase and report the failing sequence
# as generated (drop ``phases`` locally to get a minimal one).
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def segs(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".seg"))


def seg_bytes(path) -> list[bytes]:
    return [Path(path, f).read_bytes() for f in segs(path)]




# --- strategies ---------------------------------------------------------------------

UTF8 = st.characters(codec="utf-8")  # any code point but surrogates
TEXT_KEY_CHARS = st.characters(codec="utf-8", exclude_characters="|\n")
TEXT_VALUE_CHARS = st.characters(codec="utf-8", exclude_characters="\n")

text_keys = st.one_of(st.sampled_from(["", "a", "b", "é", "k\r"]),
                      st.text(TEXT_KEY_CHARS, max_size=6))
text_values = st.one_of(st.sampled_from(["", "1", "|", "a|b", "\r", "\u2028"]),
                        st.text(TEXT_VALUE_CHARS, max_size=14))
binary_keys = st.one_of(st.sampled_from(["", "a", "b", "|", "\n", "é"]), st.text(UTF8, max_size=6))
binary_values = st.one_of(st.text(UTF8, max_size=14), st.binary(max_size=14))


def ops_strategy(keys, values):
    op = st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("reopen"), st.booleans()),
    )
    return st.lists(op, max_size=40)


# --- the model of the files ---------------------------------------------------------


def record(fmt, key, value):
    """(record units, record as the file holds it) for one put (value None: delete)."""
    if fmt == "text":
        line = f"D|{key}\n" if value is None else f"P|{key}|{value}\n"
        return len(line), line.encode()
    v = b"" if value is None else (value if isinstance(value, bytes) else value.encode())
    return 16 + 9 + len(key.encode()) + len(v), None  # record and entry headers


class FileModel:
    """Segments as the rotation rule predicts them: units used, and text contents."""

    def __init__(self, fmt, limit):
        self.fmt, self.limit = fmt, limit
        self.units: list[int] = []
        self.texts: list[bytes] = []

    def fits(self, units):
        return units <= self.limit

    def append(self, units, raw):
        if not self.units or self.units[-1] + units > self.limit:
            self.units.append(0)
            self.texts.append(b"")
        self.units[-1] += units
        if raw is not None:
            self.texts[-1] += raw

    def check(self, path):
        data = seg_bytes(path)
        if self.fmt == "text":
            assert data == self.texts
        else:
            assert [len(b) for b in data] == self.units


def run_sequence(base, fmt, limit, ops):
    d = tempfile.mkdtemp(dir=base)
    s = mpkv.Store(d, format=fmt, max_segment_bytes=limit)
    model: dict = {}
    files = FileModel(fmt, limit)
    try:
        for op in ops:
            kind = op[0]
            if kind == "put" or kind == "delete":
                key = op[1]
                value = op[2] if kind == "put" else None
                units, raw = record(fmt, key, value)
                if not files.fits(units):
                    before = dir_state(d, dirs=False)
                    with pytest.raises(ValueError):
                        if kind == "put":
                            s.put(key, value)
                        else:
                            s.delete(key)
                    assert dir_state(d, dirs=False) == before
                    continue
                if kind == "put":
                    s.put(key, value)
                    model[key] = value
                else:
                    assert s.delete(key) is (key in model)
                    model.pop(key, None)
                files.append(units, raw)
            elif kind == "get":
                got = s.get(op[1])
                assert got == model.get(op[1])
                if op[1] in model:
                    assert type(got) is type(model[op[1]])
                assert (op[1] in s) is (op[1] in model)
            else:
                s.close()
                s = mpkv.Store(d, format=fmt, max_segment_bytes=limit) if op[1] else mpkv.Store(d)
                files.check(d)
        assert dict(s.items()) == model
        assert len(s) == len(model)
        assert sorted(s) == sorted(model)
        files.check(d)
        s.close()
        s = mpkv.Store(d)
        assert dict(s.items()) == model
        for k, v in model.items():
            assert type(s[k]) is type(v)
        files.check(d)
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("props"))


@SETTINGS
@given(limit=st.integers(3, 200), ops=ops_strategy(text_keys, text_values))
def test_text_store_matches_dict_model(base, limit, ops):
    run_sequence(base, "text", limit, ops)


@SETTINGS
@given(limit=st.integers(18, 200), ops=ops_strategy(binary_keys, binary_values))
def test_binary_store_matches_dict_model(base, limit, ops):
    run_sequence(base, "binary", limit, ops)


def run_with_snapshots(base, fmt, limit, ops):
    """put/delete/reopen mixed with serialize, deserialize and compact: state only."""
    d = tempfile.mkdtemp(dir=base)
    snap = os.path.join(d + ".snapshots", "snap")
    os.makedirs(os.path.dirname(snap))
    s = mpkv.Store(d, format=fmt, max_segment_bytes=limit)
    model: dict = {}
    saved = None
    try:
        for op in ops:
            kind = op[0]
            if kind == "put":
                if record(fmt, op[1], op[2])[0] > limit:
                    with pytest.raises(ValueError):
                        s.put(op[1], op[2])
                else:
                    s.put(op[1], op[2])
                    model[op[1]] = op[2]
            elif kind == "delete":
                if record(fmt, op[1], None)[0] > limit:
                    with pytest.raises(ValueError):
                        s.delete(op[1])
                else:
                    assert s.delete(op[1]) is (op[1] in model)
                    model.pop(op[1], None)
            elif kind == "snap":
                s.serialize(snap)
                saved = dict(model)
            elif kind == "restore":
                if saved is not None:
                    s.deserialize(snap)
                    model = dict(saved)
            elif kind == "compact":
                s.compact()
            else:
                s.close()
                s = mpkv.Store(d)
            assert dict(s.items()) == model
        s.close()
        s = mpkv.Store(d)
        assert dict(s.items()) == model
        for k, v in model.items():
            assert type(s[k]) is type(v)
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d + ".snapshots", ignore_errors=True)


def snapshot_ops(keys, values):
    op = st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("snap")),
        st.tuples(st.just("restore")),
        st.tuples(st.just("compact")),
        st.tuples(st.just("reopen")),
    )
    return st.lists(op, max_size=30)


@settings(max_examples=30, deadline=None, database=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["text", "binary"]), limit=st.integers(18, 120), data=st.data())
def test_snapshots_and_compaction_match_dict_model(base, fmt, limit, data):
    if fmt == "text":
        ops = data.draw(snapshot_ops(text_keys, text_values))
    else:
        ops = data.draw(snapshot_ops(binary_keys, binary_values))
    run_with_snapshots(base, fmt, limit, ops)


# --- the scenario functions against the same model ----------------------------------

scenario_keys = st.one_of(st.sampled_from(["", "a", "b", "cc"]),
                          st.text(TEXT_KEY_CHARS, max_size=4))
scenario_values = st.text(TEXT_KEY_CHARS, max_size=6)  # Part 2: no '|' or newline in either
scenario_op = st.one_of(
    st.tuples(st.just("put"), scenario_keys, scenario_values),
    st.tuples(st.just("get"), scenario_keys),
    st.tuples(st.just("delete"), scenario_keys),
)


def model_run(ops_lists):
    state: dict = {}
    gets = []
    for ops in ops_lists:
        for op in ops:
            if op[0] == "put":
                state[op[1]] = op[2]
            elif op[0] == "delete":
                state.pop(op[1], None)
            else:
                gets.append(state.get(op[1]))
    return gets, sorted(state.items())


@settings(max_examples=40, deadline=None, database=None)
@given(
    before=st.lists(scenario_op, max_size=20),
    after=st.lists(scenario_op, max_size=20),
    extra=st.integers(0, 30),
)
def test_multi_file_restart_matches_model(before, after, extra):
    lines = [
        f"P|{op[1]}|{op[2]}\n" if op[0] == "put" else f"D|{op[1]}\n"
        for op in before + after
        if op[0] != "get"
    ]
    limit = max([len(x) for x in lines] + [1]) + extra  # every record fits
    files: list[str] = []
    for line in lines:
        if not files or len(files[-1]) + len(line) > limit:
            files.append("")
        files[-1] += line
    gets, items = model_run([before, after])
    assert multi_file_restart(limit, before, after) == (gets, files, items)


any_strings = st.text(UTF8, max_size=8)
part1_op = st.one_of(
    st.tuples(st.just("put"), st.one_of(st.sampled_from(["", "a", "|", "\n"]), any_strings),
              any_strings),
    st.tuples(st.just("get"), st.one_of(st.sampled_from(["", "a", "|", "\n"]), any_strings)),
    st.tuples(st.just("delete"), st.one_of(st.sampled_from(["", "a", "|", "\n"]), any_strings)),
)


@settings(max_examples=40, deadline=None, database=None)
@given(before=st.lists(part1_op, max_size=25), after=st.lists(part1_op, max_size=25))
def test_single_file_restart_matches_model(before, after):
    assert single_file_restart(before, after) == model_run([before, after])
