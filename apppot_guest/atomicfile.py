"""Writing files that others read: a temporary file, fsync, then rename.

A reader sees the old file or the new one, never half of one; a failed write
leaves the old file and no temporary file behind.

Every temporary file or directory AppPot creates is named by ``temp_name``:
``.NAME.apppot-tmp.PID.RANDOM`` (RANDOM: 12 hex digits, so a name never
collides with the leftover of an earlier run that had the same PID), created
with ``O_EXCL`` and held under ``flock`` by its creator for as long as it
exists.  A temporary that nobody holds locked was left by a run that died
(``kill -9``, power loss): ``state.remove_leftover`` removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from . import faults
from .errors import fs_error

log = logging.getLogger(__name__)
TEMP_MARK = ".apppot-tmp."
TEMP_MARK_BYTES = TEMP_MARK.encode()
ANY_MARK = b".apppot-"  # in every temporary name, old or new: a scan's cheap first test
_TEMP = re.compile(rb"\..+" + re.escape(TEMP_MARK_BYTES) + rb"([0-9]+)\.[0-9a-f]{12}", re.S)


def temp_name(final: str) -> str:
    """A fresh temporary name for ``final`` in the same directory (see the module's docstring)."""
    return f".{final}{TEMP_MARK}{os.getpid()}.{os.urandom(6).hex()}"  # no tempfile: it is slow to import in UML


# What earlier versions left in a tree when a merge died: .apppot-merge.PID.NAME.
_OLD_MERGE_TEMP = re.compile(rb"\.apppot-merge\.[0-9]+\..+", re.S)


def is_temporary(name: bytes) -> bool:
    """True for a name made by ``temp_name`` (or an older version's merge temporary)."""
    return _TEMP.fullmatch(name) is not None or _OLD_MERGE_TEMP.fullmatch(name) is not None


def temp_creator(name: bytes) -> str:
    """The PID in a temporary's name, as text ('?' if it is not one)."""
    match = _TEMP.fullmatch(name)
    return match.group(1).decode() if match else "?"


def create_temp(final: Path) -> tuple[int, Path]:
    """Create and lock a new temporary file beside ``final``: its descriptor (O_CLOEXEC) and path."""
    while True:
        tmp = final.with_name(temp_name(final.name))
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        lock_quietly(fd)
        return fd, tmp


def lock_quietly(fd: int) -> None:
    """Mark a temporary as in use; a file system without locks (e.g. hostfs) just goes without."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        log.debug("cannot lock a temporary file: %s", exc.strerror)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, check: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``check`` gets the finished temporary file before it takes the name (e.g.
    ``visudo -cf``) and raises to keep the old file.  The temporary name starts
    with a dot and contains dots, which sudo's sudoers.d and most readers of a
    directory skip.
    """
    try:
        fd, tmp = create_temp(path)
    except OSError as exc:
        raise fs_error(exc, "write", path) from exc
    try:  # the descriptor stays open (and locked) until the rename is done
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.fchmod(fd, mode)
        if check is not None:
            check(tmp)
        faults.reached("rename")
        os.replace(tmp, path)
    except OSError as exc:
        raise fs_error(exc, "write", path) from exc
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:  # hostfs may not support fsync on a directory
        log.debug("cannot fsync %s: %s", path.parent, exc)
