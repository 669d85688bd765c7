"""The ``mpkv`` command: every operation of the store from a shell.

Exit status: 0 success, 1 when ``get`` finds no key, ``verify`` finds damage or an
operation fails, 2 on usage errors, 130 when interrupted. Every failure prints one line
on stderr, never a traceback. Only ``put``, ``load`` and ``restore`` create a store;
every other command on a path that holds none fails and creates nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

from . import __version__, recovery, snapshot
from .argparsing import Parser
from .codec import Value
from .errors import Error, FormatError
from .segments import AUX, META, check_store_dir
from .store import KeyReader, Store
from .watch import BEFORE_ALL, Change, check_timeout, parse_position

if TYPE_CHECKING:
    from .redis_store import RedisStore

T = TypeVar("T")
LOAD_CHUNK = 1000  # JSON lines per transaction in ``load``
MISSING: Any = object()  # ``get``'s default: no stored value (not even a JSON null) is it


class CommandError(Error):
    """A failure the command reports as its one line (exit 1)."""


# --- progress bars ---------------------------------------------------------------------


def _tqdm() -> Any:
    """tqdm's class when stderr is a terminal and tqdm is installed (the ``cli`` extra);
    None otherwise: the bar is a nicety, never a requirement, and never in a pipe."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _progress(items: Iterable[T], total: int | None, what: str) -> Iterable[T]:
    """A progress bar over ``items`` on a terminal, ``items`` unchanged otherwise."""
    tqdm = _tqdm()
    if tqdm is None:
        return items
    bar: Iterable[T] = tqdm(items, total=total, desc=what, file=sys.stderr)
    return bar


def _segments_bar(names: list[str]) -> Iterable[str]:
    return _progress(names, len(names), "segments")


# --- JSON lines --------------------------------------------------------------------------


def _to_json(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        return json.dumps({"key": key, "value": base64.b64encode(value).decode(), "bytes": True},
                          ensure_ascii=False)
    return json.dumps({"key": key, "value": value}, ensure_ascii=False)


class BadLine(ValueError):
    """A line of ``load``'s input that cannot be stored; ``number`` counts from 1."""

    def __init__(self, number: int, problem: str) -> None:
        super().__init__(f"stdin line {number}: {problem}")
        self.number = number


def _from_json(line: bytes, number: int) -> tuple[str, Any]:
    """The ``(key, value)`` of one dump line. The value is whatever JSON holds (a JSON
    store takes any of it; a raw store rejects non-strings when it is put)."""
    try:
        obj = json.loads(line)
        key, value = obj["key"], obj["value"]
        if obj.get("bytes"):
            value = base64.b64decode(value, validate=True)
        if not isinstance(key, str):
            raise ValueError("the key must be a string")
        return key, value
    except RecursionError:
        raise BadLine(number, "JSON nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadLine(number, f'not a {{"key": ..., "value": ...}} JSON line ({exc})') from None


# --- opening stores ----------------------------------------------------------------------


def _is_redis(path: str) -> bool:
    """PATH is a Redis URL (checked without importing redis)."""
    return path.startswith(("redis://", "rediss://"))


def _holds_store(path: str) -> bool:
    """True when ``path`` is an existing store; raises FormatError when it is something
    else that exists (a file, a directory of other things); False when it is missing,
    an empty directory, or one with ``.mpkv/`` but no metadata (yet: a store being
    created). Looks only: nothing is created."""
    if _is_redis(path):
        return True
    # The store's own check of what the path is; then: no metadata (yet) is no store.
    return check_store_dir(path) and os.path.isfile(os.path.join(path, AUX, META))


def _require_store(path: str) -> None:
    if not _holds_store(path):
        raise CommandError(f"{path}: no mpkv store here (only put, load and restore create one)")


def _open(args: argparse.Namespace, *, create: bool = False,
          **options: Any) -> Store | RedisStore:
    """The store PATH names: a directory, or a namespace on a Redis server. Unless
    ``create``, the store must exist already."""
    path = str(args.path)
    if not create:
        _require_store(path)
    if not _is_redis(path):
        return Store(path, **options)
    try:
        from .redis_store import RedisStore
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    return RedisStore(path, **options)


def _not_for_redis(args: argparse.Namespace, why: str) -> bool:
    """Maintenance of the files has no Redis counterpart: say so (the caller exits 1)."""
    if not _is_redis(str(args.path)):
        return False
    print(f"mpkv {args.command}: does not apply to redis ({why})", file=sys.stderr)
    return True


# --- commands --------------------------------------------------------------------------


def _print_value(value: Any) -> None:
    if isinstance(value, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
    elif isinstance(value, str):
        print(value)
    else:  # a JSON store's number, list, object, true/false/null
        print(json.dumps(value, ensure_ascii=False))


def cmd_get(args: argparse.Namespace) -> int:
    if _is_redis(str(args.path)):
        with _open(args, readonly=True) as store:
            value = store.get(args.key, MISSING)
    else:  # reads the one key from hint files, not the whole store
        _require_store(str(args.path))
        with KeyReader(str(args.path), args.key) as reader:
            value = reader.get(args.key, MISSING)
    if value is MISSING:
        print(f"mpkv get: key not found: {args.key!r}", file=sys.stderr)
        return 1
    _print_value(value)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    with _open(args, create=True, format=args.format, serializer=args.serializer) as store:
        store.put(args.key, args.value)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args) as store:
        existed = store.delete(args.key)
    if not existed:
        print(f"mpkv delete: key not found: {args.key!r} (a delete was logged anyway)",
              file=sys.stderr)
    return 0


# Characters a terminal may act on instead of showing: C0/C1 controls (escape
# sequences start with ESC or CSI), DEL, and the bidirectional overrides that reorder
# what is shown. Python's escapes make them visible.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_for_terminal(key: str) -> str:
    """``key`` with every character a terminal would act on shown as a Python escape."""
    if key.isprintable():
        return key
    out = []
    for ch in key:
        if unicodedata.category(ch) == "Cc" or ch in _BIDI:
            out.append(repr(ch)[1:-1] if ch not in "'\"" else ch)
        else:
            out.append(ch)
    return "".join(out)


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        keys = sorted(k for k in store if k.startswith(args.prefix))
    end = "\0" if args.null else "\n"
    show: Callable[[str], str] = (escape_for_terminal if sys.stdout.isatty() and not args.null
                                  else str)
    for key in keys:
        sys.stdout.write(show(key) + end)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        items = sorted(store.items())
    for key, value in _progress(items, len(items), "dump"):
        sys.stdout.write(_to_json(key, value) + "\n")
    return 0


def _stdin_lines() -> Iterator[tuple[int, bytes]]:
    """``(number, line)`` of stdin's non-blank lines, with a progress bar in bytes on a
    terminal (its total is the file's size when stdin is a regular file)."""
    stdin: IO[bytes] = sys.stdin.buffer
    tqdm = _tqdm()
    bar = None
    if tqdm is not None:
        try:
            st = os.fstat(stdin.fileno())
            total = st.st_size - stdin.tell() if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            total = None
        bar = tqdm(total=total, desc="load", unit="B", unit_scale=True, file=sys.stderr)
    try:
        for number, line in enumerate(stdin, start=1):
            if bar is not None:
                bar.update(len(line))
            if line.strip():
                yield number, line
    finally:
        if bar is not None:
            bar.close()


def _put_all(store: Store | RedisStore, items: list[tuple[int, str, Any]]) -> None:
    """Put ``items`` as one transaction; a value the store rejects names its line."""
    with store.transaction() as tx:
        for number, key, value in items:
            try:
                tx[key] = value
            except (TypeError, ValueError) as exc:
                raise BadLine(number, str(exc)) from None


def _load_chunks(lines: Iterable[tuple[int, bytes]], size: int | None
                 ) -> Iterator[tuple[list[tuple[int, str, Any]], BadLine | None]]:
    """Chunks of ``size`` parsed lines (one chunk when None); a chunk cut short by a bad
    line comes with that line's error, and is the last."""
    chunk: list[tuple[int, str, Any]] = []
    for number, line in lines:
        try:
            chunk.append((number, *_from_json(line, number)))
        except BadLine as bad:
            yield chunk, bad
            return
        if size is not None and len(chunk) >= size:
            yield chunk, None
            chunk = []
    if chunk:
        yield chunk, None


def cmd_load(args: argparse.Namespace) -> int:
    """Commit ``LOAD_CHUNK`` lines per transaction (or all in one with ``--atomic``).
    A bad line stops the load: the lines before it are committed (none with
    ``--atomic``) and the message says how far it got, so the rest can be resumed."""
    store: Store | RedisStore | None = None
    committed = 0  # lines committed so far (non-blank lines are records)
    last = 0  # number of the last committed line
    try:
        for chunk, bad in _load_chunks(_stdin_lines(), None if args.atomic else LOAD_CHUNK):
            if bad is not None and args.atomic:
                raise bad
            if store is None and chunk:  # opened once there is something to store
                store = _open(args, create=True, format=args.format,
                              serializer=args.serializer)
            if chunk:
                assert store is not None
                try:
                    _put_all(store, chunk)
                except BadLine as rejected:
                    if args.atomic:
                        raise
                    good = [item for item in chunk if item[0] < rejected.number]
                    if good:
                        _put_all(store, good)
                        committed, last = committed + len(good), good[-1][0]
                    raise
                committed, last = committed + len(chunk), chunk[-1][0]
            if bad is not None:
                raise bad
    except BadLine as bad:
        if args.atomic:
            raise CommandError(f"{bad}; nothing was loaded (--atomic)") from None
        done = (f"the {committed} records before it were committed (through line {last})"
                if committed else "nothing was committed")
        raise CommandError(f"{bad}; {done}; resume with `tail -n +{bad.number} FILE`"
                           ) from None
    finally:
        if store is not None:
            store.close()
    if store is None:  # empty input: still the (empty) store the user asked for
        _open(args, create=True, format=args.format, serializer=args.serializer).close()
    print(f"loaded {committed} records", file=sys.stderr)
    return 0


def _live_bytes(store: Store, live: list[tuple[str, Value]]) -> int:
    """Bytes the live data takes in the smallest of the encodings a log can hold it in:
    a record per put, one transaction, or compaction's packed records. Whichever way
    the log was written, it holds the live data in one of these (or a mix), so this is
    not more than its bytes, and it is about what a compaction leaves."""
    codec, limit = store._codec, store.max_segment_bytes
    single = sum(len(data) for item in live for data, _ in codec.encode([item], limit))
    one_unit = sum(len(data) for data, _ in codec.encode(list(live), limit))
    packed = sum(len(r.data) for r in codec.encode_state(live, limit))
    return min(single, one_unit, packed)


def cmd_stats(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "segments and records are files; see INFO and MEMORY USAGE "
                      "in redis-cli"):
        return 1
    _require_store(args.path)
    report = recovery.verify(args.path)
    with Store(args.path, readonly=True) as store:
        live = sorted(store._copy().items())  # encoded values, as the log holds them
        live_bytes = _live_bytes(store, live)
        print(f"path: {store.path}")
        print(f"format: {store.format}")
        print(f"serializer: {store.serializer}")
        print(f"max_segment_bytes: {store.max_segment_bytes}")
        print(f"segments: {report.segments}")
        print(f"records: {report.records}")
        print(f"live keys: {len(live)}")
        print(f"bytes: {report.bytes}")
        note = ("" if live_bytes <= report.bytes else
                " (more than bytes: the log holds these records in a tighter encoding "
                "than any one this count uses)")
        print(f"live bytes: {live_bytes}{note}")
        garbage = 1 - live_bytes / report.bytes if report.bytes else 0.0
        print(f"garbage ratio: {max(garbage, 0.0):.3f}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "the server checks its own files: redis-check-aof"):
        return 1
    _require_store(args.path)
    report = recovery.verify(args.path, progress=_segments_bar)
    print(report.summary())
    print("OK" if report.ok else "DAMAGED: run `mpkv repair PATH`")
    return 0 if report.ok else 1


def cmd_repair(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "the server repairs its own files: redis-check-aof --fix"):
        return 1
    _require_store(args.path)
    report = recovery.repair(args.path, progress=_segments_bar)
    print(report.summary())
    print("nothing to repair" if not report.damage else
          f"repaired: {len(report.damage)} damaged ranges moved to {len(report.quarantined)} "
          "quarantine files")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "the server reclaims memory itself and rewrites its AOF "
                      "with BGREWRITEAOF"):
        return 1
    _require_store(args.path)
    with Store(args.path) as store:
        result = store.compact(progress=_segments_bar)
    print(f"compacted {result['segments_before']} segments ({result['bytes_before']} bytes) "
          f"into {result['segments_after']} ({result['bytes_after']} bytes)")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        store.serialize(args.file)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if not _holds_store(str(args.path)):
        # Read first: a bad file must not leave a new empty store behind; and the new
        # store gets the serializer that encoded the snapshot's values.
        options["serializer"] = snapshot.read(args.file).serializer
    with _open(args, create=True, **options) as store:
        store.deserialize(args.file)
    return 0


def _change_json(change: Change) -> str:
    """A change as one JSON line: {"key", "value", "deleted", "position"}; bytes values
    base64 with "bytes": true, as ``dump`` writes them."""
    obj: dict[str, Any] = {"key": change.key, "value": change.value}
    if isinstance(change.value, bytes):
        obj["value"] = base64.b64encode(change.value).decode()
        obj["bytes"] = True
    obj["deleted"] = change.deleted
    obj["position"] = change.position
    return json.dumps(obj, ensure_ascii=False)


def _store_ready(path: str) -> bool:
    """``_holds_store``, but a store being created (a directory holding ``.mpkv/``, its
    metadata not written yet) is not ready rather than "not a store"."""
    try:
        return _holds_store(path)
    except FormatError:
        if os.path.isdir(os.path.join(path, AUX)) and not os.path.islink(path):
            return False
        raise


def _wait_for_store(path: str, timeout: float | None) -> bool:
    """Like ``tail -F``: wait until ``path`` holds a store (its metadata written), never
    creating anything. False when ``timeout`` seconds passed first; FormatError at once
    when ``path`` is something that can never become a store."""
    started = time.monotonic()
    while True:
        if _store_ready(path):
            return True
        if timeout is not None and time.monotonic() - started >= timeout:
            return False
        time.sleep(0.05)


def cmd_watch(args: argparse.Namespace) -> int:
    since = args.since
    if not _store_ready(str(args.path)):
        # Said once, like tail -F, so that whoever waits on us knows we are waiting.
        print(f"mpkv watch: waiting for {args.path} to become a store", file=sys.stderr,
              flush=True)
        if not _wait_for_store(str(args.path), args.timeout):
            return 0
        if since is None:  # the store is new: every change from its first
            since = BEFORE_ALL
    with _open(args, readonly=True) as store:
        for change in store.watch(args.prefix, since=since, timeout=args.timeout):
            sys.stdout.write(_change_json(change) + "\n")
            sys.stdout.flush()
    return 0


def _seconds(text: str) -> float:
    try:
        return check_timeout(float(text)) or 0.0
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}") from None


def _position(text: str) -> str:
    try:
        parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return 0 if demo.run(args.dir) else 1


# --- the parser --------------------------------------------------------------------------


def _new_store_options(c: argparse.ArgumentParser) -> None:
    """Options a store is created with (an existing store keeps its own; a conflicting
    value is an error)."""
    c.add_argument("--format", choices=["binary", "text"], help="format of a new store")
    c.add_argument("--serializer", choices=["raw", "json"],
                   help="values of a new store: raw (text and bytes, the default) or json "
                   "(any JSON value; put stores VALUE as a JSON string)")


PATH_HELP = "the store directory (or a redis://host:port/db?namespace=NAME URL)"
NEW_PATH_HELP = PATH_HELP + "; created when missing"


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mpkv", description="A key-value store many processes share through one "
        "directory. The store directory comes first; only put, load and restore create "
        "one. A redis://host:port/db?namespace=NAME URL in its place uses a Redis server.",
        epilog="example:\n  mpkv put /tmp/s greeting hello && mpkv get /tmp/s greeting\n"
        "  mpkv demo                 # worker processes share a store; result checked")
    p.add_argument("-V", "--version", action="version", version=f"mpkv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)

    def add(name: str, help: str, func: Any, example: str,
            *positionals: tuple[str, str]) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help,
                           epilog=f"example:\n  {example}")
        c.set_defaults(func=func)
        for arg, arg_help in positionals:
            c.add_argument(arg, metavar=arg.upper(), help=arg_help)
        return c

    path, new_path = ("path", PATH_HELP), ("path", NEW_PATH_HELP)
    key = ("key", "the key (any text)")
    add("get", "print the value of KEY (exit 1 when missing)", cmd_get,
        "mpkv get /tmp/s greeting", path, key)
    c = add("put", "set KEY to VALUE (creates the store when missing)", cmd_put,
            "mpkv put /tmp/s greeting hello", new_path, key, ("value", "the value (text)"))
    _new_store_options(c)
    add("delete", "delete KEY (logged even when missing)", cmd_delete,
        "mpkv delete /tmp/s greeting", path, key)
    c = add("list", "print the keys, sorted, one a line (on a terminal, control "
            "characters are shown escaped; in a pipe keys are written as they are)",
            cmd_list, "mpkv list /tmp/s --prefix user:", path)
    c.add_argument("--prefix", default="", help="only keys starting with P")
    c.add_argument("-0", "--null", action="store_true",
                   help="end each key with a NUL byte instead of a newline, for keys "
                   "that contain newlines (like find -print0; never escaped)")
    add("dump", 'print {"key", "value"} JSON lines (bytes values: base64, "bytes": true)',
        cmd_dump, "mpkv dump /tmp/s > backup.jsonl", path)
    c = add("load", f"read dump's JSON lines from stdin, {LOAD_CHUNK} per transaction; a "
            "bad line stops the load after committing the lines before it",
            cmd_load, "mpkv load /tmp/copy < backup.jsonl", new_path)
    _new_store_options(c)
    c.add_argument("--atomic", action="store_true",
                   help="load everything as one transaction: all lines or none")
    add("stats", "segments, records, live keys, bytes, garbage ratio", cmd_stats,
        "mpkv stats /tmp/s", path)
    add("verify", "check every record (exit 1 on damage)", cmd_verify,
        "mpkv verify /tmp/s || mpkv repair /tmp/s", path)
    add("repair", "salvage valid records, move damaged bytes to .mpkv/quarantine/",
        cmd_repair, "mpkv repair /tmp/s", path)
    add("compact", "rewrite sealed segments keeping only live data", cmd_compact,
        "mpkv compact /tmp/s", path)
    add("backup", "write the whole state to FILE (atomically)", cmd_backup,
        "mpkv backup /tmp/s /backups/s.snap", path,
        ("file", "the snapshot file to write (replaced atomically)"))
    add("restore", "replace the whole state with FILE's (atomically)", cmd_restore,
        "mpkv restore /tmp/s /backups/s.snap", new_path,
        ("file", "a snapshot file written by backup"))
    c = add("watch", 'print changes as {"key", "value", "deleted", "position"} JSON lines '
            "as they happen, like tail -F (waits for PATH to become a store, never creating "
            "it, then prints every change from its first); on an existing store, the changes "
            "made after it starts (--since POS replays from a position)", cmd_watch,
            "mpkv watch /tmp/s --prefix job: --timeout 60", path)
    c.add_argument("--prefix", default="", help="only keys starting with P")
    c.add_argument("--since", type=_position, default=None, metavar="POS",
                   help="start after the change at position POS (a printed position)")
    c.add_argument("--timeout", type=_seconds, default=None, metavar="T",
                   help="stop after T idle seconds")
    c = add("demo", "worker processes count words into a store they share; result checked",
            cmd_demo, "mpkv demo /tmp/demo && mpkv stats /tmp/demo/run-1")
    c.add_argument("dir", nargs="?", default=None, metavar="DIR",
                   help="an empty or missing directory to work in; each run creates a "
                   "new store in DIR/run-N (default: a new temporary directory)")
    # Listed for --help; main() hands their arguments to them directly.
    sub.add_parser("bench", help="benchmarks against peers (see `mpkv bench --help`)")
    sub.add_parser("stress", help="stress test with a history checker (`mpkv stress --help`)")
    return p


def _fail(command: str, message: str) -> None:
    print(f"mpkv {command}: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    try:
        if command in ("bench", "stress"):  # their options are their own
            from . import bench, stress

            code: int = (bench if command == "bench" else stress).main(argv[1:])
            return code
        args = parser().parse_args(argv)
        command = args.command
        result: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return result
    except KeyboardInterrupt:
        _fail(command, "interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`mpkv dump S | head`): not an error of ours. Point
        # stdout at /dev/null so flushing it at exit cannot complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if _interrupted(exc):  # Ctrl-C, then a failure while cleaning up after it
            _fail(command, "interrupted")
            return 130
        if isinstance(exc, (Error, ValueError, TypeError, OSError)):
            _fail(command, str(exc) or type(exc).__name__)
        else:  # a bug of ours: still one line, naming what went wrong
            _fail(command, f"unexpected {type(exc).__name__}: {exc}")
        return 1


def _interrupted(exc: BaseException) -> bool:
    """True when a KeyboardInterrupt is among the exceptions ``exc`` was raised during."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
