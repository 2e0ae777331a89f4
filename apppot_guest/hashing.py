"""Content hashes: SHA-256 of files, sparse ones without reading their holes.

A small file is read with one ``pread``; a large one is streamed in 1 MiB
chunks.  workers.py runs ``hash_batch`` on every usable core.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from typing import NamedTuple

from .errors import FsError, fs_error

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
class Digest(NamedTuple):
    """A file's hash, and the size and mtime the file had all the while it was read."""

    sha256: str
    size: int
    mtime_ns: int


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of a file that hold data; the rest are holes."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size) - start))
        offset = end
    os.lseek(fd, 0, os.SEEK_SET)
    return extents


def read_content(fd: int, size: int, extents: list[tuple[int, int]], h: hashlib._Hash) -> Iterator[memoryview]:
    """Yield the data of ``extents`` of the file ``fd`` chunk by chunk, feeding the whole
    content (holes as zeros, without reading them) to the hash ``h``.

    Raises FsError if the file is shorter than its extents say (it shrank while being read).
    """
    view = memoryview(bytearray(CHUNK))
    position = 0
    for start, length in extents:
        hash_zeros(h, start - position)
        os.lseek(fd, start, os.SEEK_SET)
        remaining = length
        while remaining:
            n = os.readv(fd, [view[: min(CHUNK, remaining)]])
            if not n:
                raise FsError(f"a file shrank while it was being read (at byte {start + length - remaining})")
            h.update(view[:n])
            yield view[:n]
            remaining -= n
        position = start + length
    hash_zeros(h, size - position)


def hash_fd(fd: int, sparse: bool = False) -> str:
    """SHA-256 of the file's content; holes of a sparse file are hashed as zeros without reading them."""
    h = hashlib.sha256()
    size = os.fstat(fd).st_size
    if not sparse and size <= CHUNK:  # the common small file: one read, no buffer of our own
        data = os.pread(fd, size + 1, 0)
        while len(data) <= size:
            more = os.pread(fd, size + 1 - len(data), len(data))
            if not more:
                break
            data += more
        h.update(data)
        return h.hexdigest()
    for _ in read_content(fd, size, data_extents(fd, size) if sparse else [(0, size)], h):
        pass
    return h.hexdigest()


def hash_zeros(h: hashlib._Hash, count: int) -> None:
    """Feed ``count`` zero bytes (a hole) to the hash ``h``."""
    while count > 0:
        n = min(count, CHUNK)
        h.update(_ZEROS[:n] if n < CHUNK else _ZEROS)
        count -= n


def hash_file(full: bytes, sparse: bool) -> Digest:
    """The hash of the file ``full`` and the size and mtime it had all the while it was read.

    A file rewritten while it is read is read again (three times at most): a hash
    always belongs to the size and mtime recorded with it.
    """
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError as exc:
        raise fs_error(exc, "read", full) from exc
    try:
        for _ in range(3):
            before = os.fstat(fd)
            digest = hash_fd(fd, sparse)
            after = os.fstat(fd)
            if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (after.st_size, after.st_mtime_ns, after.st_ctime_ns):
                return Digest(digest, after.st_size, after.st_mtime_ns)
        raise FsError(f"cannot record {os.fsdecode(full)}: it kept changing while it was read; run again when it is quiet")
    except FsError:
        raise
    except OSError as exc:
        raise fs_error(exc, "read", full) from exc
    finally:
        os.close(fd)


def hash_batch(root: bytes, files: list[tuple[bytes, bool]]) -> list[Digest]:
    """Hash the files ``(rel, sparse)`` under ``root``: one task of a worker."""
    return [hash_file(os.path.join(root, rel), sparse) for rel, sparse in files]
