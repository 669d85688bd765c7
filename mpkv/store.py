"""The store: writes, transactions and the public API, over the view of the log.

A write takes the writer lock, catches the view up with what other processes appended,
appends its own record, publishes the new commit point in the shared state file and
releases the lock. Reads look the key up in the view (view.py: the view, its cursor
and catching up with the log; keydir.py: values left in their segment files).
docs/protocol.md has the whole protocol; docs/format.md the bytes.

This module holds the write path, transactions and the public API, and wires the
pieces below it: the view (view.py), the log writer (writer.py: appending, rotation,
undo of a failed write), durability (durability.py: fsync modes, the periodic syncer),
the locks and the shared state. It also decides when to start an automatic compaction
and reopens everything in a forked child.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
import zlib
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
)
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from . import compaction, snapshot
from .codec import Batch, Op, Value
from .common import check_options, fork_epoch
from .durability import Durability
from .errors import ClosedError, CorruptionError, Error, FormatError, LockTimeout, ReadOnlyError
from .locks import CompactionLock, DirLock, WriterLock
from .mapping import MISSING, StoreMapping, TransactionMapping, open_block, savepoint
from .segments import (
    AUX,
    COMPACT_LOCK,
    DEFAULT_MAX_SEGMENT_BYTES,
    DIRLOCK,
    LOCK,
    META,
    SHM,
    VERSION,
    Meta,
    UnitPos,
    check_store_dir,
    check_written,
    clear_intent,
    create_meta,
    discard_intent,
    list_log,
    list_segments,
    parse_name,
    read_intent,
    read_meta,
    truncate_log,
    written_format,
)
from .serializer import serializer_for
from .shm import SEQ, SharedState
from .view import LogView, Look
from .watch import LogWatcher, check_prefix, check_timeout, parse_position, unit_token
from .writer import LogWriter

AUTO_COMPACT_MIN_BYTES = 4 << 20  # no auto-compaction below this much sealed data...
AUTO_COMPACT_GARBAGE = 0.5  # ... or while dead records are less than this fraction
T = TypeVar("T")
_log = logging.getLogger("mpkv")


class Store(LogView, StoreMapping):
    """A persistent mapping of str keys shared by every process that opens ``path``:
    str/bytes values (``serializer="raw"``) or any JSON value (``serializer="json"``).

    Options (CONTRACT.md has the details): ``max_segment_bytes``, ``format``
    (``"binary"``/``"text"``) and ``serializer`` (``"raw"``/``"json"``) are the store's
    own, fixed at creation (``None``: what the store has); ``fsync`` (``"always"``,
    ``"periodic"``, ``"never"``) and ``fsync_interval``: durability; ``max_staleness``:
    how old a read may be (``None``: only ``refresh()``); ``readonly``; ``lock_timeout``
    (seconds, for the writer lock); ``auto_compact``."""

    def __init__(self, path: str | os.PathLike[str], *, max_segment_bytes: int | None = None,
                 format: str | None = None, serializer: str | None = None,
                 fsync: str | None = None, fsync_interval: float = 1.0,
                 max_staleness: float | None = 0.0, readonly: bool = False,
                 lock_timeout: float | None = None, auto_compact: bool = True) -> None:
        check_options(max_segment_bytes, format, fsync, fsync_interval, max_staleness,
                      lock_timeout)
        if serializer is not None:
            serializer_for(serializer)  # ValueError for an unknown name, before any file
        self.path = os.fspath(path)
        self.fsync = fsync or "periodic"
        self.fsync_interval = float(fsync_interval)
        self.max_staleness = max_staleness
        self.readonly = bool(readonly)
        self.lock_timeout = lock_timeout
        self.auto_compact = bool(auto_compact)
        self._options = dict(max_segment_bytes=max_segment_bytes, format=format,
                             serializer=serializer, fsync=fsync,
                             fsync_interval=fsync_interval, max_staleness=max_staleness,
                             readonly=readonly, lock_timeout=lock_timeout,
                             auto_compact=auto_compact)
        self.meta = self._open_meta(max_segment_bytes, format, serializer)
        self.format = self.meta.format
        self.max_segment_bytes = self.meta.max_segment_bytes
        self._codec = self.meta.codec
        self.serializer = self.meta.serializer
        self._serializer = serializer_for(self.serializer)
        # None for raw stores: the hot paths then skip encoding and decoding.
        self._encode_value = None if self._serializer.identity else self._serializer.encode
        self._decode_value = None if self._serializer.identity else self._serializer.decode
        # Watchers of this store, told when it closes; guarded by the tail mutex.
        self._watchers: weakref.WeakSet[LogWatcher] = weakref.WeakSet()
        self._epoch = 0
        self._open_files()

    # --- opening -------------------------------------------------------------------

    def _open_meta(self, max_segment_bytes: int | None, format: str | None,
                   serializer: str | None) -> Meta:
        exists = check_store_dir(self.path)
        meta = read_meta(self.path) if exists else None
        if meta is None:
            # Lost metadata over existing segments: their bytes tell the format.
            written = written_format(self.path) if exists else None
            fmt = format or (written[0] if written else "binary")
            if exists:
                check_written(self.path, fmt, f"format={fmt!r} (no metadata)")
            if self.readonly:
                if not exists:
                    raise FormatError(f"{self.path}: no store here (readonly cannot create one)")
                return Meta(fmt, max_segment_bytes or DEFAULT_MAX_SEGMENT_BYTES,
                            serializer or "raw", written[2] if written else VERSION)
            os.makedirs(self.path, exist_ok=True)
            meta = create_meta(self.path, Meta(fmt, max_segment_bytes or DEFAULT_MAX_SEGMENT_BYTES,
                                               serializer or "raw",
                                               written[2] if written else VERSION))
        else:
            check_written(self.path, meta.format, os.path.join(self.path, AUX, META))
        if format is not None and format != meta.format:
            raise ValueError(f"{self.path}: the store's format is {meta.format!r}, not {format!r}")
        if serializer is not None and serializer != meta.serializer:
            raise ValueError(f"{self.path}: the store's serializer is {meta.serializer!r}, "
                             f"not {serializer!r}")
        if max_segment_bytes is not None and max_segment_bytes != meta.max_segment_bytes:
            raise ValueError(f"{self.path}: the store's max_segment_bytes is "
                             f"{meta.max_segment_bytes}, not {max_segment_bytes}")
        return meta

    def _open_files(self) -> None:
        """(Re)open descriptors, locks and the view: at open and in a child after fork."""
        aux = os.path.join(self.path, AUX)
        # Fields below without a note are set here only (at open, and in a forked child
        # before first use). Locks, in the order they are taken (docs/protocol.md):
        self._write_mutex = threading.RLock()  # one writer thread at a time in this process
        self._local = threading.local()  # .tx: the calling thread's open transaction
        #: Open outermost transactions. Written under the write mutex; read without a lock
        #: on the hot paths (non-zero sends them to the slow path, which checks the thread).
        self._open_tx = 0
        self._wlock = None if self.readonly else WriterLock(os.path.join(aux, LOCK),
                                                            self.lock_timeout)
        self._shm = SharedState(os.path.join(aux, SHM), writable=not self.readonly)
        self._dirlock = DirLock(os.path.join(aux, DIRLOCK), writable=not self.readonly)
        self._open_view()  # the tail mutex, the view and its cursor (view.py)
        #: fsync bookkeeping and the periodic syncer; guarded by its own mutex
        #: (durability.py), which nests inside the tail mutex.
        self._durability = Durability(self.path, self.fsync, self.fsync_interval)
        #: The append work (writer.py): its state is guarded by the writer lock, and every
        #: call into it holds the write mutex, the writer lock and the tail mutex.
        self._writer = LogWriter(self.path, self.format, self._codec, self.max_segment_bytes,
                                 self._shm, self._durability)
        #: The automatic compaction thread. Started by a writing thread after its write,
        #: without a lock: two threads racing start two attempts at worst, and the
        #: compaction lock turns the second away. Joined by ``close``.
        self._compactor: threading.Thread | None = None
        #: the error that ended the last automatic compaction (also logged), or None;
        #: written by the compaction thread only.
        self.compaction_error: BaseException | None = None
        #: ``_writer.sealed_bytes`` at which to check for garbage next; as ``_compactor``.
        self._next_check = AUTO_COMPACT_MIN_BYTES
        try:
            with self._tail_mutex:  # the view is built whole: it is read as a rebuild
                self._rebuild(self._open_limit())
        except BaseException:
            self._close_files()
            raise
        # _q and _lazy are replaced under the tail mutex when the shared state file
        # appears (``_remapped``) and read without a lock by the hot paths.
        self._q = self._shm.slots  # the shared state's slots, for a one-load counter check
        # Reads must do more than compare the counter: check the clock, or (no shared
        # state to watch) read the log.
        self._lazy = self.max_staleness != 0 or not self._shm.backed
        #: fork_epoch when the files were opened; -1 once closed (``close`` writes that
        #: under the write mutex, which writers check again once they hold it). Written
        #: by open and the first call in a forked child; read without a lock by every call.
        self._epoch = fork_epoch[0]

    def _check(self) -> None:
        """Slow path of every public call: closed, or first use in a forked child."""
        if self._epoch == -1:
            raise ClosedError(f"{self.path}: store is closed")
        if self._epoch != fork_epoch[0]:
            # First use in a forked child: inherited descriptors share the parent's
            # lock and file offsets, and threading locks may be held by threads that do
            # not exist here. Start over with our own (the parent's watchers stay the
            # parent's).
            self._watchers = weakref.WeakSet()
            self._values.forked()
            self._close_files()
            self._open_files()

    def _begin_writing(self) -> None:
        """Take the write mutex, waited for within ``lock_timeout`` like the writer lock
        of the file (a thread of this process holding it is as much a writer as another
        process); ClosedError (mutex released) if close() ran meanwhile. The caller
        releases it. A plain call, not a context manager: this is on every put."""
        timeout = -1 if self.lock_timeout is None else self.lock_timeout
        if not self._write_mutex.acquire(timeout=timeout):
            raise LockTimeout(f"{self.path}: writer lock not acquired within "
                              f"{self.lock_timeout} s (held by another thread)")
        if self._epoch == -1:
            self._write_mutex.release()
            self._still_open()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """``_begin_writing`` for a block."""
        self._begin_writing()
        try:
            yield
        finally:
            self._write_mutex.release()

    def _still_open(self) -> None:
        """Under the write mutex: ClosedError when close() ran while this thread waited
        for it (the descriptors are gone; using them could hit a reused number)."""
        if self._epoch == -1:
            raise ClosedError(f"{self.path}: store is closed")

    def _writable(self) -> None:
        if self._epoch != fork_epoch[0]:
            self._check()
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store opened with readonly=True")

    # --- tailing -------------------------------------------------------------------

    def refresh(self) -> int:
        """Apply what other processes wrote since the last refresh; return the number of
        records applied."""
        self._check()
        with self._tail_mutex:
            return self._catch_up(self._reader_limit())[0]

    # --- reads ---------------------------------------------------------------------
    #
    # Readers take no lock: they note the view's version, read, and check the version
    # did not move (nor was odd: a batch half applied). If it did, they read again under
    # the tail mutex, which every writer of the view holds. Reads run in parallel and
    # never delay a writer.

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a fresh object each call for JSON), or ``default``."""
        if (self._epoch != fork_epoch[0] or self._q[SEQ] != self._seen_seq or self._lazy
                or self._open_tx):
            tx = self._joined()
            if tx is not None:
                return tx.get(key, default)
            self._fresh()
        version = self._version
        value = self._view.get(key, MISSING)
        if value.__class__ is int:  # left in its file
            value = self._read_value(value)
        if version != self._version or version & 1 or value is None:
            with self._tail_mutex:
                value = self._get_locked(key)
        if value is MISSING:
            if not isinstance(key, str):  # checked on misses only: free
                raise TypeError(f"key must be str, not {type(key).__name__}")
            return default
        return value if self._decode_value is None else self._decode_value(value)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is live; reads no value."""
        tx = self._joined()
        if tx is not None:
            return key in tx
        self._fresh()
        version = self._version
        found = key in self._view
        if version != self._version or version & 1:  # a unit half applied: see get
            with self._tail_mutex:
                found = key in self._view
        if found:
            return True
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        return False

    def __len__(self) -> int:
        tx = self._joined()
        return self._consistent(len) if tx is None else len(tx)

    def _copy_keys(self) -> dict[str, Any]:
        """The view's keys (their values handles or values): iterating keys reads no
        value file."""
        return self._consistent(dict)

    def _copy(self) -> dict[str, Value]:
        """A point-in-time copy of the view, values read from their files: iteration
        never tears or raises (but CorruptionError for a damaged value)."""
        self._fresh()
        return self._copy_now()

    # --- writes --------------------------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (one record). TypeError/ValueError, nothing written,
        for a key or value the store's format and serializer cannot hold."""
        if self._epoch != fork_epoch[0] or self.readonly or self._open_tx:
            self._writable()
            tx = self._joined()
            if tx is not None:
                tx.put(key, value)
                return
        if self._encode_value is not None:
            value = self._encode_value(value)
        self._codec.check(key, value)
        self._commit([(key, value)], behind_ok=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed. Logged even when it did not."""
        self._writable()
        tx = self._joined()
        if tx is not None:
            return tx.delete(key)
        self._codec.check(key, None, delete=True)
        return self._commit([(key, None)], existed=key)

    def __delitem__(self, key: str) -> None:
        self._writable()
        tx = self._joined()
        if tx is not None:
            del tx[key]
            return
        self._codec.check(key, None, delete=True)
        if not self._commit([(key, None)], existed=key, only_if_exists=True):
            raise KeyError(key)

    def _commit(self, ops: list[Op], existed: str | None = None,
                only_if_exists: bool = False, behind_ok: bool = False) -> bool:
        """Append ``ops`` as one atomic unit under the writer lock; with ``existed``,
        return whether that key was live just before (checked under the lock)."""
        records = self._writer.encode(ops)
        wlock = self._wlock
        assert wlock is not None
        behind = was = False
        self._begin_writing()
        try:
            wlock.acquire()
            try:
                with self._tail_mutex:
                    if self._shm.replaced():
                        self._shm_replaced()
                    behind = behind_ok and self._writer.append_behind(
                        self._cursor, records, self._seen_seq)
                    if not behind:
                        self._sync_with_log(shm_checked=True)
                        was = existed is not None and existed in self._view
                        if only_if_exists and not was:
                            return False
                        self._append(records, ops)
            finally:
                wlock.release()
            if behind:  # now read what others appended, and ours, in log order
                with self._tail_mutex:
                    self._catch_up(self._reader_limit())
        finally:
            self._write_mutex.release()
        self._after_write()
        return was

    def _lock(self) -> None:
        assert self._wlock is not None
        self._wlock.acquire()

    def _unlock(self) -> None:
        assert self._wlock is not None
        self._wlock.release()

    def _shm_replaced(self) -> None:
        """Someone removed the shared state file: use the one at the path now, and trust
        nothing this view saw in the old one (writer lock and tail mutex held)."""
        self._shm.reattach()
        self._remapped()
        self._seen_seq = -1

    def _sync_with_log(self, shm_checked: bool = False) -> None:
        """``_sync_log`` flagged as under the writer lock (tail mutex held), after moving
        to a replaced shared state file unless the caller just did (an ``fstat`` a
        commit need not pay twice)."""
        if not shm_checked and self._shm.replaced():
            self._shm_replaced()
        self._under_writer_lock = True
        try:
            self._sync_log()
        finally:
            self._under_writer_lock = False

    def _sync_log(self) -> None:
        """Under the writer lock: apply other processes' records, decide what a writer
        that died left behind, cut a torn tail, and publish the result.

        The cheap path trusts the shared state: the counter we last saw and no writer
        that died mid-write. Otherwise records past the commit point are decided once,
        for every process (docs/protocol.md): with a trusted commit point they are
        dropped, as readers never applied them; with an untrusted one every complete
        record is kept, as readers read to the end of the files."""
        shm = self._shm
        if self._writer.verified and shm.writer_may_trust():
            if shm.seq == self._seen_seq:
                return
            seq, seg, _ = shm.snapshot() or (shm.seq, 0, 0)
            _, torn = self._catch_up(Look(seq, (seg, None), None))
            if torn is not None:
                self._cursor.truncate(torn)
            return
        published = shm.published()
        if not (published is not None and shm.inflight and self._drop_unpublished(*published)):
            self._keep_complete(trusted=published is not None)
        self._writer.verified = True
        self._seen_seq = shm.publish(self._cursor.number, self._cursor.offset)

    def _drop_unpublished(self, seq: int, segment: int, end: int) -> bool:
        """A writer died between changing files and publishing: cut the log back to the
        published point (deleting segments it started). False when the files do not
        reach that point (then the shared state is not believed)."""
        self._catch_up(Look(seq, (segment, end), None))
        cursor = self._cursor
        if not ((cursor.name is None and segment == 0 and end == 0) or (
                cursor.number == segment and not cursor.part and cursor.offset == end)):
            return False
        truncate_log(self.path, segment, end)
        if self.fsync == "always" and cursor.fd >= 0:
            os.fsync(cursor.fd)
        if self.format == "text":
            clear_intent(self.path)
        return True

    def _keep_complete(self, trusted: bool) -> None:
        """Keep every complete record: read to the end of the files and cut a torn tail.
        An unfinished text commit (``.mpkv/txn``) is undone first; with a trusted
        commit point the file cannot be one (commits remove it before publishing)."""
        if self.format == "text":
            intent = None if trusted else read_intent(self.path)
            if intent is not None:  # a text commit died half written: undo it
                truncate_log(self.path, *intent)
                clear_intent(self.path)
                self._reload(Look(self._shm.seq, None, None))
            elif trusted:
                discard_intent(self.path)
        _, torn = self._catch_up(Look(self._shm.seq, None, None))
        if torn is not None:
            self._cursor.truncate(torn)

    def _append(self, records: list[tuple[bytes, int]], ops: list[Op]) -> None:
        """Append one unit at the cursor, apply it to the view, then publish. Both locks
        held. If writing fails, the writer has put the log back and nothing is published."""
        cursor = self._cursor
        self._writer.append(cursor, records, len(ops))
        self._apply([self._left_in_file(records, ops)])
        self._seen_seq = self._shm.publish(cursor.number, cursor.offset)

    def _left_in_file(self, records: list[tuple[bytes, int]], ops: list[Op]) -> Batch:
        """The unit just appended as the view holds it: large values as handles into the
        file, as any other process reads them, so that a writer keeps no private copy
        of what it wrote. A unit written over several records (a text commit, a unit
        chained over segments) stays as it is until the view is rebuilt."""
        refs = self._cursor.refs
        if len(records) != 1 or refs is None:
            return ops
        data = records[0][0]
        if len(ops) == 1:  # one put: the value's place is known without decoding
            key, value = ops[0]
            if value is None or len(value) <= refs.inline_max:  # len <= encoded bytes
                return ops
            at, length, kind = self._codec.single_value(data)
            if length <= refs.inline_max:
                return ops
            handle = refs.add(self._cursor.offset - len(data) + at, length,
                              zlib.crc32(memoryview(data)[at : at + length]), kind)
            return [(key, handle)]  # type: ignore[list-item]
        if not any(v is not None and len(v) > refs.inline_max for _, v in ops):
            return ops
        dec = self._codec.decode(data, refs, self._cursor.offset - len(data))
        assert not dec.problem and len(dec.batches) == 1, "a record just encoded decodes"
        return dec.batches[0]

    def _after_write(self) -> None:
        """Durability per the fsync mode, outside the writer lock so that writers of all
        processes overlap their fsyncs (group commit); then maybe start auto-compaction."""
        if self._writer.sealed_bytes >= self._next_check:
            self._maybe_compact()
        self._durability.after_write()
        if self._let_go and self.max_staleness is not None:
            with self._tail_mutex:
                if self._let_go:
                    self._rebuild()

    def _maybe_compact(self) -> None:
        """Start a background compaction when dead records fill most of the sealed data.
        Writers never wait for it except while it seals a segment and renames files."""
        self._next_check = self._writer.sealed_bytes + AUTO_COMPACT_MIN_BYTES
        if not self.auto_compact or (self._compactor and self._compactor.is_alive()):
            return
        names = list_segments(self.path)[:-1]
        try:
            sealed = sum(os.path.getsize(os.path.join(self.path, n)) for n in names)
        except FileNotFoundError:  # another process compacted meanwhile
            return
        with self._tail_mutex:
            size = self._values.size
            live = sum(len(k) + (size(v) if isinstance(v, int) else len(v))
                       for k, v in self._view.items()) + 18 * len(self._view)
        if sealed < AUTO_COMPACT_MIN_BYTES or live > sealed * (1 - AUTO_COMPACT_GARBAGE):
            return
        self._compactor = threading.Thread(target=self._auto_compact, daemon=True,
                                           name=f"mpkv-compact {self.path}")
        self._compactor.start()

    def _auto_compact(self) -> None:
        """The automatic compaction thread: an error ends this compaction, not the store.
        It is logged (logger ``mpkv``) and kept in ``compaction_error``; the next check
        starts a new attempt."""
        try:
            self._compact(False)
        except Exception as exc:
            self.compaction_error = exc
            _log.error("%s: automatic compaction failed: %s", self.path, exc, exc_info=exc)
        else:
            self.compaction_error = None

    # --- transactions ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``with store.transaction() as tx:`` holds the writer lock for the block, with
        the view caught up first; ``tx`` is a mapping over the latest committed state
        plus the block's writes, which commit as one unit on normal exit and not at all
        on an exception. Using ``tx`` after the block raises ClosedError.

        Opened inside an open block on the same thread, it is a savepoint: it sees the
        outer block's writes, an exception discards only its own, and nothing commits
        before the outermost block exits. Store calls made inside a block on its thread
        (``store.put``, ``store.get``, ``store.incr``...) join it."""
        self._writable()
        outer = self._joined()
        if outer is not None:
            with savepoint(self, outer) as inner:
                yield inner  # type: ignore[misc]
            return
        with self._writing():
            self._lock()
            try:
                with self._tail_mutex:
                    self._sync_with_log()
                # The write mutex, held, guards the count of open blocks.
                with open_block(self, Transaction(self), nullcontext()) as tx:
                    yield tx
                if tx._ops:
                    ops: list[Op] = tx._ops
                    records = self._writer.encode(ops)
                    with self._tail_mutex:
                        self._append(records, ops)
            finally:
                self._unlock()
        if tx._ops:
            self._after_write()

    # --- whole-store operations --------------------------------------------------------

    def serialize(self, file_path: str | os.PathLike[str]) -> None:
        """Write the current state (caught up) to one file, atomically: a reader of
        ``file_path`` sees the old file or the whole new one. Values are stored encoded
        (JSON text for a JSON store), as in the log (docs/format.md). The file gets mode
        0666 minus the umask. A symbolic link at ``file_path`` is followed on purpose (it
        is the caller's path, as with a shell's ``>``): the file it points to is replaced
        and the link stays."""
        snapshot.write(os.fspath(file_path),
                       snapshot.encode(self._copy(), self._serializer.name))

    def deserialize(self, file_path: str | os.PathLike[str]) -> None:
        """Replace the whole contents with the file's state, as one transaction: every
        process sees all old or all new. ValueError/TypeError (nothing written) when a
        value does not suit this store (e.g. not JSON text for a JSON store)."""
        self._writable()
        items = snapshot.read_for(os.fspath(file_path), self._serializer)
        for key, value in items.items():
            self._codec.check(key, value)
        with self.transaction() as tx:
            for key in list(self._view):
                if key not in items:
                    tx._stage(key, None)
            for key, value in items.items():
                try:
                    same = self._encoded(key) == value
                except CorruptionError:  # a damaged value is replaced, whatever it was
                    same = False
                if not same:
                    tx._stage(key, value)

    def compact(self, *, progress: Callable[[list[str]], Iterable[str]] | None = None
                ) -> dict[str, int]:
        """Rewrite sealed segments keeping only live data, while others read and write.

        Writers wait only while the active segment is sealed and while the outputs are
        renamed into place; the rewriting itself runs without the writer lock.
        ``progress`` wraps the list of sealed segments when they are read (for a
        progress bar): only when this store's view cannot give their state
        (docs/compaction.md)."""
        self._writable()
        return self._compact(True, progress)

    def _compact(self, wait: bool, progress: Callable[[list[str]], Iterable[str]] | None = None
                 ) -> dict[str, int]:
        """``wait=False`` (auto-compaction): give up at once if another one runs."""
        assert self._only_key is None, "a view of one key is not the state to compact"
        lock = CompactionLock(os.path.join(self.path, AUX, COMPACT_LOCK))
        if not lock.acquire(wait):
            return {}
        try:
            compaction.tidy(self.path, self._dirlock)
            if self._let_go and self.max_staleness is not None:
                # The view holds values in files a compaction removed: move it to the
                # new files now, not under the writer lock, so that it can serve below.
                with self._tail_mutex:
                    if self._let_go:
                        self._rebuild()
            taken = self._seal()
            sealed = [n for n in list_log(self.path) if taken is None or n < taken[0]]
            before = sum(os.path.getsize(os.path.join(self.path, n)) for n in sealed)
            if not sealed:
                return {"segments_before": 0, "segments_after": 0, "bytes_before": 0,
                        "bytes_after": 0}
            served = None if taken is None else compaction.from_view(self.path, taken[1],
                                                                      sealed)
            del taken  # the copy of the view lives on in ``state`` alone, if at all
            placed: list[compaction.Placed] | None = None
            if served is not None:
                state, horizon = served
                del served
                placed = []
            else:  # the view cannot serve: replay the inputs
                last: list[UnitPos] = []
                state = compaction.replay(self.path, self._codec,
                                          progress(sealed) if progress else sealed, last)
                horizon = last[0]
            number = parse_name(sealed[-1])[0]  # type: ignore[index]
            outputs = compaction.write_outputs(self.path, self._codec, state,
                                               self.max_segment_bytes, number, placed)
            # A replayed state's keys and handles must not be alive beside the view
            # rebuilt after the switch; a copy of the view points the view's handles.
            moving = None if placed is None else (state, placed)
            del state
            after = sum(o.size for o in outputs)
            with self._write_mutex:
                try:
                    self._still_open()
                    self._lock()
                except BaseException:  # closed, LockTimeout: nothing written stays
                    compaction.discard(self.path, [o.path for o in outputs], number)
                    raise
                try:
                    compaction.switch(self.path, outputs, number, sealed,
                                      self._dirlock, horizon)
                finally:
                    self._unlock()
                self._leave_inputs(sealed, number, moving)
        finally:
            lock.release()
        return {"segments_before": len(sealed), "segments_after": len(outputs),
                "bytes_before": before, "bytes_after": after}

    def _seal(self) -> tuple[str, compaction.Taken] | None:
        """Catch up and seal the active segment (even if empty: each compaction gets a
        new b), then copy the view, which holds exactly the state of every segment
        before the new active one: its name and the view taken (``compaction.Taken``).
        None when the log has no segment yet.

        The copy is made under the tail mutex alone: nothing changes the view without
        it, while writers of other processes go on in the new active segment."""
        with self._write_mutex:
            self._still_open()
            self._lock()
            locked = True
            try:
                with self._tail_mutex:
                    self._sync_with_log()
                    if self._cursor.name is None:
                        return None
                    self._seen_seq = self._writer.seal(self._cursor)
                    self._unlock()
                    locked = False
                    values = self._values
                    taken = compaction.Taken(dict(self._view), values,
                                             [vf.file for vf in list(values.files.values())],
                                             dict(values.entered),
                                             self._cursor.position)
                    return self._cursor.name, taken
            finally:
                if locked:
                    self._unlock()

    def watch(self, prefix: str = "", *, since: str | None = None,
              timeout: float | None = None) -> LogWatcher:
        """An iterator of :class:`Change` for every change committed by any process after
        this call (or after position ``since``), in commit order; it ends after
        ``timeout`` seconds without a change. CompactedError when compaction removed
        changes after ``since`` (docs/guide.md, "Watching changes")."""
        self._check()
        prefix = check_prefix(prefix)
        timeout = check_timeout(timeout)
        start = None if since is None else parse_position(since)
        watcher = LogWatcher(self, prefix, start, timeout)
        with self._tail_mutex:
            self._watchers.add(watcher)
        return watcher

    def position(self) -> str:
        """The position of the last change this process has applied (caught up per
        ``max_staleness``); before any change, a token that sorts before them all."""
        self._fresh()
        with self._tail_mutex:
            return unit_token(self._cursor.position)

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Flush (per the fsync mode) and release everything; later use raises ClosedError."""
        if self._epoch == -1:
            return
        if self._joined() is not None:
            # Closing would pull the descriptors from under the block's commit.
            raise Error(f"{self.path}: close() inside an open transaction on this thread; "
                        "leave the with block first")
        if self._epoch == fork_epoch[0]:
            self._durability.stop()
        if self._compactor is not None:
            self._compactor.join()
        with self._tail_mutex:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher._store_closed()
        with self._write_mutex:  # a write in flight on another thread finishes first
            self._epoch = -1
            self._close_files()

    def _close_files(self) -> None:
        self._cursor.close()
        self._values.close()
        self._dirlock.close()
        self._shm.close()
        if self._wlock is not None:
            self._wlock.close()
        self._durability.close()

    def __reduce__(self) -> tuple[Callable[..., Store], tuple[str, dict[str, Any]]]:
        return _reopen, (self.path, self._options)

    def __repr__(self) -> str:
        if self._epoch == -1:
            return f"<mpkv.Store {self.path!r} closed>"
        mode = " readonly" if self.readonly else ""
        return f"<mpkv.Store {self.path!r} {self.format} {self.serializer}{mode}>"


def _reopen(path: str, options: dict[str, Any]) -> Store:
    return Store(path, **options)


class Transaction(TransactionMapping):
    """The view of one ``transaction()`` block: the latest committed state plus the
    block's own writes, which reach the log only when the outermost block exits
    normally. A full mutable mapping (``get``, ``put``, ``delete``, ``incr``, ``pop``,
    ``update``, iteration...). Used by the block's thread only, which holds the writer
    lock: the view does not change under it."""

    _store: Store

    def _committed(self, key: str) -> Any:
        return self._store._encoded(key)

    def _committed_items(self) -> dict[str, Value]:
        return self._store._copy_now()

    def _check_op(self, key: str, encoded: Value | None) -> None:
        self._store._codec.check(key, encoded, delete=encoded is None)

    def _committed_keys(self) -> Iterator[str]:
        return iter(self._store._view)  # O(1) to the first key: popitem in a loop is linear

    def _committed_has(self, key: str) -> bool:
        return key in self._store._view  # the view does not change under the block


class KeyReader(Store):
    """A readonly store for reading one key: compaction outputs' hints give only that
    key's entry, so that ``mpkv get`` on a large compacted store reads no other key.
    Its view holds that key exactly (every later change to it is replayed with the
    rest of the log past the outputs); other keys it holds only as far as that replay
    put them there, so use it for ``key`` alone."""

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self._only_key = key
        super().__init__(path, readonly=True)
