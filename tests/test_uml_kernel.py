"""AppPot's own UML kernel (apppot-build-kernel): static, found by apppot-start, checked by --check,
and the host problems the launcher routes around or names (noexec temporary directories, kernels
that cannot run on this CPU).  Real boots, as an unprivileged user unless a test needs root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from apppot_guest.account import Account
from apppot_host import uml_vm
from fixtures_uml import LAUNCHER, PYTHON, as_user

pytestmark = pytest.mark.integration

DEBIAN_UML = Path("/usr/bin/linux")  # Debian's user-mode-linux, for comparison only


def launcher_as(user: Account, *args: str | os.PathLike[str], env: dict[str, str] | None = None,
                wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """apppot-start run as ``user`` (with ``env`` set for it), optionally inside ``wrap`` (run as root)."""
    setenv = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
    argv = [*(wrap or []), *as_user(user, [*setenv, PYTHON, LAUNCHER, *(os.fspath(a) for a in args)])]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)


def test_the_kernel_is_static_and_runs_a_job_with_the_hosts_libraries_hidden(
        uml_kernel: Path, apppot_image: Path, tmp_path: Path) -> None:
    described = subprocess.run(["file", "--brief", uml_kernel], capture_output=True, text=True, check=True).stdout
    assert "statically linked" in described, described
    ldd = subprocess.run(["ldd", uml_kernel], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    planned = subprocess.run([PYTHON, LAUNCHER, "--dry-run", "--image", apppot_image, "--jobdir", jobdir, "--no-network",
                              "--", "sh", "-c", "echo ran; exit 42"], capture_output=True, text=True, check=True)
    argv = json.loads(planned.stdout)
    assert argv[0] == os.fspath(uml_kernel), "apppot-start finds the checkout's kernel by itself"
    # The dry run's per-run directory is gone: give UML a COW file, uml_dir and the hostfs view of ours
    # (the job directory as /job, the run's own directory as /run).
    view = tmp_path / "host"
    view.mkdir()
    (view / "job").symlink_to(jobdir)
    (view / "run").mkdir()
    argv = [f"ubd0={tmp_path / 'cow'},{apppot_image}" if a.startswith("ubd0=") else
            f"uml_dir={tmp_path}" if a.startswith("uml_dir=") else
            f"hostfs={view}" if a.startswith("hostfs=") else a for a in argv]
    # A private mount namespace with an empty /usr/lib (on Debian 12 /lib is /usr/lib): no libc, no
    # ld.so.  A dynamically linked program can no longer start there; the static kernel must.
    hide = ('mount -t tmpfs none /usr/lib || exit 90; '
            'if /bin/true 2>/dev/null; then echo "the libraries are still visible" >&2; exit 91; fi; exec "$@"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh", *argv],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode not in (90, 91), result.stderr
    assert "ran" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((view / "run" / "apppot.status.json").read_text())
    assert (record["exit_code"], record["outcome"]) == (42, "exited")


def test_check_says_what_a_job_would_use_and_boots_it(uml_user: Account, apppot_image: Path, uml_kernel: Path) -> None:
    result = launcher_as(uml_user, "--check", "--image", apppot_image)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"kernel:   {uml_kernel} (AppPot's own kernel; 7.") and lines[0].endswith("; static)")
    assert lines[1] == f"image:    {apppot_image} (read-only: each job gets its own copy-on-write file)"
    assert lines[2].startswith("network:  ") and "vde_plug with libvdeplug-slirp" in lines[2]
    assert re.fullmatch(r"cpu:      \d+ \(of [\d,-]+, one with the fewest AppPot VMs pinned to it \(\d+, of \d+ in all\).*\)",
                        lines[3]), lines[3]
    assert lines[4].startswith("tmpdir:   ")
    assert lines[5].startswith("boot:     `true` in batch mode: exit 0 in ") and "(network interfaces: vec0)" in lines[5]
    assert lines[-1] == "apppot-start: a job would run on this host"


def test_check_names_each_problem_with_its_fix(uml_user: Account, apppot_image: Path, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir(mode=0o755)
    result = launcher_as(uml_user, "--check", "--image", uml_user.home / "missing.img", "--linux", "/nonexistent/linux",
                         env={"PATH": os.fspath(empty)})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "apppot-start: problem: kernel: UML kernel /nonexistent/linux: not found or not executable",
        f"apppot-start: problem: image: {uml_user.home / 'missing.img'}: no such file",
        "apppot-start: problem: network: vde_plug not found (install vdeplug and libvdeplug-slirp, or use --no-network)",
    ]


def noexec_mount(path: Path) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,mode=1777", "tmpfs", path], check=True)


def test_a_noexec_tmpdir_is_avoided_and_named(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a noexec tmpfs needs root")
    noexec = uml_user.home / "noexec"
    noexec_mount(noexec)
    try:
        result = launcher_as(uml_user, "--image", apppot_image, "--jobdir", uml_jobdir, "--", "sh", "-c", "exit 5",
                             env={"TMPDIR": os.fspath(noexec)})
        assert result.returncode == 5, result.stderr
        check = launcher_as(uml_user, "--check", "--no-network", "--image", apppot_image, env={"TMPDIR": os.fspath(noexec)})
        assert check.returncode == 0, check.stderr
        assert f"({noexec}: mounted noexec)" in check.stdout
    finally:
        subprocess.run(["umount", noexec], check=False)
    # No usable directory at all: one line with the fix, before anything boots.
    remount = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,noexec {d}" for d in ("/dev/shm", "/tmp", "/var/tmp"))
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{remount} && exec "$@"', "sh"]
    result = launcher_as(uml_user, "--image", apppot_image, "--jobdir", uml_jobdir, "--no-network", "--", "true", wrap=wrap)
    assert result.returncode == 125
    assert result.stderr.startswith("apppot-start: error: no directory UML can map executable (/dev/shm: mounted noexec; ")
    assert result.stderr.rstrip().endswith("set TMPDIR to a directory on a file system mounted without noexec")
    assert len(result.stderr.splitlines()) == 1


def test_a_kernel_that_cannot_run_on_this_cpu_is_named(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """Debian's UML 6.1 panics on CPUs with AMX ('ptrace set fp regs failed'); elsewhere it runs and this is skipped."""
    if not DEBIAN_UML.exists():
        pytest.skip("Debian's user-mode-linux is not installed")
    result = launcher_as(uml_user, "--image", apppot_image, "--jobdir", uml_jobdir, "--linux", DEBIAN_UML,
                         "--no-network", "--", "true")
    if result.returncode == 0:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "this CPU")
        pytest.skip(f"Debian's UML kernel runs on {cpu}: there is no xstate death to diagnose here")
    assert result.returncode == 125, result.stderr
    diagnosis = [line for line in result.stderr.splitlines() if "cannot run a process on this CPU" in line]
    assert diagnosis == [f"apppot-start: error: the UML kernel {DEBIAN_UML} cannot run a process on this CPU: the host's "
                         "FPU state (e.g. Intel AMX) is larger than this kernel expects ('ptrace set fp regs failed'); "
                         "use AppPot's own kernel (make kernel, or leave out --linux and $APPPOT_KERNEL)"]


def test_known_deaths_are_recognised_in_the_kernels_own_words() -> None:
    """The lines UML 6.1 prints on an AMX host and UML 7.3 prints for a noexec TMPDIR (seen on real hosts)."""
    assert "Intel AMX" in (uml_vm.diagnose(b"userspace - ptrace set fp regs failed, errno = 14") or "")
    assert "noexec" in (uml_vm.diagnose(b"/dev/shm must be not mounted noexec") or "")
    assert uml_vm.diagnose(b"Kernel panic - not syncing: VFS: Unable to mount root fs") is None


def test_debian_kernel_still_runs_jobs_where_it_works(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """--linux keeps Debian's UML usable where its CPU allows; its 6.1 vector driver has no vde transport, so the
    guest has no network and the launcher says so in one line."""
    if not DEBIAN_UML.exists() or shutil.which("vde_plug") is None:
        pytest.skip("Debian's user-mode-linux or vde_plug is not installed")
    result = launcher_as(uml_user, "--image", apppot_image, "--jobdir", uml_jobdir, "--linux", DEBIAN_UML, "--",
                         "sh", "-c", "uname -r; exit 3")
    if result.returncode == 125 and "cannot run a process on this CPU" in result.stderr:
        pytest.skip("Debian's UML kernel cannot run on this CPU (see the test above)")
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines()[-1].startswith("6.")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("apppot-start: warning: ")]
    assert warnings == [f"apppot-start: warning: the guest had no working network interface (the kernel {DEBIAN_UML} has "
                        "no vector driver with the vde transport, or vde_plug failed): the job ran without network"]
