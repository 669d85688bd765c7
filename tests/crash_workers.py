"""Child processes and the shared op generator for tests/test_crash.py.

Run as a script: ``python crash_workers.py MODE JSON_ARGS``. The parent kills the child
with SIGKILL, so everything a child wants the parent to know is written to a log file
with one ``os.write`` per line *after* the operation it describes has returned. The
ops come from :func:`gen_ops`, seeded, so the parent regenerates exactly the same
sequence and knows which op was in flight when the child died.

MODE ``writer``: apply ops forever, logging ``"<i> <tag>"`` after op i returned.
MODE ``deserialize``: replace the whole store with ``files[1]``, ``files[0]``,
``files[1]``... (one ``deserialize`` each), logging ``"<i>"`` after each returned.
MODE ``faultload``: apply ops forever, logging ``{"i":..., "sizes": {segment: size}}``
after op i returned (the file sizes at ack time), and ``done`` once ``nops`` ops were
acknowledged (it keeps writing until killed, so the final files may hold a torn tail).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from collections.abc import Iterator
from typing import Any, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

Value = Union[str, bytes]
# ("put", key, value) | ("delete", key) | ("tx", [(key, value-or-None), ...])
Op = tuple[Any, ...]

_KEY_STEMS = ["k", "ключ", "🔑", "", "key with space "]
_STR_ALPHABET = "abcxyz|é€😀 -_"
_BYTE_ALPHABET = b"ab\n\x00|\xff\xfe"


def _key(rng: random.Random, prefix: str, nkeys: int) -> str:
    if rng.random() < 0.03:
        return prefix  # "" when there is no prefix: the empty key is a valid key
    return prefix + rng.choice(_KEY_STEMS) + str(rng.randrange(nkeys))


def _value(rng: random.Random, fmt: str, maxlen: int = 12) -> Value:
    n = rng.randrange(0, maxlen + 1)
    if fmt == "binary" and rng.random() < 0.3:
        return bytes(rng.choice(_BYTE_ALPHABET) for _ in range(n))
    return "".join(rng.choice(_STR_ALPHABET) for _ in range(n))


def gen_ops(seed: int, fmt: str, *, prefix: str = "", allow_tx: bool | str = True,
            nkeys: int = 12) -> Iterator[Op]:
    """An endless, deterministic sequence of ops. Records stay below 400 bytes (binary)
    and 40 characters (text), so any max_segment_bytes >= 400 fits every record --
    except with ``allow_tx="big"``: then about 1 op in 20 is a transaction of 10-40
    writes (up to ~4 KB), larger than a small segment, which the store must split into
    chained records and still apply all-or-nothing."""
    rng = random.Random(seed)
    while True:
        r = rng.random()
        if allow_tx == "big" and r < 0.05:
            sub = []
            for _ in range(rng.randrange(10, 41)):
                k = _key(rng, prefix, nkeys * 3)
                sub.append((k, None if rng.random() < 0.2 else _value(rng, fmt, 40)))
            yield ("tx", sub)
        elif allow_tx and r < 0.2:
            sub = []
            for _ in range(rng.randrange(1, 5)):
                k = _key(rng, prefix, nkeys)
                sub.append((k, None if rng.random() < 0.3 else _value(rng, fmt)))
            yield ("tx", sub)
        elif r < 0.45:
            yield ("delete", _key(rng, prefix, nkeys))
        else:
            yield ("put", _key(rng, prefix, nkeys), _value(rng, fmt))


def take(seed: int, fmt: str, n: int, **kw: Any) -> list[Op]:
    it = gen_ops(seed, fmt, **kw)
    return [next(it) for _ in range(n)]


def tag(op: Op) -> str:
    """A short fingerprint of an op, logged by the child and checked by the parent."""
    import zlib

    return f"{op[0]}:{zlib.crc32(repr(op).encode('utf-8')):08x}"


def apply_model(state: dict[str, Value], op: Op) -> None:
    if op[0] == "put":
        state[op[1]] = op[2]
    elif op[0] == "delete":
        state.pop(op[1], None)
    else:
        for k, v in op[1]:
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v


def apply_store(store: Any, op: Op) -> None:
    if op[0] == "put":
        store.put(op[1], op[2])
    elif op[0] == "delete":
        store.delete(op[1])
    else:
        with store.transaction() as tx:
            for k, v in op[1]:
                if v is None:
                    tx.delete(k)
                else:
                    tx.put(k, v)


def _segment_sizes(path: str) -> dict[str, int]:
    from mpkv.segments import list_segments

    return {n: os.path.getsize(os.path.join(path, n)) for n in list_segments(path)}


def main(argv: list[str]) -> None:
    import mpkv

    mode, args = argv[1], json.loads(argv[2])
    store = mpkv.Store(args["path"], format=args["format"], fsync=args["fsync"],
                       max_segment_bytes=args["max_segment_bytes"])
    log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log, b"ready\n")
    ops = gen_ops(args["seed"], args["format"], prefix=args.get("prefix", ""),
                  allow_tx=args.get("allow_tx", True))
    if mode == "writer":
        for i, op in enumerate(ops):
            apply_store(store, op)
            os.write(log, f"{i} {tag(op)}\n".encode())
    elif mode == "faultload":
        nops = args["nops"]
        for i, op in enumerate(ops):
            apply_store(store, op)
            line = json.dumps({"i": i, "tag": tag(op), "sizes": _segment_sizes(args["path"])})
            os.write(log, (line + "\n").encode())
            if i + 1 == nops:
                os.write(log, b"done\n")
    elif mode == "deserialize":
        files = args["files"]
        for i in itertools.count():
            store.deserialize(files[(i + 1) % len(files)])
            os.write(log, f"{i}\n".encode())
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
