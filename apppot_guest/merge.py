"""Applying a delta to a root, safely.

Two phases.  *Stage*: read the header, check the base ID, check every path
(relative, no ``..``, not excluded, never through a symlink, before or after
the delta's own changes), then stream the archive, checking each member
against the header and writing file contents into a staging directory under
``var/lib/apppot`` with their final metadata and verified hashes.  Any
problem here removes the staging directory: nothing in the root changed.
*Commit*: deletions, then creations and metadata changes in path order, each
file landing by ``rename`` of its staged copy, then directory mtimes.  Every
operation is relative to a directory file descriptor opened with
``O_NOFOLLOW`` component by component, so nothing is ever written outside the
root, whatever the archive says.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import stat
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from . import faults
from .atomicfile import lock_quietly, temp_name
from .confined import Root, set_metadata_at, set_xattrs
from .delta import HEADER_NAME, DeltaHeader, open_archive, read_header
from .diff import Op
from .errors import BaseMismatchError, DeltaError, FsError, Interrupted, NoBaseError, UnsafePathError, display_path, fs_error
from .hashing import CHUNK, hash_zeros
from .manifest import BASE_DIR, MODE_OF_KIND, Entry, Kind, make_dirs_quietly, read_base_id
from .tree import Excluder

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class MergeReport:
    created: int
    updated: int
    deleted: int
    base_id: str
    plan: list[str]


def check_syntax(path: bytes, where: Path) -> None:
    if not path or path.startswith(b"/") or b"\0" in path:
        raise UnsafePathError(f"{where}: refusing member {display_path(path)!r}: not a relative path")
    if any(part in (b"", b".", b"..") for part in path.split(b"/")):
        raise UnsafePathError(f"{where}: refusing member {display_path(path)!r}: it contains '..', '.' or an empty component")


class Merge:
    """One application of one delta to one root."""

    def __init__(self, root: Path, delta: Path, exclude: Excluder, force: bool, dry_run: bool) -> None:
        self.root_path, self.delta, self.exclude, self.force, self.dry_run = root, delta, exclude, force, dry_run
        self.root = Root(root)
        self.staged: dict[bytes, bytes] = {}  # path -> staged file name
        self.staging: Path | None = None
        self.staging_fd = -1
        self.staging_parent_mtime = 0
        self.serial = 0  # names of the entries made in the staging directory while committing
        self.header: DeltaHeader | None = None

    # -- phase 1: read, check and stage --------------------------------------------------
    def stage(self) -> None:
        stream, proc = open_archive(self.delta)
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK, encoding="utf-8", errors="surrogateescape") as tar:
                self._stage_members(tar)
            while stream.read(CHUNK):  # the zero padding after the end-of-archive blocks
                pass
        except tarfile.TarError as exc:
            raise DeltaError(f"{self.delta}: not a readable tar archive: {exc}") from None
        except EOFError:
            raise DeltaError(f"{self.delta}: truncated archive") from None
        finally:
            stream.close()
            if proc and sys.exc_info()[0] is not None:
                proc.kill()
                proc.wait()
        if proc:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            if proc.wait() != 0:
                raise DeltaError(f"{self.delta}: cannot decompress: {err or f'exit code {proc.returncode}'}")

    def _stage_members(self, tar: tarfile.TarFile) -> None:
        members = iter(tar)
        first = next(members, None)
        if first is None or first.name != HEADER_NAME or not first.isreg():
            raise DeltaError(f"{self.delta}: not an AppPot delta (its first member is not {HEADER_NAME})")
        reader = tar.extractfile(first)
        assert reader is not None
        self.header = read_header(reader, first.size, self.delta)
        self.check_base()
        self.check_paths()
        if not self.dry_run:
            self.make_staging()
        expected = iter([e for op, e in self.header.ops if op is Op.CREATE and isinstance(e, Entry)])
        for member in members:
            entry = next(expected, None)
            if entry is None:
                raise DeltaError(f"{self.delta}: unexpected member {member.name!r} after the last one its header lists")
            self.stage_member(tar, member, entry)
        missing = next(expected, None)
        if missing is not None:
            raise DeltaError(f"{self.delta}: truncated: member {display_path(missing.path)!r} is missing")

    def check_base(self) -> None:
        assert self.header is not None
        try:
            base_id = read_base_id(self.root_path)
        except NoBaseError:
            if not self.force:
                raise NoBaseError(f"no base manifest in {self.root_path / BASE_DIR}: cannot check that {self.delta} "
                                  "fits this image (--force applies it anyway)") from None
            base_id = ""
        if base_id != self.header.base_id:
            if not self.force:
                raise BaseMismatchError(
                    f"{self.delta} was made against another base ({self.header.base_id or 'none'}) "
                    f"than {self.root_path} has ({base_id or 'none'}); --force applies it anyway"
                )
            log.warning("applying %s made against another base, as --force asks", self.delta)

    def check_paths(self) -> None:
        """Every path safe, no path through a symlink or a deleted/replaced directory."""
        assert self.header is not None
        created: dict[bytes, Kind] = {}
        deleted: set[bytes] = set()
        for op, item in self.header.ops:
            path = item if isinstance(item, bytes) else item.path
            check_syntax(path, self.delta)
            if self.exclude(path):
                raise UnsafePathError(f"{self.delta}: refusing member {display_path(path)!r}: it is an excluded path")
            if op is Op.DELETE:
                deleted.add(path)
            elif op is Op.CREATE and isinstance(item, Entry):
                created[path] = item.kind
        verdicts: dict[bytes, str] = {}

        def check_dir(prefix: bytes, child: bytes) -> None:
            if prefix not in verdicts:
                verdicts[prefix] = self._dir_verdict(prefix, created, deleted)
            if verdicts[prefix]:
                raise UnsafePathError(f"{self.delta}: refusing {display_path(child)!r}: {verdicts[prefix]}")

        for op, item in self.header.ops:
            path = item if isinstance(item, bytes) else item.path
            parts = path.split(b"/")
            for i in range(1, len(parts)):
                check_dir(b"/".join(parts[:i]), path)
            if isinstance(item, Entry) and item.link:
                self._check_link_target(item, created, deleted, check_dir)
            if op is Op.META and isinstance(item, Entry):
                st = self.root.lstat(path)
                if st is None or MODE_OF_KIND[item.kind] != stat.S_IFMT(st.st_mode):
                    message = (f"{self.delta}: changes the metadata of {display_path(path)!r}, "
                               f"which is not a {item.kind.name.lower()} in {self.root_path}")
                    if not self.force:
                        raise DeltaError(message)
                    log.warning("%s", message)

    def _dir_verdict(self, prefix: bytes, created: dict[bytes, Kind], deleted: set[bytes]) -> str:
        if prefix in created:
            return "" if created[prefix] is Kind.DIR else f"{display_path(prefix)!r} becomes a {created[prefix].name.lower()} in this delta"
        if prefix in deleted:
            return f"its directory {display_path(prefix)!r} is deleted by this delta"
        st = self.root.lstat(prefix)
        if st is None:
            return f"its directory {display_path(prefix)!r} does not exist in {self.root_path}"
        if stat.S_ISLNK(st.st_mode):
            return f"{display_path(prefix)!r} is a symlink in {self.root_path}; nothing is written through symlinks"
        if not stat.S_ISDIR(st.st_mode):
            return f"{display_path(prefix)!r} is not a directory in {self.root_path}"
        return ""

    def _check_link_target(self, entry: Entry, created: dict[bytes, Kind], deleted: set[bytes], check_dir: Callable[[bytes, bytes], None]) -> None:
        target = entry.link
        check_syntax(target, self.delta)
        if self.exclude(target) or any(target == d or target.startswith(d + b"/") for d in deleted):
            raise UnsafePathError(f"{self.delta}: refusing hard link {display_path(entry.path)!r} to {display_path(target)!r}: excluded or deleted")
        parts = target.split(b"/")
        for i in range(1, len(parts)):
            check_dir(b"/".join(parts[:i]), entry.path)
        if target in created:
            ok = created[target] is Kind.FILE and target < entry.path
        else:
            st = self.root.lstat(target)
            ok = st is not None and stat.S_ISREG(st.st_mode)
        if not ok:
            raise UnsafePathError(f"{self.delta}: refusing hard link {display_path(entry.path)!r}: {display_path(target)!r} is not a regular file")

    def make_staging(self) -> None:
        staging_parent = self.root_path / BASE_DIR
        try:
            make_dirs_quietly(staging_parent)
            self.staging_parent_mtime = os.stat(staging_parent).st_mtime_ns
            while self.staging is None:
                candidate = staging_parent / temp_name("merge")
                try:
                    candidate.mkdir(mode=0o700)
                except FileExistsError:
                    continue
                self.staging = candidate
            self.staging_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            lock_quietly(self.staging_fd)  # alive: the next run's recovery leaves it alone
        except OSError as exc:
            raise fs_error(exc, "create a staging directory in", staging_parent) from exc

    def stage_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, entry: Entry) -> None:
        name = os.fsencode(member.name)
        if name != entry.path:
            raise DeltaError(f"{self.delta}: member {member.name!r} does not match its header, which lists {display_path(entry.path)!r} next")
        problem = member_mismatch(member, entry)
        if problem:
            raise DeltaError(f"{self.delta}: member {member.name!r}: {problem}")
        if not (member.isreg() and not entry.link):
            return
        reader = tar.extractfile(member)
        assert reader is not None
        faults.reached("stage")
        fd = -1
        staged = b"%d" % len(self.staged)
        if not self.dry_run:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.staging_fd)
        try:
            digest = copy_member(reader, member, fd, entry.size)
            if digest != entry.digest:
                raise DeltaError(f"{self.delta}: the content of {member.name!r} does not match its hash (corrupt or tampered with)")
            if fd >= 0:
                os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode)
                set_xattrs(fd, entry.xattrs)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                self.staged[entry.path] = staged
        except OSError as exc:
            raise fs_error(exc, "stage", self.root_path / os.fsdecode(entry.path)) from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def discard_staging(self) -> None:
        """Remove the staging directory and whatever is still in it (all of it, after a failure)."""
        if self.staging is None:
            return
        try:
            for leftover in os.scandir(self.staging_fd):
                if leftover.is_dir(follow_symlinks=False):
                    os.rmdir(leftover.name, dir_fd=self.staging_fd)
                else:
                    os.unlink(leftover.name, dir_fd=self.staging_fd)
            self.staging.rmdir()
            os.utime(self.staging.parent, ns=(self.staging_parent_mtime, self.staging_parent_mtime))
        except OSError as exc:
            log.warning("cannot remove the staging directory %s: %s", self.staging, exc.strerror)
        finally:
            os.close(self.staging_fd)
            self.staging_fd = -1
            self.staging = None

    # -- phase 2: commit ------------------------------------------------------------------
    def commit(self) -> tuple[int, int, int]:
        assert self.header is not None
        os.sync()  # staged data is on disk before any rename makes it visible
        self.root.forget()
        dir_times: dict[bytes, int] = {}
        touched: dict[bytes, int] = {}
        counts = {Op.CREATE: 0, Op.META: 0, Op.DELETE: 0}

        def touch_parent(path: bytes) -> None:
            parent = path.rpartition(b"/")[0]
            if parent not in touched:
                st = self.root.lstat(parent) if parent else os.fstat(self.root.fd)
                if st is not None:
                    touched[parent] = st.st_mtime_ns

        for op, item in self.header.ops:
            path = item if isinstance(item, bytes) else item.path
            try:
                if op is Op.DELETE:
                    touch_parent(path)
                    self.root.remove(path, self.exclude)
                elif isinstance(item, Entry):
                    if op is Op.CREATE:
                        touch_parent(path)
                        self.create(item)
                    elif self.root.lstat(path) is not None:
                        self.root.set_metadata(path, item)
                    if item.kind is Kind.DIR:
                        dir_times[path] = item.mtime_ns
            except OSError as exc:
                raise fs_error(exc, "apply the delta to", self.root_path / os.fsdecode(path)) from exc
            counts[op] += 1
        for parent, mtime in touched.items():
            dir_times.setdefault(parent, mtime)
        for path in sorted(dir_times, reverse=True):  # children before parents
            fd, name = self.root.parent(path) if path else (self.root.fd, b".")
            os.utime(name, ns=(dir_times[path], dir_times[path]), dir_fd=fd, follow_symlinks=False)
        os.sync()
        return counts[Op.CREATE], counts[Op.META], counts[Op.DELETE]

    def create(self, entry: Entry) -> None:
        """Put ``entry`` in place: made complete in the staging directory, then renamed to its name.

        Nothing is ever made under a temporary name inside the root, so an
        interrupted merge leaves no stray file there, only the staging directory.
        """
        fd, name = self.root.parent(entry.path)
        existing = self.root.lstat(entry.path)
        if entry.kind is Kind.DIR and existing is not None and stat.S_ISDIR(existing.st_mode):
            self.root.set_metadata(entry.path, entry)
            return
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            self.root.remove(entry.path, self.exclude)
            fd, name = self.root.parent(entry.path)
        elif existing is not None and entry.kind is Kind.DIR:
            os.unlink(name, dir_fd=fd)  # rename() cannot put a directory over a file
        if entry.kind is Kind.FILE and not entry.link:
            staged = self.staged[entry.path]
        else:
            staged = b"n%d" % self.serial
            self.serial += 1
            if entry.link:
                link_fd, link_name = self.root.parent(entry.link)
                os.link(link_name, staged, src_dir_fd=link_fd, dst_dir_fd=self.staging_fd, follow_symlinks=False)
            elif entry.kind is Kind.DIR:
                os.mkdir(staged, 0o700, dir_fd=self.staging_fd)
            elif entry.kind is Kind.SYMLINK:
                os.symlink(entry.target, staged, dir_fd=self.staging_fd)
            elif entry.kind is Kind.FIFO:
                os.mkfifo(staged, 0o600, dir_fd=self.staging_fd)
            else:
                os.mknod(staged, 0o600 | MODE_OF_KIND[entry.kind], entry.rdev, dir_fd=self.staging_fd)
            if not entry.link:
                set_metadata_at(self.staging_fd, staged, entry)
        faults.reached("rename")
        try:
            os.rename(staged, name, src_dir_fd=self.staging_fd, dst_dir_fd=fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            raise FsError(f"{self.root_path / os.fsdecode(entry.path)} is on another file system than {self.staging}; "
                          "merging across file systems is not supported") from None
        try:  # rename() does nothing when both names are already the same file
            os.unlink(staged, dir_fd=self.staging_fd)
        except FileNotFoundError:
            pass


def member_mismatch(member: tarfile.TarInfo, entry: Entry) -> str:
    """Why ``member`` does not carry what the header says ``entry`` is; '' if it does."""
    if entry.link:
        ok = member.islnk() and os.fsencode(member.linkname) == entry.link
        return "" if ok else f"expected a hard link to {display_path(entry.link)!r}"
    checks = {
        Kind.FILE: member.isreg() and member.size == entry.size,
        Kind.DIR: member.isdir(),
        Kind.SYMLINK: member.issym() and os.fsencode(member.linkname) == entry.target,
        Kind.CHAR: member.ischr() and os.makedev(member.devmajor, member.devminor) == entry.rdev,
        Kind.BLOCK: member.isblk() and os.makedev(member.devmajor, member.devminor) == entry.rdev,
        Kind.FIFO: member.isfifo(),
    }
    return "" if checks[entry.kind] else f"its type or size differs from the header's {entry.kind.name.lower()}"


def copy_member(reader: IO[bytes], member: tarfile.TarInfo, fd: int, size: int) -> str:
    """Copy a member's content to ``fd`` (-1: only hash it), keeping holes; returns its SHA-256."""
    h = hashlib.sha256()
    # tarfile keeps a sparse member's (offset, size) extents in TarInfo.sparse (typeshed: bytes).
    extents = cast("list[tuple[int, int]]", member.sparse) if member.sparse is not None else [(0, size)]
    raw = reader.raw  # type: ignore[attr-defined]  # tarfile's own file view: seeks forward in a stream
    position = 0
    for start, length in extents:
        hash_zeros(h, start - position)
        raw.seek(start)
        if fd >= 0:
            os.lseek(fd, start, os.SEEK_SET)
        remaining = length
        while remaining:
            chunk = raw.read(min(CHUNK, remaining))
            if not chunk:
                raise DeltaError(f"member {member.name!r} is truncated")
            h.update(chunk)
            if fd >= 0:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            remaining -= len(chunk)
        position = start + length
    hash_zeros(h, size - position)
    if fd >= 0:
        os.ftruncate(fd, size)
    return h.hexdigest()


def apply_delta(root: Path, delta: Path, *, force: bool = False, dry_run: bool = False, exclude: Excluder | None = None) -> MergeReport:
    """Apply ``delta`` to ``root``; with ``dry_run`` only check it and say what would change."""
    merge = Merge(root, delta, exclude or Excluder.load(root), force, dry_run)
    try:
        try:
            merge.stage()
        except BaseException:
            merge.discard_staging()
            raise
        assert merge.header is not None
        plan = describe(merge.header.ops)
        if dry_run:
            created, updated, deleted = (sum(1 for op, _ in merge.header.ops if op is kind) for kind in (Op.CREATE, Op.META, Op.DELETE))
            return MergeReport(created, updated, deleted, base_id=merge.header.base_id, plan=plan)
        faults.reached("staged")
        # Once the root starts to change, Ctrl-C and termination wait until it is done:
        # a merge is applied whole (only SIGKILL or a crash can stop it half-way).
        deferred = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
        try:
            try:
                created, updated, deleted = merge.commit()
            finally:
                merge.discard_staging()
            if signal.SIGINT in signal.sigpending():
                signal.sigwait({signal.SIGINT})
                raise Interrupted(f"interrupted after {delta} was applied in full")
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, deferred)
        return MergeReport(created, updated, deleted, merge.header.base_id, plan)
    finally:
        merge.root.close()


def describe(ops: list[tuple[Op, Entry | bytes]]) -> list[str]:
    words = {Op.CREATE: "create", Op.META: "update", Op.DELETE: "delete"}
    return [f"{words[op]} /{display_path(item if isinstance(item, bytes) else item.path)}" for op, item in ops]
