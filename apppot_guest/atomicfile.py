"""Writing files that others read: a temporary file, fsync, then rename.

A reader sees the old file or the new one, never half of one; an interrupted
or failed write leaves the old file and no temporary file behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from itertools import count
from pathlib import Path

from .errors import fs_error

log = logging.getLogger(__name__)
_serial = count()  # with the pid, a temporary name no other writer uses (no tempfile: it is slow to import in UML)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, check: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``check`` gets the finished temporary file before it takes the name (e.g.
    ``visudo -cf``) and raises to keep the old file.  The temporary name starts
    with a dot, which sudo's sudoers.d and most readers of a directory skip.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_serial)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise fs_error(exc, "write", path) from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise fs_error(exc, "write", path) from exc
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:  # hostfs may not support fsync on a directory
        log.debug("cannot fsync %s: %s", path.parent, exc)
