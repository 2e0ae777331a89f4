"""What changed since the base: the comparison behind ``status`` and ``changes``."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .manifest import Entry, Kind, Manifest, same_mtime
from .tree import Excluder, Scan


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


def compare(
    base: Manifest,
    scan: Scan,
    exclude: Excluder,
    *,
    checksum: bool = False,
    for_delta: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Diff:
    """Compare ``scan`` with ``base``; hashes only what it must.

    Size and mtime unchanged means content unchanged (unless ``checksum``).  A
    file whose mtime moved is hashed: same hash means a metadata-only change.
    With ``for_delta``, every file whose content goes into the delta is hashed
    so that the header can carry its hash.
    """
    records = base.records
    added: list[bytes] = []
    differing: list[bytes] = []
    for path, key in scan.keys.items():
        record = records.get(path)
        if record is None:
            added.append(path)
        elif checksum or record.rpartition(b"\t")[0] != key:
            differing.append(path)

    # Which files need their content hashed, and which keep the base's hash.
    digests: dict[bytes, str] = {}
    to_hash = [p for p in added if scan.is_plain_file(p)] if for_delta else []
    for path in differing:
        old, new = base.entry(path), scan.entry(path)
        assert old is not None
        if new.kind is not Kind.FILE:
            continue
        was_file = old.kind is Kind.FILE
        if was_file and (checksum or (new.size == old.size and not same_mtime(old.mtime_ns, new.mtime_ns))):
            to_hash.append(path)
        elif was_file and new.size == old.size:
            digests[path] = old.digest  # size and mtime unchanged: trusted, as rsync does
        elif for_delta and scan.is_plain_file(path):
            to_hash.append(path)
        else:
            digests[path] = "?"  # not hashed: the size or the type alone shows the change
    scan.hash_files(to_hash, progress)

    changes = [Change(Status.ADDED, path) for path in added]
    creates: list[tuple[Op, Entry | bytes]] = [(Op.CREATE, scan.entry(path)) for path in added] if for_delta else []
    for path in differing:
        old = base.entry(path)
        new = scan.entry(path, digests.get(path))
        assert old is not None
        what = old.differences(new)
        if not what:
            continue
        changes.append(Change(Status.MODIFIED, path, tuple(what)))
        if for_delta:
            creates.append((Op.META if old.same_content(new) else Op.CREATE, new))
    deletes: list[tuple[Op, Entry | bytes]] = []
    current = scan.keys
    for path in records:
        if path in current or exclude(path):
            continue
        changes.append(Change(Status.DELETED, path))
        parent = path.rpartition(b"/")[0]
        if not parent or current.get(parent, b"")[:1] == b"d":
            deletes.append((Op.DELETE, path))  # the topmost deleted path of its tree
    changes.sort(key=lambda c: c.path)
    creates.sort(key=lambda op: op[1].path)  # type: ignore[union-attr]
    deletes.sort(key=lambda op: op[1])  # type: ignore[arg-type, return-value]
    return Diff(changes, deletes + creates)
