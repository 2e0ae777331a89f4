"""File operations confined to a root directory.

Every operation names its target relative to a directory file descriptor
that was opened component by component with ``O_NOFOLLOW``: a symlink
anywhere on the way (already in the tree, or planted by a delta) makes the
operation fail instead of leaving the root.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from pathlib import Path

from .errors import UnsafePathError, display_path, fs_error
from .manifest import Entry, Kind
from .tree import Excluder

log = logging.getLogger(__name__)


class Root:
    """File operations confined to a root directory: parents opened with O_NOFOLLOW."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise fs_error(exc, "open the root", root) from exc
        self._parents: OrderedDict[bytes, int] = OrderedDict()  # a few open parent directories

    def close(self) -> None:
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()
        os.close(self.fd)

    def parent(self, rel: bytes) -> tuple[int, bytes]:
        """An fd of ``rel``'s parent directory (kept open for a while) and the last component."""
        head, _, name = rel.rpartition(b"/")
        if head in self._parents:
            self._parents.move_to_end(head)
            return self._parents[head], name
        fd = os.dup(self.fd)
        for part in head.split(b"/") if head else ():
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"refusing to write {display_path(rel)}: {display_path(head)} is not a directory (a symlink?)") from None
                raise fs_error(exc, "open the directory of", self.root / os.fsdecode(rel)) from exc
            os.close(fd)
            fd = next_fd
        self._parents[head] = fd
        if len(self._parents) > 16:
            os.close(self._parents.popitem(last=False)[1])
        return fd, name

    def forget(self, rel: bytes = b"") -> None:
        """Close the cached directories at or below ``rel`` (all with ``b""``): it is being replaced."""
        for head in [h for h in self._parents if not rel or h == rel or h.startswith(rel + b"/")]:
            os.close(self._parents.pop(head))

    def lstat(self, rel: bytes) -> os.stat_result | None:
        fd, name = self.parent(rel)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def remove(self, rel: bytes, exclude: Excluder) -> None:
        """Remove ``rel`` and everything below it, except excluded paths and other mounts."""
        self.forget(rel)
        fd, name = self.parent(rel)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._remove_tree(fd, name, rel, st.st_dev, exclude)
        else:
            os.unlink(name, dir_fd=fd)

    def _remove_tree(self, parent_fd: int, name: bytes, rel: bytes, dev: int, exclude: Excluder) -> None:
        dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            for item in list(os.scandir(dir_fd)):
                child = os.fsencode(item.name)
                child_rel = rel + b"/" + child
                st = os.stat(child, dir_fd=dir_fd, follow_symlinks=False)
                if exclude(child_rel) or st.st_dev != dev:
                    log.warning("keeping %s: excluded or another file system", display_path(child_rel))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._remove_tree(dir_fd, child, child_rel, dev, exclude)
                else:
                    os.unlink(child, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            log.warning("keeping the directory %s: it still holds excluded paths", display_path(rel))

    def set_metadata(self, rel: bytes, entry: Entry) -> None:
        fd, name = self.parent(rel)
        set_metadata_at(fd, name, entry)


def set_metadata_at(dir_fd: int, name: bytes, entry: Entry) -> None:
    """Owner, mode, xattrs and mtime of ``name`` in ``dir_fd`` (in that order: chown clears setuid and capabilities)."""
    os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
    if entry.kind is not Kind.SYMLINK:
        os.chmod(name, entry.mode, dir_fd=dir_fd)
    set_xattrs(b"/proc/self/fd/%d/%s" % (dir_fd, name), entry.xattrs)
    if entry.kind is not Kind.DIR:
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def set_xattrs(target: bytes | int, wanted: tuple[tuple[bytes, bytes], ...]) -> None:
    follow = isinstance(target, int)
    try:
        present = set(os.listxattr(target, follow_symlinks=follow))
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise
        present = set()
    wanted_names = {os.fsdecode(n) for n, _ in wanted}
    for stale in present - wanted_names:
        os.removexattr(target, stale, follow_symlinks=follow)
    for name, value in wanted:
        os.setxattr(target, os.fsdecode(name), value, follow_symlinks=follow)
