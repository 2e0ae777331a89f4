"""Walking a root: exclusions, lstat metadata, xattrs, hardlink groups, in manifest order.

``walk`` yields every entry of a root in the byte order of its full path, the
order of a manifest, so that a manifest and a tree can be compared as two
sorted streams (see diff.py).  It holds one listing per directory level it is
in, plus the hardlink groups whose members have not all been met yet (only
files with more than one link, which are few: see ``walk``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Protocol

from .atomicfile import ANY_MARK, is_temporary
from .errors import ConfigError, fs_error
from .manifest import KIND_OF_MODE, escape, format_key

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE = Path(__file__).with_name("exclude.default")
IMAGE_EXCLUDE = Path("etc/apppot/exclude")  # the package's conffile, under the root
Item = tuple[bytes, bytes, bool]  # what a walk yields: path, manifest key (see manifest.py), sparse file?


def _glob_to_regex(component: bytes) -> bytes:
    out = b""
    i = 0
    while i < len(component):
        c = component[i : i + 1]
        if c == b"*":
            out += b"[^/]*"
        elif c == b"?":
            out += b"[^/]"
        elif c == b"[" and b"]" in component[i + 2 :]:
            end = component.index(b"]", i + 2)
            body = component[i + 1 : end]
            if body.startswith(b"!"):
                body = b"^" + body[1:]
            out += b"[" + body.replace(b"\\", b"\\\\") + b"]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return out


class Excluder:
    """Decides which paths (relative to the root, as bytes) are left out."""

    def __init__(self, patterns: Iterable[bytes]) -> None:
        self.patterns = sorted(set(patterns))
        self._components = [[_glob_to_regex(c) for c in p.strip(b"/").split(b"/")] for p in self.patterns]
        alternatives = [b"/".join(parts) for parts in self._components]
        body = b"|".join(alternatives) if alternatives else b"(?!)"
        self._regex = re.compile(b"(?:" + body + b")(?:/.*)?", re.S)
        # For each depth N with patterns of N components: their first N-1 components, which
        # the directory must match for a pattern to match an entry in it.
        by_depth: dict[int, list[bytes]] = {}
        for parts in self._components:
            by_depth.setdefault(len(parts), []).append(b"/".join(parts[:-1]))
        self._prefixes = {n: re.compile(b"|".join(p), re.S) for n, p in by_depth.items()}

    def __call__(self, rel: bytes) -> bool:
        return self._regex.fullmatch(rel) is not None

    def in_directory(self, rel_dir: bytes) -> Callable[[bytes], bool] | None:
        """A test for the entries of ``rel_dir`` (itself not excluded), or None when no pattern can match them.

        A pattern of N components can only exclude entries at depth N: the walk
        never enters an excluded directory, so deeper entries need no test at all.
        """
        depth = rel_dir.count(b"/") + 2 if rel_dir else 1
        prefixes = self._prefixes.get(depth)
        if prefixes is None or (depth > 1 and prefixes.fullmatch(rel_dir) is None):
            return None
        return self
    @classmethod
    def load(cls, root: Path, extra_files: Iterable[Path] = (), extra_paths: Iterable[Path] = ()) -> Excluder:
        """The image's exclude list (or the packaged default), plus ``extra_files`` and ``extra_paths``."""
        image_list = root / IMAGE_EXCLUDE
        sources = [image_list if image_list.is_file() else DEFAULT_EXCLUDE, *extra_files]
        patterns: list[bytes] = []
        for source in sources:
            patterns += read_patterns(source)
        resolved_root = os.fsencode(root.resolve())
        for extra in extra_paths:
            absolute = os.fsencode(Path(os.path.abspath(extra)))
            if absolute.startswith(resolved_root.rstrip(b"/") + b"/"):
                patterns.append(b"/" + glob_escape(absolute[len(resolved_root.rstrip(b"/")) + 1 :]))
        return cls(patterns)


def glob_escape(path: bytes) -> bytes:
    return re.sub(rb"([*?\[])", rb"[\1]", path)


def read_patterns(source: Path) -> list[bytes]:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read exclude list {source}: {exc.strerror}") from None
    patterns = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if not line.startswith(b"/"):
            raise ConfigError(f"{source}:{number}: exclude pattern {os.fsdecode(line)!r} is not an absolute path")
        if b"/../" in line + b"/" or line.rstrip(b"/") == b"":
            raise ConfigError(f"{source}:{number}: exclude pattern {os.fsdecode(line)!r} would exclude everything")
        patterns.append(line.rstrip(b"/"))
    return patterns


def read_xattrs(path: bytes | int) -> tuple[tuple[bytes, bytes], ...]:
    """All extended attributes of ``path`` (not following symlinks); none where unsupported."""
    follow = isinstance(path, int)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
            return ()
        raise
    if not names:
        return ()
    pairs = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return tuple(sorted(pairs))




class Lister(Protocol):
    """Where a walk gets its directory listings (``list_dir``'s results) from: e.g. workers.Workers."""

    def listing(self, rel_dir: bytes, root_dev: int) -> list[Planned]: ...


def walk(root: Path, exclude: Excluder, on_temporary: Callable[[bytes], object] | None = None, lister: Lister | None = None) -> Iterator[Item]:
    """Every entry under ``root`` (not crossing mount points, leaving out what ``exclude`` says),
    as ``(path, key, sparse)``, in the byte order of the full paths.

    A manifest sorts full paths as bytes, which is not "each directory's names
    sorted, depth first": ``a-b`` comes between ``a`` and ``a/b``, as ``-`` sorts
    before ``/``.  So each directory's listing is sorted with every
    subdirectory standing twice: as ``name`` (the entry) and as ``name/`` (the
    place where its contents come); the contents of a directory are
    contiguous in full-path order, so they are listed only when their turn comes.

    Hardlinks: the first member of a group in this order is the smallest path,
    the group's leader; every later member's key names it.  A group is
    remembered from its first member until ``st_nlink`` members were met, so
    memory holds only groups split across the part of the tree yet to come
    (and those with members outside the tree or excluded).

    AppPot temporaries met on the way are never listed; ``on_temporary`` gets their full paths.
    ``lister`` lists directories instead of this process (ahead of the walk, in
    other processes); it must use the same ``exclude`` and ``on_temporary``.
    """
    broot = os.fsencode(root)
    try:
        root_dev = os.lstat(broot).st_dev
    except OSError as exc:
        raise fs_error(exc, "read the root", root) from exc
    groups: dict[tuple[int, int], list[object]] = {}  # (st_dev, st_ino) -> [leader, members still to come]

    def list_here(rel_dir: bytes, root_dev: int) -> list[Planned]:
        return list_dir(broot, rel_dir, root_dev, exclude, on_temporary)

    listing = lister.listing if lister is not None else list_here
    stack: list[Iterator[Planned]] = [iter(listing(b"", root_dev))]
    while stack:
        planned = next(stack[-1], None)
        if planned is None:
            stack.pop()
            continue
        _, rel, key, sparse, inode, nlink = planned
        if key is None:  # the contents of the directory rel, whose entry came earlier
            stack.append(iter(listing(rel, root_dev)))
            continue
        if inode is not None:
            group = groups.get(inode)
            if group is None:
                groups[inode] = [rel, nlink - 1]
            else:
                key += escape(group[0])  # type: ignore[arg-type]
                group[1] -= 1  # type: ignore[operator]
                if group[1] <= 0:  # type: ignore[operator]
                    del groups[inode]
        yield rel, key, sparse


# One planned step of a walk: sort key, path, manifest key (None: list this directory now),
# sparse, hardlink inode (None: a single link), link count.
Planned = tuple[bytes, bytes, "bytes | None", bool, "tuple[int, int] | None", int]
_by_sort_key = itemgetter(0)
_KIND_BYTES_OF_MODE = {mode: kind.encode() for mode, kind in KIND_OF_MODE.items()}


def list_dir(broot: bytes, rel_dir: bytes, root_dev: int, exclude: Excluder, on_temporary: Callable[[bytes], object] | None) -> list[Planned]:
    """The entries of one directory, each with its key, and its subdirectories' contents to come, in walk order.

    Each entry is looked at by its name from inside the open directory (``fchdir``, then ``lstat``
    and ``listxattr`` of the name), not by its full path: the kernel resolves one component
    instead of every one of the path, a fifth of the walk's system time (measured).  Where the
    working directory cannot be reopened to come back to, full paths are used instead.
    """
    full_dir = os.path.join(broot, rel_dir) if rel_dir else broot
    try:
        # A directory met on the walk is never followed if it became a symlink meanwhile; the root may be one.
        dir_fd = os.open(full_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if rel_dir else 0))
    except OSError as exc:
        raise fs_error(exc, "list", full_dir) from exc
    try:
        saved_cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        saved_cwd = None  # no way back to the working directory: stay in it and use full paths
    temporaries: list[bytes] = []
    try:
        if saved_cwd is not None:
            os.fchdir(dir_fd)
        planned = _list_open_dir(dir_fd, full_dir, rel_dir, root_dev, exclude, temporaries, relative=saved_cwd is not None)
    except OSError as exc:
        raise fs_error(exc, "list", full_dir) from exc
    finally:
        if saved_cwd is not None:
            os.fchdir(saved_cwd)
            os.close(saved_cwd)
        os.close(dir_fd)
    if on_temporary is not None:
        for path in temporaries:  # back in our working directory, where a relative root's paths hold
            on_temporary(path)
    return planned


def _list_open_dir(dir_fd: int, full_dir: bytes, rel_dir: bytes, root_dev: int, exclude: Excluder,
                   temporaries: list[bytes], *, relative: bool) -> list[Planned]:
    """``list_dir``'s work on the open directory; ``relative``: it is the working directory too.

    The hot loop of every walk: names come as bytes (``listdir``), each is
    looked at once (``lstat``) and its key formatted in one step in the common
    case (no xattrs, no target, no device), as format_key would write it.
    """
    lstat: Callable[[bytes], os.stat_result]
    listxattr: Callable[[bytes], list[str]]
    if relative:  # names relative to the working directory: the kernel resolves one component
        names = os.listdir(b".")
        lstat, listxattr = os.lstat, functools.partial(os.listxattr, follow_symlinks=False)
    else:
        names = [os.fsencode(n) for n in os.listdir(dir_fd)]
        lstat = functools.partial(os.lstat, dir_fd=dir_fd)

        def listxattr(name: bytes) -> list[str]:
            return os.listxattr(os.path.join(full_dir, name), follow_symlinks=False)
    excluded = exclude.in_directory(rel_dir)
    prefix = rel_dir + b"/" if rel_dir else b""
    planned: list[Planned] = []
    append = planned.append
    kind_bytes, s_ifreg, s_ifdir, s_iflnk, join = _KIND_BYTES_OF_MODE, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, os.path.join
    for name in names:
        if excluded and excluded(prefix + name):
            continue
        if ANY_MARK in name and is_temporary(name):
            temporaries.append(join(full_dir, name))  # AppPot's own, live or left by a dead run: never recorded
            continue
        try:
            st = lstat(name)
            mode = st.st_mode
            ifmt = mode & 0o170000
            kind = kind_bytes.get(ifmt)
            if kind is None:
                continue  # a socket: it cannot be archived and is recreated by its program
            target = b""
            sparse = False
            inode = None
            size = 0
            if ifmt == s_ifreg:
                size = st.st_size
                if st.st_nlink > 1:
                    inode = (st.st_dev, st.st_ino)
                sparse = st.st_blocks * 512 < size
            elif ifmt == s_ifdir:
                if st.st_dev != root_dev:
                    log.debug("not crossing into the mount point %s", os.fsdecode(join(full_dir, name)))
                    continue
                append((name + b"/", prefix + name, None, False, None, 0))
            elif ifmt == s_iflnk:
                target = os.readlink(name, dir_fd=dir_fd)
            try:
                has_xattrs = bool(listxattr(name))
            except OSError:
                has_xattrs = True  # let read_xattrs tell "none" from a real error
            if target or has_xattrs or kind == b"c" or kind == b"b":
                here = name if relative else join(full_dir, name)
                key = format_key(KIND_OF_MODE[ifmt], mode & 0o7777, st.st_uid, st.st_gid, size, st.st_mtime_ns, target,
                                 st.st_rdev, read_xattrs(here) if has_xattrs else (), b"")
            else:  # the common case, as format_key writes it
                key = b"%s\t%o\t%d\t%d\t%d\t%d\t\t\t\t" % (kind, mode & 0o7777, st.st_uid, st.st_gid, size, st.st_mtime_ns)
            append((name, prefix + name, key, sparse, inode, st.st_nlink))
        except FileNotFoundError:
            continue  # vanished while we looked: not part of this tree
        except OSError as exc:
            raise fs_error(exc, "read", join(full_dir, name)) from exc
    planned.sort(key=_by_sort_key)
    return planned
