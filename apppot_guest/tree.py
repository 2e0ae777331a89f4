"""Walking a root: exclusions, lstat metadata, xattrs, hardlink groups, content hashes."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .atomicfile import ANY_MARK, is_temporary
from .errors import ConfigError, FsError, fs_error
from .manifest import KIND_OF_MODE, Entry, Kind, escape, format_key, parse_record

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE = Path(__file__).with_name("exclude.default")
IMAGE_EXCLUDE = Path("etc/apppot/exclude")  # the package's conffile, under the root
CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


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

    def __call__(self, rel: bytes) -> bool:
        return self._regex.fullmatch(rel) is not None

    def in_directory(self, rel_dir: bytes) -> Callable[[bytes], bool] | None:
        """A test for the entries of ``rel_dir`` (itself not excluded), or None when no pattern can match them.

        A pattern of N components can only exclude entries at depth N: the walk
        never enters an excluded directory, so deeper entries need no test at all.
        """
        depth = rel_dir.count(b"/") + 2 if rel_dir else 1
        if not any(len(parts) == depth for parts in self._components):
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

    def hash_files(self, paths: Iterable[bytes], progress: Callable[[int, int], None] | None = None) -> None:
        """Hash the regular files ``paths`` in a few threads (hashlib releases the GIL).

        A hash always belongs to the size and mtime recorded with it: a file
        whose size or mtime is no longer what the walk saw gets its key updated
        to what was actually read (see ``_hash_one``).
        """
        from concurrent.futures import ThreadPoolExecutor  # only hashing needs threads

        todo = [p for p in paths if self.keys[p][:1] == b"f" and p not in self.digests]
        batches = [todo[i : i + 64] for i in range(0, len(todo), 64)]  # bounded: no future per file
        done_bytes = 0
        workers = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for batch, results in zip(batches, pool.map(self._hash_batch, batches)):
                for rel, (digest, size, mtime_ns) in zip(batch, results):
                    self.digests[rel] = digest
                    fields = self.keys[rel].split(b"\t")
                    if (fields[4], fields[5]) != (b"%d" % size, b"%d" % mtime_ns):
                        log.info("%s changed after it was listed; recording what was read", os.fsdecode(rel))
                        self.total_bytes += size - int(fields[4])
                        fields[4:6] = [b"%d" % size, b"%d" % mtime_ns]
                        self.keys[rel] = b"\t".join(fields)
                if progress:
                    done_bytes += sum(int(self.keys[p].split(b"\t", 5)[4]) for p in batch)
                    progress(len(self.keys), done_bytes)

    def _hash_batch(self, batch: list[bytes]) -> list[tuple[str, int, int]]:
        return [self._hash_one(rel) for rel in batch]

    def _hash_one(self, rel: bytes) -> tuple[str, int, int]:
        """The hash of ``rel`` and the size and mtime it had all the while it was read."""
        full = os.path.join(self.broot, rel)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as exc:
            raise fs_error(exc, "read", full) from exc
        try:
            for _ in range(3):
                before = os.fstat(fd)
                digest = hash_fd(fd, rel in self.sparse)
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
    for _ in read_content(fd, size, data_extents(fd, size) if sparse else [(0, size)], h):
        pass
    return h.hexdigest()


def hash_zeros(h: hashlib._Hash, count: int) -> None:
    """Feed ``count`` zero bytes (a hole) to the hash ``h``."""
    while count > 0:
        n = min(count, CHUNK)
        h.update(_ZEROS[:n] if n < CHUNK else _ZEROS)
        count -= n
