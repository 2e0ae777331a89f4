"""TEST-ONLY: apppot-snap's comparison as it was before it streamed (commit adacb02), the reference
the streaming merge must agree with: one walk into a dict, the whole base in memory, sorted afterwards.

Copied from apppot_guest/tree.py (Scan) and diff.py (compare) of that commit; hashing is
sequential here (the threads only made it faster), everything else is as it was.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from apppot_guest.atomicfile import ANY_MARK, is_temporary
from apppot_guest.diff import Change, Diff, Op, Status
from apppot_guest.errors import fs_error
from apppot_guest.hashing import hash_file
from apppot_guest.manifest import KIND_OF_MODE, Entry, Kind, Manifest, escape, format_key, parse_record, same_mtime
from apppot_guest.tree import Excluder, read_xattrs

log = logging.getLogger(__name__)


class Scan:
    """One walk of a root: the manifest key of every entry, and content hashes on demand."""

    def __init__(self, root: Path, exclude: Excluder, progress: Callable[[int, int], None] | None = None) -> None:
        self.root = root
        self.broot = os.fsencode(root)
        self.keys: dict[bytes, bytes] = {}  # path -> manifest key (kind ... link)
        self.digests: dict[bytes, str] = {}  # path -> sha256, for the files hashed so far
        self.sparse: set[bytes] = set()
        self.temporaries: list[bytes] = []  # full paths of AppPot temporaries met on the way
        self.total_bytes = 0
        self._walk(exclude, progress)

    def entry(self, rel: bytes, digest: str | None = None) -> Entry:
        """The full entry of ``rel``, with its hash if known (or ``digest``)."""
        return parse_record(rel, self.keys[rel] + b"\t" + (digest if digest is not None else self.digests.get(rel, "")).encode())

    def record(self, rel: bytes) -> bytes:
        return self.keys[rel] + b"\t" + self.digests.get(rel, "").encode()

    def is_plain_file(self, rel: bytes) -> bool:
        """A regular file that is not a second name of another (a hardlink member)."""
        key = self.keys[rel]
        return key[:1] == b"f" and key.endswith(b"\t")

    def _walk(self, exclude: Excluder, progress: Callable[[int, int], None] | None) -> None:
        try:
            root_dev = os.lstat(self.broot).st_dev
        except OSError as exc:
            raise fs_error(exc, "read the root", self.root) from exc
        inodes: dict[tuple[int, int], list[bytes]] = {}
        keys = self.keys
        stack: list[bytes] = [b""]
        while stack:
            rel_dir = stack.pop()
            full_dir = os.path.join(self.broot, rel_dir) if rel_dir else self.broot
            try:
                listing = list(os.scandir(full_dir))
            except OSError as exc:
                raise fs_error(exc, "list", full_dir) from exc
            excluded = exclude.in_directory(rel_dir)
            for item in listing:
                rel = rel_dir + b"/" + item.name if rel_dir else item.name
                if excluded and excluded(rel):
                    continue
                if ANY_MARK in item.name and is_temporary(item.name):
                    self.temporaries.append(item.path)  # AppPot's own, live or left by a dead run: never recorded
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                    kind = KIND_OF_MODE.get(stat.S_IFMT(st.st_mode))
                    if kind is None:
                        continue  # a socket: it cannot be archived and is recreated by its program
                    target = b""
                    if kind is Kind.DIR:
                        if st.st_dev != root_dev:
                            log.debug("not crossing into the mount point %s", os.fsdecode(item.path))
                            continue
                        stack.append(rel)
                    elif kind is Kind.FILE:
                        if st.st_nlink > 1:
                            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
                        if st.st_blocks * 512 < st.st_size:
                            self.sparse.add(rel)
                        self.total_bytes += st.st_size
                    elif kind is Kind.SYMLINK:
                        target = os.readlink(item.path)
                    keys[rel] = format_key(
                        kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size if kind is Kind.FILE else 0,
                        st.st_mtime_ns, target, st.st_rdev, read_xattrs(item.path), b"",
                    )
                except FileNotFoundError:
                    continue  # vanished while we looked: not part of this tree
                except OSError as exc:
                    raise fs_error(exc, "read", item.path) from exc
            if progress:
                progress(len(keys), 0)
        for group in inodes.values():
            if len(group) > 1:
                leader = min(group)
                for member in group:
                    if member != leader:
                        keys[member] += escape(leader)

    def hash_files(self, paths: Iterable[bytes]) -> None:
        for rel in [p for p in paths if self.keys[p][:1] == b"f" and p not in self.digests]:
            digest, size, mtime_ns = hash_file(os.path.join(self.broot, rel), rel in self.sparse)
            self.digests[rel] = digest
            fields = self.keys[rel].split(b"\t")
            if (fields[4], fields[5]) != (b"%d" % size, b"%d" % mtime_ns):
                fields[4:6] = [b"%d" % size, b"%d" % mtime_ns]
                self.keys[rel] = b"\t".join(fields)

    def manifest(self) -> Manifest:
        self.hash_files(list(self.keys))
        return Manifest.from_records({path: self.record(path) for path in self.keys})


def compare(
    base: Manifest,
    scan: Scan,
    exclude: Excluder,
    *,
    checksum: bool = False,
    for_delta: bool = False,

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
    scan.hash_files(to_hash)

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
