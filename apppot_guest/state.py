"""A root's state directory (``var/lib/apppot``): the lock of the root, and crash recovery.

*The lock.*  ``base`` and ``merge`` change the root or its record and hold
``var/lib/apppot/lock`` exclusively; ``status`` and ``changes`` only read it
and hold it shared, so any number of them run together but never beside a
``base`` or ``merge``.  A command that finds the lock taken does not wait: it
says which process holds it and exits with ``BusyError`` (10), having done
nothing.  The lock is an ``flock``: the kernel releases it when its holder dies.

*Recovery.*  Every temporary name AppPot makes is recognisable and held locked
by its creator (see atomicfile.py).  Before it starts, every command removes
the temporaries in ``var/lib/apppot`` that nobody holds (a merge's staging
directory, a manifest being written), and a scan of the tree removes the dead
ones it meets instead of listing them; ``changes`` also removes the dead
temporaries of its output file beside it.  Each removal is reported on stderr.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from pathlib import Path

from . import faults
from .atomicfile import TEMP_MARK, is_temporary, temp_creator
from .errors import BusyError, display_path, fs_error
from .manifest import BASE_DIR, make_dirs_quietly

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
# What earlier versions left in var/lib/apppot: merge.PID/ and .base.manifest.PID.N.tmp.
_OLD_STATE_TEMP = re.compile(rb"merge\.[0-9]+|\.base\.manifest\.[0-9]+\.[0-9]+\.tmp")


class RootLock:
    """The lock of one root, held from ``acquire`` until the process ends or ``release``."""

    def __init__(self, root: Path, action: str, exclusive: bool) -> None:
        self.root, self.action, self.exclusive = root, action, exclusive
        self.path = root / BASE_DIR / LOCK_NAME
        self.fd = -1
        self.footprint: tuple[int, int, int] | None = None

    def acquire(self, create: bool) -> bool:
        """Take the lock; False if there is no state directory to lock (and ``create`` is False)."""
        if create:
            make_dirs_quietly(self.path.parent)  # before any scan: a fresh base must not list it
        while True:
            if not self._open():
                return False
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.describe_holders()
                os.close(self.fd)
                self.fd = -1
                raise BusyError(f"{display_path(self.root)} is in use by {holder}; {self.action} did nothing: "
                                "run it again when that has finished") from None
            try:  # the last holder removes the file (see release): then this lock is on a dead inode
                named, held = os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)
                if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        if self.exclusive:  # say who holds it, for the message of whoever is refused
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()} {self.action}\n".encode(), 0)
            except OSError as exc:  # a full disk: the lock holds all the same
                log.debug("cannot note the lock's holder in %s: %s", self.path, exc.strerror)
        faults.reached("locked")
        return True

    def _open(self) -> bool:
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            before = os.stat(self.path.parent)
            try:
                self.fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self.fd = os.open(self.path, flags)
                return True
            # Made here, removed by release(): then the directory gets back its mtime too,
            # unless something else changed it meanwhile (a new base).
            self.footprint = (before.st_atime_ns, before.st_mtime_ns, os.stat(self.path.parent).st_mtime_ns)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or self.exclusive:
                raise fs_error(exc, "open the lock", self.path) from exc
        try:  # a reader on a read-only tree: an existing lock file can still be locked
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            return True
        except OSError as exc:
            log.debug("reading %s without a lock: %s", self.root, exc.strerror)
            return False

    def release(self) -> None:
        """Let go; the last holder removes the lock file, so a finished run leaves nothing behind."""
        if self.fd < 0:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails (and unlocks) if others hold it too
            changed = os.stat(self.path.parent).st_mtime_ns
            os.unlink(self.path)
            if self.footprint and changed == self.footprint[2]:
                os.utime(self.path.parent, ns=self.footprint[:2])
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def describe_holders(self) -> str:
        """'apppot-snap merge (pid 123)' for the processes holding the lock, as far as /proc tells."""
        pids = lock_holders(self.fd)
        try:
            recorded_pid, _, recorded_action = os.pread(self.fd, 200, 0).decode("ascii", "replace").strip().partition(" ")
        except OSError:
            recorded_pid, recorded_action = "", ""
        if not pids:
            return "another apppot-snap"
        names = [f"apppot-snap {recorded_action} (pid {pid})" if str(pid) == recorded_pid else f"apppot-snap (pid {pid})" for pid in pids[:3]]
        return ", ".join(names) + (f" and {len(pids) - 3} more" if len(pids) > 3 else "")


def lock_holders(fd: int) -> list[int]:
    """The PIDs holding flock locks on the file ``fd`` (from /proc/locks; empty if it cannot tell)."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            for line in table:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the number
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
                    pids.append(int(fields[4]))
    except OSError:
        return []
    return sorted(set(pids) - {os.getpid()})


def recover(root: Path) -> None:
    """Remove what dead runs left in the root's state directory."""
    state = root / BASE_DIR
    try:
        names = os.listdir(os.fsencode(state))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise fs_error(exc, "list", state) from exc
    for name in sorted(names):
        if is_temporary(name) or _OLD_STATE_TEMP.fullmatch(name):
            remove_leftover(os.path.join(os.fsencode(state), name))


def recover_beside(path: Path) -> None:
    """Remove the dead temporaries of the file ``path`` in its directory (a delta being written)."""
    prefix = os.fsencode(f".{path.name}{TEMP_MARK}")
    parent = os.fsencode(path.parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return  # the caller reports an unusable directory
    for name in names:
        if name.startswith(prefix) and is_temporary(name):
            remove_leftover(os.path.join(parent, name))


def remove_leftover(path: bytes) -> bool:
    """Remove the temporary ``path`` (a file, or a staging directory of files) unless a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove %s, left by an interrupted apppot-snap: %s", display_path(path), exc.strerror)
        return False
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return False  # not something AppPot makes under such a name: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its creator is still at work
        except OSError as exc:
            log.debug("cannot lock %s: %s", display_path(path), exc.strerror)
        try:
            if stat.S_ISDIR(st.st_mode):
                for entry in os.scandir(fd):  # a staging directory: flat, its entries are named by number
                    if entry.is_dir(follow_symlinks=False):
                        os.rmdir(entry.name, dir_fd=fd)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:  # e.g. a read-only tree: the command itself can still do its work
            log.warning("cannot remove %s, left by an interrupted apppot-snap: %s", display_path(path), exc.strerror)
            return False
    finally:
        os.close(fd)
    pid = temp_creator(os.path.basename(path))
    log.warning("removed %s, left by an interrupted apppot-snap%s", display_path(path), f" (pid {pid})" if pid != "?" else "")
    return True
