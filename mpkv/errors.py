"""The exceptions mpkv raises: one small hierarchy under :class:`Error`."""

from __future__ import annotations


class Error(Exception):
    """Base class of every error raised by mpkv itself."""


class FormatError(Error):
    """The path is not an mpkv store (or not a snapshot file) this version can read."""


class CorruptionError(Error):
    """A damaged record that is not a torn tail; the message names the file and offset."""

    def __init__(self, message: str, path: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class ClosedError(Error):
    """The store was used after ``close()``."""


class LockTimeout(Error):
    """The writer lock was not acquired within ``lock_timeout`` seconds (or never could
    be: this thread holds it through another Store object's open transaction)."""


class ReadOnlyError(Error):
    """A write was attempted on a store opened with ``readonly=True``."""


class CompactedError(Error):
    """Compaction removed changes a watcher needed: a ``watch(since=...)`` position
    older than the log's start, or a gap an unregistered watcher could not prevent.
    Reread the state and watch from a fresh ``store.position()``."""
