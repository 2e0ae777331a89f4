"""apppot-init's boot sequence on a scratch root: the real CLI, real accounts (useradd --root),
real bind mounts in place of hostfs, real jobs, a real delta merge, and PID 1 in a PID namespace."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apppot_guest.cmdline import BootConfig, fit_kernel_args
from apppot_guest.status import read_exitcode, read_status
from fixtures_user import free_id, require_root, shared_tmp  # noqa: F401

PY = "/usr/bin/python3"
REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("DPKG_MAINTSCRIPT_NAME", None)
NAME = "apppot-job"


def make_root(base: Path, ident: int) -> Path:
    """A scratch system root: the host's account databases, skel and sudoers, the AppPot defaults."""
    root = base / "root"
    (root / "etc/default").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs", "sudoers"):
        shutil.copy2(Path("/etc") / name, root / "etc" / name)
    shutil.copytree("/etc/skel", root / "etc/skel", symlinks=True)
    (root / "etc/default/apppot").write_text(
        f"# test defaults\nAPPPOT_USER={NAME}\nAPPPOT_UID={ident}\nAPPPOT_GROUP={NAME}\nAPPPOT_GID={ident}\n"
    )
    for d in ("home", "run", "tmp", "var/lib/dpkg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    return root


@pytest.fixture
def scratch(shared_tmp: Path) -> Iterator[tuple[Path, Path, int]]:
    """(root, jobdir, id): a scratch root and a job directory owned by the job's future uid."""
    require_root("the scratch root gets the host's account files (shadow) and job accounts")
    base = Path(tempfile.mkdtemp(prefix="boot-", dir=shared_tmp))
    base.chmod(0o755)
    ident = free_id(24000)
    root = make_root(base, ident)
    jobdir = base / "job dir"  # a space: paths travel encoded
    jobdir.mkdir()
    os.chown(jobdir, ident, ident)
    yield root, jobdir, ident
    subprocess.run(["pkill", "-KILL", "-u", str(ident)], check=False)
    subprocess.run(["umount", "-R", "-l", str(root)], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(base, ignore_errors=True)


def boot(root: Path, words: list[str], *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmdline = root.parent / "cmdline"
    cmdline.write_text(" ".join(["ubd0=/x.img", "root=/dev/ubda", *words, "quiet"]) + " console=tty0\n")
    argv = [PY, "-m", "apppot_guest.init", "--root", str(root), "--bind", "--no-poweroff", "--cmdline", str(cmdline), *options]
    return subprocess.run(argv, capture_output=True, text=True, env=env or ENV, cwd=REPO, timeout=300, check=False)


def mounted_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4].startswith(prefix)]


def test_print_config(scratch: tuple[Path, Path, int], tmp_path: Path) -> None:
    root, _jobdir, ident = scratch
    words = BootConfig(argv=("python3", "run.py", "a b"), jobdir="/", timeout=60, term="xterm").kernel_args()
    (tmp_path / "cmdline").write_text(" ".join(words) + "\n")
    out = subprocess.run(
        [PY, "-m", "apppot_guest.init", "--print-config", "--cmdline", str(tmp_path / "cmdline"), "--root", str(root)],
        capture_output=True, text=True, env=ENV, cwd=REPO, check=True,
    )
    data = json.loads(out.stdout)
    assert data["argv"] == ["python3", "run.py", "a b"]
    assert (data["user"], data["uid"], data["group"], data["gid"]) == (NAME, ident, NAME, ident)  # the image's defaults
    assert (data["jobdir"], data["cwd"], data["timeout"], data["term"]) == ("/", "~/job", 60, "xterm")
    assert data["tmpdir"] is None and data["changes"] is None


def test_print_config_hand_typed_and_unknown_key(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text('apppot.cmd="python3 run.py 10" apppot.uid=2000 apppot.colour=blue\n')
    out = subprocess.run(
        [PY, "-m", "apppot_guest.init", "--print-config", "--cmdline", str(tmp_path / "cmdline"), "--root", str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=REPO, check=True,
    )
    data = json.loads(out.stdout)
    assert data["argv"] == ["python3", "run.py", "10"] and data["uid"] == 2000 and data["user"] == "user"
    assert data["unknown"] == ["apppot.colour"]
    assert "unknown kernel command line key apppot.colour" in out.stderr


@pytest.mark.parametrize(
    ("line", "message"),
    [("apppot.uid=abc", "apppot.uid=abc: not a number"), ('apppot.cmd="unterminated', "unterminated double quote")],
)
def test_print_config_rejects_a_bad_command_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "cmdline").write_text(line + "\n")
    out = subprocess.run(
        [PY, "-m", "apppot_guest.init", "--print-config", "--cmdline", str(tmp_path / "cmdline")],
        capture_output=True, text=True, env=ENV, cwd=REPO, check=False,
    )
    assert out.returncode == 3
    assert out.stderr.startswith("apppot-init: error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


def test_boot_runs_the_job_as_the_user_and_records_its_status(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    (jobdir / "input.txt").write_text("from the host\n")
    script = 'cat input.txt > output.txt; echo "$HOME $USER $PWD" >> output.txt; id -u >> output.txt; printf "%s|" "$@" >> output.txt; exit 7'
    argv = ("sh", "-c", script, "sh", "a b", "$HOME", "")
    config = BootConfig(argv=argv, jobdir=os.fspath(jobdir), uid=ident, gid=ident, user=NAME, group=NAME)
    out = boot(root, config.kernel_args())
    assert out.returncode == 7, out.stderr
    home = root / "home" / NAME
    lines = (jobdir / "output.txt").read_text().splitlines()
    assert lines == ["from the host", f"{home} {NAME} {home}/job", str(ident), "a b|$HOME||"]
    st = (jobdir / "output.txt").stat()
    assert (st.st_uid, st.st_gid) == (ident, ident)
    status: dict[str, Any] = read_status(jobdir)
    assert read_exitcode(jobdir) == 7
    assert status["exit_code"] == 7 and status["outcome"] == "exited" and status["signal"] is None and status["error"] is None
    assert status["command"] == list(argv)
    assert (status["cwd"], status["user"], status["uid"], status["gid"]) == (f"/home/{NAME}/job", NAME, ident, ident)
    assert status["started_at"].endswith("Z") and status["finished_at"] >= status["started_at"]
    assert status["oom_killed"] is False and status["apppot_version"]
    assert sorted(p.name for p in jobdir.iterdir()) == ["apppot.exitcode", "apppot.status.json", "input.txt", "output.txt"]
    # The account: in the root's passwd with the ids, a home from skel, sudo checked by visudo.
    passwd = (root / "etc/passwd").read_text()
    assert f"{NAME}:x:{ident}:{ident}:" in passwd
    assert (home / ".bashrc").exists() and home.stat().st_uid == ident
    sudoers = root / "etc/sudoers.d/apppot"
    assert sudoers.read_text().endswith(f"{NAME} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    assert sudoers.stat().st_mode & 0o777 == 0o440
    subprocess.run(["visudo", "-cqf", str(sudoers)], check=True)
    assert mounted_under(root) == [], "the boot sequence left mounts behind"
    assert (home / "job").stat().st_uid == ident  # the empty mount point, when nothing is mounted


def test_boot_with_another_uid_moves_the_account_and_reuses_a_group(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    boot(root, BootConfig(argv=("true",), jobdir=os.fspath(jobdir)).kernel_args())  # creates NAME with ident
    other = free_id(ident + 1)
    os.chown(jobdir, other, 100)
    out = boot(root, BootConfig(argv=("sh", "-c", "id -u; id -g; touch f"), jobdir=os.fspath(jobdir), uid=other, gid=100).kernel_args())
    assert out.returncode == 0, out.stderr
    status: dict[str, Any] = read_status(jobdir)
    assert (status["user"], status["uid"], status["gid"]) == (NAME, other, 100)  # gid 100 is the existing group 'users'
    assert (jobdir / "f").stat().st_uid == other
    assert (root / "home" / NAME).stat().st_uid == other


def test_long_command_from_the_command_file(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    text = "x" * 6000
    config = BootConfig(argv=("sh", "-c", 'printf %s "$1" > long.txt', "sh", text), jobdir=os.fspath(jobdir), uid=ident, gid=ident)
    words = fit_kernel_args(config, ["ubd0=/x.img"], jobdir)
    assert "apppot.cmdfile=apppot.argv" in words
    out = boot(root, words)
    assert out.returncode == 0, out.stderr
    assert (jobdir / "long.txt").read_text() == text


def test_autorun_in_the_job_directory(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    (jobdir / "apppot-run").write_text("#!/bin/sh\necho autorun > ran.txt\nexit 4\n")
    (jobdir / "apppot-run").chmod(0o755)
    out = boot(root, BootConfig(jobdir=os.fspath(jobdir), uid=ident, gid=ident).kernel_args())
    assert out.returncode == 4, out.stderr
    assert (jobdir / "ran.txt").read_text() == "autorun\n"
    assert read_status(jobdir)["command"] == [f"{root}/home/{NAME}/job/apppot-run"]


def test_timeout_and_cwd_and_tmpdir(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    tmpdir = root.parent / "scratch-tmp"
    tmpdir.mkdir(mode=0o1777)
    tmpdir.chmod(0o1777)
    (jobdir / "sub").mkdir()
    os.chown(jobdir / "sub", ident, ident)
    script = f"pwd > ../pwd.txt; echo t > {root}/tmp/t.txt; exec sleep 600"
    config = BootConfig(argv=("sh", "-c", script), jobdir=os.fspath(jobdir), tmpdir=os.fspath(tmpdir), cwd="job/sub", uid=ident, gid=ident, timeout=2)
    out = boot(root, config.kernel_args())
    assert out.returncode == 124, out.stderr
    assert read_status(jobdir)["outcome"] == "timeout"
    assert (jobdir / "pwd.txt").read_text() == f"{root}/home/{NAME}/job/sub\n"
    assert (tmpdir / "t.txt").read_text() == "t\n"  # /tmp was the tmpdir


@pytest.mark.parametrize(
    ("argv", "code", "outcome"),
    [(("no-such-program",), 127, "not-found"), (("/etc/passwd",), 126, "not-executable"), (("sh", "-c", "kill -TERM $$"), 143, "killed")],
)
def test_boot_reports_every_job_outcome(scratch: tuple[Path, Path, int], argv: tuple[str, ...], code: int, outcome: str) -> None:
    root, jobdir, ident = scratch
    out = boot(root, BootConfig(argv=argv, jobdir=os.fspath(jobdir), uid=ident, gid=ident).kernel_args())
    assert out.returncode == code, out.stderr
    status: dict[str, Any] = read_status(jobdir)
    assert (status["exit_code"], status["outcome"]) == (code, outcome)
    assert read_exitcode(jobdir) == code


def test_a_bad_delta_is_merge_failed_and_the_job_does_not_run(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    (jobdir / "changes.tar").write_bytes(b"this is not a delta archive\n" * 10)
    config = BootConfig(argv=("touch", "ran"), jobdir=os.fspath(jobdir), changes=os.fspath(jobdir / "changes.tar"), uid=ident, gid=ident)
    out = boot(root, config.kernel_args())
    assert out.returncode == 125
    status: dict[str, Any] = read_status(jobdir)
    assert (status["outcome"], status["exit_code"]) == ("merge-failed", 125)
    assert status["error"] and "\n" not in status["error"]
    assert not (jobdir / "ran").exists()
    assert "merge failed" not in out.stderr, "the record says it; apppot-start prints it once"


def test_a_missing_delta_is_merge_failed(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    config = BootConfig(argv=("touch", "ran"), jobdir=os.fspath(jobdir), changes=os.fspath(jobdir / "nope.tar"), uid=ident, gid=ident)
    assert boot(root, config.kernel_args()).returncode == 125
    status: dict[str, Any] = read_status(jobdir)
    assert status["outcome"] == "merge-failed" and "no such file" in status["error"]
    assert not (jobdir / "ran").exists()


def test_a_real_delta_is_merged_before_the_job(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    snap = [PY, "-m", "apppot_guest.snap"]
    (root / "usr/local/bin").mkdir(parents=True)
    subprocess.run([*snap, "--root", str(root), "base"], check=True, env=ENV, cwd=REPO, capture_output=True)
    changed = root.parent / "changed"
    shutil.copytree(root, changed, symlinks=True)
    (changed / "usr/local/bin/hello").write_text("#!/bin/sh\necho hello from the delta\n")
    (changed / "usr/local/bin/hello").chmod(0o755)
    subprocess.run([*snap, "--root", str(changed), "changes", str(jobdir / "changes.tar.gz")], check=True, env=ENV, cwd=REPO, capture_output=True)
    argv = ("sh", "-c", f"{root}/usr/local/bin/hello > out.txt")
    config = BootConfig(argv=argv, jobdir=os.fspath(jobdir), changes=os.fspath(jobdir / "changes.tar.gz"), uid=ident, gid=ident)
    out = boot(root, config.kernel_args())
    assert out.returncode == 0, out.stderr
    assert (jobdir / "out.txt").read_text() == "hello from the delta\n"
    assert read_status(jobdir)["outcome"] == "exited"


def test_a_bad_command_line_is_setup_failed_in_the_job_directory(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, _ident = scratch
    out = boot(root, ["apppot.cmd=true", "apppot.uid=abc", f"apppot.jobdir={BootConfig(jobdir=os.fspath(jobdir)).kernel_args()[0].split('=', 1)[1]}"])
    assert out.returncode == 125
    status: dict[str, Any] = read_status(jobdir)
    assert (status["outcome"], status["exit_code"]) == ("setup-failed", 125)
    assert status["error"] == "bad kernel command line: apppot.uid=abc: not a number"
    assert "apppot-init: apppot.uid=abc: not a number" in out.stderr


def test_a_missing_command_file_is_setup_failed(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    out = boot(root, BootConfig(cmdfile="apppot.argv", jobdir=os.fspath(jobdir), uid=ident, gid=ident).kernel_args())
    assert out.returncode == 125
    status: dict[str, Any] = read_status(jobdir)
    assert status["outcome"] == "setup-failed" and "apppot.argv" in status["error"]


def test_a_missing_job_directory_is_setup_failed(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    out = boot(root, BootConfig(argv=("true",), jobdir=os.fspath(jobdir / "gone"), uid=ident, gid=ident).kernel_args())
    assert out.returncode == 125
    assert "setup failed" in out.stderr and "gone" in out.stderr


def test_nothing_happens_while_dpkg_runs(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, ident = scratch
    words = BootConfig(argv=("touch", "ran"), jobdir=os.fspath(jobdir), uid=ident, gid=ident).kernel_args()
    out = boot(root, words, env={**ENV, "DPKG_MAINTSCRIPT_NAME": "postinst"})
    assert out.returncode == 0 and "while dpkg runs" in out.stderr
    lock = root / "var/lib/dpkg/lock"
    with open(lock, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        out = boot(root, words)
    assert out.returncode == 0 and "lock is locked" in out.stderr
    assert list(jobdir.iterdir()) == [] and not (root / "home" / NAME).exists()


def test_init_needs_root() -> None:
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    out = subprocess.run(
        [*as_nobody, PY, "-m", "apppot_guest.init", "--no-poweroff"],
        capture_output=True, text=True, env=ENV, cwd=REPO, check=False,
    )
    assert out.returncode == 2 and out.stderr == "apppot-init: error: must run as root (it is the boot hook)\n"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_as_pid_1_in_a_pid_namespace(scratch: tuple[Path, Path, int]) -> None:
    """apppot-init as PID 1: early mounts, the job, orphans reaped, reboot(2) (in a PID namespace
    the kernel answers RB_POWER_OFF by killing PID 1 with SIGINT)."""
    root, jobdir, ident = scratch
    script = f"cat {root}/proc/1/cmdline | tr '\\0' ' ' > pid1.txt; (sleep 600 &) ; exit 5"
    config = BootConfig(argv=("sh", "-c", script), jobdir=os.fspath(jobdir), uid=ident, gid=ident)
    cmdline = root.parent / "cmdline"
    cmdline.write_text(" ".join(config.kernel_args()) + "\n")
    argv = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
            PY, "-m", "apppot_guest.init", "--root", str(root), "--bind", "--cmdline", str(cmdline)]
    out = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300, check=False)
    status: dict[str, Any] = read_status(jobdir)
    assert status["exit_code"] == 5, out.stderr
    assert status["max_rss_kib"] < 100 * 1024, "measured processes outside the job's tree"
    assert out.returncode in (-2, 128 + 2), out.stderr  # SIGINT from reboot(RB_POWER_OFF) in the namespace
    assert "apppot_guest.init" in (jobdir / "pid1.txt").read_text()
    assert mounted_under(root) == []  # the mounts lived and died with the namespace


# -- the systemd unit and the LSB init script -----------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "debian/apppot.service").read_text()
    assert "\nExecStart=/usr/sbin/apppot-init\n" in unit
    assert "\nTTYPath=/dev/console\n" in unit and "\nStandardInput=tty\n" in unit
    assert "\nDefaultDependencies=no\n" in unit and "getty@tty0.service" in unit
    # systemd-analyze checks every directive; only the not-yet-installed binary is swapped.
    (tmp_path / "apppot.service").write_text(unit.replace("/usr/sbin/apppot-init", "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "apppot.service")], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def init_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(REPO / "debian/apppot.init"), *args], capture_output=True, text=True, env=env or ENV, check=False)


def test_the_init_script_header_and_verbs() -> None:
    text = (REPO / "debian/apppot.init").read_text()
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(line[2:].split(":", 1) for line in header.splitlines() if line.startswith("# ") and ":" in line[:20])
    assert fields["Provides"].strip() == "apppot" and fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert "$local_fs" in fields["Required-Start"] and fields["X-Interactive"].strip() == "true"
    assert os.access(REPO / "debian/apppot.init", os.X_OK)
    subprocess.run(["sh", "-n", str(REPO / "debian/apppot.init")], check=True)
    assert init_script("status").returncode == 3
    assert init_script("stop").returncode == 0
    bad = init_script("frobnicate")
    assert bad.returncode == 3 and "Usage: /etc/init.d/apppot" in bad.stderr


def test_the_init_script_does_nothing_while_dpkg_runs() -> None:
    out = init_script("start", env={**ENV, "DPKG_MAINTSCRIPT_NAME": "postinst"})
    assert out.returncode == 0 and "not running a job while dpkg runs (postinst)" in out.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_the_init_script_runs_apppot_init(scratch: tuple[Path, Path, int]) -> None:
    """'start' on a sysvinit system runs the hook: in a private mount namespace, /usr/sbin/apppot-init
    is the checkout's apppot-init with the scratch-root options (an overlay), /run/systemd is hidden."""
    root, jobdir, ident = scratch
    cmdline = root.parent / "cmdline"
    config = BootConfig(argv=("sh", "-c", "echo ran > ran; exit 6"), jobdir=os.fspath(jobdir), uid=ident, gid=ident)
    cmdline.write_text(" ".join(config.kernel_args()))
    hook = root.parent / "apppot-init"
    hook.write_text(f'#!/bin/sh\nexec {PY} -m apppot_guest.init --root "{root}" --bind --no-poweroff --cmdline "{cmdline}"\n')
    hook.chmod(0o755)
    upper, work = root.parent / "upper", root.parent / "work"
    upper.mkdir()
    work.mkdir()
    setup = (
        f"set -e; mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir={upper},workdir={work} /usr/sbin; "
        "cp \"$1\" /usr/sbin/apppot-init; "
        "if [ -d /run/systemd ]; then mount -t tmpfs none /run/systemd; fi; "
        f"cd {REPO}; exec sh {REPO}/debian/apppot.init start"
    )
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", str(hook)],
                         capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert out.returncode == 6, out.stderr
    assert (jobdir / "ran").read_text() == "ran\n"
    assert read_status(jobdir)["exit_code"] == 6


# -- the account (useradd/groupadd/usermod --root on a scratch root) -------------


def test_account_group_name_taken_by_another_gid(scratch: tuple[Path, Path, int]) -> None:
    from apppot_guest.account import ensure_account

    root, _jobdir, ident = scratch
    account = ensure_account(root, NAME, ident, "users", ident)  # 'users' is gid 100
    assert (account.group, account.gid) == (NAME, ident)
    assert f"\n{NAME}:x:{ident}:" in "\n" + (root / "etc/group").read_text()
    assert "\nusers:x:100:" in "\n" + (root / "etc/group").read_text()
    passwd = (root / "etc/passwd").read_bytes()
    assert ensure_account(root, NAME, ident, "users", ident) == account  # a second boot changes nothing
    assert (root / "etc/passwd").read_bytes() == passwd


def test_account_home_missing_is_made_from_skel(scratch: tuple[Path, Path, int]) -> None:
    from apppot_guest.account import ensure_account

    root, _jobdir, ident = scratch
    with open(root / "etc/passwd", "a") as passwd:  # as a delta might carry it: the account, not the home
        passwd.write(f"{NAME}:x:{ident}:{ident}::/home/{NAME}:/bin/sh\n")
    with open(root / "etc/group", "a") as group:
        group.write(f"{NAME}:x:{ident}:\n")
    account = ensure_account(root, NAME, ident, NAME, ident)
    assert account.home == root / "home" / NAME and account.shell == "/bin/sh"
    assert (account.home / ".profile").exists()
    assert {(p.stat().st_uid, p.stat().st_gid) for p in [account.home, *account.home.iterdir()]} == {(ident, ident)}


def test_bad_defaults_file_is_setup_failed(scratch: tuple[Path, Path, int]) -> None:
    root, jobdir, _ident = scratch
    (root / "etc/default/apppot").write_text("APPPOT_UID=lots\n")
    out = boot(root, BootConfig(argv=("touch", "ran"), jobdir=os.fspath(jobdir)).kernel_args())
    assert out.returncode == 125
    status: dict[str, Any] = read_status(jobdir)
    assert status["outcome"] == "setup-failed" and "etc/default/apppot" in status["error"]
    assert not (jobdir / "ran").exists()


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare(1) and ip(8)")
@pytest.mark.parametrize("interface", ["vec0", "eth0", None])
def test_network_up_configures_whatever_interface_the_guest_has(interface: str | None) -> None:
    """system.network_up (run in-process by apppot-init before a job, and by apppot-network.service as
    `apppot-init --network-up`), in a fresh network namespace with a veth standing in for UML's interface,
    or none at all.  The second run (the unit's, then the hook's in a full boot) leaves it as it is."""
    probe = subprocess.run(["unshare", "--net", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no veth interfaces here: {probe.stderr.strip()}")
    make = f"ip link add {interface} type veth peer name zzpeer; " if interface else ""
    setup = (f"set -e; mount -t sysfs sysfs /sys; {make}"
             f"{PYTHON} -m apppot_guest.init --network-up; "
             f"{PYTHON} -c 'from apppot_guest.system import network_up; print(network_up())'; "
             "ip -o link show lo; ip -o -4 address show; ip route show")
    out = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", setup],
                         capture_output=True, text=True, env=ENV, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if interface is None:
        assert lines[:2] == ["apppot-init: network: no interface, only lo", "None"], out.stdout
        assert ",UP" in lines[2] and len(lines) == 4 and "127.0.0.1" in lines[3], out.stdout  # lo only, no route
    else:
        assert lines[:2] == [f"apppot-init: network: {interface} as 10.0.2.15/24, gateway 10.0.2.2", interface], out.stdout
        assert ",UP" in lines[2]
        assert any(f"{interface}    inet 10.0.2.15/24" in line for line in lines), out.stdout
        routes = [" ".join(line.split()[:5]) for line in lines if line.startswith(("default", "10.0.2."))]
        assert routes == [f"default via 10.0.2.2 dev {interface}", f"10.0.2.0/24 dev {interface} proto kernel"], out.stdout


def test_account_keeps_the_packages_sudo_rule_for_the_same_user(scratch: tuple[Path, Path, int]) -> None:
    from apppot_guest.account import ensure_account

    root, _jobdir, ident = scratch
    rule = root / "etc/sudoers.d/apppot"
    rule.parent.mkdir()
    package_rule = f"# Written by the apppot package\n{NAME} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    rule.write_text(package_rule)
    ensure_account(root, NAME, ident, NAME, ident)
    assert rule.read_text() == package_rule
    other = free_id(ident + 1)
    ensure_account(root, "other-user", other, "other-user", other)  # another user: the rule is replaced
    assert rule.read_text().endswith("\nother-user ALL=(ALL:ALL) NOPASSWD: ALL\n")
