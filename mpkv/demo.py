"""``mpkv demo``: worker processes share one store to count the words of a corpus.

Each worker counts a slice of the documents and adds its counts with one transaction
per document; the parent follows progress live with ``watch`` and finally checks the
store against a single-process count.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import sys
import tempfile
import time

from .store import Store

WORKERS = 4
DOCS = 200
WORDS_PER_DOC = 300


def corpus(seed: int = 7) -> list[list[str]]:
    rng = random.Random(seed)
    vocabulary = [f"w{rng.randrange(10**6):06d}" for _ in range(500)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf-like
    return [rng.choices(vocabulary, weights, k=WORDS_PER_DOC) for _ in range(DOCS)]


def _worker(path: str, worker: int) -> None:
    docs = corpus()
    with Store(path) as store:
        for number in range(worker, len(docs), WORKERS):
            counts = collections.Counter(docs[number])
            with store.transaction() as tx:
                for word, n in counts.items():
                    tx[f"count:{word}"] = str(int(tx.get(f"count:{word}", "0")) + n)
                tx[f"done:{number:04d}"] = str(worker)


def run(path: str | None = None, out: object = sys.stdout) -> bool:
    """Run the demo in ``path`` (a temporary directory when None); True when verified."""
    def say(line: str) -> None:
        print(line, file=out, flush=True)  # type: ignore[call-overload]

    with tempfile.TemporaryDirectory(prefix="mpkv-demo-") as tmp:
        path = path or os.path.join(tmp, "store")
        store = Store(path)
        say(f"mpkv demo: {WORKERS} processes count the words of {DOCS} documents "
            f"in the store {path}")
        progress = store.watch("done:", timeout=30)
        ctx = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        workers = [ctx.Process(target=_worker, args=(path, w)) for w in range(WORKERS)]
        for p in workers:
            p.start()
        for done, _change in enumerate(progress, start=1):
            if done % 50 == 0 or done == DOCS:
                say(f"  {done}/{DOCS} documents counted (seen live through watch)")
            if done == DOCS:
                break
        for p in workers:
            p.join()
        elapsed = time.perf_counter() - started
        expected = collections.Counter(w for doc in corpus() for w in doc)
        got = {k[len("count:"):]: int(v) for k, v in store.items() if k.startswith("count:")}
        ok = got == dict(expected) and all(p.exitcode == 0 for p in workers)
        top = sorted(got.items(), key=lambda kv: -kv[1])[:5]
        say(f"  top words: {', '.join(f'{w}={n}' for w, n in top)}")
        say(f"  {DOCS} transactions ({DOCS * WORDS_PER_DOC} words) in {elapsed:.2f} s "
            f"= {DOCS / elapsed:,.0f} transactions/s across {WORKERS} processes")
        say("  result " + ("VERIFIED: equal to a single-process count" if ok
                           else "WRONG: differs from a single-process count"))
        store.close()
        return ok
