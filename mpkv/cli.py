"""The ``mpkv`` command: every operation of the store from a shell.

Exit status: 0 success, 1 when ``get`` finds no key, ``verify`` finds damage or an
operation fails, 2 on usage errors. Failures print one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import recovery
from .codec import Value
from .errors import Error
from .segments import AUX, META, check_store_dir, read_meta
from .store import Store
from .watch import BEFORE_ALL, Change, check_timeout, parse_position

if TYPE_CHECKING:
    from .redis_store import RedisStore

T = TypeVar("T")
LOAD_CHUNK = 1000  # JSON lines per transaction in ``load``


def _progress(items: Iterable[T], total: int | None, what: str) -> Iterable[T]:
    """A progress bar on a terminal, nothing in a pipe."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm  # only needed on a terminal

    bar: Iterable[T] = tqdm(items, total=total, desc=what, file=sys.stderr)
    return bar


def _to_json(key: str, value: Value | None) -> str:
    if isinstance(value, bytes):
        return json.dumps({"key": key, "value": base64.b64encode(value).decode(), "bytes": True},
                          ensure_ascii=False)
    return json.dumps({"key": key, "value": value}, ensure_ascii=False)


def _from_json(line: str, number: int) -> tuple[str, Value]:
    try:
        obj = json.loads(line)
        key, value = obj["key"], obj["value"]
        if obj.get("bytes"):
            value = base64.b64decode(value, validate=True)
        if not isinstance(key, str) or not isinstance(value, (str, bytes)):
            raise ValueError("key must be a string and value a string")
        return key, value
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"stdin line {number}: not a {{\"key\", \"value\"}} JSON line: {exc}"
                         ) from None


def _is_redis(args: argparse.Namespace) -> bool:
    """PATH is a Redis URL (checked without importing redis)."""
    return str(args.path).startswith(("redis://", "rediss://"))


def _open(args: argparse.Namespace, **options: Any) -> Store | RedisStore:
    """The store PATH names: a directory, or a namespace on a Redis server."""
    if not _is_redis(args):
        return Store(args.path, **options)
    try:
        from .redis_store import RedisStore
    except ImportError as exc:
        raise Error(str(exc)) from None
    return RedisStore(args.path, **options)


def _not_for_redis(args: argparse.Namespace, why: str) -> bool:
    """Maintenance of the files has no Redis counterpart: say so (the caller exits 1)."""
    if not _is_redis(args):
        return False
    print(f"mpkv {args.command}: does not apply to redis ({why})", file=sys.stderr)
    return True


def cmd_get(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        value = store.get(args.key)
    if value is None:
        print(f"mpkv: key not found: {args.key!r}", file=sys.stderr)
        return 1
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value)
    else:
        print(value)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    with _open(args, format=args.format) as store:
        store.put(args.key, args.value)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args) as store:
        existed = store.delete(args.key)
    if not existed:
        print(f"mpkv: key not found: {args.key!r} (a delete was logged anyway)", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        for key in sorted(store):
            if key.startswith(args.prefix):
                print(key)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        items = sorted(store.items())
    for key, value in _progress(items, len(items), "dump"):
        sys.stdout.write(_to_json(key, value) + "\n")
    return 0


def _chunks(lines: Iterable[str]) -> Iterator[list[tuple[str, Value]]]:
    chunk: list[tuple[str, Value]] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            chunk.append(_from_json(line, number))
        if len(chunk) >= LOAD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cmd_load(args: argparse.Namespace) -> int:
    loaded = 0
    with _open(args, format=args.format) as store:
        for chunk in _chunks(_progress(sys.stdin, None, "load")):
            with store.transaction() as tx:
                for key, value in chunk:
                    tx[key] = value
            loaded += len(chunk)
    print(f"loaded {loaded} records", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "segments and records are files; see INFO and MEMORY USAGE "
                      "in redis-cli"):
        return 1
    report = recovery.verify(args.path)
    with Store(args.path, readonly=True) as store:
        live = store.items()
        limit = store.max_segment_bytes
        live_bytes = sum(len(r) for k, v in live for r, _ in store._codec.encode([(k, v)], limit))
        print(f"path: {store.path}")
        print(f"format: {store.format}")
        print(f"max_segment_bytes: {store.max_segment_bytes}")
        print(f"segments: {report.segments}")
        print(f"records: {report.records}")
        print(f"live keys: {len(live)}")
        print(f"bytes: {report.bytes}")
        print(f"live bytes: {live_bytes}")
        garbage = 1 - live_bytes / report.bytes if report.bytes else 0.0
        print(f"garbage ratio: {max(garbage, 0.0):.3f}")
    return 0


def _segments_bar(names: list[str]) -> Iterable[str]:
    return _progress(names, len(names), "segments")


def cmd_verify(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "the server checks its own files: redis-check-aof"):
        return 1
    report = recovery.verify(args.path, progress=_segments_bar)
    print(report.summary())
    print("OK" if report.ok else "DAMAGED: run `mpkv repair PATH`")
    return 0 if report.ok else 1


def cmd_repair(args: argparse.Namespace) -> int:
    if _not_for_redis(args, "the server repairs its own files: redis-check-aof --fix"):
        return 1
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
    with _open(args) as store:
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


def _wait_for_store(path: str, timeout: float | None) -> bool:
    """Like ``tail -F``: wait until ``path`` holds a store (its metadata written), never
    creating anything. False when ``timeout`` seconds passed first; FormatError at once
    when ``path`` is something that can never become a store."""
    started = time.monotonic()
    while True:
        if check_store_dir(path) and read_meta(path) is not None:
            return True
        if timeout is not None and time.monotonic() - started >= timeout:
            return False
        time.sleep(0.05)


def cmd_watch(args: argparse.Namespace) -> int:
    since = args.since
    if not _is_redis(args) and not os.path.isfile(os.path.join(args.path, AUX, META)):
        if not _wait_for_store(args.path, args.timeout):
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), as for every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mpkv", description="A key-value store many processes share through one "
        "directory. The store directory comes first; it is created by writes when missing. "
        "A redis://host:port/db?namespace=NAME URL in its place uses a Redis server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def add(name: str, help: str, func: Any, *args: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        for a in args:
            c.add_argument(a)
        return c

    add("get", "print the value of KEY (exit 1 when missing)", cmd_get, "path", "key")
    c = add("put", "set KEY to VALUE", cmd_put, "path", "key", "value")
    c.add_argument("--format", choices=["binary", "text"], help="format of a new store")
    add("delete", "delete KEY (logged even when missing)", cmd_delete, "path", "key")
    c = add("list", "print the keys, one a line, sorted", cmd_list, "path")
    c.add_argument("--prefix", default="", help="only keys starting with P")
    add("dump", 'print {"key", "value"} JSON lines (bytes values: base64, "bytes": true)',
        cmd_dump, "path")
    c = add("load", f"read dump's JSON lines from stdin, {LOAD_CHUNK} per transaction",
            cmd_load, "path")
    c.add_argument("--format", choices=["binary", "text"], help="format of a new store")
    add("stats", "segments, records, live keys, bytes, garbage ratio", cmd_stats, "path")
    add("verify", "check every record (exit 1 on damage)", cmd_verify, "path")
    add("repair", "salvage valid records, move damaged bytes to .mpkv/quarantine/",
        cmd_repair, "path")
    add("compact", "rewrite sealed segments keeping only live data", cmd_compact, "path")
    add("backup", "write the whole state to FILE (atomically)", cmd_backup, "path", "file")
    add("restore", "replace the whole state with FILE's (atomically)", cmd_restore,
        "path", "file")
    c = add("watch", 'print changes as {"key", "value", "deleted", "position"} JSON lines '
            "as they happen, like tail -F (waits for PATH to become a store, then prints "
            "every change from its first)", cmd_watch, "path")
    c.add_argument("--prefix", default="", help="only keys starting with P")
    c.add_argument("--since", type=_position, default=None, metavar="POS",
                   help="start after the change at position POS (a printed position)")
    c.add_argument("--timeout", type=_seconds, default=None, metavar="T",
                   help="stop after T idle seconds")
    c = add("demo", "worker processes share a store on a real job; result verified",
            cmd_demo)
    c.add_argument("dir", nargs="?", default=None, help="store directory (default: a temp dir)")
    # Listed for --help; main() hands their arguments to them directly.
    sub.add_parser("bench", help="benchmarks against peers (see `mpkv bench --help`)")
    sub.add_parser("stress", help="stress test with a history checker (`mpkv stress --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["stress"]):  # their options are their own
        from . import bench, stress

        code: int = (bench if argv[0] == "bench" else stress).main(argv[1:])
        return code
    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Error, ValueError, TypeError, OSError) as exc:
        print(f"mpkv {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
