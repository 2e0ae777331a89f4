"""Running one planned job: the disk locks, the VM, the job's own status record and exit code.

The exit code comes only from this run's record (``RunDir.read_status``),
which is then published into the job directory; a launcher stopped by a
signal writes the record itself (outcome ``stopped``).  Imported by
apppot_host.start.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import cast

from apppot_guest.errors import EXIT_USAGE, AppPotError, display_path, fs_error
from apppot_guest.job import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_TIMEOUT
from apppot_guest.status import EXITCODE_FILE as EXITCODE_NAME
from apppot_guest.status import STATUS_FILE as STATUS_NAME
from apppot_guest.status import write_status
from .uml_host import VDE_PLUG, uml_tmpdir
from .uml_run import RunDir, lock_image, publish_status, stopped_status
from .uml_vm import Vm

log = logging.getLogger("apppot-start")

PROG = "apppot-start"
EXIT_LAUNCHER = 125  # the VM ended without a status, or apppot-start itself failed (as docker run)
EXIT_CHECK_FAILED = 1  # apppot-start --check found a problem
# apppot-start's exit codes: the one table.  Its --help and the README's table
# are made from it (tests/test_uml_launcher.py checks both).
EXIT_CODES: tuple[tuple[str, str], ...] = (
    ("0-123", "the job's own exit code"),
    (str(EXIT_TIMEOUT), "the job ran out of time (--timeout)"),
    (str(EXIT_LAUNCHER), "the VM ended without a status (kernel panic, killed, setup or merge failed in the guest), "
                         "or apppot-start itself failed; the last console lines are printed"),
    (str(EXIT_NOT_EXECUTABLE), "the command is not executable"),
    (str(EXIT_NOT_FOUND), "the command was not found"),
    ("128+N", "the job was killed by signal N (137: SIGKILL, e.g. out of memory)"),
    ("130, 143", "apppot-start got SIGINT (Ctrl-C) or SIGTERM (the batch system's time limit, scancel) and stopped "
                 "the VM; apppot.status.json says outcome stopped and when"),
    (str(EXIT_USAGE), "bad command-line option, no command and no terminal, or (as root) a job directory root owns; "
                      "nothing was started"),
    (str(EXIT_CHECK_FAILED), "--check found a problem (one line each, with its fix)"),
)
GUEST_FAILURES = ("setup-failed", "merge-failed")  # outcomes where the hook could not run the job
TIMEOUT_MARGIN = 60.0  # seconds the host adds to --timeout for boot and power-off (they take ~5 s)


class Disk(StrEnum):
    IN_PLACE = "in-place"  # a writable image, written directly (desktop development)
    PER_RUN_COW = "per-run-cow"  # a COW file in the run directory, removed afterwards
    USER_COW = "user-cow"  # COW:IMAGE given by the user, kept


class LaunchError(AppPotError):
    exit_code = EXIT_LAUNCHER
    summary = "the virtual machine could not be started or ended without a status"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one run needs: the UML argv and what to clean up afterwards."""

    argv: tuple[str, ...]
    jobdir: Path
    run: RunDir
    disk: Disk
    image: str  # as the user gave it
    locks: tuple[tuple[Path, bool], ...]  # the disk files and whether this run must hold each alone (see lock_image)
    interactive: bool
    timeout: float | None
    command: tuple[str, ...] | None
    uid: int | None
    gid: int | None
    changes: str | None  # the delta as the user gave it
    cpu: int | None = None  # the host CPU UML runs on (uml_host.choose_cpu); None: any


def remove_stale_status(jobdir: Path) -> None:
    """An old status must never be taken for this run's."""
    for name in (STATUS_NAME, EXITCODE_NAME):
        try:
            (jobdir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise fs_error(exc, "remove the old status file", jobdir / name) from exc


def guest_error(error: object, changes: str | None) -> str:
    """The guest's error for the user: the delta (``changes``) named as they gave it, hints apppot-start can act on."""
    text = str(error)
    if changes is not None:  # the guest's name for it: /run/apppot/changes/NAME (RunDir.place_changes)
        guest = f"/run/apppot/changes/{os.path.basename(os.path.realpath(os.path.expanduser(changes)))}"
        text = text.replace(guest, display_path(changes))
    return re.sub(r";? ?\(?--force applies it anyway\)?", "; make the delta again in a boot of this image "
                  "(apppot-snap changes), or merge it there by hand (sudo apppot-snap merge --force)", text)


def launch(plan: Plan, network: bool) -> int:
    held: list[int] = []
    try:
        for path, exclusive in plan.locks:
            held.append(lock_image(path, exclusive))
        return run_vm(plan, network)
    finally:
        for fd in held:
            os.close(fd)


def run_vm(plan: Plan, network: bool) -> int:
    started = datetime.now(UTC)
    remove_stale_status(plan.jobdir)
    tmpdir, why = uml_tmpdir()
    log.info("UML's temporary directory: %s (%s)", tmpdir, why)
    vm = Vm(plan.argv, plan.interactive, plan.timeout + TIMEOUT_MARGIN if plan.timeout else None, {"TMPDIR": tmpdir},
            cpu=plan.cpu)
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        vm.stop(f"apppot-start got {signal.Signals(signum).name}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    log.info("booting: %s", " ".join(plan.argv))
    try:
        uml_code, tail = vm.run()
    except OSError as exc:
        raise LaunchError(f"cannot run {display_path(plan.argv[0])}: {exc.strerror}") from exc
    found = plan.run.read_status()
    if found is None and vm.old_guest:
        found = plan.run.read_status(plan.jobdir)
        sys.stderr.write(f"{PROG}: warning: the image's apppot-init is older than apppot-start: it wrote the record "
                         "into the job directory, where jobs sharing it can overwrite it; rebuild the image\n")
    if found is not None:  # this run's own record: the job ended (even if a signal came after)
        status, raw = found
        code = int(cast(int, status["exit_code"]))  # read_status checked that it is an int
        try:
            publish_status(plan.jobdir, raw, code)
        except AppPotError as exc:  # the code is known: a job directory that cannot take its record does not change it
            sys.stderr.write(f"{PROG}: warning: {exc}\n")
        log.info("job finished: outcome %s, exit code %d", status.get("outcome"), code)
        if status.get("outcome") in GUEST_FAILURES:
            sys.stderr.write(f"{PROG}: error: the job did not run ({status['outcome']}): {guest_error(status.get('error'), plan.changes)}\n")
        elif status.get("outcome") in ("not-found", "not-executable"):
            sys.stderr.write(f"{PROG}: error: {status.get('error')}\n")
        elif network and status.get("network") == []:
            sys.stderr.write(f"{PROG}: warning: the guest had no working network interface (the kernel {plan.argv[0]} "
                             f"has no vector driver with the vde transport, or {VDE_PLUG} failed): the job ran without "
                             "network\n")
        return code
    if signals:
        signum = signals[0]
        name = signal.Signals(signum).name
        record = stopped_status(signum, name, plan.command, plan.uid, plan.gid, started)
        write_status(plan.jobdir, record)
        sys.stderr.write(f"{PROG}: error: {record.error}; exit {record.exit_code}\n")
        return record.exit_code
    if vm.timed_out:
        sys.stderr.write(f"{PROG}: error: the job did not finish within --timeout {plan.timeout:g} s; the VM was stopped\n")
        return EXIT_TIMEOUT
    how = f"killed by {signal.Signals(-uml_code).name}" if uml_code < 0 else f"exited with code {uml_code}"
    why = f" ({vm.stop_reason})" if vm.stop_reason else ""
    if tail:
        sys.stderr.write(f"{PROG}: last console lines:\n")
        sys.stderr.write(tail.decode("utf-8", "replace") + "\n")
    sys.stderr.write(f"{PROG}: error: the VM ended without a job status (UML {how}{why}); no {STATUS_NAME} in {display_path(plan.jobdir)}\n")
    if vm.diagnosis is not None:
        sys.stderr.write(f"{PROG}: error: {vm.diagnosis.format(kernel=plan.argv[0])}\n")
    return EXIT_LAUNCHER
