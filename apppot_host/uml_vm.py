"""One User-Mode Linux process for apppot-start: its console as the job's output, stopped for good.

In batch mode UML's stdout (the guest console, ``con0=fd:0,fd:1``) and stderr
(UML's own messages) are pipes: the console is written to our stdout as it
arrives, CR LF turned into LF and the kernel's power-off lines dropped, and its
tail is kept for the report when the VM ends without a status.  In interactive
mode UML gets the terminal and the terminal's settings are restored afterwards.
UML runs in its own process group, which is killed when it exits (slirp and its
other helpers share that group).  Imported by apppot_host.start.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger("apppot-start")

TAIL_KEPT = 400  # console lines kept for the report when the VM ends without a status
TAIL_LINES = 20
PANIC_RE = re.compile(rb"Kernel panic|Out of memory|BUG:|Oops")
# Known ways a UML kernel dies, and what to do about each ({kernel}: the kernel's path).
DIAGNOSES = (
    (re.compile(rb"ptrace (set|get) fp ?regs failed"),
     "the UML kernel {kernel} cannot run a process on this CPU: the host's FPU state (e.g. Intel AMX) is larger "
     "than this kernel expects ('ptrace set fp regs failed'); use AppPot's own kernel (make kernel, or leave out "
     "--linux and $APPPOT_KERNEL)"),
    (re.compile(rb"must be not mounted noexec"),
     "UML cannot map its memory file executable: its temporary directory is mounted noexec; set TMPDIR to a "
     "directory on a file system mounted without noexec"),
)
KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the VM must be stopped
# Lines the kernel and UML print while powering off: not the job's output.
# (UML reports slirp's exit status 1 as it stops it: "helper_wait : process N ...")
# An apppot-init older than the run directory says so as it boots (it then writes its record into the job directory).
OLD_GUEST_LINE = re.compile(rb"unknown kernel command line key apppot\.rundir")
KERNEL_POWEROFF_LINES = re.compile(rb"reboot: (Power down|System halted)|helper_wait : process [0-9]+ exited with status 0x100")


class ConsoleFilter:
    """The guest console as the job's output: CR LF to LF, kernel power-off lines dropped."""

    def __init__(self, out: int) -> None:
        self.out = out
        self.diagnosis: str | None = None  # the first known way of dying seen on the console
        self.old_guest = False  # the image's apppot-init does not know apppot.rundir
        self.partial = b""
        self.tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_KEPT)

    def feed(self, data: bytes) -> None:
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        kept = []
        for line in lines:
            line = line.rstrip(b"\r")
            self.tail.append(line[-512:])
            if self.diagnosis is None:
                self.diagnosis = diagnose(line)
            self.old_guest = self.old_guest or bool(OLD_GUEST_LINE.search(line))
            if not KERNEL_POWEROFF_LINES.fullmatch(line):
                kept.append(line + b"\n")
        self._write(b"".join(kept))

    def flush_partial(self) -> None:
        """Write an unfinished line (a prompt, a progress bar) after a pause."""
        text = self.partial.rstrip(b"\r")
        if text and not (b"reboot: ".startswith(text[:8]) or b"helper_wait".startswith(text[:11])):
            self._write(text)
            self.tail.append(text[-512:])
            self.partial = self.partial[len(text) :]

    def close(self) -> None:
        line = self.partial.rstrip(b"\r")
        if line and not KERNEL_POWEROFF_LINES.fullmatch(line):
            self._write(line)
            self.tail.append(line)
        self.partial = b""

    def _write(self, data: bytes) -> None:
        while data and self.out >= 0:
            try:
                data = data[os.write(self.out, data) :]
            except BlockingIOError:
                time.sleep(0.01)
            except BrokenPipeError:
                self.out = -1  # nobody reads our stdout any more: the job still runs to its end


def diagnose(line: bytes) -> str | None:
    """What a console or UML log line says about why the kernel died (None: nothing known)."""
    return next((message for pattern, message in DIAGNOSES if pattern.search(line)), None)


@contextlib.contextmanager
def terminal_restored(fd: int) -> Iterator[None]:
    """Give the terminal back as it was: UML sets it raw and non-blocking."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        saved = None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class Vm:
    """One UML process group, stopped for good when the launcher leaves."""

    def __init__(self, argv: Sequence[str], interactive: bool, time_limit: float | None,
                 env: dict[str, str] | None = None, cpu: int | None = None) -> None:
        self.argv = tuple(argv)
        self.cpu = cpu  # the one host CPU for UML and its helpers (None: any)
        self.env = dict(env or {})  # added to our environment for UML
        self.diagnosis: str | None = None  # a known way of dying, from the console or UML's messages
        self.interactive = interactive  # UML gets the terminal itself, else its console is piped through us
        self.time_limit = time_limit  # seconds after which the VM is stopped (None: never)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_reason: str | None = None
        self.timed_out = False
        self.old_guest = False  # its apppot-init wrote the record into the job directory, not the run's own

    def stop(self, reason: str) -> None:
        if self.proc is None:  # not started yet: _wait stops it as soon as it is
            self.stop_reason = self.stop_reason or reason
            return
        if self.proc.poll() is not None:
            return
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("stopping the VM: %s", reason)
            self._signal_group(signal.SIGTERM)
        else:
            self._signal_group(signal.SIGKILL)

    def _in_child(self) -> None:
        """In UML's process, before exec."""
        die_with_parent()
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # see uml_host.choose_cpu

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def run(self) -> tuple[int, bytes]:
        """Boot, pass the console through, wait; return UML's exit status and the console tail."""
        become_subreaper()
        env = {**os.environ, **self.env}
        env.pop("DISPLAY", None)  # UML never opens an xterm for a console
        if self.interactive:
            return self._run_on_terminal(env), b""
        return self._run_piped(env)

    def _run_on_terminal(self, env: dict[str, str]) -> int:
        with terminal_restored(sys.stdin.fileno()):
            self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True, stderr=subprocess.DEVNULL,
                                         preexec_fn=self._in_child)
            return self._wait(lambda: None)

    def _run_piped(self, env: dict[str, str]) -> tuple[int, bytes]:
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=self._in_child,
        )
        console = ConsoleFilter(sys.stdout.fileno())
        uml_log: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        open_streams = 2

        def pump() -> None:
            nonlocal open_streams
            ready = sel.select(timeout=0.2)
            if not ready:
                console.flush_partial()
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "out":
                    console.feed(data)
                else:
                    log.debug("uml: %s", data.decode("utf-8", "replace").rstrip())
                    uml_log.extend(data.splitlines()[-TAIL_LINES:])
                    for line in data.splitlines():
                        self.diagnosis = self.diagnosis or diagnose(line)

        code = self._wait(pump, lambda: open_streams > 0)
        console.close()
        self.diagnosis = self.diagnosis or console.diagnosis
        self.old_guest = console.old_guest
        sel.close()
        return code, b"\n".join(console_report(list(console.tail), list(uml_log)))

    def _wait(self, pump: Callable[[], None], draining: Callable[[], bool] = lambda: False) -> int:
        """Pump the console until UML has exited and its pipes are closed; stop it after a timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + self.time_limit if self.time_limit else None
        kill_at: float | None = None
        if self.stop_reason is not None:  # a signal came while UML was being started
            log.warning("stopping the VM: %s", self.stop_reason)
            self._signal_group(signal.SIGTERM)
        exited = False
        while not exited or draining():
            if not exited and self.proc.poll() is not None:
                exited = True
                self._signal_group(signal.SIGKILL)  # UML's helpers (slirp) share its process group
            if not exited:
                now = time.monotonic()
                if deadline is not None and now > deadline and self.stop_reason is None:
                    self.timed_out = True
                    self.stop(f"no job status after {self.time_limit:.0f} s")
                if self.stop_reason is not None:
                    kill_at = kill_at or now + KILL_GRACE
                    if now > kill_at:
                        self._signal_group(signal.SIGKILL)
            if draining():
                pump()
            elif not exited:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)
        reap_orphans(KILL_GRACE)
        return self.proc.returncode


def die_with_parent() -> None:
    """In UML's process, before exec: SIGKILL when the launcher dies, even by SIGKILL (the batch system's last
    resort), so no VM outlives its job.  (A child forked from a process without threads: ctypes is safe here.)"""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def become_subreaper() -> None:
    """Adopt what UML leaves behind: its helpers (vde_plug) outlive it by a moment and become our children,
    so we reap them instead of leaving zombies to an init that may not (containers, batch-system sandboxes)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))


def reap_orphans(within: float) -> None:
    """Wait for UML's helpers, killed with its process group, to be gone; at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left
        if pid == 0:
            if time.monotonic() > deadline:
                log.warning("a helper of UML is still running after %.0f s", within)
                return
            time.sleep(0.01)


def console_report(console: list[bytes], uml_log: list[bytes]) -> list[bytes]:
    """The console lines worth showing when the VM ended without a status.

    The last lines, and the kernel's panic line even when a long stack trace
    follows it; UML's own start-up messages only when the console said nothing.
    """
    tail = console[-TAIL_LINES:]
    panic = next((line for line in console if PANIC_RE.search(line)), None)
    if panic is not None and panic not in tail:
        tail = [panic, b"[...]", *tail[-(TAIL_LINES // 2):]]
    return tail or [b"[uml] " + line for line in uml_log]


