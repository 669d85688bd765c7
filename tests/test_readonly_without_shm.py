"""A readonly store whose shared state file is missing still sees other writers."""

import os

import mpkv


def test_readonly_without_shared_state_reads_new_writes(tmp_path):
    path = str(tmp_path / "s")
    with mpkv.Store(path) as s:
        s["a"] = "1"
    os.unlink(os.path.join(path, ".mpkv", "shm"))
    with mpkv.Store(path, readonly=True) as reader:
        assert reader["a"] == "1"
        with mpkv.Store(path) as writer:  # recreates a shared state the reader never mapped
            writer["b"] = "2"
            assert reader.get("b") == "2"
            writer["a"] = "3"
            assert dict(reader) == {"a": "3", "b": "2"}
