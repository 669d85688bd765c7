"""What both backends (the directory store and the Redis store) share and is about
neither: the checks of the options they have in common, and the fork generation that
tells a handle it is being used in a child process for the first time.
"""

from __future__ import annotations

import os

#: The values of the ``fsync`` option, weakest last.
FSYNC_MODES = ("always", "periodic", "never")

#: The fork generation: bumped in a child after fork(). A handle notes it when it opens
#: its descriptors and locks; a handle used under a newer one reopens them (inherited
#: ones are shared with the parent, and threading locks may be held by threads the child
#: does not have). A list so that the hot paths read it with one index. Written only by
#: the at-fork hook, which runs in the child while it has a single thread.
fork_epoch = [1]
os.register_at_fork(after_in_child=lambda: fork_epoch.__setitem__(0, fork_epoch[0] + 1))


def check_options(max_segment_bytes: int | None, format: str | None, fsync: str | None,
                  fsync_interval: float, max_staleness: float | None,
                  lock_timeout: float | None) -> None:
    """ValueError naming the first option that has no valid value, before any file or
    connection is opened."""
    if max_segment_bytes is not None and (
            not isinstance(max_segment_bytes, int) or isinstance(max_segment_bytes, bool)
            or max_segment_bytes < 1):
        raise ValueError(f"max_segment_bytes must be a positive int, not {max_segment_bytes!r}")
    if format not in (None, "binary", "text"):
        raise ValueError(f"format must be 'binary', 'text' or None, not {format!r}")
    if fsync not in (None, *FSYNC_MODES):
        raise ValueError(f"fsync must be one of {FSYNC_MODES} or None, not {fsync!r}")
    if not isinstance(fsync_interval, (int, float)) or not fsync_interval > 0:
        raise ValueError(f"fsync_interval must be a positive number, not {fsync_interval!r}")
    if max_staleness is not None and (
            not isinstance(max_staleness, (int, float)) or not max_staleness >= 0):
        raise ValueError(f"max_staleness must be None or >= 0, not {max_staleness!r}")
    if lock_timeout is not None and (
            not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0):
        raise ValueError(f"lock_timeout must be None or >= 0, not {lock_timeout!r}")
