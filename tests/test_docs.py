"""Every ```python block of README.md and docs/*.md runs on its own and exits 0.

Each block is written to a file in a fresh temporary directory and run there as a
script (so ``multiprocessing`` examples with an ``if __name__ == "__main__":`` guard
work under any start method). New documents are picked up automatically.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block whose language is python."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        lang = (m["info"].strip().split() or [""])[0].lower().strip("{}.")
        start = i + 1
        j = start
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and set(close) <= {fence[0]}:
                break
            j += 1
        if lang in ("python", "py", "python3"):
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:j]]
            blocks.append((start + 1, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def documents() -> list[Path]:
    docs = sorted((REPO / "docs").glob("**/*.md")) if (REPO / "docs").is_dir() else []
    readme = [REPO / "README.md"] if (REPO / "README.md").is_file() else []
    return readme + docs


def cases() -> list:
    out = []
    for doc in documents():
        rel = doc.relative_to(REPO).as_posix()
        for line, code in python_blocks(doc.read_text(encoding="utf-8")):
            out.append(pytest.param(rel, line, code, id=f"{rel}:{line}"))
    return out


CASES = cases()


@pytest.mark.parametrize(("doc", "line", "code"), CASES)
def test_python_block_runs(doc: str, line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{doc}, the python block at line {line} did not finish in 120 s")
    assert r.returncode == 0, (
        f"{doc}, the python block at line {line} exited {r.returncode}\n"
        f"--- code ---\n{code}--- stdout ---\n{r.stdout}--- stderr ---\n{r.stderr}")


def test_the_guide_has_runnable_examples() -> None:
    assert any(doc == "docs/guide.md" for doc, *_ in (c.values for c in CASES)), \
        "docs/guide.md has no ```python blocks"


def test_block_extraction() -> None:
    text = "\n".join([
        "# t", "```python", "a = 1", "```", "```console", "$ mpkv list s", "```",
        "  ```py", "  b = 2", "  ```", "````python", "```nested", "````", "```", "no lang",
        "```",
    ])
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = 2\n"), (12, "```nested\n")]
