"""Safe file primitives: a store directory is input, not trust.

Anyone who can write a store's directory can put links, folders, FIFOs or huge files
where mpkv expects its own files. Every file inside a store is opened through this
module: never through a symbolic link (``O_NOFOLLOW``), only when it is a regular file,
created with mode 0666 so that the umask decides who else may use it, and read with a
size cap. Temporary files get unpredictable names and are created with ``O_EXCL``, so no
one can plant a link where mpkv is about to write. See "Threat model" in
docs/recovery.md.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Callable

from .errors import FormatError

#: Mode of every file mpkv creates: the umask takes away what the user wants to keep.
MODE = 0o666
#: Errors of an open that found something other than a regular file at the path.
_NOT_REGULAR = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory",
                errno.ENXIO: "a FIFO or socket", errno.ENOTDIR: "under a non-directory"}


def not_regular(path: str, what: str) -> FormatError:
    return FormatError(f"{path}: {what}, not a regular file; mpkv refuses to use it "
                       "(links and special files inside a store are never followed)")


def open_regular(path: str, flags: int, mode: int = MODE) -> int:
    """``os.open`` that never follows a link at ``path`` and returns only a descriptor
    of a regular file: FormatError naming the file otherwise (nothing is created through
    a link; a FIFO is opened non-blocking, so it cannot hang, then refused)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _NOT_REGULAR:
            raise not_regular(path, _NOT_REGULAR[exc.errno]) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, "a special file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: str, cap: int) -> bytes | None:
    """The whole content of a small side file, None when it does not exist.
    FormatError naming the file when it is a link, not a regular file, or over ``cap``
    bytes (a side file linked to /dev/zero, or grown huge, must not exhaust memory)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, cap + 1, 0)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise FormatError(f"{path}: over {cap} bytes; not a file mpkv wrote")
    return data


def check_dir(path: str) -> bool:
    """True when ``path`` is a real directory, False when it does not exist;
    FormatError when it is a link (even to a directory) or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise FormatError(f"{path}: a symbolic link, not a directory; mpkv does not "
                          "follow links inside a store")
    if not stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path}: not a directory")
    return True


def make_dir(path: str) -> None:
    """Create a folder inside a store (mode 0777 minus the umask) unless it exists;
    FormatError when the name is taken by a link or a file."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    check_dir(path)


def open_dir(path: str) -> int:
    """A descriptor of the real directory ``path`` (never through a link): operations
    relative to it (``dir_fd=``) stay in that directory even if its name is swapped
    for a link meanwhile. FileNotFoundError when it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            check_dir(path)  # raises the FormatError that names it
        raise


def create_temp(folder: str, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """A new empty file ``folder/prefix<random>suffix``, opened for writing: the name is
    unpredictable and the file created with O_EXCL, so nothing planted in advance (a
    link, a file) is ever written through; mode 0666 minus the umask."""
    while True:
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), path
        except FileExistsError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_temp(folder: str, prefix: str, data: bytes | list[bytes],
               durable: bool = True) -> str:
    """``data`` (or its pieces, in order) in a new temporary file (see ``create_temp``),
    fsynced when ``durable``; returns its path. Removed again on any error."""
    fd, tmp = create_temp(folder, prefix)
    try:
        try:
            for piece in [data] if isinstance(data, bytes) else data:
                _write_all(fd, piece)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(file: str, data: bytes, *, follow_link: bool = False) -> None:
    """Temporary file in the same directory, fsync, rename over, fsync the directory:
    a reader of ``file`` sees the old file or the whole new one, even after a crash.

    Inside a store (the default) a link at ``file`` is replaced by the new file, never
    written through. ``follow_link=True`` is for a path the user named (``serialize``):
    when ``file`` is a symbolic link, the file it points to is replaced (in its own
    directory) and the link stays."""
    if follow_link:
        file = os.path.realpath(file)
    folder = os.path.dirname(os.path.abspath(file))
    tmp = write_temp(folder, ".mpkv-tmp-", data)
    try:
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(folder)


def place_new(folder: str, name: str, suffix: str, put: Callable[[str], None]) -> str:
    """``put(target)`` for the first name in ``folder`` that ``put`` finds free (it
    raises FileExistsError when the name is taken): ``name+suffix``, else
    ``name.1+suffix``, ``name.2+suffix``...; the folder fsynced. Never overwrites."""
    for k in range(1_000_000):
        target = os.path.join(folder, f"{name}{f'.{k}' if k else ''}{suffix}")
        try:
            put(target)
        except FileExistsError:
            continue
        fsync_dir(folder)
        return target
    raise FormatError(f"{folder}: no free name for {name}{suffix}")


def save_new(folder: str, name: str, suffix: str, data: bytes) -> str:
    """Write ``data`` (fsynced) under a name in ``folder`` that did not exist
    (``place_new``): the file is linked into place, which fails when the name is taken."""
    tmp = write_temp(folder, ".mpkv-tmp-", data)
    try:
        return place_new(folder, name, suffix, lambda target: os.link(tmp, target))
    finally:
        os.unlink(tmp)
