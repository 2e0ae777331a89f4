"""What changed since the base: the comparison behind ``status`` and ``changes``.

The base manifest and the walk of the tree come in the same order (the bytes
of the full paths, see tree.walk), so they are compared as two sorted streams,
a merge join: a path only in the walk was added, only in the base deleted, in
both with another key changed.  Memory holds the changes found (what the
delta's header lists anyway), the hashing pipeline's few batches in flight, and
the directories of the current path (to tell the topmost deleted path of a
deleted tree), not the tree.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .hashing import Digest
from .manifest import KEY_MTIME, KEY_SIZE, BaseRecords, Entry, Kind, parse_record, same_mtime
from .tree import Excluder, Item
from .workers import Workers


class Op(enum.StrEnum):
    CREATE = "C"
    META = "M"
    DELETE = "D"


class Status(enum.StrEnum):
    ADDED = "A"
    MODIFIED = "M"
    DELETED = "D"


@dataclass(frozen=True, slots=True)
class Change:
    """One path that differs from the base: what ``status`` lists."""

    status: Status
    path: bytes
    what: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Diff:
    """The difference between a base and the current tree."""

    changes: list[Change]
    ops: list[tuple[Op, Entry | bytes]]  # delta operations, in header order
    sparse: frozenset[bytes] = frozenset()  # the files among the CREATE operations that have holes


# What the merge passes on: path, the base's record (None: added), the walk's key
# (None: gone), sparse, and for a deletion whether it is the topmost of its tree.
_Found = tuple[bytes, "bytes | None", "bytes | None", bool, bool]


def merge_join(
    records: Iterator[tuple[bytes, bytes]], items: Iterable[Item], exclude: Excluder, *, checksum: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[_Found]:
    """The paths where the base and the walk differ (all of them with ``checksum``), in path order."""
    walk = iter(items)
    open_dirs: list[bytes] = []  # "dir/" of current directories whose contents may still come
    base = next(records, None)
    item = next(walk, None)
    seen = 0
    while base is not None or item is not None:
        if item is not None and (base is None or item[0] <= base[0]):
            path, key, sparse = item
            while open_dirs and path > open_dirs[-1] and not path.startswith(open_dirs[-1]):
                open_dirs.pop()
            if key[:1] == b"d":
                open_dirs.append(path + b"/")
            if base is not None and base[0] == path:
                record = base[1]
                if checksum or record.rpartition(b"\t")[0] != key:
                    yield path, record, key, sparse, False
                base = next(records, None)
            else:
                yield path, None, key, sparse, False
            item = next(walk, None)
            seen += 1
            if progress and (seen == 1 or not seen & 4095):
                progress(seen, 0)
        else:
            assert base is not None
            path = base[0]
            if not exclude(path):
                while open_dirs and path > open_dirs[-1] and not path.startswith(open_dirs[-1]):
                    open_dirs.pop()
                parent = path.rpartition(b"/")[0]
                yield path, base[1], None, False, not parent or parent + b"/" in open_dirs
            base = next(records, None)


def compare(
    base: BaseRecords,
    items: Iterable[Item],
    exclude: Excluder,
    workers: Workers,
    *,
    checksum: bool = False,
    for_delta: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Diff:
    """Compare the walk ``items`` with ``base``; hashes only what it must, on ``workers``.

    Size and mtime unchanged means content unchanged (unless ``checksum``).  A
    file whose mtime moved is hashed: same hash means a metadata-only change.
    With ``for_delta``, every file whose content goes into the delta is hashed
    so that the header can carry its hash.
    """
    changes: list[Change] = []
    deletes: list[tuple[Op, Entry | bytes]] = []
    creates: list[tuple[Op, Entry | bytes]] = []
    sparse: set[bytes] = set()
    found = merge_join(base.records, items, exclude, checksum=checksum, progress=progress)
    hashed = 0
    for (path, record, key, is_sparse, topmost), digest in workers.map(found, lambda f: _to_hash(f, checksum, for_delta)):
        if key is None:
            changes.append(Change(Status.DELETED, path))
            if topmost:
                deletes.append((Op.DELETE, path))
            continue
        if digest is not None:
            key = with_read_metadata(key, digest)
            hashed += digest.size
            if progress:
                progress(0, hashed)
        if record is None:
            changes.append(Change(Status.ADDED, path))
            if for_delta:
                new = parse_record(path, key + b"\t" + (digest.sha256 if digest else "").encode())
                creates.append((Op.CREATE, new))
                if is_sparse and new.kind is Kind.FILE:
                    sparse.add(path)
            continue
        old = parse_record(path, record)
        new = parse_record(path, key + b"\t" + _digest_for(old, key, digest).encode())
        what = old.differences(new)
        if not what:
            continue
        changes.append(Change(Status.MODIFIED, path, tuple(what)))
        if for_delta:
            op = Op.META if old.same_content(new) else Op.CREATE
            creates.append((op, new))
            if op is Op.CREATE and is_sparse and new.kind is Kind.FILE:
                sparse.add(path)
    return Diff(changes, deletes + creates, frozenset(sparse))


def _is_plain_file(key: bytes) -> bool:
    """A regular file that is not a second name of another (a hardlink member)."""
    return key[:1] == b"f" and key.endswith(b"\t")


def _fields(key: bytes) -> tuple[bytes, int, int]:
    fields = key.split(b"\t", KEY_MTIME + 1)
    return fields[0], int(fields[KEY_SIZE]), int(fields[KEY_MTIME])


def _to_hash(found: _Found, checksum: bool, for_delta: bool) -> tuple[bytes, int, bool] | None:
    """The file to hash for this difference, as ``(path, size, sparse)``, or None."""
    path, record, key, sparse, _ = found
    if key is None or key[:1] != b"f":
        return None
    _, size, mtime = _fields(key)
    if record is None:
        return (path, size, sparse) if for_delta and _is_plain_file(key) else None
    old_kind, old_size, old_mtime = _fields(record)
    was_file = old_kind == b"f"
    if was_file and (checksum or (size == old_size and not same_mtime(old_mtime, mtime))):
        return path, size, sparse
    if was_file and size == old_size:
        return None  # size and mtime unchanged: trusted, as rsync does
    if for_delta and _is_plain_file(key):
        return path, size, sparse
    return None


def _digest_for(old: Entry, key: bytes, digest: Digest | None) -> str:
    """The hash the current entry is described with: read, kept from the base, or unknown ("?")."""
    if digest is not None:
        return digest.sha256
    if key[:1] != b"f":
        return ""
    if old.kind is Kind.FILE and old.size == _fields(key)[1]:
        return old.digest
    return "?"  # not hashed: the size or the type alone shows the change


def with_read_metadata(key: bytes, digest: Digest) -> bytes:
    """``key`` with the size and mtime the file had while it was hashed (a hash always goes with those)."""
    fields = key.split(b"\t")
    read = [b"%d" % digest.size, b"%d" % digest.mtime_ns]
    if fields[KEY_SIZE:KEY_MTIME + 1] != read:
        fields[KEY_SIZE:KEY_MTIME + 1] = read
        return b"\t".join(fields)
    return key
