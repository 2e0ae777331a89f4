"""Running the job as the unprivileged user and following its whole process tree.

``run_job()`` starts the command as that user with a login-like
environment and stdin from /dev/null, follows and measures its whole process
tree with psutil, stops the tree on timeout (TERM, then KILL after a grace
period) and returns a ``JobResult`` whose exit code follows the shell's
conventions.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from .account import Account
from .errors import display_path

log = logging.getLogger(__name__)

EXIT_SETUP_FAILED = 125  # the hook's own failure: the job did not run
EXIT_TIMEOUT = 124
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
SAMPLE_SECONDS = 0.2  # how often the process tree's memory is sampled

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


class Outcome(StrEnum):
    EXITED = "exited"
    KILLED = "killed"
    TIMEOUT = "timeout"
    NOT_FOUND = "not-found"
    NOT_EXECUTABLE = "not-executable"
    MERGE_FAILED = "merge-failed"
    SETUP_FAILED = "setup-failed"
    STOPPED = "stopped"  # written by apppot-start: it got SIGTERM or SIGINT and stopped the VM


@dataclass(frozen=True, slots=True)
class JobSpec:
    argv: tuple[str, ...]
    cwd: Path
    account: Account
    env: Mapping[str, str]
    timeout: float | None = None
    grace: float = KILL_GRACE
    stdout: int | None = None  # a file descriptor; None inherits ours
    stderr: int | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    outcome: Outcome
    exit_code: int
    signal: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime
    wall_seconds: float
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    max_rss_kib: int = 0
    oom_killed: bool = False

    @classmethod
    def failed(cls, outcome: Outcome, error: str, started_at: datetime | None = None) -> JobResult:
        """A job that never ran: setup or merge failed."""
        now = datetime.now(UTC)
        start = started_at or now
        return cls(outcome, EXIT_SETUP_FAILED, None, error, start, now, (now - start).total_seconds())


# -- running the job -----------------------------------------------------------


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if option == PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        libc.prctl(option, ctypes.byref(out), 0, 0, 0)
        return out.value
    return int(libc.prctl(option, value, 0, 0, 0))


def _oom_kills() -> int:
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(slots=True)
class _Tree:
    """The job's process tree: everything below us (we are its subreaper)."""

    job_pid: int
    user: float = 0.0
    system: float = 0.0
    max_rss_kib: int = 0
    job_status: int | None = None
    seen: set[int] = field(default_factory=set)

    def members(self) -> list:
        import psutil

        try:
            procs = psutil.Process().children(recursive=True)
        except psutil.Error:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def sample(self) -> None:
        import psutil

        total = 0
        for proc in self.members():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        self.max_rss_kib = max(self.max_rss_kib, total // 1024)

    def reap(self, pid: int, block: bool) -> bool:
        try:
            got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if got == 0:
            return False
        self.user += usage.ru_utime
        self.system += usage.ru_stime
        self.max_rss_kib = max(self.max_rss_kib, usage.ru_maxrss)
        if got == self.job_pid:
            self.job_status = status
        return True

    def reap_children(self) -> None:
        """Reap the job's processes that are our children (the job, adopted orphans) and have exited."""
        import psutil

        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for child in children:
            if child.pid == self.job_pid or child.pid in self.seen:
                self.reap(child.pid, block=False)

    def wait_gone(self, procs: list, timeout: float) -> list:
        """Wait up to ``timeout`` seconds for ``procs`` to end, reaping (never via psutil,
        which would reap our children and lose their status and usage); return those alive."""
        end = time.monotonic() + timeout
        while True:
            self.reap_children()
            alive = _running(procs)
            if not alive or time.monotonic() >= end:
                return alive
            time.sleep(0.05)

    def stop(self, grace: float) -> None:
        """SIGTERM every process of the tree, SIGKILL what is left after ``grace`` seconds."""
        procs = self.members()
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        alive = self.wait_gone(procs, grace)
        for _ in range(10):
            alive = _running(list({p.pid: p for p in alive + self.members()}.values()))  # incl. forked meanwhile
            if not alive:
                return
            log.info("sending SIGKILL to %d process(es) still running", len(alive))
            for proc in alive:
                _signal(proc, signal.SIGKILL)
            alive = self.wait_gone(alive, 2.0)

    def reap_all(self) -> None:
        import psutil

        for _ in range(100):
            try:
                children = [c for c in psutil.Process().children() if c.pid in self.seen or c.pid == self.job_pid]
            except psutil.Error:
                return
            if not children:
                return
            for child in children:
                if not self.reap(child.pid, block=False):
                    _signal(child, signal.SIGKILL)
                    self.reap(child.pid, block=True)


def _running(procs: list) -> list:
    import psutil

    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def _signal(proc: object, signum: int) -> None:
    import psutil

    try:
        proc.send_signal(signum)  # type: ignore[attr-defined]
    except psutil.Error:
        pass


def run_job(spec: JobSpec) -> JobResult:
    """Run ``spec.argv`` as ``spec.account``; wait, measure, enforce the timeout."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    oom_before = _oom_kills()
    was_subreaper = _prctl(PR_GET_CHILD_SUBREAPER)
    if os.getpid() != 1:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        return _run(spec, started, t0, oom_before)
    finally:
        if os.getpid() != 1 and not was_subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)


def _run(spec: JobSpec, started: datetime, t0: float, oom_before: int) -> JobResult:
    acct = spec.account
    argv = list(spec.argv)
    if not spec.cwd.is_dir():
        return _never_ran(Outcome.SETUP_FAILED, f"working directory {display_path(spec.cwd)} does not exist", started, t0)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=spec.stdout,
            stderr=spec.stderr,
            cwd=spec.cwd,
            env=dict(spec.env),
            user=acct.uid,
            group=acct.gid,
            extra_groups=list(acct.groups),
            umask=0o022,
            close_fds=True,
            start_new_session=True,
            restore_signals=True,
        )
    except OSError as exc:
        return _exec_failed(exc, spec, started, t0)
    log.info("job started as %s (uid %d), pid %d: %s", acct.name, acct.uid, proc.pid, display_path(" ".join(argv)))
    tree = _Tree(proc.pid)
    deadline = t0 + spec.timeout if spec.timeout is not None else None
    timed_out = False
    pidfd = os.pidfd_open(proc.pid)
    try:
        while not tree.reap(proc.pid, block=False):
            if time.monotonic() - t0 >= SAMPLE_SECONDS:  # a job that ends sooner is measured by wait4 alone
                tree.sample()
                tree.reap_children()
            wait = SAMPLE_SECONDS
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("job timed out after %s seconds; stopping its processes", spec.timeout)
                    timed_out = True
                    tree.stop(spec.grace)
                    tree.reap(proc.pid, block=True)
                    break
                wait = min(wait, remaining)
            select.select([pidfd], [], [], wait)
    finally:
        os.close(pidfd)
    if _have_children():  # else the whole tree is gone and reaped: psutil is not even imported (0.04 s in UML)
        leftovers = tree.members()
        if leftovers:
            log.info("stopping %d process(es) the job left behind", len(leftovers))
            tree.stop(spec.grace)
        tree.reap_all()
    finished = datetime.now(UTC)
    status = tree.job_status if tree.job_status is not None else 0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by us with wait4: Popen must not wait
    wall_seconds = round(time.monotonic() - t0, 3)
    # The kernel's count of OOM kills rose while the job ran (in the VM only the job runs):
    # also true when the job survived the loss of one of its processes.
    oom_killed = _oom_kills() > oom_before

    def result(outcome: Outcome, code: int, signum: int | None, error: str | None) -> JobResult:
        return JobResult(outcome, code, signum, error, started_at=started, finished_at=finished, wall_seconds=wall_seconds,
                         cpu_user_seconds=round(tree.user, 3), cpu_system_seconds=round(tree.system, 3),
                         max_rss_kib=tree.max_rss_kib, oom_killed=oom_killed)

    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if timed_out:
        return result(Outcome.TIMEOUT, EXIT_TIMEOUT, signum, f"timed out after {spec.timeout:g} seconds")
    if signum is not None:
        return result(Outcome.KILLED, 128 + signum, signum, f"killed by signal {signum} ({_signal_name(signum)})")
    return result(Outcome.EXITED, os.WEXITSTATUS(status), None, None)


def _have_children() -> bool:
    """Whether we have any child at all, running or exited (nothing is reaped).  We are the job's
    subreaper: every process the job left behind is our child or a descendant of one."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}" if signal.SIGRTMIN <= signum <= signal.SIGRTMAX else str(signum)


def _never_ran(outcome: Outcome, error: str, started: datetime, t0: float) -> JobResult:
    finished = datetime.now(UTC)
    code = {Outcome.NOT_FOUND: EXIT_NOT_FOUND, Outcome.NOT_EXECUTABLE: EXIT_NOT_EXECUTABLE}.get(outcome, EXIT_SETUP_FAILED)
    return JobResult(outcome, code, None, error, started, finished, round(time.monotonic() - t0, 3))


def _exec_failed(exc: OSError, spec: JobSpec, started: datetime, t0: float) -> JobResult:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and os.fsdecode(exc.filename) == os.fspath(spec.cwd):
        return _never_ran(Outcome.SETUP_FAILED, f"cannot change to directory {display_path(spec.cwd)}: {reason}", started, t0)
    what = display_path(spec.argv[0])
    if exc.errno == errno.ENOENT:
        return _never_ran(Outcome.NOT_FOUND, _not_found(spec), started, t0)
    return _never_ran(Outcome.NOT_EXECUTABLE, f"{what}: cannot execute: {reason}", started, t0)


def _not_found(spec: JobSpec) -> str:
    """Which command, where it was looked for, and where a job's own programs belong."""
    name = spec.argv[0]
    if "/" in name:
        where = f"no such file (relative to {display_path(spec.cwd)})" if not name.startswith("/") else "no such file"
    else:
        where = f"not in PATH={display_path(spec.env.get('PATH', os.defpath))}"
    return (f"{display_path(name)}: command not found: {where}; a program built in ~/job is not in a delta "
            "(the job directory is not part of the image): install it under /usr/local/bin or /opt before "
            "apppot-snap changes")


@dataclass(frozen=True, slots=True)
class _Descriptor:
    """A stand-in stream for DaemonContext: just a file descriptor number."""

    fd: int

    def fileno(self) -> int:
        return self.fd


def console_session(argv: Sequence[str], account: Account, env: Mapping[str, str], console: Path) -> int:
    """Run ``argv`` (``screen``) as ``account`` on ``console`` as its controlling terminal.

    python-daemon's DaemonContext does the part it is made for in the child:
    dropping privileges (with initgroups), closing every inherited descriptor,
    the working directory and umask; the console becomes stdin/stdout/stderr.
    Returns the session's exit status (shell convention).
    """
    import daemon

    fd = os.open(console, os.O_RDWR | os.O_NOCTTY)

    def enter_session() -> None:  # in the child, after setsid(), before exec
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 1)  # the console becomes our controlling terminal
        os.setgroups(list(account.groups))
        # DaemonContext binds sys.stdin/out/err to its stdin/stdout/stderr (None would mean
        # /dev/null): point both at descriptors 0-2, which Popen has made the console.
        streams = [_Descriptor(n) for n in (0, 1, 2)]
        sys.stdin, sys.stdout, sys.stderr = streams  # type: ignore[assignment]  # in the child only
        daemon.DaemonContext(
            detach_process=False,
            uid=account.uid,
            gid=account.gid,
            initgroups=False,  # set above from the image's group file
            working_directory=os.fspath(account.home),
            umask=0o022,
            prevent_core=False,
            signal_map={},
            stdin=streams[0],
            stdout=streams[1],
            stderr=streams[2],  # the console; every other descriptor is closed
        ).open()

    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=fd,
            stdout=fd,
            stderr=fd,
            env=dict(env),
            start_new_session=True,
            preexec_fn=enter_session,
        )
    finally:
        os.close(fd)
    code = proc.wait()
    return 128 - code if code < 0 else code
