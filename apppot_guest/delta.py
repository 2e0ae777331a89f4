"""Comparing a tree with its base, and writing the difference as a delta archive.

A delta is a POSIX (pax) tar archive, optionally compressed, that GNU tar
lists cleanly.  Its first member, ``APPPOT-DELTA``, is a text header::

    apppot-delta 1
    {"apppot_version": ..., "base_id": ..., "created": ..., "create": N, "meta": N, "delete": N}
    D<TAB><escaped path>              a path to delete (with everything below it)
    C<TAB><manifest entry line>       an entry to create or replace; its member follows
    M<TAB><manifest entry line>       metadata-only change of an existing entry

The header's entry lines (see manifest.py) are the authoritative metadata:
mode, owner, nanosecond mtime, xattrs (security.capability included) and
content hashes.  After the header come the members of the ``C`` lines in the
same order: file contents (sparse files in GNU's sparse 1.0 format), hard
links, symlinks, directories, device nodes and FIFOs.  Deletions live only in
the header, so a user file named like a whiteout (``.wh.x``) is just a file.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from . import __version__, faults
from .atomicfile import create_temp
from .diff import Diff, Op
from .errors import DeltaError, FsError, ToolError, UsageError, display_path, excerpt, fs_error
from .hashing import data_extents, read_content
from .manifest import Entry, Kind, escape, format_entry, join_document, parse_entry, unescape

log = logging.getLogger(__name__)

HEADER_NAME = "APPPOT-DELTA"
HEADER_MAGIC = b"apppot-delta 1"
BLOCK = 512
RECORD = 20 * BLOCK

# File-name ending -> compressor argv (None: plain tar).  zstd is the default:
# see docs/benchmarks.md for the measurements behind the choice and level.
COMPRESSORS: dict[str, list[str] | None] = {
    ".tar.zst": ["zstd", "-q", "-T0", "-3"],
    ".tar.gz": ["gzip", "-6", "-n"],
    ".tgz": ["gzip", "-6", "-n"],
    ".tar.xz": ["xz", "-q", "-T0", "-6"],
    ".tar": None,
}
DEFAULT_SUFFIX = ".tar.zst"
DECOMPRESSORS: list[tuple[bytes, list[str]]] = [
    (b"\x28\xb5\x2f\xfd", ["zstd", "-q", "-d", "-c"]),
    (b"\x1f\x8b", ["gzip", "-d", "-c"]),
    (b"\xfd7zXZ\x00", ["xz", "-q", "-d", "-c", "-T0"]),
]


def header_bytes(base_id: str, ops: list[tuple[Op, Entry | bytes]]) -> bytes:
    counts = {op.name.lower(): 0 for op in Op}
    lines = []
    for op, item in ops:
        counts[op.name.lower()] += 1
        payload = escape(item) if isinstance(item, bytes) else format_entry(item)
        lines.append(op.encode() + b"\t" + payload)
    meta: dict[str, object] = {
        "apppot_version": __version__,
        "base_id": base_id,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **counts,
    }
    return join_document(HEADER_MAGIC, meta, lines)


# Bounds on what a header may be, from what a real one needs: a line holds one
# entry (a path and a link of at most PATH_MAX bytes, escaped: 4 x 4096 each, and
# xattrs, hex-encoded), the whole header one line per changed path.  Anything
# beyond is refused as soon as it is read, and never quoted whole.
MAX_LINE = 256 << 10
MAX_HEADER = 256 << 20  # about a million changed paths


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    meta: dict[str, object]
    ops: list[tuple[Op, Entry | bytes]]

    @property
    def base_id(self) -> str:
        return str(self.meta.get("base_id", ""))


def read_header(reader: IO[bytes], size: int, where: Path) -> DeltaHeader:
    """Parse a delta's header member of ``size`` bytes line by line, refusing it at its first fault."""
    what = f"{where}: {HEADER_NAME}"
    if size > MAX_HEADER:
        raise DeltaError(f"{what} is {size} bytes, more than any real delta's ({MAX_HEADER})")
    magic = reader.readline(len(HEADER_MAGIC) + 1)
    if magic != HEADER_MAGIC + b"\n":
        raise DeltaError(f"{what} does not start with {HEADER_MAGIC.decode()!r} but {excerpt(magic)}")
    line = reader.readline(MAX_LINE)
    try:
        meta = json.loads(line)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise DeltaError(f"{what} line 2 is not a JSON object ({str(exc)[:80]}): {excerpt(line)}") from None
    ops: list[tuple[Op, Entry | bytes]] = []
    seen: set[bytes] = set()
    number = 2
    while True:
        line = reader.readline(MAX_LINE + 1)
        if not line:
            return DeltaHeader(meta, ops)
        number += 1
        if not line.endswith(b"\n"):
            problem = "longer than any real entry" if len(line) > MAX_LINE else "not ended by a newline"
            raise DeltaError(f"{what} line {number} is {problem}: {excerpt(line)}")
        try:
            tag, _, payload = line[:-1].partition(b"\t")
            op = Op(tag.decode("ascii"))
            item: Entry | bytes = unescape(payload) if op is Op.DELETE else parse_entry(payload)
        except (ValueError, KeyError) as exc:
            raise DeltaError(f"{what} line {number} is malformed ({str(exc)[:80]}): {excerpt(line)}") from None
        path = item if isinstance(item, bytes) else item.path
        if path in seen:
            raise DeltaError(f"{where}: {display_path(path)!r} appears twice in its header")
        seen.add(path)
        ops.append((op, item))


def compressor_for(path: Path) -> list[str] | None:
    for suffix, argv in COMPRESSORS.items():
        if path.name.endswith(suffix):
            return argv
    known = ", ".join(COMPRESSORS)
    raise UsageError(f"cannot tell the compression of {path}: its name must end in one of {known}")


class TarWriter:
    """Writes pax tar members to a binary stream, padding as tar wants.

    Small pieces are gathered in a buffer of its own, so that ``out`` can be
    unbuffered: after a failure nothing is left in a file object to be flushed.
    A failed write names ``destination`` (BrokenPipeError passes: the
    compressor died, which its caller reports).
    """

    FLUSH_AT = 64 << 10

    def __init__(self, out: BinaryIO, destination: Path | None = None) -> None:
        self.out, self.destination = out, destination
        self.written = 0
        self.buffer = bytearray()

    def _write(self, data: bytes | memoryview) -> None:
        self.written += len(data)
        if len(data) < self.FLUSH_AT:
            self.buffer += data
            if len(self.buffer) >= self.FLUSH_AT:
                self.flush()
        else:
            self.flush()
            self._emit(memoryview(data))

    def flush(self) -> None:
        if self.buffer:
            self._emit(memoryview(self.buffer))
            self.buffer = bytearray()

    def _emit(self, view: memoryview) -> None:
        faults.reached("write")
        try:
            while view:
                view = view[self.out.write(view) or 0 :]
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise fs_error(exc, "write", self.destination or "the delta") from exc

    def _pad(self) -> None:
        if self.written % BLOCK:
            self._write(bytes(BLOCK - self.written % BLOCK))

    def add(self, info: tarfile.TarInfo, data: bytes = b"", pax: dict[str, bytes] | None = None) -> None:
        self._write(member_header(info, pax or {}))
        if data:
            self._write(data)
            self._pad()

    def add_file(self, info: tarfile.TarInfo, fd: int, size: int, sparse: bool, digest: str, where: bytes) -> None:
        """A regular file's content, streamed from ``fd``; checks it still matches ``digest``."""
        extents = data_extents(fd, size) if sparse else [(0, size)]
        h = hashlib.sha256()
        if sparse:
            sparse_map = [*extents, (size, 0)]
            map_text = b"".join(b"%d\n%d\n" % pair for pair in sparse_map)
            map_text = b"%d\n" % len(sparse_map) + map_text
            map_text += bytes(-len(map_text) % BLOCK)
            real_name = os.fsencode(info.name)
            head, _, tail = real_name.rpartition(b"/")
            info.name = os.fsdecode((head + b"/" if head else b"") + b"GNUSparseFile.0/" + tail)
            info.size = len(map_text) + sum(length for _, length in extents)
            pax = {"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0", "GNU.sparse.name": real_name, "GNU.sparse.realsize": b"%d" % size}
            self._write(member_header(info, pax))
            self._write(map_text)
        else:
            info.size = size
            self._write(member_header(info, {}))
        chunks = read_content(fd, size, extents, h)
        while True:
            try:
                chunk = next(chunks, None)
            except FsError:
                raise FsError(f"{os.fsdecode(where)} shrank while it was being archived; run again") from None
            if chunk is None:
                break
            self._write(chunk)
        self._pad()
        if digest and h.hexdigest() != digest:
            raise FsError(f"{os.fsdecode(where)} changed while it was being archived; run again")

    def close(self) -> None:
        self._write(bytes(2 * BLOCK))
        if self.written % RECORD:
            self._write(bytes(RECORD - self.written % RECORD))
        self.flush()


def member_header(info: tarfile.TarInfo, pax: dict[str, bytes]) -> bytes:
    """A ustar header, preceded by a pax extended header when a field does not fit ustar.

    Names go into pax records as raw bytes, without the ``hdrcharset`` record
    Python's tarfile adds for names that are not UTF-8 (GNU tar warns about it).
    """
    name, linkname = os.fsencode(info.name), os.fsencode(info.linkname)
    records = dict(pax)
    if "GNU.sparse.name" not in pax and (len(name) > 99 or not name.isascii()):
        records["path"] = name
    if len(linkname) > 99 or not linkname.isascii():
        records["linkpath"] = linkname
    for field, limit in (("size", 8**11), ("uid", 8**7), ("gid", 8**7)):
        if getattr(info, field) >= limit:
            records[field] = b"%d" % getattr(info, field)
    ustar = tarfile.TarInfo(_ascii_stub(name, 99) + ("/" if info.isdir() and len(name) < 99 and name.isascii() else ""))
    for attr in ("mode", "mtime", "type", "devmajor", "devminor"):
        setattr(ustar, attr, getattr(info, attr))
    ustar.size = info.size if "size" not in records else 0
    ustar.uid = info.uid if "uid" not in records else 0
    ustar.gid = info.gid if "gid" not in records else 0
    ustar.linkname = _ascii_stub(linkname, 99)
    ustar.uname = ustar.gname = ""
    block = ustar.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    if not records:
        return block
    body = b"".join(_pax_record(key.encode(), value) for key, value in records.items())
    pax_info = tarfile.TarInfo("././@PaxHeader")
    pax_info.type, pax_info.size = tarfile.XHDTYPE, len(body)
    return pax_info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict") + body + bytes(-len(body) % BLOCK) + block


def _ascii_stub(raw: bytes, limit: int) -> str:
    """A ustar-safe stand-in for a name whose real bytes are in a pax record."""
    return raw[-limit:].decode("ascii", "replace").replace("\ufffd", "_")


def _pax_record(key: bytes, value: bytes) -> bytes:
    payload = b" " + key + b"=" + value + b"\n"
    length = len(payload) + 1
    while len(b"%d" % length) + len(payload) != length:
        length = len(b"%d" % length) + len(payload)
    return b"%d" % length + payload


TAR_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


def tarinfo_for(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(os.fsdecode(entry.path))
    info.type = tarfile.LNKTYPE if entry.link else TAR_TYPES[entry.kind]
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.uname = info.gname = ""
    if entry.link:
        info.linkname = os.fsdecode(entry.link)
    elif entry.kind is Kind.SYMLINK:
        info.linkname = os.fsdecode(entry.target)
    elif entry.kind in (Kind.CHAR, Kind.BLOCK):
        info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    return info


def write_members(writer: TarWriter, root: bytes, sparse: frozenset[bytes], ops: Iterable[tuple[Op, Entry | bytes]],
                  progress: Callable[[int, int], None] | None) -> None:
    count = 0
    for op, entry in ops:
        if op is not Op.CREATE or not isinstance(entry, Entry):
            continue
        info = tarinfo_for(entry)
        if entry.kind is Kind.FILE and not entry.link:
            full = os.path.join(root, entry.path)
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
            except OSError as exc:
                raise fs_error(exc, "read", full) from exc
            try:
                writer.add_file(info, fd, entry.size, entry.path in sparse, entry.digest, full)
            except BrokenPipeError:
                raise  # the compressor's end, not this file's
            except OSError as exc:
                raise fs_error(exc, "read", full) from exc
            finally:
                os.close(fd)
        else:
            writer.add(info)
        count += 1
        if progress:
            progress(count, writer.written)


class DeltaOutput:
    """A delta being written: a locked temporary beside its final name until it is complete.

    Made before the tree is scanned, so that a destination that cannot be
    written is reported at once; dead temporaries of the same name go first.
    """

    def __init__(self, path: Path) -> None:
        from .state import recover_beside  # recovery needs the lock's module, writing a delta does not

        self.path = path
        self.compressor = compressor_for(path)
        if path.is_dir():
            raise UsageError(f"cannot write the delta {path}: it is a directory")
        recover_beside(path)
        try:
            self.fd, self.tmp = create_temp(path)
        except OSError as exc:
            raise fs_error(exc, "write", path) from exc

    def discard(self) -> None:
        if self.fd >= 0:
            self.tmp.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1

    def write(self, root: bytes, diff: Diff, base_id: str, progress: Callable[[int, int], None] | None = None) -> int:
        """Write the delta and give it its name; returns its size in bytes.  Any failure or interrupt leaves nothing."""
        try:
            self._write(root, diff, base_id, progress)
            faults.reached("rename")
            os.replace(self.tmp, self.path)
            size = os.fstat(self.fd).st_size
            os.close(self.fd)
            self.fd = -1
            return size
        except OSError as exc:
            raise fs_error(exc, "write", self.path) from exc
        finally:
            self.discard()

    def _write(self, root: bytes, diff: Diff, base_id: str, progress: Callable[[int, int], None] | None) -> None:
        header = header_bytes(base_id, diff.ops)
        info = tarfile.TarInfo(HEADER_NAME)
        info.size, info.mode, info.mtime = len(header), 0o644, int(time.time())
        if not self.compressor:
            with open(self.fd, "wb", buffering=0, closefd=False) as out:
                writer = TarWriter(out, self.path)
                writer.add(info, header)
                write_members(writer, root, diff.sparse, diff.ops, progress)
                writer.close()
            os.fsync(self.fd)
            return
        log.debug("compressing with %s", " ".join(self.compressor))
        try:  # in its own process group: Ctrl-C reaches only apppot-snap, which ends it
            proc = subprocess.Popen(self.compressor, stdin=subprocess.PIPE, stdout=self.fd, stderr=subprocess.PIPE, bufsize=0, process_group=0)
        except OSError as exc:
            raise ToolError(f"cannot run {self.compressor[0]}: {exc.strerror}") from exc
        assert proc.stdin is not None and proc.stderr is not None
        try:
            writer = TarWriter(proc.stdin, self.path)  # type: ignore[arg-type]
            try:
                writer.add(info, header)
                write_members(writer, root, diff.sparse, diff.ops, progress)
                writer.close()
            except BrokenPipeError:
                pass  # the compressor died: reported below
            proc.stdin.close()
            err = proc.stderr.read(4096)
            if proc.wait() != 0:
                if os.fstatvfs(self.fd).f_bavail == 0 or os.strerror(errno.ENOSPC).encode() in err:
                    raise FsError(f"cannot write {self.path}: No space left on device")
                why = excerpt(err.strip(), 200) if err.strip() else f"exit code {proc.returncode}"
                raise ToolError(f"{self.compressor[0]} failed writing {self.path}: {why}")
            os.fsync(self.fd)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # unbuffered: nothing is flushed into the dead pipe
            proc.wait()
            raise
        finally:
            proc.stderr.close()


def open_archive(path: Path) -> tuple[BinaryIO, subprocess.Popen[bytes] | None]:
    """Open a delta for reading, decompressing by its magic bytes (not its name)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 (returned to the caller, or closed here)
    except OSError as exc:
        raise fs_error(exc, "read the delta", path) from exc
    magic = os.pread(raw.fileno(), 6, 0)  # the file offset stays at 0 for the decompressor
    for prefix, argv in DECOMPRESSORS:
        if magic.startswith(prefix):
            try:
                proc = subprocess.Popen(argv, stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError as exc:
                raw.close()
                raise ToolError(f"cannot run {argv[0]} to read {path}: {exc.strerror}") from exc
            raw.close()
            return proc.stdout, proc  # type: ignore[return-value]
    if len(magic) == 0:
        raw.close()
        raise DeltaError(f"{path} is empty, not an AppPot delta")
    return raw, None
