"""One run of apppot-start on the host: its private directory, the image lock, the status record, units.

The run directory (a ``mkdtemp`` under $TMPDIR, removed afterwards) holds
everything that belongs to this run only:

    RUN/cow            the copy-on-write file of a read-only image
    RUN/image|kernel   links with safe names to a user's path that UML cannot
                       take on its command line (white space, commas, quotes)
    RUN/host/          what the guest's hostfs sees (``hostfs=RUN/host``):
        job  ->        a link to the job directory (hostfs follows a link at a mount's root)
        changes        the delta's directory (a link), or a read-only copy of a delta from elsewhere
        run/           this run's own directory (``apppot.rundir=/run``): the guest writes the
                       status record there and reads a long command from there

The launcher takes its job's exit code from ``RUN/host/run/apppot.status.json``
and then publishes the record into the job directory atomically, so jobs that
share a job directory never read each other's record.  Imported by
apppot_host.start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import struct
from datetime import UTC, datetime
from pathlib import Path

from apppot_guest.atomicfile import write_atomic
from apppot_guest.errors import AppPotError, FsError, UsageError, display_path, fs_error
from apppot_guest.job import Outcome
from apppot_guest.status import EXITCODE_FILE, STATUS_FILE, Status, parse_status

log = logging.getLogger("apppot-start")

# Characters UML cannot take in a path: its command line is split at white space
# and quotes, its ubd0= and hostfs= options (and the guest's mount options) at commas.
UNSAFE_PATH = re.compile(r"[\s,\"'\\]")
HOST_DIR = "host"  # RUN/host: the hostfs root
GUEST_JOBDIR = "/job"
GUEST_RUNDIR = "/run"
GUEST_CHANGES = "/changes"


class BusyError(AppPotError):
    """A writable image (or COW file) that another VM is using: nothing was started."""

    exit_code = 125
    summary = "the image is in use by another VM"


class RunDir:
    """This run's private directory and the guest's view of the host (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.host = path / HOST_DIR
        self.status_dir = self.host / GUEST_RUNDIR.lstrip("/")

    def create_host_view(self, jobdir: Path) -> None:
        """RUN/host with the job directory's link and this run's own directory."""
        self.host.mkdir(mode=0o700)
        (self.host / GUEST_JOBDIR.lstrip("/")).symlink_to(jobdir)
        self.status_dir.mkdir(mode=0o700)

    def safe(self, path: Path, name: str) -> Path:
        """``path`` itself when UML can take it, else a link named ``name`` in the run directory."""
        if not UNSAFE_PATH.search(os.fspath(path)):
            return path
        link = self.path / name
        if not link.is_symlink():
            link.symlink_to(path)
        log.info("%s is passed to UML as %s", display_path(path), link)
        return link

    def place_changes(self, changes: Path, jobdir: Path, dry_run: bool) -> str:
        """The guest's hostfs path of the delta ``changes`` (a real path).

        A delta inside the job directory is reached through a link to its
        directory; a delta elsewhere is copied (read-only) into the run
        directory: a copy, not a link, so the guest cannot change the user's
        delta through it.
        """
        where = self.host / GUEST_CHANGES.lstrip("/")
        if dry_run:
            return f"{GUEST_CHANGES}/{changes.name}"
        try:
            if changes.is_relative_to(jobdir):
                where.symlink_to(changes.parent)
            else:
                where.mkdir(mode=0o700)
                shutil.copyfile(changes, where / changes.name)
                (where / changes.name).chmod(0o444)
        except OSError as exc:
            raise fs_error(exc, "copy the delta into", where) from exc
        return f"{GUEST_CHANGES}/{changes.name}"

    def read_status(self, directory: Path | None = None) -> tuple[dict[str, object], bytes] | None:
        """The record this run's guest wrote (None: it wrote none) and its bytes; from ``directory`` if given."""
        path = (directory or self.status_dir) / STATUS_FILE
        try:
            raw = path.read_bytes()
            return parse_status(raw, path, complete=False), raw
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s: %s", display_path(path), exc)
        except FsError as exc:
            log.error("%s", exc)
        return None


def publish_status(jobdir: Path, raw: bytes, exit_code: int) -> None:
    """This run's record as the job directory's ``apppot.status.json`` and ``apppot.exitcode``, each atomically."""
    write_atomic(jobdir / STATUS_FILE, raw)
    write_atomic(jobdir / EXITCODE_FILE, f"{exit_code}\n".encode("ascii"))


def stopped_status(signum: int, name: str, command: tuple[str, ...] | None, uid: int | None, gid: int | None,
                   started: datetime) -> Status:
    """The record of a job the launcher stopped on a signal (from the batch system or the user)."""
    finished = datetime.now(UTC)
    why = "the batch system's time limit or scancel" if signum != 2 else "Ctrl-C"
    return Status(
        exit_code=128 + signum, signal=signum, outcome=str(Outcome.STOPPED),
        error=f"apppot-start got {name} ({why}) at {finished.isoformat(timespec='seconds')}: the VM was stopped",
        command=command, cwd=None, user=None, uid=uid, gid=gid, started_at=started, finished_at=finished,
        wall_seconds=round((finished - started).total_seconds(), 3), cpu_user_seconds=0.0, cpu_system_seconds=0.0,
        max_rss_kib=0, oom_killed=False, network=(),
    )


# -- the image lock ------------------------------------------------------------------


def lock_holder(fd: int) -> int | None:
    """The PID that holds a flock on the file open at ``fd`` (from /proc/locks), if one can be found."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and fields[-3] == key and fields[-4].isdigit() and fields[-4] != str(os.getpid()):
                return int(fields[-4])
    return None


def lock_image(path: Path, exclusive: bool) -> int:
    """Hold the disk file ``path`` for this run (an open descriptor under ``flock``); BusyError if in use.

    A disk the VM writes (a writable image used in place, a COW file) is held
    exclusively; an image used as a read-only base is held shared, so any
    number of jobs share it, but never while a VM writes it in place.  Booting
    one writable image twice ends in a kernel panic in the second VM (UML's
    own POSIX lock on the file fails inside ``ubd_init``); this refuses the
    second launcher before it boots.  The flock goes when the launcher exits,
    however it exits.  On NFS, where flock is emulated with the same POSIX
    locks UML takes, only UML's lock is checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise fs_error(exc, "open", path) from exc
    try:
        holder = None
        if not _is_nfs(path):
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd) or -1  # another apppot-start
            except OSError as exc:  # a file system without flock (some Lustre mounts): UML's own lock still counts
                log.info("cannot lock %s (%s): only a running UML's lock is checked", display_path(path), exc.strerror)
        holder = holder or _posix_lock_holder(fd, exclusive)  # a UML that was started some other way
    except OSError:
        os.close(fd)
        raise
    if holder is not None:
        os.close(fd)
        who = f"PID {holder}" if holder > 0 else "another process"
        raise BusyError(f"image {display_path(path)} in use by {who}: " + (
            "a writable image runs one VM at a time; wait for it, or boot a copy" if exclusive else
            "a VM writes it in place; wait for it"))
    return fd


def _is_nfs(path: Path) -> bool:
    with contextlib.suppress(OSError):
        best = ""
        fstype = ""
        real = os.fspath(path.resolve())
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            mount_point = fields[1].replace("\\040", " ")
            if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
                best, fstype = mount_point, fields[2]
        return fstype.startswith("nfs")
    return False


def _posix_lock_holder(fd: int, exclusive: bool) -> int | None:
    """The PID of a process (a running UML) holding a POSIX lock on the file that ours would conflict with."""
    import struct

    probe = struct.pack("hhqqi", fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return None
    l_type, _, _, _, pid = struct.unpack("hhqqi", answer)
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


# -- units as people write them --------------------------------------------------


SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
SIZE_FACTORS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


EXT_MAGIC = (1080, b"\x53\xef")  # the superblock (at 1 KiB) of ext2/3/4 holds 0xEF53 at its offset 56, little-endian


def image_problem(image: Path) -> str | None:
    """Why ``image`` cannot be booted as an AppPot image (None: it can, as far as can be told without booting)."""
    if not image.is_file():
        return "no such file"
    try:
        with open(image, "rb") as f:
            f.seek(EXT_MAGIC[0])
            magic = f.read(2)
    except OSError:
        return "not readable"
    if magic != EXT_MAGIC[1]:  # else the kernel panics: "VFS: Unable to mount root fs"
        return ("not an ext2/3/4 file system; an AppPot image is a raw ext4 image, as apppot-build-image makes (not a "
                "partitioned disk, a qcow2 file or a delta)")
    return None


COW_MAGICS = (b"OOOM", b"MOOO")  # UML's COW header: its magic 0x4f4f4f4d, big-endian (versions 2, 3) or the host's (1)
# Version 3 of UML's COW header (arch/um/drivers/cow_user.c), big-endian: magic, version, the backing
# file's mtime and size, sector size, alignment, format, then the backing file's path (4096 bytes).
COW_V3 = struct.Struct(">4sIIQIII4096s")


def cow_problem(cow: Path, image: Path) -> str | None:
    """Why the existing file ``cow`` cannot be booted over ``image`` (None: it can).

    UML itself panics on a file that is not a COW file ("Unable to mount root fs"), and
    over another image, or an image changed since, it silently boots the image the COW
    file names instead, if that one still fits, or panics.
    """
    try:
        with open(cow, "rb") as f:
            header = f.read(COW_V3.size)
        st = image.stat()
    except OSError as exc:
        return exc.strerror or "cannot be read"
    if not header:
        return "empty, not a UML copy-on-write file"
    if header[:4] not in COW_MAGICS:
        return "not a UML copy-on-write file (no COW header)"
    if len(header) < COW_V3.size:
        return None  # an older, shorter header (UML checks it itself)
    _, version, mtime, size, _, _, _, raw = COW_V3.unpack(header)
    backing = raw.split(b"\0", 1)[0]
    if version != 3 or not backing:
        return None  # an older header, or version 3 in its old 64-bit layout (UML checks them itself)
    if (size, mtime) == (st.st_size, int(st.st_mtime) & 0xFFFFFFFF):
        return None  # the same image, or a copy of it as it was (UML switches to it)
    try:
        same = os.path.samefile(backing, image)
    except OSError:
        same = False
    if same:
        return (f"the image {display_path(image)} changed since the COW file was made over it (its size or modification "
                "time differ), so the COW file's blocks no longer fit it")
    return f"it was made over {display_path(os.fsdecode(backing))}, not {display_path(image)} (give that image to go on with it)"


def parse_size(text: str) -> str:
    """``--mem`` as UML's ``mem=`` (whole MiB, ``2048M``): 2g, 2G, 2048M, 2GiB, 2048 (MiB), 1.5G."""
    match = SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"--mem {display_path(text)}: not a size like 512M, 2G or 2GiB")
    number, unit = match.groups()
    size = int(float(number) * SIZE_FACTORS[unit.upper()])
    mib = size >> 20
    if mib < 64:
        raise UsageError(f"--mem {display_path(text)}: at least 64M are needed to boot")
    return f"{mib}M"


DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)", re.IGNORECASE)
DURATION_FACTORS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Slurm's --time forms: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_RE = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")


def parse_duration(text: str) -> float:
    """``--timeout`` in seconds: 90, 90s, 1.5, 30m, 1h, 2d, and Slurm's 1:30:00, 30:00, 2-12:00:00."""
    value = text.strip()
    match = DURATION_RE.fullmatch(value)
    if match is not None:
        seconds = float(match.group(1)) * DURATION_FACTORS[match.group(2).lower()]
    elif (slurm := SLURM_RE.fullmatch(value)) is not None and (":" in value or "-" in value):
        days, first, second, third = slurm.groups()
        parts = [int(p) for p in (first, second, third) if p is not None]
        if days is not None:  # D-HH[:MM[:SS]]
            parts += [0] * (3 - len(parts))
            hours, minutes, secs = parts
            seconds = int(days) * 86400 + hours * 3600 + minutes * 60 + secs
        elif len(parts) == 2:  # MM:SS
            seconds = parts[0] * 60 + parts[1]
        else:  # HH:MM:SS
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    else:
        raise UsageError(f"--timeout {display_path(text)}: not a duration like 90, 90s, 30m, 1h or 1:30:00")
    if not seconds > 0:
        raise UsageError(f"--timeout {display_path(text)}: not a positive duration")
    return float(seconds)
