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


def hash_fd(fd: int, sparse: bool = False, size: int | None = None) -> str:
    """SHA-256 of the file's content; holes of a sparse file are hashed as zeros without reading them.

    ``size``: the file's size from an ``fstat`` of the caller's (else one is made here).
    """
    h = hashlib.sha256()
    if size is None:
        size = os.fstat(fd).st_size
    if not sparse and size <= CHUNK:  # the common small file: one read, no buffer of our own
        data = os.pread(fd, size + 1, 0)  # fewer than size + 1 bytes: the end of the file was reached
        while len(data) < size:  # a short read: on to the end
            more = os.pread(fd, size + 1 - len(data), len(data))
            if not more:
                break
            data += more
        h.update(data)  # more than size bytes: the file grew, which hash_file's second fstat tells
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


def hash_file(full: bytes, sparse: bool, dir_fd: int | None = None, name: bytes | None = None) -> Digest:
    """The hash of the file ``full`` and the size and mtime it had all the while it was read.

    A file rewritten while it is read is read again (three times at most): a hash
    always belongs to the size and mtime recorded with it.  With ``dir_fd``, the file
    is opened as ``name`` in that directory (``full`` names it in messages).
    """
    try:
        opened = full if dir_fd is None or name is None else name
        fd = os.open(opened, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as exc:
        raise fs_error(exc, "read", full) from exc
    try:
        for _ in range(3):
            before = os.fstat(fd)
            digest = hash_fd(fd, sparse, before.st_size)
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
    """Hash the files ``(rel, sparse)`` under ``root``: one task of a worker.

    The files come in walk order, a directory's together: each is opened by its name in
    its open directory, so the kernel resolves one component, not the whole path.
    """
    digests = []
    current, dir_fd = None, None
    try:
        for rel, sparse in files:
            parent, _, name = rel.rpartition(b"/")
            if parent != current:
                if dir_fd is not None:
                    os.close(dir_fd)
                    dir_fd = None
                current = parent
                where = os.path.join(root, parent) if parent else root
                try:
                    dir_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if parent else 0))
                except OSError:
                    dir_fd = None  # hash_file says what is wrong, by the file's full path
            digests.append(hash_file(os.path.join(root, rel), sparse, dir_fd, name))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return digests
