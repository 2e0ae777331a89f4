"""Run a command, or an interactive session, in an AppPot image under User-Mode Linux.

    apppot-start [OPTIONS] [--] [PROG ARGS...]

Run by an ordinary user (no root, no sudo).  The job directory (default: the
current directory) is the only host directory the guest sees (UML's
``hostfs=DIR``), mounted at ``~/job``; the job runs there as the host user's
uid/gid, its output appears on stdout as it runs, and apppot-start exits with
the job's own exit code, read from ``apppot.status.json`` in the job directory.
See docs/host.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from apppot_guest import __version__
from apppot_guest.cli import add_output_options, run_main
from apppot_guest.cmdline import PROTOCOL, TERM_RE, BootConfig, fit_kernel_args
from apppot_guest.errors import AppPotError, ConfigError, UsageError, display_path, exit_codes_help
from .allocation import guest_memory
from .uml_host import choose_cpu, find_kernel, host_memory_mib, kernel_description, network_helper, uml_tmpdir
from .uml_launch import EXIT_CHECK_FAILED, EXIT_CODES, EXIT_LAUNCHER, PROG, Disk, Plan, launch
from .uml_run import GUEST_JOBDIR, GUEST_RUNDIR, UNSAFE_PATH, RunDir, cow_problem, image_problem, parse_duration

log = logging.getLogger("apppot-start")

DEFAULT_MEM = "1024M"
# The guest's network: UML's vector driver runs the host's vde_plug (uml_host.py), which
# plugs it into a user-mode slirp (libvdeplug-slirp); no root, no host interface.
NETWORK_WORD = "vec0:transport=vde,vnl=slirp://"
BATCH_TARGET = "apppot-batch.target"  # shipped by the apppot package
APPPOT_INIT = "/usr/sbin/apppot-init"
EPILOG = f"""\
boot modes (--boot):
  batch   systemd isolates {BATCH_TARGET}: only apppot.service and what it needs
          (default when PROG is given)
  full    systemd's default target: the whole system, then apppot.service
          (default without PROG: the interactive session)
  direct  no systemd: {APPPOT_INIT} runs as PID 1 (fastest)

the kernel: --linux, else $APPPOT_KERNEL, else a `linux` next to the image,
  else AppPot's own (out/linux of the checkout, /usr/lib/apppot/linux), else
  `linux` on PATH.  `apppot-start --check` says which and why, and boots `true`.

memory: inside a Slurm job (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU times
  SLURM_CPUS_ON_NODE) and without --mem, the guest gets the allocation minus
  room for UML itself, so a guest that fills its memory is stopped by its own
  OOM killer, not by Slurm; a --mem that does not fit is warned about.

cpu: the guest has one CPU, and UML runs it as several host processes that hand
  control to each other at every system call and page fault of the guest; on one
  host CPU those hand-offs are several times faster, so apppot-start pins UML to
  one (--cpu auto: of those it may use, such as a batch system's cpuset, one
  with the fewest AppPot VMs, preferring the one apppot-start runs on).
  --cpu any leaves the placement to the host's scheduler.

environment: APPPOT_IMAGE (--image), APPPOT_MEM (--mem), APPPOT_KERNEL (--linux),
  APPPOT_CPU (--cpu), TMPDIR (where UML keeps the guest's memory: a directory not mounted noexec;
  by default /dev/shm, else /tmp, chosen by apppot-start)

""" + exit_codes_help(EXIT_CODES)


class BootMode(StrEnum):
    BATCH = "batch"
    FULL = "full"
    DIRECT = "direct"


# -- planning ------------------------------------------------------------------


def real_path(text: str) -> Path:
    """An absolute real path (a path UML cannot take reaches it through a link in the run directory)."""
    return Path(os.path.realpath(os.path.expanduser(text)))


def image_path(spec: str | None) -> Path | None:
    """The image file of ``--image`` (``PATH`` or ``COW:IMAGE``), unchecked."""
    if not spec:
        return None
    plain = ":" not in spec or os.path.isfile(spec)
    return Path(os.path.realpath(os.path.expanduser(spec if plain else spec.partition(":")[2])))


def resolve_disk(spec: str, run: RunDir, ephemeral: bool) -> tuple[str, Disk, tuple[tuple[Path, bool], ...]]:
    """The ``ubd0=`` value for ``--image`` (``PATH`` or ``COW:IMAGE``), and the files to lock (exclusively?)."""
    plain = ":" not in spec or os.path.isfile(spec)  # an image whose name has a colon is still an image
    cow_text, sep, image_text = ("", "", spec) if plain else spec.partition(":")
    image = real_path(image_text)
    problem = image_problem(image)
    if problem is not None:
        raise UsageError(f"image {display_path(image_text)}: {problem}")
    if sep:
        cow = real_path(cow_text)
        if not cow.parent.is_dir():
            raise UsageError(f"COW file {display_path(cow_text)}: its directory does not exist")
        if not os.path.lexists(cow):  # UML makes it (O_EXCL: of two VMs making one file, the second fails)
            return f"{run.safe(cow, 'cow-file')},{run.safe(image, 'image')}", Disk.USER_COW, ((image, False),)
        problem = cow_problem(cow, image)
        if problem is not None:
            raise UsageError(f"COW file {display_path(cow_text)}: {problem}; name a file that does not exist yet and "
                             "the kernel makes a new one")
        return f"{run.safe(cow, 'cow-file')},{run.safe(image, 'image')}", Disk.USER_COW, ((cow, True), (image, False))
    if image_writable(image) and not ephemeral:
        return os.fspath(run.safe(image, "image")), Disk.IN_PLACE, ((image, True),)
    return f"{run.path / 'cow'},{run.safe(image, 'image')}", Disk.PER_RUN_COW, ((image, False),)


def image_writable(image: Path) -> bool:
    """Whether to use the image in place: the user may write it (root: it has a write bit)."""
    if os.geteuid() == 0:  # root passes every access check: a 0444 base must still stay pristine
        return bool(image.stat().st_mode & 0o222)
    return os.access(image, os.W_OK)


def kernel_words(args: argparse.Namespace, ubd0: str, run: RunDir, mode: BootMode) -> list[str]:
    """The UML and kernel words before the apppot.* ones."""
    words = [
        f"ubd0={ubd0}",
        "root=/dev/ubda",
        "rw",
        f"mem={args.mem}",
        f"umid={args.id}",
        f"uml_dir={run.path}",
        f"hostfs={run.host}",  # the run's view: a link to the job directory, this run's own directory, the delta
        "con0=fd:0,fd:1",
        "con=null",
        "ssl=null",
        "loglevel=3",
        # Guest processes run under a seccomp filter instead of ptrace where the host allows it:
        # batch boots 3.0 -> 1.9 s here.  UML says it is less isolated from the guest's own
        # processes; an AppPot guest's user has passwordless sudo anyway (not a security boundary).
        "seccomp=auto",
        "security=none",  # no LSM: else systemd tries to load an SELinux policy and says so on the console
        "systemd.show_status=error",
    ]
    if not args.no_network:
        words.append(NETWORK_WORD)
    if mode is BootMode.BATCH:
        words.append(f"systemd.unit={BATCH_TARGET}")
    elif mode is BootMode.DIRECT:
        words.append(f"init={APPPOT_INIT}")
    words.extend(args.extra)
    return words


def job_ids(jobdir: Path, dry_run: bool) -> tuple[int | None, int | None]:
    """The uid/gid the job runs as: the host user's, so its files in the job directory are theirs.

    apppot-start is for an ordinary user.  Run by root, the job runs as the
    uid/gid that owns the job directory (UML creates its files as root on the
    host, so the job cannot chmod what it wrote).  A job directory that root
    owns is refused: the job never runs as root, so it could not write there.
    """
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    st = jobdir.stat()
    if st.st_uid == 0 and not dry_run:
        raise UsageError(f"job directory {display_path(jobdir)} belongs to root, and the job never runs as root, "
                         "so it could not write there: run apppot-start as the user the job is for, or give the "
                         "directory to that user (chown USER DIR)")
    log.warning("running as root: the job runs as the job directory's owner (uid %d); files it creates there "
                "belong to root and it cannot change their modes; run apppot-start as an ordinary user", st.st_uid)
    return st.st_uid or None, st.st_gid or None


def make_plan(args: argparse.Namespace, run: RunDir) -> Plan:
    if not args.image:
        raise UsageError("no image: give --image PATH or set APPPOT_IMAGE")
    asked = args.mem
    args.mem, warning = guest_memory(args.mem, os.environ, DEFAULT_MEM)
    host_mib = host_memory_mib()
    if host_mib is not None and int(args.mem.removesuffix("M")) > host_mib:  # UML would be killed while it boots
        raise UsageError(f"--mem {display_path(asked or args.mem)}: {args.mem.removesuffix('M')} MiB, more than this "
                         f"host's memory ({host_mib} MiB)")
    if warning is not None:
        sys.stderr.write(f"{PROG}: warning: {warning}\n")
    if args.id is None:
        args.id = f"apppot-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.id):
        raise UsageError(f"--id {display_path(args.id)}: use letters, digits, '.', '_' and '-' only")
    kernel, _ = find_kernel(args.linux, image_path(args.image))
    cpu, _ = choose_cpu(args.cpu)
    if not args.no_network:
        network_helper()
    jobdir = real_path(args.jobdir)
    if not jobdir.is_dir():
        raise UsageError(f"job directory {display_path(args.jobdir)}: not a directory")
    if args.cwd is not None and not args.cwd:
        raise UsageError("--cwd: empty path")
    interactive = not args.command
    on_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and not on_terminal and not args.dry_run and not autorun_in(jobdir):
        raise UsageError("no command and no terminal: an interactive session needs one; give the job's command "
                         "(apppot-start [OPTIONS] -- PROG ARGS) or run it in a terminal")
    mode = BootMode(args.boot) if args.boot else (BootMode.FULL if interactive else BootMode.BATCH)
    run.create_host_view(jobdir)
    ubd0, disk, locks = resolve_disk(args.image, run, args.ephemeral)
    changes = None
    if args.changes:
        delta = real_path(args.changes)
        if not delta.is_file():
            raise UsageError(f"changes {display_path(args.changes)}: no such file")
        changes = run.place_changes(delta, jobdir, args.dry_run)
    # The guest's console is a terminal whatever our stdout is; when the job's output goes to a
    # file or a pipe (a batch job), TERM=dumb tells programs such as apppot-snap not to draw progress.
    term = os.environ.get("TERM") if sys.stdout.isatty() else "dumb"
    uid, gid = job_ids(jobdir, args.dry_run)
    config = BootConfig(
        protocol=PROTOCOL,
        argv=tuple(args.command) if args.command else None,
        cwd=args.cwd,
        uid=uid,
        gid=gid,
        jobdir=GUEST_JOBDIR,
        rundir=GUEST_RUNDIR,
        changes=changes,
        timeout=args.timeout,
        term=term if term and TERM_RE.match(term) else None,
    )
    kernel = run.safe(kernel, "kernel")
    words = kernel_words(args, ubd0, run, mode)
    apppot_words = fit_kernel_args(config, [os.fspath(kernel), *words], run.status_dir)
    return Plan(
        argv=(os.fspath(kernel), *words, *apppot_words),
        jobdir=jobdir,
        run=run,
        disk=disk,
        image=args.image,
        locks=locks,
        interactive=interactive and on_terminal,
        timeout=args.timeout,
        command=config.argv,
        uid=uid,
        gid=gid,
        changes=args.changes,
        cpu=cpu,
    )


def session_is_throwaway(plan: Plan) -> str:
    why = "used with --ephemeral" if image_writable(plan.locks[-1][0]) else "read-only"
    return (f"the image {display_path(plan.image)} is {why}: what you change in this session is thrown away at "
            "`exit`; to keep it, run `apppot-snap changes` (the delta lands in ~/job) before `exit`, or boot a "
            "writable copy (cp IMAGE ~/apppot.img; apppot-start --image ~/apppot.img)")


def autorun_in(jobdir: Path) -> bool:
    """Whether the guest will run the job directory's ``apppot-run`` when no command is given."""
    path = jobdir / "apppot-run"
    return path.is_file() and os.access(path, os.X_OK)


# -- checking a host ---------------------------------------------------------------


def cmd_check(args: argparse.Namespace, run: RunDir) -> int:
    """What a job on this host would use and why, then a real boot of `true`."""
    problems: list[str] = []

    def show(what: str, text: str) -> None:
        print(f"{what + ':':9} {text}", flush=True)

    try:
        kernel, why = find_kernel(args.linux, image_path(args.image))
        show("kernel", f"{kernel} ({why}; {kernel_description(kernel)})")
    except (AppPotError, OSError) as exc:
        problems.append(f"kernel: {exc}")
    image = image_path(args.image)
    if image is None:
        problems.append("image: none given: use --image PATH or set APPPOT_IMAGE")
    elif not os.path.isfile(image) or not os.access(image, os.R_OK):
        why = "not readable" if os.path.exists(image) else "no such file"
        problems.append(f"image: {display_path(image)}: {why}")
    else:
        how = "writable: jobs change it in place" if image_writable(image) else "read-only: each job gets its own copy-on-write file"
        show("image", f"{image} ({how})")
    if args.no_network:
        show("network", "off (--no-network)")
    else:
        try:
            show("network", f"{network_helper()} with libvdeplug-slirp (guest 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3)")
        except AppPotError as exc:
            problems.append(str(exc))
    try:
        cpu, why = choose_cpu(args.cpu)
        show("cpu", f"{'any' if cpu is None else cpu} ({why})")
    except AppPotError as exc:
        problems.append(str(exc))
    try:
        tmpdir, why = uml_tmpdir()
        show("tmpdir", f"{tmpdir} ({why})")
    except AppPotError as exc:
        problems.append(f"tmpdir: {exc}")
    if not problems:
        jobdir = run.path / "check-job"
        jobdir.mkdir()
        args.command, args.jobdir, args.ephemeral, args.cwd, args.changes = ["true"], os.fspath(jobdir), True, None, None
        args.boot = args.boot or BootMode.BATCH.value
        plan = make_plan(args, run)
        started = time.monotonic()
        code = launch(plan, network=not args.no_network)
        found = run.read_status()
        status = found[0] if found is not None else None
        if code != 0 or status is None:
            problems.append(f"boot: `true` in {args.boot} mode exited {code}, not 0 (the reason is above)")
        else:
            interfaces = ", ".join(status.get("network") or []) or "none"  # type: ignore[arg-type]
            show("boot", f"`true` in {args.boot} mode: exit 0 in {time.monotonic() - started:.1f} s "
                 f"(network interfaces: {interfaces})")
            if not args.no_network and interfaces == "none":
                problems.append("network: the guest had no network interface; see the warning above")
    for problem in problems:
        sys.stderr.write(f"{PROG}: problem: {problem}\n")
    if problems:
        return EXIT_CHECK_FAILED
    print(f"{PROG}: a job would run on this host")
    return 0


# -- command line ----------------------------------------------------------------


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--timeout {display_path(text)}: ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] [--] [PROG ARGS...]",
        description="Boot an AppPot image in User-Mode Linux and run PROG ARGS in it as you, in the job "
        "directory, or start an interactive session (screen and bash) when no PROG is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", "--apppot", dest="image", metavar="PATH|COW:IMAGE",
                        default=os.environ.get("APPPOT_IMAGE"),
                        help="the image; a read-only one is used through a per-run copy-on-write file "
                        "(default: $APPPOT_IMAGE)")
    parser.add_argument("--changes", metavar="FILE", help="a delta from 'apppot-snap changes' to merge before the job")
    parser.add_argument("--mem", default=os.environ.get("APPPOT_MEM") or None, metavar="SIZE",
                        help="guest memory, e.g. 512M, 2g, 2048M, 2GiB (a bare number: MiB; default: $APPPOT_MEM, "
                        f"else in a Slurm job its allocation minus room for UML itself, else {DEFAULT_MEM})")
    parser.add_argument("--linux", "--uml", dest="linux", metavar="PATH", default=os.environ.get("APPPOT_KERNEL"),
                        help="the UML kernel (default: $APPPOT_KERNEL, else found as described below)")
    parser.add_argument("--id", metavar="NAME", help="the VM's name (UML umid; default: apppot-PID)")
    parser.add_argument("--extra", action="append", default=[], metavar="ARG", help="one more kernel argument (repeatable)")
    parser.add_argument("--jobdir", default=".", metavar="DIR", help="host directory shared as ~/job (default: .)")
    parser.add_argument("--cwd", metavar="DIR", help="working directory in the guest (default: ~/job)")
    parser.add_argument("--timeout", type=duration, metavar="DURATION",
                        help="stop the job after DURATION (exit 124): seconds (90, 90s), 30m, 1h, or Slurm's 1:30:00")
    parser.add_argument("--cpu", default=os.environ.get("APPPOT_CPU") or "auto", metavar="N|auto|any",
                        help="the host CPU UML runs on: auto (default: $APPPOT_CPU, else the one with the fewest "
                        "AppPot VMs), a number, or any (not pinned); see below")
    parser.add_argument("--no-network", action="store_true", help="no network device in the guest")
    parser.add_argument("--boot", choices=[m.value for m in BootMode], help="how the guest boots (see below)")
    parser.add_argument("--ephemeral", action="store_true", help="use a per-run copy-on-write file even for a writable image")
    parser.add_argument("--dry-run", action="store_true", help="print the UML command as a JSON array and boot nothing")
    parser.add_argument("--check", action="store_true", help="check this host: which kernel, image, network helper and "
                        "temporary directory a job would use and why, then boot `true`; exit 0 only when a job would run")
    add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="PROG ARGS", help="the job's command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv, failure_code=failure_code, handler=cmd_start)


def failure_code(error: AppPotError) -> int:
    """apppot-start's own failures: 2 for bad usage (nothing was started), else 125 (as docker run)."""
    return error.exit_code if isinstance(error, UsageError) else EXIT_LAUNCHER


def cmd_start(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    run_dir: Path | None = None
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="apppot-run-"))
        if UNSAFE_PATH.search(os.fspath(run_dir)):
            raise ConfigError(f"temporary directory {display_path(run_dir)}: UML cannot take its path (set TMPDIR)")
        run = RunDir(run_dir)
        if args.check:
            return cmd_check(args, run)
        plan = make_plan(args, run)
        if args.dry_run:
            print(json.dumps(list(plan.argv), ensure_ascii=False))
            sys.stderr.write(f"{PROG}: --dry-run: a preview, not a command to run: the per-run directory {run_dir} it "
                             "names (copy-on-write file, links, the command file of a long command) is removed now\n")
            return 0
        if plan.disk is Disk.IN_PLACE:
            log.info("the image is writable: the job changes it in place (use --ephemeral to keep it)")
        throwaway = plan.interactive and plan.disk is Disk.PER_RUN_COW
        if throwaway:
            sys.stderr.write(f"{PROG}: {session_is_throwaway(plan)}\n")
        try:
            return launch(plan, network=not args.no_network)
        finally:
            if throwaway:
                sys.stderr.write(f"\n{PROG}: the session's changes to {display_path(plan.image)} were thrown away "
                                 "(a per-run copy-on-write file); see above for how to keep them next time\n")
    finally:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
