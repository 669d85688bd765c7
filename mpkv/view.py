"""The view: what a process knows of the log, and how it keeps up with it.

Every process replays the segments into a dict (the view) and keeps a cursor at the end
of what it applied. Small values are held in the view; larger ones stay in their
segment files and the view holds a handle to them (keydir.py). A read compares one
shared counter with the one it last saw and tails the log only when they differ.

``LogView`` is the part of a store that holds the view: the tail mutex, the seqlock
version, the cursor, catching up with the log (to the published commit point, or to
the end of the files when the shared state is untrusted), rebuilding the view from
scratch after a compaction (or pointing its handles into the outputs of its own
compaction), and reading values without a lock. The store (store.py)
adds the writes and the public API on top; watchers (watch.py) use the same limits.
docs/protocol.md has the protocol.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

from . import hints
from .codec import BYTES_VALUE, STR_VALUE, Batch, Codec, Value, apply
from .common import fork_epoch
from .compaction import Placed, State
from .errors import Error
from .files import open_regular
from .keydir import Moved, ValueFiles
from .locks import DirLock
from .mapping import MISSING
from .segments import (
    Cursor,
    Limit,
    Meta,
    NeedReload,
    list_log,
    parse_name,
    read_intent,
    segment_name,
)
from .shm import SharedState

T = TypeVar("T")
#: Hint kinds of an item whose value is in the output (``compaction.Placed``).
_IN_OUTPUT = frozenset([hints.FILE_STR, hints.FILE_BYTES])


def _entry(value: Value | int, values: ValueFiles) -> tuple[int, int, int] | None:
    """``(length, crc, kind)`` of a value of the view, inline or in its file."""
    if type(value) is int:
        return values.entry(value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        return len(data), zlib.crc32(data), STR_VALUE
    assert isinstance(value, bytes)
    return len(value), zlib.crc32(value), BYTES_VALUE


class Look(NamedTuple):
    """Where a read of the log stops, decided from one look at the shared state."""

    seq: int  # the shared counter it was decided at
    limit: Limit | None  # the end to read to (None: the end of the files)
    #: None when ``limit`` is a published commit point (or the reader holds the writer
    #: lock); else the shared state's ``look()`` before reading, to check again after:
    #: a read to the end of the files is valid only if no writer published meanwhile.
    check: tuple[bool, int, bool] | None


class LogView:
    """The view of the log a store reads from (see the module's docstring). The fields
    it uses from its store are set by the store before ``_open_view``."""

    path: str
    meta: Meta
    format: str
    readonly: bool
    max_staleness: float | None
    _codec: Codec
    _shm: SharedState
    _dirlock: DirLock
    _epoch: int  # fork_epoch when the files were opened (-1: closed)
    #: A key this view is for alone (``KeyReader``), or None: the whole state.
    _only_key: str | None = None

    def _check(self) -> None:
        raise NotImplementedError  # the store's: closed, or first use after a fork

    def _open_view(self) -> None:
        """The fields of the view, empty: at open, and in a forked child."""
        #: Guards the cursor, the view and everything that moves with them (noted below).
        self._tail_mutex = threading.Lock()
        #: The seqlock of the view: odd while a batch is being applied. Written under the
        #: tail mutex; read without a lock by readers, which retry under the mutex.
        self._version = 0
        #: key -> encoded value, or the int handle of a value left in its segment file
        #: (keydir.py). Changed in place under the tail mutex (``_apply``, with the
        #: version odd) or replaced whole by ``_reload``; read without a lock (seqlock).
        self._view: dict[str, Value | int] = {}
        #: Where the view's handles point. Grown by the cursor under the tail mutex and
        #: replaced with the view by ``_reload`` (first, so that a reader holding a
        #: handle of the old view finds it unknown and looks again); read without a lock.
        self._values = ValueFiles(keep=self.max_staleness is None)
        #: The end of what the view holds: read and moved under the tail mutex (by
        #: writes too: the writer appends at it), replaced whole by ``_reload``.
        self._cursor = self._new_cursor(self._values)
        #: The shared counter the view is caught up with. Written under the tail mutex;
        #: read without a lock by the hot paths (a stale value only sends them to the
        #: slow path).
        self._seen_seq = -1
        self._last_refresh = 0.0  # monotonic time of the last catch-up; as _seen_seq
        #: Files the view holds values in were removed by a compaction: rebuild the view
        #: at the next catch-up that does not hold the writer lock (a rebuild there would
        #: hold every writer back), or after the write. Tail mutex.
        self._let_go = False
        #: Set while this store catches up under the writer lock; tail mutex.
        self._under_writer_lock = False

    # --- tailing -------------------------------------------------------------------

    def _reader_limit(self) -> Look:
        """Where a reader stops: the published commit point, or, when the shared state
        is untrusted, the end of the files short of an unfinished text commit."""
        snap = self._shm.snapshot()
        if snap is None:
            return self._untrusted_limit()
        seq, seg, end = snap
        return Look(seq, (seg, end), None)

    def _untrusted_limit(self) -> Look:
        """The untrusted shared state says nothing of the log's end: read to the end of
        the files, and check afterwards that no writer published meanwhile. A writer
        that finds the state untrusted publishes before it writes a record, so records
        read that way were complete before any writer of this boot started: every
        process keeps them (docs/protocol.md)."""
        if self._shm.remap():
            self._remapped()
            snap = self._shm.snapshot()
            if snap is not None:
                return Look(snap[0], (snap[1], snap[2]), None)
        check = self._shm.look()
        limit = read_intent(self.path) if self.format == "text" else None
        return Look(check[1], limit, check)

    def _remapped(self) -> None:
        """The shared state file appeared and is mapped now: reads watch its counter."""
        self._q = self._shm.slots
        self._lazy = self.max_staleness != 0

    def _changed(self, check: tuple[bool, int, bool]) -> bool:
        if self._shm.remap():
            self._remapped()
            return True
        return self._shm.look() != check

    def _open_limit(self) -> Look:
        """Where opening stops reading: the published commit point, or the end of the
        files when they hold more and no writer is at work (the directory was edited),
        so that such records are seen and checked too. The end is the size measured
        between two looks at the shared state showing no writer: bytes of a writer
        starting later are beyond it."""
        look = self._reader_limit()
        if look.check is not None or self._shm.inflight:
            return look
        seq, limit = look.seq, look.limit
        assert limit is not None
        with self._dirlock.shared():  # never a compaction's switch halfway (a gap)
            names = list_log(self.path)
        if not names:
            return look
        number = parse_name(names[-1])[0]  # type: ignore[index]
        try:
            size = os.path.getsize(os.path.join(self.path, names[-1]))
        except FileNotFoundError:  # compacted away meanwhile: a writer is at work
            return look
        if self._shm.inflight or self._shm.seq != seq or (number, size) <= limit:
            return look
        return Look(seq, (number, size), None)

    def _catch_up(self, look: Look) -> tuple[int, int | None]:
        """Apply what the log holds past the cursor, up to the look's limit. Tail mutex
        held. Returns (records applied, offset of a torn tail or None)."""
        reload = False  # the cursor is lost: rebuild the view from scratch
        for _ in range(1000):
            if not reload:
                mark = self._cursor.mark()
                try:
                    batches, torn = self._cursor.read(look.limit)
                except NeedReload:
                    reload = True
                else:
                    if look.check is None or not self._changed(look.check):
                        if self._let_go or self._files_removed():
                            if not self._under_writer_lock:
                                reload = True  # let go of them: rebuild from the new files
                                continue
                            self._let_go = True  # not while other writers wait: later
                        if batches:
                            self._apply(batches)
                        self._seen_seq = look.seq
                        self._last_refresh = time.monotonic()
                        return len(batches), torn
                    try:  # a writer published while we read: what we read may not count
                        self._cursor.restore(mark)
                    except NeedReload:
                        reload = True
                    look = self._reader_limit()
                    continue
            count = self._reload(look)
            if count is not None:
                return count, None
            look = self._reader_limit()
        raise Error(f"{self.path}: the shared state kept changing while reading the log")

    def _files_removed(self) -> bool:
        """Did the read just made list the log and find files the view holds values in
        gone (a compaction removed them)? Maps and kept descriptors would hold their
        space for ever: the view is rebuilt instead. Tail mutex held."""
        listing = self._cursor.listing
        if listing is None:
            return False  # still in one segment: no compaction switch was passed
        names = {os.path.join(folder, name) for name, folder in listing}
        return any(vf.file not in names for vf in list(self._values.files.values()))

    def _holds_values_in(self, names: list[str]) -> bool:
        """Does the view hold values in any of these segments of the log? Tail mutex held."""
        files = {os.path.join(self.path, name) for name in names}
        return any(vf.file in files for vf in list(self._values.files.values()))

    def _leave_inputs(self, inputs: list[str], number: int,
                      moving: tuple[State, list[Placed]] | None) -> None:
        """After this store's compaction ``number`` switched ``inputs`` out: let go of
        them (maps, kept descriptors). The view's handles are pointed into the outputs
        when the view gave the state (``moving``: its copy, and where each output put
        the values); else the view is rebuilt, unless only refresh() may move it. Other
        writers are not held meanwhile."""
        if moving is not None:
            copy, placed = moving
            names = [segment_name(number, k) for k in range(1, len(placed) + 1)]
            try:
                with self._tail_mutex:
                    if self._repoint(copy.view, copy.files, inputs,
                                     list(zip(names, placed, strict=True))):
                        return
            except OSError:  # an output could not be opened: rebuild instead
                pass
        if self.max_staleness is not None:
            with self._tail_mutex:
                if self._holds_values_in(inputs):
                    self._rebuild()

    def _repoint(self, state: dict[str, Value | int], values: ValueFiles, inputs: list[str],
                 outputs: list[tuple[str, Placed]]) -> bool:
        """After a compaction this store made from its view (``state``, the copy taken at
        the seal, with handles into ``values``): point the handles still in the view
        into the outputs, which hold the same values, instead of the removed inputs,
        and forget the inputs. Tail mutex held. True when the view holds no value in
        the inputs any more (else the caller rebuilds it, as without this).

        Only a key whose entry is still the very handle object of the copy moves: any
        other entry changed since the seal, and points past the inputs. Items come in
        the copy's order, which is the outputs' (``compaction.write_outputs``); a
        value in an output is one the copy held as a handle or inline (a str of few
        characters but many bytes), never the reverse (both use ``INLINE_MAX``)."""
        if self._values is not values:
            return not self._holds_values_in(inputs)  # rebuilt meanwhile: not its handles
        files = {os.path.join(self.path, name) for name in inputs}
        if any(vf.file in files for vf in list(values.files.values())):
            view = self._view
            items = iter(state.items())
            self._version += 1
            try:
                for name, placed in outputs:
                    handles = self._output_handles(name, placed, values)
                    # ``items`` runs on over the outputs: zip takes from it only
                    # while this output has kinds left.
                    for kind, (key, old) in zip(placed.kinds, items, strict=False):
                        if kind in _IN_OUTPUT:
                            new = next(handles)
                            if old.__class__ is int and view.get(key) is old:
                                view[key] = new
                        elif old.__class__ is int:
                            return False  # a handle the output holds inline: rebuild
                assert next(items, None) is None, "the outputs hold every item of the copy"
            finally:
                self._version += 1
        values.forget(files)
        return True

    def _output_handles(self, name: str, placed: Placed, values: ValueFiles) -> Iterator[int]:
        """Handles, in ``values``, of the values compaction output ``name`` holds."""
        if not placed.offsets:
            return iter(())
        file = os.path.join(self.path, name)
        fd = open_regular(file, os.O_RDONLY)
        try:
            vf = values.new_file(file, fd)
            handles = vf.extend(placed.offsets, placed.lengths, placed.crcs,
                                placed.file_kinds())
        finally:
            os.close(fd)
        vf.source = -1  # closed: entries are complete
        return iter(handles)

    def _reload(self, look: Look, count: bool = True) -> int | None:
        """Rebuild the view from scratch: files the cursor needed were compacted away.
        Only the view: watchers read the log with cursors of their own (watch.py), so
        none of them is fed the difference of two states in place of the changes.
        Returns how many keys changed (0 without ``count``: the caller has no use for
        it, and it costs a comparison per key); None (nothing changed) when a writer
        published during an untrusted read."""
        for _ in range(100):
            values = ValueFiles(keep=self.max_staleness is None)
            cursor = self._new_cursor(values)
            # Units are applied as they are read: no one sees this view before the swap
            # below, and a read that fails or does not count leaves it unused.
            view: dict[str, Value | int] = {}
            try:
                cursor.read(look.limit, apply_to=view)
            except NeedReload:
                cursor.close()
                continue
            if look.check is not None and self._changed(look.check):
                cursor.close()
                return None
            old, old_values = self._view, self._values
            changed = 0
            if count:
                changed = sum(1 for k, v in view.items()
                              if not self._same(old.get(k, MISSING), old_values, v, values))
                changed += sum(1 for k in old if k not in view)
            self._values = values
            self._view = view  # one reference store: readers see the old or the new view
            old_values.close()
            self._cursor.close()
            self._cursor = cursor
            self._seen_seq = look.seq
            self._last_refresh = time.monotonic()
            self._let_go = False
            return changed
        raise Error(f"{self.path}: could not read a stable set of segments (compaction loop?)")

    def _new_cursor(self, values: ValueFiles) -> Cursor:
        cursor = Cursor(self.path, self._codec, not self.readonly, self._dirlock,
                        self.meta.max_file_bytes)
        cursor.values = values
        cursor.only = self._only_key
        return cursor

    @staticmethod
    def _same(a: object, a_values: ValueFiles, b: Value | int, b_values: ValueFiles) -> bool:
        """Do two values of the view (of two builds of it) hold the same value? One may
        be inline where the other is a handle (a writer keeps inline what it wrote over
        several records, or a str of few code points but many bytes): compared by
        length, CRC-32 and kind, as two handles are."""
        if type(a) is int or type(b) is int:
            if a is MISSING:
                return False
            entry = _entry(a, a_values)  # type: ignore[arg-type]
            return entry is not None and entry == _entry(b, b_values)
        return a == b

    def _apply(self, batches: list[Batch]) -> None:
        """Change the view; tail mutex held. The version is odd meanwhile, so optimistic
        readers retry (a seqlock): a batch is seen whole or not at all."""
        view = self._view
        self._version += 1
        try:
            for batch in batches:
                apply(view, batch)
        finally:
            self._version += 1

    def _fresh(self) -> None:
        """Make the view fresh enough for a read, per ``max_staleness``."""
        if self._epoch != fork_epoch[0]:
            self._check()
        if self.max_staleness is None:
            return
        if self.max_staleness == 0:
            if self._shm.seq == self._seen_seq and self._shm.backed:
                return
        elif time.monotonic() - self._last_refresh < self.max_staleness:
            return
        with self._tail_mutex:
            self._catch_up(self._reader_limit())

    # --- reading the view without a lock -------------------------------------------
    #
    # Readers take no lock: they note the view's version, read, and check the version
    # did not move (nor was odd: a batch half applied). If it did, they read again under
    # the tail mutex, which every writer of the view holds. Reads run in parallel and
    # never delay a writer.

    def _read_value(self, handle: int) -> Value | None:
        """The value of a handle of the view, read without a lock; None when the view was
        replaced meanwhile or the file is gone (look again under the tail mutex)."""
        try:
            return self._values.read(handle)
        except Moved:
            return None

    def _get_locked(self, key: str) -> Any:
        """The encoded value of ``key`` or MISSING; tail mutex held. A value whose file a
        compaction removed (and this process had not mapped) is read from the new files:
        the view is rebuilt from them first."""
        for _ in range(3):
            value = self._view.get(key, MISSING)
            if value.__class__ is not int:
                return value
            try:
                got = self._values.read(value)
            except Moved:
                got = None
            if got is not None:
                return got
            self._rebuild()
        raise Error(f"{self.path}: the value of {key!r} could not be read: its segment "
                    "keeps being replaced")

    def _rebuild(self, look: Look | None = None) -> None:
        """Rebuild the view from the log's current files (up to ``look``, first); tail
        mutex held."""
        for _ in range(100):
            if self._reload(look or self._reader_limit(), count=False) is not None:
                return
            look = None
        raise Error(f"{self.path}: the shared state kept changing while reading the log")

    def _encoded(self, key: str) -> Any:
        """The encoded value of ``key`` or MISSING, as of the view now (no catching up)."""
        version = self._version
        value = self._view.get(key, MISSING)
        if value.__class__ is int:
            value = self._read_value(value)
        if version != self._version or version & 1 or value is None:
            with self._tail_mutex:
                return self._get_locked(key)
        return value

    def _copy_now(self) -> dict[str, Value]:
        """``_copy`` of the view as it is, without catching up first."""
        version = self._version
        values = self._values
        view = dict(self._view)
        if version == self._version and not version & 1:
            copy = self._resolved(view, values)
            if copy is not None:
                return copy
        with self._tail_mutex:
            for _ in range(3):
                copy = self._resolved(dict(self._view), self._values)
                if copy is not None:
                    return copy
                self._rebuild()
        raise Error(f"{self.path}: values could not be read: their segments keep being "
                    "replaced")

    @staticmethod
    def _resolved(view: dict[str, Value | int], values: ValueFiles) -> dict[str, Value] | None:
        """``view`` with every handle replaced by its value (in place); None if one of
        them is not of ``values`` or its file is gone."""
        read = values.read
        try:
            for key, value in view.items():
                if value.__class__ is int:
                    got = read(value)
                    if got is None:
                        return None
                    view[key] = got
        except Moved:
            return None
        return view  # type: ignore[return-value]

    def _consistent(self, read: Callable[[dict[str, Value | int]], T]) -> T:
        """``read(view)`` on a fresh enough view that no batch is half applied to."""
        self._fresh()
        version = self._version
        result = read(self._view)
        if version == self._version and not version & 1:
            return result
        with self._tail_mutex:
            return read(self._view)
