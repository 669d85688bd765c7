"""mpkv: a persistent key-value store that many processes share through one directory."""

import os
from typing import Any

from .errors import ClosedError, CorruptionError, Error, FormatError, LockTimeout, ReadOnlyError
from .recovery import Report, repair, verify
from .store import Store, Transaction

__all__ = ["Store", "Transaction", "open", "Error", "FormatError", "CorruptionError",
           "ClosedError", "LockTimeout", "ReadOnlyError", "repair", "verify", "Report"]
__version__ = "0.1.0"


def open(path: str | os.PathLike[str], **options: Any) -> Store:
    """Open (creating if needed) the store at ``path``; usable as a context manager."""
    return Store(path, **options)
