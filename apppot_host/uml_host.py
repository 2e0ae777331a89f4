"""What this host gives a job: the UML kernel, the network helper, a temporary directory UML can use.

Each is found as the epilog of ``apppot-start --help`` says, with the reason
for the choice, so ``apppot-start --check`` can show it.  Imported by
apppot_host.start.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import struct
import subprocess
from pathlib import Path

from apppot_guest.cmdline import PREFIX
from apppot_guest.errors import ConfigError, UsageError, display_path

KERNEL_NAME = "linux"
# AppPot's own kernels (apppot-build-kernel): the checkout's, then an installed one.
PROJECT_KERNELS = (Path(__file__).resolve().parent.parent / "out" / KERNEL_NAME, Path("/usr/lib/apppot") / KERNEL_NAME)
VDE_PLUG = "vde_plug"
SLIRP_PLUGINS = "/usr/lib/*/vdeplug/libvdeplug_slirp.so*"


def find_kernel(explicit: str | None, image: Path | None) -> tuple[Path, str]:
    """The UML kernel to boot and why that one (see the epilog for the order)."""
    if explicit:
        found = shutil.which(os.path.expanduser(explicit))
        if found is None:
            raise UsageError(f"UML kernel {display_path(explicit)}: not found or not executable")
        return Path(found), "--linux" if explicit != os.environ.get("APPPOT_KERNEL") else "$APPPOT_KERNEL"
    candidates = [(image.parent / KERNEL_NAME, "next to the image")] if image is not None else []
    candidates += [(path, "AppPot's own kernel") for path in PROJECT_KERNELS]
    for path, why in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):  # isfile: False also where we may not look
            return path.resolve(), why
    found = shutil.which(KERNEL_NAME)
    if found is not None:
        return Path(found), "on PATH"
    raise UsageError("no UML kernel: build AppPot's with 'make kernel' (apppot-build-kernel), or give --linux PATH")


def network_helper() -> Path:
    """The host's vde_plug, which UML's vector driver runs; UsageError with the fix when it cannot work."""
    found = shutil.which(VDE_PLUG)
    if found is None:
        raise UsageError(f"network: {VDE_PLUG} not found (install vdeplug and libvdeplug-slirp, or use --no-network)")
    if not glob.glob(SLIRP_PLUGINS):
        raise UsageError("network: vde_plug has no slirp plug-in (install libvdeplug-slirp, or use --no-network)")
    return Path(found)


def usable_for_uml(directory: str) -> str | None:
    """Why UML cannot keep its memory file in ``directory`` (None: it can)."""
    try:
        flags = os.statvfs(directory).f_flag
    except OSError as exc:
        return exc.strerror or "cannot be read"
    if not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
        return "not writable"
    if flags & os.ST_NOEXEC:
        return "mounted noexec"
    return None


def uml_tmpdir() -> tuple[str, str]:
    """The directory UML keeps the guest's memory in (it must map it executable), and why.

    UML takes $TMPDIR when set, else /dev/shm when it is a tmpfs, else /tmp;
    apppot-start sets TMPDIR to the first of those that UML can use.
    """
    tried: list[str] = []
    for directory in (os.environ.get("TMPDIR"), "/dev/shm", "/tmp", "/var/tmp"):
        if not directory:
            continue
        problem = usable_for_uml(directory)
        if problem is None:
            why = "$TMPDIR" if directory == os.environ.get("TMPDIR") else "the first usable of /dev/shm, /tmp, /var/tmp"
            if tried:
                why += f" ({'; '.join(tried)})"
            return directory, why
        tried.append(f"{directory}: {problem}")
    raise ConfigError(f"no directory UML can map executable ({'; '.join(tried)}): set TMPDIR to a directory "
                      "on a file system mounted without noexec")


def host_memory_mib() -> int | None:
    """The host's memory (MemTotal), None where it cannot be read."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5`` (the kernel's and taskset's notation)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def stat_field(stat: bytes, number: int) -> bytes:
    """Field ``number`` (as proc(5) counts them, from 1) of a /proc/PID/stat line; the command's
    name, field 2, may hold spaces and parentheses, so fields are counted after its last ')'."""
    return stat[stat.rindex(b")") + 2:].split()[number - 3]


def current_cpu() -> int | None:
    """The CPU this process last ran on (field 39 of /proc/self/stat), None where it cannot be read."""
    try:
        return int(stat_field(Path("/proc/self/stat").read_bytes(), 39))
    except (OSError, ValueError, IndexError):
        return None


def vms_per_cpu(proc: Path = Path("/proc")) -> collections.Counter[int]:
    """How many AppPot VMs run pinned to each CPU: process groups of processes whose command line
    speaks AppPot's protocol (UML's kernel, its address spaces and I/O thread: one VM) and that may
    use one CPU only.  Anyone's: a VM of another user takes a core just the same."""
    groups: dict[int, int] = {}  # process group -> its CPU
    marker = b"\0" + f"{PREFIX}protocol=".encode()  # a word of UML's argv, never its first
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                if marker not in f.read():
                    continue
            with open(os.path.join(entry.path, "stat"), "rb") as f:
                stat = f.read()
            with open(os.path.join(entry.path, "status"), "rb") as f:
                allowed = next(line.split()[1] for line in f if line.startswith(b"Cpus_allowed_list:"))
        except (OSError, StopIteration, IndexError):
            continue  # gone, or not ours to read
        if allowed.isdigit():
            groups[int(stat_field(stat, 5))] = int(allowed)  # field 5: the process group
    return collections.Counter(groups.values())


def choose_cpu(spec: str) -> tuple[int | None, str]:
    """The one host CPU UML is to run on, and why (None: the host's scheduler decides).

    The guest has one CPU, but UML is several host processes: its kernel, one
    process per guest address space, its disk I/O thread.  Every system call and
    page fault of the guest hands control from one to another and back.  On two
    host CPUs each hand-off is a cross-CPU wake-up (in a virtual machine, an
    interrupt between virtual CPUs); on one CPU it is a plain context switch.
    Measured on a 2-core virtual machine: a guest system call 58 -> 7.5 us, a
    page fault 86 -> 20 us, `apppot-start -- true` 1.31 -> 0.63 s (docs/host.md).

    ``auto``: of the CPUs we may use (a batch system's cpuset), one with the
    fewest AppPot VMs pinned to it, so VMs started side by side never share a
    core while another is free; among those, the one the launcher runs on (where
    the host's scheduler placed it), else the lowest.  ``any`` does not pin; a
    number pins to that CPU.
    """
    allowed = os.sched_getaffinity(0)
    if spec == "any":
        return None, f"not pinned (--cpu any): the host's scheduler places UML's processes on {cpu_list(allowed)}"
    if spec == "auto":
        vms = vms_per_cpu()
        fewest = min(vms[cpu] for cpu in allowed)
        candidates = {cpu for cpu in allowed if vms[cpu] == fewest}
        here = current_cpu()
        cpu = here if here in candidates else min(candidates)
        busy = sum(vms[c] for c in allowed)
        return cpu, (f"of {cpu_list(allowed)}, one with the fewest AppPot VMs pinned to it ({fewest}, of {busy} in all)"
                     f"{', where the launcher runs' if cpu == here else ''}; UML's processes hand off to each other on one core")
    if not spec.isdigit():
        raise UsageError(f"--cpu {display_path(spec)}: give a CPU number, 'auto' or 'any'")
    if int(spec) not in allowed:
        raise UsageError(f"--cpu {spec}: not one of the CPUs this process may use ({cpu_list(allowed)})")
    return int(spec), "--cpu or $APPPOT_CPU"


def elf_interpreter(path: Path) -> bytes | None:
    """The dynamic loader an ELF64 binary asks for (None: statically linked, or not ELF64)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            return None
        phoff, phentsize, phnum = int.from_bytes(header[32:40], "little"), *struct.unpack_from("<HH", header, 54)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0")
    return None


def kernel_description(kernel: Path) -> str:
    version_file = kernel.with_name(kernel.name + ".version")
    try:
        version = version_file.read_text().strip()
    except OSError:
        try:
            version = subprocess.run([kernel, "--version"], capture_output=True, text=True, timeout=20,
                                     stdin=subprocess.DEVNULL, check=False).stdout.strip() or "version unknown"
        except (OSError, subprocess.TimeoutExpired):
            version = "version unknown"
    interpreter = elf_interpreter(kernel)
    linked = "static" if interpreter is None else f"dynamic, needs {interpreter.decode(errors='replace')}"
    return f"{version}; {linked}"
