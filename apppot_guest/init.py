"""apppot-init: the boot hook that turns a booted AppPot image into a batch job.

Started by ``apppot.service`` (systemd), ``/etc/init.d/apppot`` (sysvinit), or
as PID 1 itself (kernel argument ``init=/usr/sbin/apppot-init``, the fastest
boot).  It reads the ``apppot.*`` words of the kernel command line, makes the
job's account, mounts the job directory, merges the delta, runs the job as
the user, writes ``apppot.status.json`` and ``apppot.exitcode`` into the job
directory, and powers the machine off.  See docs/boot-hook.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from . import __version__
from .account import Account, ensure_account, login_env, requested_account
from .cli import as_error, report, setup_logging
from .cmdline import BootConfig, parse_cmdline, read_cmdfile, salvage_path
from .errors import AppPotError, ConfigError, UsageError, display_path, fs_error
from .job import EXIT_SETUP_FAILED, JobResult, JobSpec, Outcome, console_session, run_job
from .status import Status, status_of, write_status
from .system import (
    Mounter,
    dpkg_running,
    early_mounts,
    in_uml,
    network_interfaces,
    network_summary,
    network_up,
    power_off,
    reap_orphans,
)

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (see cli.py)
if TYPE_CHECKING:
    import argparse

log = logging.getLogger("apppot-init")

PROG = "apppot-init"
RUN_DIR = "run/apppot"  # under the root: the job directory and the delta's directory are mounted here
AUTORUN_JOB = "apppot-run"  # in the job directory
AUTORUN_HOME = "apppot-autorun"  # in the user's home

EPILOG = f"""\
kernel command line (see docs/boot-hook.md):
  apppot.cmd=b64:ARGV | apppot.cmd="WORDS"   the job (none: ~/job/{AUTORUN_JOB},
                                            ~/{AUTORUN_HOME}, else screen+bash)
  apppot.cmdfile=NAME   the job's argv in a file in the run (else the job) directory
  apppot.cwd= apppot.user= apppot.uid= apppot.group= apppot.gid=
  apppot.jobdir= apppot.rundir= apppot.tmpdir= apppot.changes= (hostfs paths)
  apppot.timeout=SECONDS TERM=
  apppot.rundir: this run's own directory; the status record is written there
  (else into the job directory)

exit codes (the job's, also in apppot.exitcode in the job directory):
  0-255  the job's own exit code     128+N  the job was killed by signal N
  124    the job timed out           125    setup or merge failed, the job did not run
  126    not executable              127    command not found
  2      bad option, or not run as root
  with --print-config: 0, or 3 for a bad kernel command line
  with --network-up: 0, or 8 when the interface cannot be configured
"""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the boot sequence acts: ``/`` in the VM, a scratch root in tests."""

    root: Path = Path("/")
    hostfs: bool = True  # False: apppot.* paths are local directories, bind-mounted
    console: Path = Path("/dev/console")

    def path(self, guest_path: str | PurePosixPath) -> Path:
        """A path inside the guest, as this process sees it."""
        return self.root / os.fspath(guest_path).lstrip("/")

    def guest(self, path: Path) -> str:
        """The guest's name for ``path`` (inverse of ``path``)."""
        try:
            return "/" + os.fspath(path.relative_to(self.root))
        except ValueError:
            return os.fspath(path)


# -- the boot sequence ---------------------------------------------------------


def boot(config: BootConfig, layout: Layout, mounter: Mounter) -> Status:
    """Account, job directory, delta, the job, the status record.  Never raises AppPotError."""
    started = datetime.now(UTC)
    jobdir = layout.path(RUN_DIR) / "job"
    rundir = layout.path(RUN_DIR) / "run"
    have_jobdir = False
    status_dir: Path | None = None  # where the record goes: this run's own directory, else the job directory
    account: Account | None = None
    argv = config.argv

    def finish(result: JobResult, cwd: Path | None = None) -> Status:
        status = status_of(
            result,
            argv,
            layout.guest(cwd) if cwd is not None else config.cwd,
            account.name if account else config.user,
            account.uid if account else config.uid,
            account.gid if account else config.gid,
            network_interfaces(layout.path("/sys/class/net")),
        )
        if status_dir is not None:
            try:
                write_status(status_dir, status)
            except AppPotError as exc:
                log.error("%s", exc)
        else:
            log.warning("no job directory: the status (%s, exit code %d) is not recorded", status.outcome, status.exit_code)
        return status

    try:
        if config.rundir is not None:  # the launcher's per-run directory: only this run writes there
            mounter.host_dir(config.rundir, rundir)
            status_dir = rundir
        if config.jobdir is not None:
            mounter.host_dir(config.jobdir, jobdir)
            have_jobdir = True
            status_dir = status_dir or jobdir
        account = ensure_account(layout.root, *requested_account(layout.root, config.user, config.uid, config.group, config.gid))
    except AppPotError as exc:
        log.error("setup failed: %s", exc)
        return finish(JobResult.failed(Outcome.SETUP_FAILED, str(exc), started))

    if config.changes is not None:
        try:
            delta = _mount_delta(config.changes, layout, mounter)
            _merge(layout.root, delta)
        except AppPotError as exc:
            # Said once: by apppot-start from the status record, on the console only when there is none.
            (log.info if status_dir is not None else log.error)("merge failed: %s", exc)
            return finish(JobResult.failed(Outcome.MERGE_FAILED, str(exc), started))
        except Exception as exc:  # a bug in the merge must still be reported and power off
            log.error("merge failed: %s", "".join(traceback.format_exception_only(type(exc), exc)).strip())
            return finish(JobResult.failed(Outcome.MERGE_FAILED, f"internal error: {exc}", started))

    try:
        if config.changes is not None:  # the delta may have carried /etc/passwd, /etc/group or the home
            account = ensure_account(layout.root, account.name, account.uid, account.group, account.gid)
        user_job = account.home / "job"
        if have_jobdir:
            mounter.bind(jobdir, user_job, owner=(account.uid, account.gid))
        if config.tmpdir is not None:
            mounter.host_dir(config.tmpdir, layout.path("/tmp"))
        if config.cmdfile is not None:
            if status_dir is None:
                raise ConfigError(f"apppot.cmdfile={config.cmdfile} needs apppot.rundir or apppot.jobdir")
            argv = read_cmdfile(status_dir / config.cmdfile)
        if config.cwd is None:
            cwd = user_job if have_jobdir else account.home
        elif config.cwd.startswith("/"):
            cwd = layout.path(config.cwd)
        else:  # relative to the home directory
            cwd = account.home / config.cwd
    except AppPotError as exc:
        log.error("setup failed: %s", exc)
        return finish(JobResult.failed(Outcome.SETUP_FAILED, str(exc), started))

    env = login_env(account, config.term or os.environ.get("TERM"), layout.root)
    if argv is None:
        argv = _autorun(account, user_job if have_jobdir else None)
    if argv is None:
        return finish(_interactive(account, env, layout, started), account.home)
    log.info("running %s as %s in %s", display_path(" ".join(argv)), account.name, display_path(cwd))
    result = run_job(JobSpec(argv, cwd, account, env, timeout=config.timeout))
    return finish(result, cwd)


def _mount_delta(changes: str, layout: Layout, mounter: Mounter) -> Path:
    path = PurePosixPath(changes)
    if not path.name or path.name in (".", ".."):
        raise ConfigError(f"apppot.changes={display_path(changes)}: not a file path")
    where = layout.path(RUN_DIR) / "changes"
    mounter.host_dir(os.fspath(path.parent), where, readonly=True)
    delta = where / path.name
    if not delta.is_file():
        raise ConfigError(f"apppot.changes={display_path(changes)}: no such file")
    return delta


def _merge(root: Path, delta: Path) -> None:
    from .merge import apply_delta  # the merge code is only needed when there is a delta
    from .state import RootLock, recover

    log.info("merging %s", display_path(delta))
    lock = RootLock(root, "merge", exclusive=True)  # as apppot-snap merge: one writer, dead runs' leftovers removed first
    try:
        lock.acquire(create=True)
        recover(root)
        apply_delta(root, delta)
    finally:
        lock.release()


def _autorun(account: Account, user_job: Path | None) -> tuple[str, ...] | None:
    """``~/job/apppot-run`` or ``~/apppot-autorun`` when executable (as the original AppPot)."""
    candidates = ([user_job / AUTORUN_JOB] if user_job else []) + [account.home / AUTORUN_HOME]
    for path in candidates:
        if path.is_file() and os.stat(path).st_mode & 0o111:
            log.info("no apppot.cmd: running %s", display_path(path))
            return (os.fspath(path),)
    return None


def _interactive(account: Account, env: dict[str, str], layout: Layout, started: datetime) -> JobResult:
    """No command: screen running bash as the user on the console, no login prompt."""
    bash = "/bin/bash" if layout.path("/bin/bash").exists() else account.shell
    import shutil  # only the interactive session needs it

    screen = shutil.which("screen", path=env["PATH"])
    argv = [screen, "-q", "-S", "apppot", bash, "-l"] if screen else [bash, "-l"]
    log.info("no command: starting %s on %s", " ".join(argv), layout.console)
    try:
        code = console_session(argv, account, env, layout.console)
    except OSError as exc:
        return JobResult.failed(Outcome.SETUP_FAILED, str(fs_error(exc, "start a session on", layout.console)), started)
    finished = datetime.now(UTC)
    outcome = Outcome.KILLED if code > 128 else Outcome.EXITED
    return JobResult(outcome, code, code - 128 if code > 128 else None, None, started, finished, (finished - started).total_seconds())


def _failed_cmdline(raw: bytes, exc: ConfigError, layout: Layout, mounter: Mounter) -> Status:
    """A kernel command line that does not parse (or speaks another protocol): report it where the
    launcher looks, the run's own directory (apppot.rundir) or else the job directory, if one can be found."""
    started = datetime.now(UTC)
    result = JobResult.failed(Outcome.SETUP_FAILED, f"bad kernel command line: {exc}", started)
    status = status_of(result, None, None, None, None, None)
    for name, target in (("rundir", layout.path(RUN_DIR) / "run"), ("jobdir", layout.path(RUN_DIR) / "job")):
        salvaged = salvage_path(raw, name)
        if not salvaged:
            continue
        try:
            BootConfig(rundir=salvaged) if name == "rundir" else BootConfig(jobdir=salvaged)  # a good line's checks
            mounter.host_dir(salvaged, target)
        except AppPotError as mount_exc:
            log.error("%s", mount_exc)
            return status
        write_status(target, status)
        return status
    return status


# -- the command ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """apppot-init's options; a boot passes none (see ``parse_options``)."""

    print_config: bool = False
    network_up: bool = False
    cmdline: Path | None = None
    root: Path = Path("/")
    bind: bool = False
    console: Path = Path("/dev/console")
    no_poweroff: bool = False
    verbose: bool = False
    debug: bool = False


def make_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Boot hook of an AppPot image: run the job the kernel command line names, as the "
        "unprivileged user, record its exit status in the job directory, and power off.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--print-config", action="store_true", help="print the parsed kernel command line as JSON and exit")
    parser.add_argument("--network-up", action="store_true",
                        help="only bring up the guest's network (slirp's 10.0.2.15/24, gateway 10.0.2.2) and exit: "
                        "apppot-network.service, in a full boot")
    parser.add_argument("--cmdline", type=Path, metavar="FILE", help="read the kernel command line from FILE (default: /proc/cmdline)")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR", help="act on the system under DIR (testing; default /)")
    parser.add_argument("--bind", action="store_true",
                        help="apppot.* paths are local directories to bind-mount, not hostfs paths (testing on a host)")
    parser.add_argument("--console", type=Path, default=Path("/dev/console"), metavar="TTY",
                        help="the terminal of an interactive session (default /dev/console)")
    parser.add_argument("--no-poweroff", action="store_true", help="exit with the job's exit code instead of powering off")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is done")
    parser.add_argument("--debug", action="store_true", help="debug messages and tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_options(argv: list[str], pid1: bool) -> tuple[Options, list[str]]:
    """The options and the words to ignore.

    A boot (systemd's ExecStart, or the kernel starting PID 1) passes no
    arguments: then argparse is not even imported, which saves a tenth of a
    second of every boot in UML.  As PID 1, words the kernel passes on that
    it does not know (e.g. 'single') are ignored, never fatal.
    """
    if not argv:
        return Options(), []
    parser = make_parser()
    namespace, extra = parser.parse_known_args(argv) if pid1 else (parser.parse_args(argv), [])
    return Options(**{name: getattr(namespace, name) for name in Options.__dataclass_fields__}), extra


def read_cmdline(args: Options) -> bytes:
    path = args.cmdline or args.root / "proc/cmdline"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise fs_error(exc, "read the kernel command line from", path) from exc


def cmd_print_config(args: Options) -> int:
    config = parse_cmdline(read_cmdline(args))
    user, uid, group, gid = requested_account(args.root, config.user, config.uid, config.group, config.gid)
    data = config.as_json()
    data.update(user=user, uid=uid, group=group, gid=gid)
    data["cwd"] = config.cwd or ("~/job" if config.jobdir else "~")
    print(json.dumps(data, indent=2))
    return 0


def bring_up_network() -> None:
    """The guest's network (system.network_up); a failure, even a bug, is said and the job runs
    without it: its record's ``network`` is empty, and apppot-start warns about that."""
    try:
        log.info("%s", network_summary(network_up()))
    except AppPotError as exc:
        log.warning("%s", exc)
    except Exception as exc:
        log.warning("network: internal error: %r", exc)


def cmd_boot(args: Options, pid1: bool) -> int | None:
    """The boot sequence; the job's exit code, or None when nothing may be done (dpkg runs)."""
    layout = Layout(root=args.root, hostfs=not args.bind, console=args.console)
    if pid1:
        early_mounts(layout.root)
        if layout.root != Path("/"):  # a PID namespace on a host (tests): follow its processes, not the host's
            import psutil

            psutil.PROCFS_PATH = os.fspath(layout.root / "proc")
    if layout.root == Path("/") and in_uml():  # a batch boot starts no apppot-network.service: the network is ours
        bring_up_network()
    reason = dpkg_running(layout.root)
    if reason:
        log.warning("not running a job while dpkg runs (%s)", reason)
        return None
    mounter = Mounter(hostfs=layout.hostfs)
    try:
        raw = read_cmdline(args)
        try:
            config = parse_cmdline(raw)
        except ConfigError as exc:
            log.error("%s", exc)
            status = _failed_cmdline(raw, exc, layout, mounter)
        else:
            status = boot(config, layout, mounter)
    finally:
        if pid1:
            reap_orphans()
        mounter.undo()
    return status.exit_code


def main(argv: list[str] | None = None) -> int:
    pid1 = os.getpid() == 1
    args, extra = parse_options(sys.argv[1:] if argv is None else argv, pid1)
    setup_logging(PROG, verbose=args.verbose, debug=args.debug)
    if extra:
        log.warning("ignoring arguments %s", " ".join(extra))
    if args.print_config:
        try:
            return cmd_print_config(args)
        except AppPotError as exc:
            if args.debug:
                traceback.print_exc()
            report(PROG, exc)
            return exc.exit_code
    if os.geteuid() != 0:
        report(PROG, UsageError("must run as root (it is the boot hook)"))
        return UsageError.exit_code
    if args.network_up:
        try:
            dev = network_up()
        except AppPotError as exc:
            report(PROG, exc)
            return exc.exit_code
        print(f"{PROG}: {network_summary(dev)}")
        return 0
    code: int | None = EXIT_SETUP_FAILED
    try:
        code = cmd_boot(args, pid1)
        if code is None and not pid1:
            return 0
    except Exception as exc:  # AppPot's errors, and bugs: report them and still power off, so the VM cannot hang
        error = as_error(exc)
        if args.debug or (pid1 and not isinstance(exc, AppPotError)):
            traceback.print_exc()
        report(PROG, error)
    except BaseException:  # as PID 1 nothing may escape (KeyboardInterrupt, SystemExit)
        if not pid1:
            raise
        traceback.print_exc()
    code = EXIT_SETUP_FAILED if code is None else code
    if args.no_poweroff and not pid1:
        return code
    log.info("powering off")
    try:
        power_off(args.root, pid1)
    except AppPotError as exc:
        report(PROG, exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
