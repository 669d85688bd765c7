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


# --- shell transcripts: every command's output follows from the commands before it ---------

TRANSCRIPT = "<!-- transcript -->"


def transcripts(text: str) -> list[tuple[int, list[tuple[str, list[str]]]]]:
    """``(line number, [(command, expected output lines)])`` of every console block
    marked by a ``<!-- transcript -->`` line just before it."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() != TRANSCRIPT:
            continue
        j = i + 1
        while not lines[j].strip():
            j += 1
        assert lines[j].startswith("```"), f"line {j + 1}: {TRANSCRIPT} must precede a block"
        steps: list[tuple[str, list[str]]] = []
        j += 1
        while not lines[j].startswith("```"):
            if lines[j].startswith("$ "):
                steps.append((lines[j][2:], []))
            else:
                assert steps, f"line {j + 1}: output before any command"
                steps[-1][1].append(lines[j])
            j += 1
        out.append((i + 2, steps))
    return out


def matches(expected: str, got: str) -> bool:
    """``...`` in an expected line stands for any text."""
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got) is not None


DOCS_WITH_TRANSCRIPTS = [doc for doc in documents() if TRANSCRIPT in doc.read_text("utf-8")]


@pytest.mark.parametrize("doc", DOCS_WITH_TRANSCRIPTS, ids=lambda d: d.relative_to(REPO).as_posix())
def test_shell_transcripts_run_as_shown(doc: Path, tmp_path: Path) -> None:
    """The document's transcripts run one after the other in a scratch directory (its
    ``/tmp/`` paths moved there) and print what the document shows."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHON": sys.executable}
    prelude = 'mpkv() { "$PYTHON" -m mpkv "$@"; }\n'
    for line, steps in transcripts(doc.read_text(encoding="utf-8")):
        for command, expected in steps:
            command = command.replace("/tmp/", f"{tmp_path}/")
            expected = [e.replace("/tmp/", f"{tmp_path}/") for e in expected]
            r = subprocess.run(["bash", "-c", prelude + command], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, timeout=120)
            got = r.stdout.splitlines()
            assert len(got) == len(expected) and all(
                matches(e, g) for e, g in zip(expected, got, strict=True)), (
                f"{doc.name}, transcript at line {line}: `{command}`\n"
                f"expected: {expected}\ngot:      {got}")


def test_transcript_parsing() -> None:
    text = "\n".join(["x", TRANSCRIPT, "", "```console", "$ echo hi", "hi", "$ true", "```"])
    assert transcripts(text) == [(3, [("echo hi", ["hi"]), ("true", [])])]
    assert matches("bytes: ...", "bytes: 120") and not matches("bytes: ...", "live: 1")


# --- the README's two setup commands -------------------------------------------------------


def readme_commands() -> list[str]:
    """The one-line commands of the README's quick start, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```\n(.+)\n```$", section, flags=re.M)


def test_readme_sets_up_with_two_commands_and_ci_runs_the_same_tests() -> None:
    demo, suite = readme_commands()
    assert "pip install" in demo and demo.endswith("mpkv demo")
    assert "pip install" in suite and "pytest" in suite
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == suite, "the README's test command must be exactly what .ci/run runs"


def test_docs_do_not_promise_an_unpublished_package() -> None:
    """mpkv is not on PyPI: install commands name the checkout ('.'), never 'mpkv'."""
    offenders = [f"{doc.name}: {line.strip()}" for doc in documents()
                 for line in doc.read_text(encoding="utf-8").splitlines()
                 if re.search(r"pip install [^.\n]*\bmpkv\b", line)]
    assert not offenders, offenders
