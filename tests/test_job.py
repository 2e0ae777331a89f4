"""Running real jobs as a temporary unprivileged user: exit codes, signals, timeouts, the tree."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from apppot_guest.account import Account, login_env
from apppot_guest.job import JobResult, JobSpec, Outcome, run_job
from fixtures_user import job_dir, job_user, shared_tmp  # noqa: F401

PY = "/usr/bin/python3"


def run(account: Account, cwd: Path, *argv: str, timeout: float | None = None, grace: float = 1.0) -> tuple[JobResult, str]:
    out = cwd.parent / f"{cwd.name}.out"
    with open(out, "wb") as sink:
        spec = JobSpec(tuple(argv), cwd, account, login_env(account, "xterm"), timeout=timeout, grace=grace,
                       stdout=sink.fileno(), stderr=sink.fileno())
        result = run_job(spec)
    return result, out.read_text(errors="replace")


@pytest.mark.parametrize("code", [0, 7, 255])
def test_exit_code_is_the_jobs_own(job_user: Account, job_dir: Path, code: int) -> None:
    result, _ = run(job_user, job_dir, "sh", "-c", f"exit {code}")
    assert (result.outcome, result.exit_code, result.signal, result.error) == (Outcome.EXITED, code, None, None)
    assert result.finished_at >= result.started_at
    assert not result.oom_killed


def test_killed_by_a_signal_is_128_plus_n(job_user: Account, job_dir: Path) -> None:
    result, _ = run(job_user, job_dir, "sh", "-c", "kill -USR1 $$")
    assert (result.outcome, result.exit_code, result.signal) == (Outcome.KILLED, 128 + signal.SIGUSR1, signal.SIGUSR1)
    assert "SIGUSR1" in (result.error or "")


def test_not_found_is_127(job_user: Account, job_dir: Path) -> None:
    result, _ = run(job_user, job_dir, "no-such-command-apppot")
    assert (result.outcome, result.exit_code) == (Outcome.NOT_FOUND, 127)
    assert result.error is not None
    assert result.error.startswith("no-such-command-apppot: command not found: not in PATH=")
    assert "install it under /usr/local/bin or /opt" in result.error


def test_not_executable_is_126(job_user: Account, job_dir: Path) -> None:
    script = job_dir / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result, out = run(job_user, job_dir, "./script.sh")
    assert (result.outcome, result.exit_code) == (Outcome.NOT_EXECUTABLE, 126)
    assert "Permission denied" in (result.error or "")
    assert out == ""


def test_a_file_the_user_cannot_read_through_is_126(job_user: Account, job_dir: Path) -> None:
    secret = job_dir / "secret"
    secret.mkdir(mode=0o700)  # owned by root: the user cannot search it
    (secret / "tool").write_text("#!/bin/sh\n")
    (secret / "tool").chmod(0o755)
    result, _ = run(job_user, job_dir, str(secret / "tool"))
    assert (result.outcome, result.exit_code) == (Outcome.NOT_EXECUTABLE, 126)


def test_missing_working_directory_is_setup_failed(job_user: Account, job_dir: Path) -> None:
    result, _ = run(job_user, job_dir / "gone", "true")
    assert (result.outcome, result.exit_code) == (Outcome.SETUP_FAILED, 125)
    assert "gone" in (result.error or "")


def test_timeout_stops_the_whole_tree_including_a_grandchild_ignoring_term(job_user: Account, job_dir: Path) -> None:
    grandchild = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open('gc.pid.tmp', 'w').write(str(os.getpid())); os.rename('gc.pid.tmp', 'gc.pid')\n"
        "while True: time.sleep(60)\n"
    )
    (job_dir / "gc.py").write_text(grandchild)
    script = f"{PY} gc.py & until [ -e gc.pid ]; do sleep 0.05; done; echo ready; exec sleep 600"
    result, out = run(job_user, job_dir, "sh", "-c", script, timeout=5, grace=1)
    assert "ready" in out, "the grandchild never started: the scenario did not happen"
    assert (result.outcome, result.exit_code) == (Outcome.TIMEOUT, 124)
    assert result.signal == signal.SIGTERM
    assert result.error == "timed out after 5 seconds"
    gc_pid = int((job_dir / "gc.pid").read_text())
    assert not psutil.pid_exists(gc_pid), "the grandchild ignoring SIGTERM survived (or is an unreaped zombie)"
    assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == job_user.uid]


def test_processes_left_behind_are_stopped(job_user: Account, job_dir: Path) -> None:
    result, _ = run(job_user, job_dir, "sh", "-c", "setsid sleep 600 & echo $! > bg.pid; exit 3")
    assert (result.outcome, result.exit_code) == (Outcome.EXITED, 3)
    assert not psutil.pid_exists(int((job_dir / "bg.pid").read_text()))


def test_cwd_environment_and_stdin(job_user: Account, job_dir: Path) -> None:
    os.environ["APPPOT_TEST_SECRET"] = "leak"
    try:
        result, out = run(job_user, job_dir, "sh", "-c", "pwd; readlink /proc/self/fd/0; id -u; id -g; id -G; env")
    finally:
        del os.environ["APPPOT_TEST_SECRET"]
    assert result.exit_code == 0
    lines = out.splitlines()
    assert lines[:5] == [str(job_dir), "/dev/null", str(job_user.uid), str(job_user.gid), str(job_user.gid)]
    env = dict(line.split("=", 1) for line in lines[5:] if "=" in line)
    assert env["HOME"] == str(job_user.home)
    assert env["USER"] == env["LOGNAME"] == job_user.name
    assert env["SHELL"] == "/bin/sh"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
    assert env["TERM"] == "xterm"
    assert env["LANG"]
    assert "APPPOT_TEST_SECRET" not in env


def test_files_written_belong_to_the_user(job_user: Account, job_dir: Path) -> None:
    result, _ = run(job_user, job_dir, "sh", "-c", "echo data > out.txt; mkdir sub")
    assert result.exit_code == 0
    for name in ("out.txt", "sub"):
        st = (job_dir / name).stat()
        assert (st.st_uid, st.st_gid) == (job_user.uid, job_user.gid)
    assert (job_dir / "out.txt").stat().st_mode & 0o777 == 0o644


def test_the_job_cannot_act_as_root(job_user: Account, job_dir: Path) -> None:
    result, out = run(job_user, job_dir, "sh", "-c", "touch /root/apppot-should-not-exist")
    assert result.exit_code == 1
    assert "Permission denied" in out
    assert not Path("/root/apppot-should-not-exist").exists()


def test_cpu_and_memory_of_the_whole_tree_are_measured(job_user: Account, job_dir: Path) -> None:
    # A grandchild (below sh) holds 64 MiB and burns CPU until it has used 0.3 s of it.
    child = "b = bytearray(64 << 20); import os\nwhile os.times().user < 0.3: pass\n"
    result, _ = run(job_user, job_dir, "sh", "-c", f"{PY} -c '{child}'; true")
    assert result.exit_code == 0
    assert result.cpu_user_seconds >= 0.3
    assert result.max_rss_kib >= 64 * 1024
    assert result.cpu_system_seconds >= 0


def test_the_test_process_is_left_as_it_was(job_user: Account, job_dir: Path) -> None:
    from apppot_guest.job import PR_GET_CHILD_SUBREAPER, _prctl

    before = _prctl(PR_GET_CHILD_SUBREAPER)
    run(job_user, job_dir, "true")
    assert _prctl(PR_GET_CHILD_SUBREAPER) == before
    assert psutil.Process().children() == [] or sys.platform != "linux"


def _drive_terminal(master: int, command: bytes, until: bytes, deadline: float, running: object) -> bytes:
    """Read the terminal until ``until`` shows, type ``command``, then read until the session ends."""
    import select
    import time

    seen = b""
    typed = False
    while time.monotonic() < deadline and running():  # type: ignore[operator]
        ready, _, _ = select.select([master], [], [], 0.2)
        if not ready:
            continue
        seen += os.read(master, 65536)
        if not typed and until in seen:
            os.write(master, command)
            typed = True
    return seen


@pytest.mark.parametrize("use_screen", [True, False])
def test_console_session_is_the_users_shell_on_the_terminal(job_user: Account, job_dir: Path, use_screen: bool) -> None:
    import shutil
    import threading
    import time

    from apppot_guest.job import console_session

    if use_screen and shutil.which("screen") is None:
        pytest.skip("screen is not installed")
    master, slave = os.openpty()  # the slave stays open here too: a read never meets EIO
    console = Path(os.ttyname(slave))
    env = login_env(job_user, "xterm")
    screendir = job_user.home / ".screen"
    screendir.mkdir(mode=0o700, exist_ok=True)
    os.chown(screendir, job_user.uid, job_user.gid)
    env["SCREENDIR"] = str(screendir)  # at boot /run/screen (1777) is made by apppot-init or tmpfiles
    env["PS1"] = "apppot-prompt$ "
    argv = ["screen", "-q", "-S", "apppot-test", "/bin/sh", "-i"] if use_screen else ["/bin/sh", "-i"]
    command = f"id -u > {job_dir}/who; tty >> {job_dir}/who; ls /proc/self/fd >> {job_dir}/who; exit\r".encode()
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.update(code=console_session(argv, job_user, env, console)))
    runner.start()
    try:
        seen = _drive_terminal(master, command, b"apppot-prompt$ ", time.monotonic() + 60, runner.is_alive)
    finally:
        runner.join(timeout=60)
        os.close(master)
        os.close(slave)
    assert b"apppot-prompt$ " in seen
    assert result.get("code") == 0
    who = (job_dir / "who").read_text().splitlines()
    assert who[0] == str(job_user.uid)
    if not use_screen:
        assert who[1] == str(console)  # the shell's controlling terminal is the console itself
        assert sorted(who[2:]) == ["0", "1", "2", "3"]  # stdin/out/err and ls's own directory fd: nothing leaked
    else:
        assert who[1].startswith("/dev/pts/")


def _memory_cgroup(limit: int) -> Path | None:
    """A new memory cgroup limited to ``limit`` bytes without swap (v2 or v1), or None."""
    import uuid

    base = Path("/sys/fs/cgroup")
    name = f"apppot-oom-{uuid.uuid4().hex[:8]}"
    try:
        if (base / "cgroup.controllers").exists():  # cgroup v2: a child of the root cgroup
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                return None
            cg = base / name
            cg.mkdir()
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            return cg
        # cgroup v1: a child of our own memory cgroup
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.split(":")[1] == "memory")
        cg = base / "memory" / own.lstrip("/") / name
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if (cg / "memory.memsw.limit_in_bytes").exists():
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return cg
    except (OSError, StopIteration, IndexError):
        return None


def test_an_oom_killed_job_says_so(job_user: Account, job_dir: Path) -> None:
    """The job is moved into a 64 MiB memory cgroup, then allocates 1 GiB: the kernel's OOM killer ends it."""
    import threading
    import time

    cg = _memory_cgroup(64 << 20)
    if cg is None:
        pytest.skip("no writable memory cgroup on this machine")
    script = f"echo $$ > pid.tmp; mv pid.tmp pid; until [ -e go ]; do sleep 0.05; done; exec {PY} -c 'b = bytearray(1 << 30)'"
    outcome: dict[str, tuple[JobResult, str]] = {}
    runner = threading.Thread(target=lambda: outcome.update(r=run(job_user, job_dir, "sh", "-c", script, timeout=120)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not (job_dir / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for the job to say where it is
        (cg / "cgroup.procs").write_text((job_dir / "pid").read_text())
        (job_dir / "go").touch()
        runner.join(timeout=120)
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    result, _ = outcome["r"]
    assert (result.outcome, result.exit_code, result.signal) == (Outcome.KILLED, 137, signal.SIGKILL)
    assert result.oom_killed


@pytest.mark.parametrize(("term", "no_color"), [("dumb", "1"), ("xterm-256color", None), (None, None)])
def test_a_batch_jobs_console_asks_for_no_colour(tmp_path: Path, term: str | None, no_color: str | None) -> None:
    """TERM=dumb (the launcher's output is not a terminal): the job's console is still a terminal in the guest,
    so programs that colour any terminal (ip) are told NO_COLOR as well."""
    account = Account("someone", 4242, "someone", 4242, tmp_path, "/bin/sh", ())
    env = login_env(account, term, tmp_path)
    assert env.get("NO_COLOR") == no_color and env["TERM"] == (term or "linux")
