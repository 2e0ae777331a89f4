"""Content hashes: SHA-256 of files (sparse ones without reading their holes), on every usable core.

Small files cost a system call or three each and almost nothing to hash; in
threads they serialise on the interpreter.  ``Hasher`` therefore sends
*batches* of files (hundreds of small ones, or one large one, which is then
streamed in 1 MiB chunks) to worker processes forked once per command, keeps a
bounded number of batches in flight and gives the results back in the order
the entries came in, so that a caller can stream a sorted walk through it.
With one usable CPU (a UML guest) there is no pool: the caller's process
hashes, as fast as one core allows and without a process to feed.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import FsError, fs_error

if TYPE_CHECKING:
    from multiprocessing.pool import AsyncResult, Pool

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
BATCH_FILES = 256  # small files per batch: a worker's round trip costs about as much as hashing 50 of them
BATCH_BYTES = 8 << 20  # a batch holds about this much content; a larger file is a batch of its own
WINDOW = 2048  # entries passed along per batch, hashed or not: bounds what waits in memory
Digest = tuple[str, int, int]  # sha256, and the size and mtime the file had all the while it was read
T = TypeVar("T")


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
                return digest, after.st_size, after.st_mtime_ns
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


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _worker_start(parent: int) -> None:
    """In each worker: die with the parent (SIGKILL included), leave Ctrl-C and the terminal to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes  # only workers need it: PR_SET_PDEATHSIG has no wrapper in os

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # never hold the caller's pipes open
        os.dup2(null, fd)
    os.close(null)


class Hasher:
    """Hashes files of one root in worker processes, in batches, results in input order.

    Use as a context manager; the pool is forked only when the first batch
    needs it, so a command that hashes nothing pays nothing.
    """

    def __init__(self, root: bytes, workers: int | None = None) -> None:
        self.root = root
        self.workers = usable_cpus() if workers is None else workers
        self._pool: Pool | None = None

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _submit(self, files: list[tuple[bytes, bool]]) -> AsyncResult[list[Digest]] | list[Digest]:
        if self.workers < 2 or not files:
            return hash_batch(self.root, files) if files else []
        if self._pool is None:
            import multiprocessing  # only hashing on several cores needs it

            self._pool = multiprocessing.get_context("fork").Pool(self.workers, _worker_start, (os.getpid(),))
        return self._pool.apply_async(hash_batch, (self.root, files))

    def map(self, items: Iterable[T], wanted: Callable[[T], tuple[bytes, int, bool] | None]) -> Iterator[tuple[T, Digest | None]]:
        """Each item with the digest of the file ``wanted(item)`` names as ``(rel, size, sparse)`` (None: no hash).

        At most a few batches per worker are in flight: memory stays bounded however many items come.
        """
        inflight: collections.deque[tuple[list[tuple[T, bool]], Any]] = collections.deque()
        limit = 2 * self.workers + 1
        window: list[tuple[T, bool]] = []
        files: list[tuple[bytes, bool]] = []
        nbytes = 0
        for item in items:
            want = wanted(item)
            if want is None:
                window.append((item, False))
                if len(window) < WINDOW:
                    continue
            else:
                rel, size, sparse = want
                if files and nbytes + size > BATCH_BYTES:  # a large file goes alone
                    inflight.append((window, self._submit(files)))
                    window, files, nbytes = [], [], 0
                window.append((item, True))
                files.append((rel, sparse))
                nbytes += size
                if len(files) < BATCH_FILES and nbytes < BATCH_BYTES and len(window) < WINDOW:
                    continue
            inflight.append((window, self._submit(files)))
            window, files, nbytes = [], [], 0
            while len(inflight) > limit or (inflight and isinstance(inflight[0][1], list)):
                yield from _results(*inflight.popleft())
        if window:
            inflight.append((window, self._submit(files)))
        while inflight:
            yield from _results(*inflight.popleft())


def _results(window: list[tuple[T, bool]], pending: Any) -> Iterator[tuple[T, Digest | None]]:
    digests = iter(pending if isinstance(pending, list) else pending.get())
    for item, hashed in window:
        yield item, next(digests) if hashed else None
