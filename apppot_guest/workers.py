"""Worker processes for one command: directory listings ahead of the walk, and file hashes.

Small files cost a system call or three each and almost nothing to hash; in
threads they serialise on the interpreter, and so does listing a directory
(lstat, xattrs and formatting of each entry).  ``Workers`` forks a pool of
one process per usable CPU, once per command and only when there is work
for it, and sends it:

- *listings*: the walk asks for a directory's entries in walk order;
  ``listing`` hands back the one a worker prepared and has workers list the
  next directories of the walk meanwhile (at most ``LOOKAHEAD`` ahead), once
  the walk has listed ``POOL_AFTER`` entries itself: a tree of a few thousand
  directories is walked sooner without workers than with them;
- *hash batches* (``map``): hundreds of small files, or one large one (streamed
  in 1 MiB chunks), per task, a bounded number in flight, results given back
  in the order the items came, so that a sorted walk streams through.

With one usable CPU (a UML guest) there is no pool: the command's own process
does everything, as fast as one core allows and without a process to feed.
Workers die with the command (``PR_SET_PDEATHSIG``), even when it is killed.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .forkpool import ForkPool, Pending
from .hashing import Digest, hash_batch
from .tree import Excluder, Planned, list_dir

BATCH_FILES = 256  # small files per batch: a worker's round trip costs about as much as hashing 50 of them
BATCH_BYTES = 8 << 20  # a batch holds about this much content; a larger file is a batch of its own
WINDOW = 2048  # entries passed along per batch, hashed or not: bounds what waits in memory
LOOKAHEAD = 16  # directory listings prepared ahead of the walk
# Entries a walk lists in its own process before workers list ahead of it: below this, forking
# and feeding workers costs more than it saves (measured: a 15k-entry Debian tree, 1700
# directories, took 0.45 s with workers and 0.34 s without; a 30k-entry tree the same either way).
POOL_AFTER = 30_000
T = TypeVar("T")
log = logging.getLogger(__name__)

# What a worker works on, inherited through fork (never pickled): root, exclude, on_temporary.
_context: tuple[bytes, Excluder, Callable[[bytes], object] | None] = (b"", Excluder([]), None)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _list_task(rel_dir: bytes, root_dev: int) -> list[Planned]:
    root, exclude, on_temporary = _context
    return list_dir(root, rel_dir, root_dev, exclude, on_temporary)


def _hash_task(files: list[tuple[bytes, bool]]) -> list[Digest]:
    return hash_batch(_context[0], files)


class Workers:
    """The worker processes of one command on one root.  Use as a context manager."""

    def __init__(self, root: bytes, exclude: Excluder, on_temporary: Callable[[bytes], object] | None = None, workers: int | None = None,
                 pool_after: int = POOL_AFTER) -> None:
        self.root, self.exclude, self.on_temporary = root, exclude, on_temporary
        self.workers = usable_cpus() if workers is None else workers
        self.pool_after = pool_after
        self._pool: ForkPool | None = None
        # For each directory the walk is in, deepest last: its subdirectories (in walk order),
        # the listings under way in workers, and how many of the subdirectories were handed out.
        self._todo: list[tuple[list[bytes], dict[bytes, Pending], list[int]]] = []
        self._listed = 0  # entries listed so far (see pool_after)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._todo.clear()

    def _get_pool(self) -> ForkPool | None:
        """The pool, forked on first use; None if there is none (one CPU, or no process could be forked)."""
        if self._pool is None and self.workers > 1:
            global _context
            _context = (self.root, self.exclude, self.on_temporary)
            try:
                self._pool = ForkPool(self.workers)
            except OSError as exc:  # e.g. EAGAIN at a process limit: do the work here instead
                log.debug("no worker processes (%s): working in one process", exc.strerror)
                self.workers = 1
        return self._pool

    # -- listings ----------------------------------------------------------------------------

    def listing(self, rel_dir: bytes, root_dev: int) -> list[Planned]:
        """The planned entries of ``rel_dir`` (see tree.list_dir); the walk asks in its order."""
        last = rel_dir + b"/"
        while self._todo and (not self._todo[-1][0] or self._todo[-1][0][-1] + b"/" < last):
            self._todo.pop()  # lists of directories the walk has left (all listed)
        pending = None
        for frame in reversed(self._todo):
            pending = frame[1].pop(rel_dir, None)
            if pending is not None:
                break
        result: list[Planned] = pending.get() if pending is not None else list_dir(self.root, rel_dir, root_dev, self.exclude, self.on_temporary)
        if self.workers > 1:
            subdirs = [p[1] for p in result if p[2] is None]
            if subdirs:
                self._todo.append((subdirs, {}, [0]))
            self._listed += len(result)
            if self._listed >= self.pool_after:
                self._prefetch(root_dev, last)
        return result

    def _prefetch(self, root_dev: int, last: bytes) -> None:
        """Have workers list the next directories of the deepest list the walk is in (LOOKAHEAD at most per list)."""
        if not self._todo:
            return
        subdirs, ahead, position = self._todo[-1]
        pool = self._get_pool()
        while pool is not None and position[0] < len(subdirs) and len(ahead) < LOOKAHEAD and pool.has_room():
            rel_dir = subdirs[position[0]]
            position[0] += 1
            if rel_dir + b"/" > last:
                ahead[rel_dir] = pool.submit(_list_task, rel_dir, root_dev)

    # -- hashes ------------------------------------------------------------------------------

    def _submit(self, files: list[tuple[bytes, bool]]) -> Any:
        pool = self._get_pool() if files else None
        if pool is None:
            return hash_batch(self.root, files) if files else []
        return pool.submit(_hash_task, files)

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
