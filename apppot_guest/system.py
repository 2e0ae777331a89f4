"""The guest's system plumbing for apppot-init: mount(2), PID 1 duties, the dpkg lock, power-off.

Mounts use the system call directly (no mount(8) option parsing: a hostfs
path with a comma or a quote stays intact).  ``Mounter`` mounts hostfs paths
in the VM, or bind-mounts local paths when ``apppot-init --bind`` runs the boot
sequence on an ordinary host (the tests).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FsError, ToolError, display_path, fs_error
from .proc import run

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The guest's network: slirp's fixed addresses (network_up).
GUEST_ADDRESS, GUEST_NETMASK, GATEWAY = "10.0.2.15", "255.255.255.0", "10.0.2.2"
IFNAMSIZ = 16
IFF_UP = 0x1
SIOCADDRT, SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x890B, 0x8913, 0x8914, 0x8916, 0x891C
RTF_UP, RTF_GATEWAY = 0x1, 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, action: str, path: object) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise FsError(f"cannot {action} {display_path(path)}: {os.strerror(err)}")


def mount(source: str, target: Path, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    """mount(2); FsError naming the target on failure."""
    log.debug("mount %s on %s type %s flags %#x data %s", source, target, fstype, flags, data)
    _check(
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            os.fsencode(data) if data is not None else None,
        ),
        f"mount {fstype or 'bind'} {display_path(source if data is None else data)} on",
        target,
    )


def umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        log.warning("cannot unmount %s: %s", display_path(target), os.strerror(ctypes.get_errno()))


def is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


@dataclass(slots=True)
class Mounter:
    """Mounts what the kernel command line names, and undoes them in reverse order.

    ``hostfs``: the paths are hostfs paths (in the VM).  Otherwise they are
    local paths, bind-mounted (running the boot sequence on a host for tests).
    """

    hostfs: bool = True
    done: list[Path] = field(default_factory=list)

    def host_dir(self, path: str, target: Path, *, readonly: bool = False) -> None:
        _mountpoint(target)
        if self.hostfs:
            mount("none", target, "hostfs", MS_RDONLY if readonly else 0, path)
        else:
            if not Path(path).is_dir():
                raise FsError(f"cannot mount {display_path(path)} on {display_path(target)}: not a directory")
            mount(path, target, None, MS_BIND)
            if readonly:
                mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        self.done.append(target)

    def bind(self, source: Path, target: Path, owner: tuple[int, int] | None = None) -> None:
        """Bind-mount ``source`` on ``target``, creating the mount point (owned by ``owner``)."""
        if not target.exists() and owner is not None:
            _mountpoint(target)
            try:
                os.chown(target, *owner)
            except OSError as exc:
                raise fs_error(exc, "change the owner of", target) from exc
        _mountpoint(target)
        mount(os.fspath(source), target, None, MS_BIND)
        self.done.append(target)

    def undo(self) -> None:
        while self.done:
            umount(self.done.pop())


def _mountpoint(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, "create the mount point", target) from exc


def early_mounts(root: Path) -> None:
    """What the kernel does not give PID 1: /proc, /sys, /dev, /dev/pts, /dev/shm, /run; / read-write."""
    os.environ.setdefault("PATH", SYSTEM_PATH)
    table = [
        ("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("devtmpfs", "dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        ("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        ("tmpfs", "run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ]
    for source, where, fstype, flags, data in table:
        target = root / where
        if is_mountpoint(target):
            continue  # e.g. devtmpfs when the kernel mounts it itself
        target.mkdir(parents=True, exist_ok=True)
        mount(source, target, fstype, flags, data)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        link = root / "dev" / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(dest)
    for path, mode in (("run/lock", 0o1777), ("run/screen", 0o1777), ("run/user", 0o755)):
        (root / path).mkdir(exist_ok=True)
        os.chmod(root / path, mode)
    if root == Path("/"):
        try:
            mount("none", root, None, MS_REMOUNT)  # read-write: flags without MS_RDONLY
        except FsError as exc:
            log.warning("%s", exc)
    try:
        hostname = (root / "etc/hostname").read_text().strip()
        if hostname and root == Path("/"):
            socket.sethostname(hostname)
    except OSError:
        pass
    transient_machine_id(root)


def transient_machine_id(root: Path) -> None:
    """A machine ID of this boot's own, as systemd gives one: in /run, bind-mounted on an empty /etc/machine-id.

    The image ships /etc/machine-id empty and deltas never carry one (exclude.default),
    so no two boots of a shared image share an ID.
    """
    etc = root / "etc/machine-id"
    try:
        if not etc.is_file() or etc.stat().st_size > 0:
            return
        run_id = root / "run/machine-id"
        run_id.write_text(os.urandom(16).hex() + "\n")
        run_id.chmod(0o444)
        mount(os.fspath(run_id), etc, None, MS_BIND)
    except (OSError, FsError) as exc:
        log.warning("no machine ID for this boot: %s", exc)


def in_uml() -> bool:
    """Whether this system is a User-Mode Linux guest (as systemd's ConditionVirtualization=uml tells)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"User Mode Linux" in f.read(4096)
    except OSError:
        return False


def _ifreq(name: str, data: bytes = b"") -> bytes:
    """struct ifreq: the interface's name, then the request's 24-byte union."""
    return name.encode().ljust(IFNAMSIZ, b"\0") + data.ljust(24, b"\0")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def _flags(sock: socket.socket, name: str) -> int:
    return int(struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name)), IFNAMSIZ)[0])


def network_up(sys_class_net: Path = Path("/sys/class/net")) -> str | None:
    """The guest's network: lo up, and whatever interface UML gave the guest (vec0 with
    AppPot's kernel, eth0 with older transports) with slirp's fixed addresses: 10.0.2.15/24,
    gateway 10.0.2.2 (DNS 10.0.2.3 is in the image's resolv.conf).

    Run by apppot-init in the VM before the job (in-process: ioctls, no ip(8) to fork
    and exec, which cost 0.05 s of every boot in UML) and by apppot-network.service in a
    full boot (``apppot-init --network-up``).  An interface already up was configured
    by the other: it is left alone.  Returns the interface's name (None: only lo).
    """
    try:
        names = sorted(name for name in os.listdir(sys_class_net) if name != "lo")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq("lo", struct.pack("H", _flags(sock, "lo") | IFF_UP)))
            if not names:
                return None
            dev = names[0]  # UML gives the guest one
            flags = _flags(sock, dev)
            if flags & IFF_UP:
                return dev
            fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(GUEST_ADDRESS)))
            fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(GUEST_NETMASK)))
            fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(dev, struct.pack("H", flags | IFF_UP)))
            # struct rtentry (linux/route.h), native layout: the default route through slirp's gateway.
            anywhere = _sockaddr_in("0.0.0.0")
            route = struct.pack("@L16s16s16sHhLPhPLLH", 0, anywhere, _sockaddr_in(GATEWAY), anywhere,
                                RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
            fcntl.ioctl(sock, SIOCADDRT, route)
            return dev
    except OSError as exc:
        raise FsError(f"network: cannot configure the guest's interface: {exc.strerror or exc}") from exc


def network_summary(dev: str | None) -> str:
    """What network_up did, in words."""
    return f"network: {dev} as {GUEST_ADDRESS}/24, gateway {GATEWAY}" if dev else "network: no interface, only lo"


def network_interfaces(sys_class_net: Path) -> list[str]:
    """The network interfaces besides lo that are up (what the job can reach the network through)."""
    try:
        names = sorted(name for name in os.listdir(sys_class_net) if name != "lo")
    except OSError:
        return []
    up = []
    for name in names:
        try:
            flags = int((sys_class_net / name / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_UP:  # network_up could configure it
            up.append(name)
    return up


def dpkg_running(root: Path) -> str | None:
    """Why apppot-init must not start a job now (dpkg is running), or None.

    ``DPKG_MAINTSCRIPT_NAME`` is set when a maintainer script runs us (the LSB
    script through invoke-rc.d); under systemd the unit does not inherit the
    environment, so the dpkg locks are checked too.
    """
    if os.environ.get("DPKG_MAINTSCRIPT_NAME"):
        return f"DPKG_MAINTSCRIPT_NAME={os.environ['DPKG_MAINTSCRIPT_NAME']} is set"
    for name in ("var/lib/dpkg/lock-frontend", "var/lib/dpkg/lock"):
        path = root / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
            if struct.unpack("hhqqi", answer)[0] != fcntl.F_UNLCK:
                return f"{display_path(path)} is locked"
        except OSError:
            continue
        finally:
            os.close(fd)
    return None


def reap_orphans() -> None:
    """PID 1's duty: collect every exited child (orphans are re-parented to us)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_everything(grace: float = 2.0) -> None:
    """As PID 1 before power-off: SIGTERM every other process, SIGKILL after ``grace``."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.05)


def power_off(root: Path, pid1: bool) -> None:
    """Sync and power the machine off, so the UML process exits.

    As PID 1: stop all processes, remount / read-only, reboot(2) with
    RB_POWER_OFF.  Under systemd: sync, remount / read-only where nothing
    holds it open for writing, then reboot(2) at once, as ``systemctl poweroff
    --force --force`` does (0.3-0.5 s faster than stopping units in UML; after
    the sync nothing is lost, ext4's journal covers a root still mounted
    read-write, and hostfs wrote through to the host).  In UML we call it
    ourselves (starting systemctl costs 0.03 s there); elsewhere, and if that
    fails, systemctl does.  Under sysvinit: ``poweroff``.
    """
    os.sync()
    if pid1:
        stop_everything()
        os.sync()
        if root == Path("/"):
            try:
                mount("none", root, None, MS_REMOUNT | MS_RDONLY)
            except FsError as exc:
                log.warning("%s", exc)
        _libc.reboot(ctypes.c_int(RB_POWER_OFF))
        raise FsError(f"cannot power off: {os.strerror(ctypes.get_errno())}")
    if (root / "run/systemd/system").is_dir():
        if root == Path("/"):
            try:
                mount("none", root, None, MS_REMOUNT | MS_RDONLY)
            except FsError as exc:
                log.info("%s (the journal covers it)", exc)
            os.sync()
            if in_uml():
                _libc.reboot(ctypes.c_int(RB_POWER_OFF))
                log.info("reboot(2) failed (%s): asking systemctl", os.strerror(ctypes.get_errno()))
        argv = ["systemctl", "poweroff", "--force", "--force"]
    else:
        argv = ["poweroff"]
    try:
        run(argv)
    except ToolError:
        run(["poweroff", "-f"])
