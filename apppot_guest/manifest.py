"""The manifest format: one line per file-system entry, bytes-safe, sorted.

A manifest file is::

    apppot-manifest 1
    {"apppot_version": "...", "created": "...", "entries": N, "id": "sha256:..."}
    <entry line>
    ...

An entry line has twelve tab-separated fields::

    path kind mode uid gid size mtime_ns target rdev xattrs link digest

Everything between ``path`` and ``digest`` is the entry's *key*: when the key
of a path is the same in the base and in the tree, the entry is unchanged
(size and mtime stand in for the content, as in ``rsync``), which makes a
comparison one bytes equality for almost every entry.

``path``, ``target`` and ``link`` are raw bytes relative to the root (no
leading slash), with tab, newline, carriage return, backslash and other
control bytes written as ``\\xHH``; every other byte, valid UTF-8 or not, is
stored as it is.  ``mode`` is octal, ``rdev`` is ``major:minor``, ``xattrs`` is
a comma-separated list of ``name=hexvalue`` (``,`` and ``=`` in names escaped
too).  An empty field means "none".  ``link`` names the hardlink group's first
path (in byte order) on every other member of the group.

The manifest's ID is the SHA-256 of its entry lines: the same tree gives the
same ID wherever and whenever it is recorded.

Entries are sorted by the bytes of their paths.  ``BaseWriter`` writes a
manifest entry by entry as a walk yields them (line 2 is written last, padded
with spaces to a fixed width, which JSON allows), and ``read_records``
streams one back, checking order, count and ID as it goes: neither holds more
than a buffer of the manifest in memory.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import __version__, faults
from .atomicfile import create_temp, write_atomic
from .errors import DeltaError, NoBaseError, fs_error

MAGIC = b"apppot-manifest 1"
BASE_DIR = Path("var/lib/apppot")
BASE_NAME = "base.manifest"


class Kind(enum.StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    CHAR = "c"
    BLOCK = "b"
    FIFO = "p"


KIND_OF_MODE = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
    stat.S_IFIFO: Kind.FIFO,
}
MODE_OF_KIND = {kind: mode for mode, kind in KIND_OF_MODE.items()}


@dataclass(frozen=True, slots=True)
class Entry:
    """What apppot-snap records of one file-system entry."""

    path: bytes
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""
    target: bytes = b""
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    link: bytes = b""

    def same_content(self, other: Entry) -> bool:
        """True if the two entries have the same type and payload (not metadata)."""
        return (
            self.kind == other.kind
            and self.size == other.size
            and self.digest == other.digest
            and self.target == other.target
            and self.rdev == other.rdev
            and self.link == other.link
        )

    def differences(self, other: Entry) -> list[str]:
        """Names of the fields in which ``other`` (the current state) differs from this entry (the base)."""
        fields = ("kind", "size", "digest", "target", "rdev", "link", "mode", "uid", "gid", "xattrs")
        changed = [f for f in fields if getattr(self, f) != getattr(other, f)]
        if not same_mtime(self.mtime_ns, other.mtime_ns):
            changed.append("mtime_ns")
        return changed


def same_mtime(base_ns: int, current_ns: int) -> bool:
    """Equal mtimes, also when a copy kept only whole seconds of the base's.

    ``mkfs.ext4 -d`` (e2fsprogs 1.47) and some copy tools drop the
    nanoseconds; a real modification sets them, so a whole-second mtime in the
    base's second is the same mtime, not a change.
    """
    return current_ns == base_ns or (current_ns % 1_000_000_000 == 0 and current_ns == base_ns - base_ns % 1_000_000_000)


_ESCAPE_PATH = re.compile(rb"[\x00-\x1f\x7f\\]")
_ESCAPE_NAME = re.compile(rb"[\x00-\x1f\x7f\\,=]")
_UNESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def escape(raw: bytes, pattern: re.Pattern[bytes] = _ESCAPE_PATH) -> bytes:
    return pattern.sub(lambda m: b"\\x%02x" % m.group()[0], raw)


def unescape(field: bytes) -> bytes:
    if b"\\" not in field:
        return field
    out = _UNESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), field)
    if out.count(b"\\") != field.count(b"\\x5c"):
        raise ValueError(f"bad escape in {field!r}")
    return out


def format_key(
    kind: Kind, mode: int, uid: int, gid: int, size: int, mtime_ns: int,
    target: bytes, rdev: int, xattrs: tuple[tuple[bytes, bytes], ...], link: bytes,
) -> bytes:
    """The fields between path and digest, as they stand in a manifest line."""
    xattr_field = b",".join(escape(n, _ESCAPE_NAME) + b"=" + v.hex().encode() for n, v in xattrs) if xattrs else b""
    rdev_field = b"%d:%d" % (os.major(rdev), os.minor(rdev)) if kind in (Kind.CHAR, Kind.BLOCK) else b""
    return b"%s\t%o\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s" % (
        kind.encode(), mode, uid, gid, size, mtime_ns, escape(target) if target else b"", rdev_field, xattr_field, escape(link) if link else b"",
    )


# Where the size and the mtime stand among a key's tab-separated fields (kind, mode, uid, gid, size, mtime, ...):
# the fields format_key writes, for code that reads a key without parsing all of it.
KEY_SIZE, KEY_MTIME = 4, 5


def format_entry(e: Entry) -> bytes:
    key = format_key(e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.target, e.rdev, e.xattrs, e.link)
    return escape(e.path) + b"\t" + key + b"\t" + e.digest.encode()


def parse_entry(line: bytes) -> Entry:
    """Parse one entry line; raises ValueError on anything malformed."""
    path, _, record = line.partition(b"\t")
    return parse_record(unescape(path), record)


def parse_record(path: bytes, record: bytes) -> Entry:
    """The entry for ``path`` from the rest of its line (key and digest)."""
    fields = record.split(b"\t")
    if len(fields) != 11:
        raise ValueError(f"expected 12 fields, found {len(fields) + 1}")
    kind, mode, uid, gid, size, mtime, target, rdev, xattrs, link, digest = fields
    rdev_num = 0
    if rdev:
        major, minor = rdev.split(b":")
        rdev_num = os.makedev(int(major), int(minor))
    pairs = []
    if xattrs:
        for item in xattrs.split(b","):
            name, value = item.split(b"=")
            pairs.append((unescape(name), bytes.fromhex(value.decode("ascii"))))
    entry = Entry(
        path=path,
        kind=Kind(kind.decode("ascii")),
        mode=int(mode, 8),
        uid=int(uid),
        gid=int(gid),
        size=int(size),
        mtime_ns=int(mtime),
        digest=digest.decode("ascii"),
        target=unescape(target),
        rdev=rdev_num,
        xattrs=tuple(pairs),
        link=unescape(link),
    )
    if not entry.path or entry.mode < 0 or entry.size < 0:
        raise ValueError("empty path or negative number")
    return entry


def join_document(magic: bytes, meta: dict[str, object], lines: Iterable[bytes]) -> bytes:
    """A magic line, a JSON line, then ``lines``: the layout of manifests and delta headers."""
    return b"\n".join([magic, json.dumps(meta, sort_keys=True).encode(), *lines]) + b"\n"


def split_document(data: bytes, magic: bytes, where: str, what: str) -> tuple[dict[str, object], list[bytes]]:
    """The JSON line and the remaining lines of a document made by ``join_document``."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) < 2 or lines[0] != magic:
        raise DeltaError(f"{where}: not {what} (it does not start with {magic.decode()!r})")
    try:
        meta = json.loads(lines[1])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise DeltaError(f"{where}: line 2 of {what}: {exc}") from None
    return meta, lines[2:]


def entries_id(lines: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line)
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """A recorded tree: the record (key and digest) of each path, sorted, and the manifest's ID.

    Records stay bytes until an entry is asked for: most of them are only ever compared.
    """

    records: dict[bytes, bytes]
    id: str
    created: str = ""
    apppot_version: str = __version__

    @classmethod
    def from_records(cls, records: dict[bytes, bytes]) -> Manifest:
        ordered = {path: records[path] for path in sorted(records)}
        return cls(
            records=ordered,
            id=entries_id(escape(p) + b"\t" + r for p, r in ordered.items()),
            created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> Manifest:
        return cls.from_records({e.path: format_entry(e).partition(b"\t")[2] for e in entries})

    def entry(self, path: bytes) -> Entry | None:
        record = self.records.get(path)
        if record is None:
            return None
        try:
            return parse_record(path, record)
        except (ValueError, KeyError) as exc:
            raise DeltaError(f"the base manifest's entry for {os.fsdecode(path)!r} is malformed: {exc}") from None

    def __len__(self) -> int:
        return len(self.records)

    def to_bytes(self) -> bytes:
        meta = {"apppot_version": self.apppot_version, "created": self.created, "entries": len(self.records), "id": self.id}
        return join_document(MAGIC, meta, (escape(p) + b"\t" + r for p, r in self.records.items()))

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        header, lines = split_document(data, MAGIC, where, "an apppot manifest")
        try:  # the ID check below guards the content; a record is parsed only when asked for
            pairs = (line.split(b"\t", 1) for line in lines)
            records = {(unescape(p) if b"\\" in p else p): r for p, r in pairs}
        except ValueError as exc:
            raise DeltaError(f"{where}: bad manifest entry: {exc}") from None
        manifest_id = entries_id(lines)
        if header.get("id") != manifest_id or header.get("entries") != len(records):
            raise DeltaError(f"{where}: manifest is corrupt (its ID or entry count does not match its entries)")
        return cls(records, manifest_id, str(header.get("created", "")), str(header.get("apppot_version", "")))


def base_path(root: Path) -> Path:
    return root / BASE_DIR / BASE_NAME


def load_base(root: Path) -> Manifest:
    """The whole base manifest in memory (small trees, tests); commands stream it with ``read_records``."""
    path = base_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NoBaseError(f"no base manifest at {path}: record one with 'apppot-snap base'") from None
    except OSError as exc:
        raise fs_error(exc, "read the base manifest", path) from exc
    return Manifest.from_bytes(data, os.fspath(path))


READ_CHUNK = 1 << 20
HEADER_WIDTH = 255  # bytes of line 2 as BaseWriter writes it, without the newline


@dataclass(frozen=True, slots=True)
class BaseRecords:
    """A base manifest being read: its header, and its records ``(path, record)`` in path order.

    ``records`` raises DeltaError when the manifest turns out corrupt (its ID,
    count or order is wrong), at the latest after its last record: a caller
    acts on a comparison only when the stream has ended.
    """

    id: str
    entries: int
    records: Iterator[tuple[bytes, bytes]]


def read_records(root: Path) -> BaseRecords:
    path = base_path(root)
    try:
        f = open(path, "rb")  # noqa: SIM115 (the records generator reads and closes it)
    except FileNotFoundError:
        raise NoBaseError(f"no base manifest at {path}: record one with 'apppot-snap base'") from None
    except OSError as exc:
        raise fs_error(exc, "read the base manifest", path) from exc
    where = os.fspath(path)
    try:
        head = f.readline(len(MAGIC) + 1) + f.readline(64 << 10)
        meta, _ = split_document(head, MAGIC, where, "an apppot manifest")
    except BaseException:
        f.close()
        raise
    entries = meta.get("entries")
    return BaseRecords(str(meta.get("id", "")), int(entries) if isinstance(entries, int) else -1, _records(f, where, meta))


def _records(f: IO[bytes], where: str, meta: dict[str, object]) -> Iterator[tuple[bytes, bytes]]:
    h = hashlib.sha256()
    count = 0
    previous = b""
    rest = b""
    with f:
        while True:
            try:
                chunk = f.read(READ_CHUNK)
            except OSError as exc:
                raise fs_error(exc, "read the base manifest", where) from exc
            if not chunk:
                break
            h.update(chunk)
            lines = (rest + chunk if rest else chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                path, tab, record = line.partition(b"\t")
                try:
                    if not tab:
                        raise ValueError("no tab")
                    if b"\\" in path:
                        path = unescape(path)
                except ValueError as exc:
                    raise DeltaError(f"{where}: bad manifest entry: {exc}") from None
                if path <= previous:
                    raise DeltaError(f"{where}: manifest is corrupt (its entries are not sorted)")
                previous = path
                count += 1
                yield path, record
        if rest:
            raise DeltaError(f"{where}: manifest is corrupt (its last line is cut short)")
    if meta.get("id") != "sha256:" + h.hexdigest() or meta.get("entries") != count:
        raise DeltaError(f"{where}: manifest is corrupt (its ID or entry count does not match its entries)")


def read_base_id(root: Path) -> str:
    """The ID of the base, checked against its entries (in constant memory)."""
    base = read_records(root)
    for _ in base.records:
        pass
    return base.id


class BaseWriter:
    """Writes a manifest entry by entry (``add``, in path order), computing its ID as it goes.

    ``path`` None: nothing is written (a dry run), the ID is computed all the same.
    """

    FLUSH_AT = 1 << 20

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd = -1
        self.tmp: Path | None = None
        self.h = hashlib.sha256()
        self.entries = 0
        self.buffer = bytearray()
        if path is not None:
            make_dirs_quietly(path.parent)
            try:
                self.fd, self.tmp = create_temp(path)
            except OSError as exc:
                raise fs_error(exc, "write", path) from exc
            self.buffer += MAGIC + b"\n" + b" " * HEADER_WIDTH + b"\n"
        self.body_starts = len(self.buffer)

    def add(self, path: bytes, record: bytes) -> None:
        self.buffer += escape(path) + b"\t" + record + b"\n" if _NEEDS_ESCAPE(path) else path + b"\t" + record + b"\n"
        self.entries += 1
        if len(self.buffer) >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        view = memoryview(self.buffer)
        self.h.update(view[self.body_starts :])
        self.body_starts = 0
        try:
            while self.fd >= 0 and view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise fs_error(exc, "write", self.path) from exc
        finally:
            view.release()
        self.buffer = bytearray()

    @property
    def id(self) -> str:
        return "sha256:" + self.h.hexdigest()

    def finish(self) -> str:
        """Complete the manifest and give it its name (unless a dry run); returns its ID."""
        self._flush()
        if self.path is None or self.tmp is None:
            return self.id
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = {"apppot_version": __version__, "created": created, "entries": self.entries, "id": self.id}
        line = json.dumps(meta, sort_keys=True).encode()
        assert len(line) <= HEADER_WIDTH, line
        try:
            os.pwrite(self.fd, line.ljust(HEADER_WIDTH), len(MAGIC) + 1)
            os.fsync(self.fd)
            os.fchmod(self.fd, 0o644)
            faults.reached("rename")
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise fs_error(exc, "write", self.path) from exc
        self.tmp = None
        self.discard()
        try:  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # hostfs may not support fsync on a directory
        return self.id

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_NEEDS_ESCAPE = _ESCAPE_PATH.search


def save_base(root: Path, manifest: Manifest) -> Path:
    path = base_path(root)
    make_dirs_quietly(path.parent)
    write_atomic(path, manifest.to_bytes())
    return path


def make_dirs_quietly(directory: Path) -> None:
    """Create ``directory`` and its missing parents, leaving the mtimes of existing parents as they were.

    Recording a base must not itself show up as a change of ``var/lib``.
    """
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    if not missing:
        return
    st = os.lstat(directory)
    try:
        for new in reversed(missing):
            new.mkdir(mode=0o755)
    except OSError as exc:
        raise fs_error(exc, "create", new) from exc
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))
