"""The worked examples of the original problem (shared/000_cdd06dd7b690ec95.txt),
run through ``mpkv.scenarios`` on the real Store, with the exact expected outputs."""

from __future__ import annotations

import pytest

from mpkv.scenarios import multi_file_restart, single_file_restart

# --- Part 1: serialize -> fresh store -> deserialize -------------------------------

PART1 = [
    pytest.param(
        [("put", "a", "1"), ("put", "b", "2"), ("get", "a")],
        [("get", "b"), ("delete", "a"), ("get", "a")],
        (["1", "2", None], [("b", "2")]),
        id="p1-ex1-survive-restart-then-delete",
    ),
    pytest.param(
        [("put", "", "x"), ("put", "k", "old"), ("put", "k", "new")],
        [("get", ""), ("get", "k")],
        (["x", "new"], [("", "x"), ("k", "new")]),
        id="p1-ex2-empty-key-and-overwrite",
    ),
    pytest.param(
        [],
        [("get", "missing"), ("delete", "missing")],
        ([None], []),
        id="p1-ex3-nothing-stored",
    ),
    pytest.param(
        [("put", "x", "1"), ("delete", "x")],
        [("get", "x")],
        ([None], []),
        id="p1-ex4-deleted-key-does-not-reappear",
    ),
]


@pytest.mark.parametrize("before, after, expected", PART1)
def test_part1_examples(before, after, expected):
    assert single_file_restart(before, after) == expected


# --- Part 2: text log, size-limited segments, close and reopen ---------------------

PART2 = [
    pytest.param(
        10,
        [("put", "a", "1"), ("put", "bb", "2"), ("get", "a")],
        [("get", "bb"), ("delete", "a"), ("get", "a"), ("put", "c", "3")],
        (["1", "2", None], ["P|a|1\n", "P|bb|2\n", "D|a\nP|c|3\n"], [("bb", "2"), ("c", "3")]),
        id="p2-ex1-second-put-starts-new-file",
    ),
    pytest.param(
        8,
        [("put", "aa", "b"), ("put", "x", "y")],
        [("get", "aa"), ("put", "aa", "c"), ("get", "aa")],
        (["b", "c"], ["P|aa|b\n", "P|x|y\n", "P|aa|c\n"], [("aa", "c"), ("x", "y")]),
        id="p2-ex2-overwrite-after-restart",
    ),
    pytest.param(
        10,
        [("put", "a", "1"), ("delete", "a")],
        [("get", "a")],
        ([None], ["P|a|1\nD|a\n"], []),
        id="p2-ex3-delete-fits-exactly",
    ),
    pytest.param(
        12,
        [("put", "a", "1")],
        [("put", "b", "2"), ("get", "a"), ("get", "b")],
        (["1", "2"], ["P|a|1\nP|b|2\n"], [("a", "1"), ("b", "2")]),
        id="p2-ex4-reuse-last-file-after-restart",
    ),
    pytest.param(
        5,
        [],
        [("get", "z")],
        ([None], [], []),
        id="p2-ex5-no-records-at-all",
    ),
]


@pytest.mark.parametrize("max_size, before, after, expected", PART2)
def test_part2_examples(max_size, before, after, expected):
    assert multi_file_restart(max_size, before, after) == expected


# --- a few more cases the problem statement implies --------------------------------


def test_scenario_calls_are_independent():
    """Each call starts from an empty store: no files leak from one call to the next."""
    first = multi_file_restart(10, [("put", "a", "1"), ("put", "bb", "2")], [])
    assert first == ([], ["P|a|1\n", "P|bb|2\n"], [("a", "1"), ("bb", "2")])
    assert multi_file_restart(5, [], [("get", "a")]) == ([None], [], [])
    assert single_file_restart([("put", "a", "1")], []) == ([], [("a", "1")])
    assert single_file_restart([], [("get", "a")]) == ([None], [])


def test_part2_size_is_counted_in_characters():
    # 'P|é|1\n' is 6 characters (7 UTF-8 bytes): it fits a 6-character file exactly,
    # and the next record of the same size needs a new file.
    assert multi_file_restart(6, [("put", "é", "1")], [("put", "ü", "2"), ("get", "é")]) == (
        ["1"],
        ["P|é|1\n", "P|ü|2\n"],
        [("é", "1"), ("ü", "2")],
    )


def test_part2_delete_of_missing_key_is_logged():
    assert multi_file_restart(10, [("delete", "x")], [("get", "x"), ("delete", "y")]) == (
        [None],
        ["D|x\nD|y\n"],
        [],
    )


def test_part2_record_equal_to_limit_fits_empty_file():
    assert multi_file_restart(6, [("put", "a", "1"), ("put", "b", "2")], [("put", "c", "3")]) == (
        [],
        ["P|a|1\n", "P|b|2\n", "P|c|3\n"],
        [("a", "1"), ("b", "2"), ("c", "3")],
    )


def test_part2_empty_strings():
    assert multi_file_restart(
        8, [("put", "", ""), ("put", "k", "")], [("get", ""), ("get", "k"), ("delete", "")]
    ) == (["", ""], ["P||\n", "P|k|\nD|\n"], [("k", "")])


def test_part1_any_strings_survive():
    odd = ["", "|", "\n", "a|b\nc", "é", "\u2028", "\r\n", "\x00", "🙂" * 3, "x" * 100]
    before = [("put", k, v) for k, v in zip(odd, reversed(odd), strict=True)]
    after = [("get", k) for k in odd] + [("delete", "|"), ("get", "|"), ("get", "nope")]
    gets, items = single_file_restart(before, after)
    assert gets == [*reversed(odd), None, None]
    expected = dict(zip(odd, reversed(odd), strict=True))
    del expected["|"]
    assert items == sorted(expected.items())


def test_part1_many_operations_match_a_dict():
    import random

    rnd = random.Random(1234)
    keys = [f"k{i}" for i in range(60)]
    model: dict[str, str] = {}
    gets: list = []

    def gen(n):
        out = []
        for _ in range(n):
            r = rnd.random()
            k = rnd.choice(keys)
            if r < 0.5:
                v = str(rnd.random())
                out.append(("put", k, v))
                model[k] = v
            elif r < 0.75:
                out.append(("delete", k))
                model.pop(k, None)
            else:
                out.append(("get", k))
                gets.append(model.get(k))
        return out

    before, after = gen(1500), gen(1500)
    assert single_file_restart(before, after) == (gets, sorted(model.items()))
