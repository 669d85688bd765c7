"""Durability of one store handle: the fsync modes, group commit and the periodic syncer.

``always``: a write returns after an ``fdatasync`` of its segment, done outside the
writer lock so that the writers of every process overlap their syncs (group commit: one
sync covers every record appended before it, by any process). ``periodic``: a daemon
thread syncs every ``fsync_interval`` seconds, and ``close`` syncs. ``never``: the OS
decides. A sealed segment is always fsynced by whoever seals it (``rotate``).

This module knows nothing of the view or the locks between processes: the log writer
(writer.py) counts what it appends here, and the store calls ``after_write``.
"""

from __future__ import annotations

import os
import threading

from .segments import Cursor


class Durability:
    """Bookkeeping of what this process appended and what is known to be on disk."""

    def __init__(self, path: str, mode: str, interval: float) -> None:
        self.path = path
        self.mode = mode  # one of common.FSYNC_MODES; fixed
        self.interval = interval  # seconds between periodic syncs; fixed
        #: Guards ``synced``, ``_sync_fd`` and ``_sync_number``, and orders a rotation's
        #: fsync with the syncs of other threads.
        self.mutex = threading.Lock()
        #: Records this process appended. Incremented by the writing thread, which holds
        #: the write mutex and the tail mutex; read without a lock (a snapshot of an int)
        #: by the syncer and by ``after_write``.
        self.appended = 0
        self.synced = 0  # how many of them are known to be on disk; guarded by ``mutex``
        #: A descriptor of the segment being written, for syncs outside the writer lock
        #: (the cursor's own may be closed by a reader moving on meanwhile); -1: none.
        #: Guarded by ``mutex``; moved to a new segment by the writer (``follow``).
        self._sync_fd = -1
        self._sync_number = -1  # the segment _sync_fd is open on; guarded by ``mutex``
        self._stop = threading.Event()  # set by ``close``: the syncer ends
        #: The periodic syncer, started by the first write; set by the writing thread
        #: (write mutex held), read by ``close``.
        self.syncer: threading.Thread | None = None

    def follow(self, cursor: Cursor) -> None:
        """Point the fsync descriptor at the segment about to be written: after another
        process rotated, that is a segment this process never created. (The segment
        left behind was fsynced by whoever sealed it: fsync covers the whole file.)"""
        if self._sync_number != cursor.number and cursor.fd >= 0:
            with self.mutex:
                if self._sync_fd >= 0:
                    os.close(self._sync_fd)
                self._sync_fd = os.dup(cursor.fd)
                self._sync_number = cursor.number

    def seal(self, cursor: Cursor) -> None:
        """Move the cursor to a new segment; its rotate fsyncs the sealed one, which holds
        everything appended so far."""
        with self.mutex:
            cursor.rotate()
            self.synced = self.appended

    def sync_now(self, fd: int) -> None:
        """Sync ``fd`` at once (a text commit's records, before its intent file goes)."""
        with self.mutex:
            os.fdatasync(fd)

    def sync(self, upto: int) -> None:
        """Make at least ``upto`` appended records durable: one fdatasync covers every
        record appended before it, so a thread that finds it done by another returns."""
        with self.mutex:
            if self.synced >= upto or self._sync_fd < 0:
                return
            target = self.appended
            os.fdatasync(self._sync_fd)
            self.synced = target

    def after_write(self) -> None:
        """Per the mode, after a write, outside the writer lock (group commit)."""
        if self.mode == "always":
            self.sync(self.appended)
        elif self.mode == "periodic" and self.syncer is None:
            self.syncer = threading.Thread(target=self._sync_periodically, daemon=True,
                                           name=f"mpkv-fsync {self.path}")
            self.syncer.start()

    def _sync_periodically(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync(self.appended)

    def stop(self) -> None:
        """Stop the syncer and make what was appended durable (unless ``never``)."""
        self._stop.set()
        if self.syncer is not None:
            self.syncer.join()
        if self.mode != "never":
            self.sync(self.appended)

    def close(self) -> None:
        """Release the descriptor (in a forked child too: it is this process's copy)."""
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
            self._sync_fd = -1
