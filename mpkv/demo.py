"""``mpkv demo``: worker processes share one store to count the words of real text.

The text is the documentation Python carries with it: the Zen of Python and the
docstrings of a few standard-library modules. Each worker counts a slice of the
documents and adds its counts with one transaction per document; the parent follows
progress live with ``watch`` and finally checks the store against a single-process
count.

Every run creates a fresh store of its own (``DIR/run-N``, the next free N), so the
demo never writes into a store it did not create and can be run again on the same
``DIR``; the store stays there to be looked at with ``mpkv stats`` / ``mpkv dump``.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import importlib
import inspect
import io
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from typing import TextIO

from .errors import Error
from .segments import AUX
from .store import Store

WORKERS = 4
MAX_DOCS = 400
MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "itertools",
           "json", "os", "pathlib", "re", "shutil", "string", "subprocess", "tempfile",
           "textwrap", "threading", "typing", "unittest", "zipfile", "zlib")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


class DemoError(Error):
    """The demo cannot run where it was asked to."""


def zen() -> str:
    """The Zen of Python, without the side effect of ``import this`` (it prints)."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def corpus() -> list[list[str]]:
    """Documents as lists of lowercase words: the Zen of Python, then the docstrings of
    ``MODULES`` and their public functions and classes (none under ``python -OO``,
    which strips docstrings: the Zen is still there)."""
    texts: list[object] = [zen()]
    for name in MODULES:
        module = importlib.import_module(name)
        texts.append(module.__doc__)
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                texts.append(obj.__doc__)
    docs = [WORD.findall(text.lower()) for text in texts if isinstance(text, str)]
    return [doc for doc in docs if doc][:MAX_DOCS]


def _worker(path: str, worker: int, docs: list[tuple[int, list[str]]]) -> None:
    with Store(path) as store:
        for number, words in docs:
            counts = collections.Counter(words)
            with store.transaction() as tx:
                for word, n in counts.items():
                    tx[f"count:{word}"] = str(int(tx.get(f"count:{word}", "0")) + n)
                tx[f"done:{number:04d}"] = str(worker)


def fresh_store_dir(base: str) -> str:
    """A new, empty directory ``base/run-N`` for this run's store, made by us alone
    (``mkdir`` fails if another run took the name first)."""
    if os.path.lexists(base) and not os.path.isdir(base):
        raise DemoError(f"{base}: not a directory")
    if os.path.isdir(os.path.join(base, AUX)):
        raise DemoError(f"{base}: an mpkv store; the demo makes its own stores, give it "
                        "another directory")
    os.makedirs(base, exist_ok=True)
    n = 1
    while True:
        path = os.path.join(base, f"run-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def run(base: str | None = None, out: TextIO = sys.stdout) -> bool:
    """Run the demo in a fresh store under ``base`` (a new temporary directory when
    None); True when the result is verified."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    base = base if base is not None else tempfile.mkdtemp(prefix="mpkv-demo-")
    docs = corpus()
    path = os.path.abspath(fresh_store_dir(base))
    total_words = sum(map(len, docs))
    with Store(path) as store:
        say(f"mpkv demo: {WORKERS} processes count the {total_words} words of {len(docs)} "
            f"documents (the Zen of Python and standard-library docstrings)\n"
            f"  into the store {path}")
        progress = store.watch("done:", timeout=60)
        ctx = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        workers = [ctx.Process(target=_worker, args=(path, w, [
            (i, docs[i]) for i in range(w, len(docs), WORKERS)])) for w in range(WORKERS)]
        # Ctrl-C reaches the whole process group: the workers ignore it (inherited
        # through exec) and the parent, which reports it, stops them.
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for p in workers:
                p.start()
        finally:
            signal.signal(signal.SIGINT, sigint)
        marks = {len(docs) * quarter // 4 for quarter in (1, 2, 3, 4)}
        done = 0
        try:
            for done, _change in enumerate(progress, start=1):
                if done in marks:
                    say(f"  {done}/{len(docs)} documents counted (seen live through watch)")
                if done == len(docs):
                    break
            for p in workers:
                p.join()
        finally:
            for p in workers:
                if p.is_alive():
                    p.terminate()
        elapsed = time.perf_counter() - started
        expected = collections.Counter(w for doc in docs for w in doc)
        got = {k[len("count:"):]: int(v) for k, v in store.items() if k.startswith("count:")}
    ok = got == dict(expected) and done == len(docs) and all(p.exitcode == 0 for p in workers)
    top = sorted(got.items(), key=lambda kv: (-kv[1], kv[0]))
    longer = [(w, n) for w, n in top if len(w) >= 8][:4]
    say(f"  top words: {', '.join(f'{w}={n}' for w, n in top[:6])}; "
        f"longer ones: {', '.join(f'{w}={n}' for w, n in longer)}")
    say(f"  {len(docs)} transactions by {WORKERS} processes in {elapsed:.2f} s, starting "
        "the processes included")
    say("  result " + ("VERIFIED: equal to a single-process count" if ok
                       else "WRONG: differs from a single-process count"))
    say(f"  look at it: mpkv stats {path}   mpkv dump {path} | head")
    return ok
