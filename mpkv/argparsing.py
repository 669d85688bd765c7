"""The argument parser every ``mpkv`` command uses (the CLI, ``bench`` and ``stress``):
usage errors in one line with exit 2, and help that ends with an example."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps the ``example:`` epilog's lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), as for every other failure; help ends with
    an example (every mpkv parser is one of these)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")
