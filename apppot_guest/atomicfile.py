"""Writing files that others read: a temporary file, fsync, then rename.

A reader sees the old file or the new one, never half of one; an interrupted
or failed write leaves the old file and no temporary file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import fs_error

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, check: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``check`` gets the finished temporary file before it takes the name (e.g.
    ``visudo -cf``) and raises to keep the old file.  The temporary name starts
    with a dot, which sudo's sudoers.d and most readers of a directory skip.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise fs_error(exc, "write", path) from exc
    tmp = Path(tmp_name)
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
