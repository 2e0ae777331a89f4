"""Submit AppPot jobs to Slurm as a job array, see how each task went, resubmit the failed ones.

    apppot-submit [OPTIONS] -- PROG ARGS...      a job array: one apppot-start per task
    apppot-submit status NAME [--json]            one line per task and a summary
    apppot-submit resubmit NAME                   the failed, timed-out and cancelled tasks again

A submission is a directory, NAME/, written before anything is submitted:

    NAME/submit.json       what was asked (the command, image, delta and its SHA-256, tasks, options)
    NAME/job.sbatch        the batch script every task runs (a Python script: no shell quoting)
    NAME/changes.delta     the delta (--changes), staged once, read-only, for every task
    NAME/jobids            one line per sbatch: JOBID TASKS
    NAME/TASK/             the task's job directory: argv.json (its command), slurm-JOBID_TASK.out,
                           apppot.status.json; attempt-JOBID/ holds a resubmitted task's old record

The command's placeholders are described in apppot_host/tasks.py; status and
resubmit in apppot_host/submit_status.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from apppot_guest import __version__
from apppot_guest.atomicfile import write_atomic
from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import AppPotError, FsError, UsageError, display_path, exit_codes_help, fs_error
from . import slurm
from .submit_status import (
    JOBIDS_FILE,
    Category,
    NotASubmission,
    TaskStatus,
    collect,
    move_aside,
    read_jobids,
    summary,
    summary_line,
    table,
)
from .submit_status import exit_code as status_exit_code
from .tasks import Task, array_spec, expand, parse_array, read_params
from .uml_run import image_problem, parse_size

log = logging.getLogger("apppot-submit")

PROG = "apppot-submit"
SUBMIT_FILE = "submit.json"
SCRIPT_FILE = "job.sbatch"
DELTA_FILE = "changes.delta"
ARGV_FILE = "argv.json"
OUTPUT_PATTERN = "%a/slurm-%A_%a.out"  # in NAME: each task's output in its own directory, one file per attempt
RESERVED_SBATCH = ("--array", "-a", "--output", "-o", "--chdir", "-D", "--job-name", "-J", "--parsable")


class ExistsError(AppPotError):
    exit_code = 3
    summary = "NAME already exists; nothing was written"


# -- the exit codes: one table, printed by --help and in the README (tests/test_submit.py checks both) --

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNFINISHED = 4
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "submitted; status: every task finished with exit code 0"),
    (EXIT_FAILED, "status: every task finished, some did not succeed (resubmit runs those again)"),
    (UsageError.exit_code, "bad command line, array, parameters file or placeholder; nothing was written"),
    (ExistsError.exit_code, ExistsError.summary),
    (EXIT_UNFINISHED, "status: some tasks are still pending or running"),
    (slurm.SlurmError.exit_code, "sbatch, sacct or scontrol failed or is not installed; nothing (more) was submitted"),
    (NotASubmission.exit_code, NotASubmission.summary),
    (FsError.exit_code, "a file could not be read or written (permissions, space, a missing path)"),
)


@dataclass(frozen=True, slots=True)
class Submission:
    """What was asked: NAME/submit.json.  Every field is read and written by name."""

    name: str  # NAME's absolute path
    command: tuple[str, ...]  # PROG ARGS with their placeholders
    tasks: tuple[int, ...]
    array: str | None  # --array as given
    params: str | None  # --params as given
    image: str | None  # absolute (--image or $APPPOT_IMAGE when submitted)
    changes: str | None  # --changes as given
    changes_sha256: str | None  # of NAME/changes.delta
    mem: str | None  # Slurm's --mem (MiB, e.g. 2048M); the guest gets it minus UML's margin
    no_network: bool
    start_options: tuple[str, ...]  # more apppot-start options (--start)
    sbatch_extra: tuple[str, ...]  # more sbatch options (--sbatch)
    launcher: str
    created_at: str
    apppot_version: str = __version__

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def load(cls, given: str) -> Submission:
        """NAME/submit.json; ``given`` is NAME as the user gave it (messages name it so)."""
        name = Path(os.path.abspath(given))
        path = name / SUBMIT_FILE
        try:
            data = json.loads(path.read_bytes())
            return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})
        except FileNotFoundError as exc:
            raise NotASubmission(f"{display_path(given)}: no {SUBMIT_FILE}: not a directory apppot-submit wrote") from exc
        except OSError as exc:
            raise fs_error(exc, "read", os.path.join(given, SUBMIT_FILE)) from exc
        except (ValueError, TypeError) as exc:
            raise NotASubmission(f"{display_path(os.path.join(given, SUBMIT_FILE))}: not apppot-submit's record ({exc})") from exc

    @property
    def root(self) -> Path:
        return Path(self.name)

    def sbatch_argv(self, tasks: Sequence[int]) -> list[str]:
        """sbatch's options for these tasks: on its command line, not in the script, so paths need no quoting."""
        throttle = (self.array or "").partition("%")[2]  # --array 1-100%10: at most 10 at once, resubmits too
        output = self.name.replace("%", "%%")  # a % in NAME is not one of sbatch's patterns
        options = [f"--job-name={self.root.name}", f"--array={array_spec(tasks)}{'%' + throttle if throttle else ''}",
                   f"--chdir={self.name}", f"--output={output}/{OUTPUT_PATTERN}"]
        if self.mem is not None:
            options.append(f"--mem={self.mem}")
        return [*options, *self.sbatch_extra]

    def check_delta(self) -> None:
        """The staged delta is the one submitted (its SHA-256)."""
        if self.changes_sha256 is None:
            return
        path = self.root / DELTA_FILE
        try:
            digest = sha256_of(path)
        except OSError as exc:
            raise fs_error(exc, "read", path) from exc
        if digest != self.changes_sha256:
            raise NotASubmission(f"{display_path(path)} was changed after submission (its SHA-256 differs from "
                                 f"{SUBMIT_FILE}'s): submit again with the delta you mean")


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- the batch script ----------------------------------------------------------------

SCRIPT_DOC = '''\
"""Run apppot-start for one task: its own job directory JOB/TASK, its command from JOB/TASK/argv.json
(read here and passed as an argument list, never through a shell), the staged delta checked first."""
import hashlib
import json
import os
import sys
'''
SCRIPT_BODY = '''\
task = sys.argv[1] if len(sys.argv) > 1 else os.environ["SLURM_ARRAY_TASK_ID"]
jobdir = os.path.join(JOB, task)
if CHANGES_SHA256 is not None:
    with open(os.path.join(JOB, "changes.delta"), "rb") as delta:
        if hashlib.file_digest(delta, "sha256").hexdigest() != CHANGES_SHA256:
            sys.stderr.write(f"apppot-submit: error: {JOB}/changes.delta was changed after submission (its SHA-256 "
                             f"differs); task {task} did not run\\n")
            sys.exit(125)
with open(os.path.join(jobdir, "argv.json"), encoding="utf-8") as f:
    argv = json.load(f)
os.execv(LAUNCHER, [LAUNCHER, *OPTIONS, "--jobdir", jobdir, "--", *argv])
'''


def launcher_options(sub: Submission) -> list[str]:
    options = []
    if sub.image is not None:
        options += ["--image", sub.image]
    if sub.changes_sha256 is not None:
        options += ["--changes", os.fspath(sub.root / DELTA_FILE)]
    if sub.no_network:
        options.append("--no-network")
    return [*options, *sub.start_options]


def render_script(sub: Submission) -> str:
    """NAME/job.sbatch: a Python script, so the task's command needs no shell quoting."""
    sbatch = shlex.join(["sbatch", "--parsable", *sub.sbatch_argv(sub.tasks), os.fspath(sub.root / SCRIPT_FILE)])
    head = [
        "#!/usr/bin/python3",
        f"# One task of the AppPot job array {sub.name}, written by {PROG} {sub.apppot_version}.",
        f"# Submitted as: {sbatch}",
        f"# One task by hand, or from another batch system: {shlex.quote(os.fspath(sub.root / SCRIPT_FILE))} TASK",
        SCRIPT_DOC,
        f"JOB = {sub.name!r}",
        f"LAUNCHER = {sub.launcher!r}",
        f"OPTIONS = {launcher_options(sub)!r}",
        f"CHANGES_SHA256 = {sub.changes_sha256!r}",
        "",
        "",
    ]
    return "\n".join(head) + SCRIPT_BODY


# -- submitting ------------------------------------------------------------------------


def find_launcher() -> str:
    """apppot-start beside this apppot-submit (the checkout's shims, an installed package's scripts), else on PATH."""
    beside = Path(sys.argv[0]).resolve().parent / "apppot-start"
    if beside.is_file() and os.access(beside, os.X_OK):
        return os.fspath(beside)
    found = shutil.which("apppot-start")
    if found is None:
        raise UsageError(f"apppot-start: not found beside {display_path(sys.argv[0])} nor on PATH")
    return os.path.realpath(found)


def plan_tasks(args: argparse.Namespace) -> tuple[Task, ...]:
    if args.params is not None:
        return read_params(Path(args.params), args.params)
    if args.array is not None:
        return tuple(Task(n) for n in parse_array(args.array))
    return (Task(1),)


def check_sbatch_options(options: Sequence[str]) -> None:
    for option in options:
        for reserved in RESERVED_SBATCH:
            if option == reserved or option.startswith(reserved + "=") or (len(reserved) == 2 and option.startswith(reserved)):
                raise UsageError(f"--sbatch={display_path(option)}: apppot-submit sets {reserved} itself "
                                 "(tasks: --array or --params; each task's output is in its own directory)")


def default_name(command: Sequence[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(command[0]).name) or "job"
    return f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def cmd_submit(args: argparse.Namespace) -> int:
    command = tuple(args.command[1:] if args.command[:1] == ["--"] else args.command)
    if not command:
        raise UsageError("no command: apppot-submit [OPTIONS] -- PROG ARGS...")
    tasks = plan_tasks(args)
    argvs = {task.number: expand(command, task) for task in tasks}  # every placeholder, before anything is written
    check_sbatch_options(args.sbatch)
    image_text = args.image or os.environ.get("APPPOT_IMAGE")
    if not image_text:
        raise UsageError("no image: give --image PATH or set APPPOT_IMAGE")
    image = Path(os.path.realpath(os.path.expanduser(image_text)))
    problem = image_problem(image)
    if problem is not None:
        raise UsageError(f"image {display_path(image_text)}: {problem}")
    sha = None
    if args.changes is not None:
        try:
            sha = sha256_of(Path(args.changes).expanduser())
        except OSError as exc:
            raise UsageError(f"changes {display_path(args.changes)}: {exc.strerror}") from exc
    root = Path(os.path.abspath(args.name or default_name(command)))
    if os.path.lexists(root):
        raise ExistsError(f"{display_path(args.name or root)} already exists: give a new --name (a submission "
                          f"is never written over; see `{PROG} status` and `{PROG} resubmit`)")
    sub = Submission(
        name=os.fspath(root), command=command, tasks=tuple(argvs), array=args.array, params=args.params,
        image=os.fspath(image), changes=args.changes, changes_sha256=sha,
        mem=parse_size(args.mem) if args.mem else None, no_network=args.no_network,
        start_options=tuple(args.start), sbatch_extra=tuple(args.sbatch), launcher=find_launcher(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    script = render_script(sub)
    if args.dry_run:
        sys.stdout.write(script)
        return EXIT_OK
    write_submission(sub, argvs, script, Path(args.changes).expanduser() if args.changes else None)
    job_id = submit_tasks(sub, sub.tasks)
    print(f"{PROG}: job {job_id}: {len(sub.tasks)} task(s) in {display_path(root)}/TASK; "
          f"see `{PROG} status {display_path(args.name or root)}`")
    return EXIT_OK


def write_submission(sub: Submission, argvs: dict[int, tuple[str, ...]], script: str, delta: Path | None) -> None:
    """NAME/ and everything in it, before sbatch sees it."""
    root = sub.root
    try:
        root.mkdir()
    except FileExistsError as exc:
        raise ExistsError(f"{display_path(root)} already exists: give a new --name") from exc
    except OSError as exc:
        raise fs_error(exc, "create", root) from exc
    if delta is not None:
        stage_delta(delta, root / DELTA_FILE, sub.changes_sha256)
    for number, argv in argvs.items():
        task_dir = root / str(number)
        try:
            task_dir.mkdir()
        except OSError as exc:
            raise fs_error(exc, "create", task_dir) from exc
        write_atomic(task_dir / ARGV_FILE, (json.dumps(list(argv)) + "\n").encode("ascii"))
    write_atomic(root / SCRIPT_FILE, script.encode("utf-8", "surrogateescape"), mode=0o755)
    write_atomic(root / SUBMIT_FILE, sub.to_json())


def stage_delta(source: Path, target: Path, sha: str | None) -> None:
    """The delta copied once into NAME, read-only, and checked against the SHA-256 it was submitted with."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        tmp.chmod(0o444)
        if sha256_of(tmp) != sha:
            tmp.unlink()
            raise UsageError(f"changes {display_path(source)} changed while it was being copied: submit again")
        os.replace(tmp, target)
    except OSError as exc:
        raise fs_error(exc, "copy the delta to", target) from exc


def submit_tasks(sub: Submission, tasks: Sequence[int]) -> str:
    """sbatch for ``tasks`` of the submission; the job id is appended to NAME/jobids."""
    try:
        job_id = slurm.sbatch(sub.sbatch_argv(tasks), sub.root / SCRIPT_FILE)
    except slurm.SlurmError as exc:
        raise slurm.SlurmError(f"{exc}; {display_path(sub.root)} is written but these tasks were not submitted: "
                               f"fix that and run `{PROG} resubmit {display_path(sub.root)}`") from exc
    try:
        with (sub.root / JOBIDS_FILE).open("a", encoding="ascii") as f:
            f.write(f"{job_id} {array_spec(tasks)}\n")
    except OSError as exc:
        raise fs_error(exc, f"record job {job_id} in", sub.root / JOBIDS_FILE) from exc
    return job_id


# -- status and resubmit ---------------------------------------------------------------


def statuses_of(given: str) -> tuple[Submission, list[TaskStatus]]:
    sub = Submission.load(given)
    jobs = read_jobids(sub.root, sub.tasks)
    return sub, collect(sub.root, sub.tasks, slurm.records(jobs.values()))


def cmd_status(args: argparse.Namespace) -> int:
    _, statuses = statuses_of(args.name)
    if args.json:
        print(json.dumps({"tasks": [s.to_json() for s in statuses], "summary": summary(statuses)}, indent=2))
    else:
        print("\n".join([*table(statuses), summary_line(statuses)]))
    return status_exit_code(statuses, EXIT_UNFINISHED, EXIT_FAILED)


def cmd_resubmit(args: argparse.Namespace) -> int:
    sub, statuses = statuses_of(args.name)
    again = [s for s in statuses if s.category is Category.FAILED]
    if not again:
        print(f"{PROG}: nothing to resubmit: no task of {display_path(args.name)} failed, timed out or was cancelled")
        return EXIT_OK
    sub.check_delta()
    for s in again:
        if s.job_id is not None:
            move_aside(sub.root / str(s.task), s.job_id)
    tasks = [s.task for s in again]
    job_id = submit_tasks(sub, tasks)
    print(f"{PROG}: job {job_id}: task(s) {array_spec(tasks)} of {display_path(args.name)} again "
          f"({', '.join(f'{s.task}: {s.state}' for s in again)}); their old records are in TASK/attempt-JOBID/")
    return EXIT_OK


# -- command line ----------------------------------------------------------------------

DESCRIPTION = """\
Submit PROG ARGS to Slurm as a job array of AppPot jobs: each task runs
apppot-start in its own job directory NAME/TASK with its own command.

placeholders in PROG ARGS:
  {task}          the task's number (SLURM_ARRAY_TASK_ID)
  {0}             with --params: the task's whole line
  {1}, {2}, ...   with --params: the line's fields, split like a shell's words
                  (quotes and backslashes as in sh, so spaces survive)
  {{ and }}       literal braces
  A placeholder without a value is refused before anything is written.

memory: --mem SIZE is Slurm's memory for each task; apppot-start gives the
  guest SIZE minus room for UML itself (docs/submit.md), so a guest that fills
  its memory is stopped by its own OOM killer (oom_killed in its record), not
  by Slurm.

also:
  apppot-submit status NAME [--json]   one line per task (Slurm's state and exit
                                       code, AppPot's outcome, wall time, MaxRSS,
                                       node) and a summary line
  apppot-submit resubmit NAME          the failed, timed-out and cancelled tasks
                                       again (their old records: TASK/attempt-JOBID/)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [OPTIONS] -- PROG ARGS...\n       {PROG} status NAME [--json]\n       {PROG} resubmit NAME",
        description=DESCRIPTION, epilog=exit_codes_help(EXIT_CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", metavar="PATH", help="the image (default: $APPPOT_IMAGE)")
    parser.add_argument("--changes", metavar="DELTA", help="a delta from apppot-snap changes, staged once read-only "
                        "as NAME/changes.delta for every task")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--array", metavar="SPEC", help="the tasks, as Slurm's --array: 1-6, 0-15:4, 1,3,5, 1-100%%10 "
                       "(default: one task, 1)")
    tasks.add_argument("--params", metavar="FILE", help="one task per line (numbered from 1; blank lines and # "
                       "comments skipped), its fields as {1}, {2}, ...")
    parser.add_argument("--name", metavar="NAME", help="the submission's directory, which must not exist "
                        "(default: PROG-DATE-TIME)")
    parser.add_argument("--mem", metavar="SIZE", help="Slurm's memory for each task (sbatch --mem); the guest gets "
                        "it minus UML's own")
    parser.add_argument("--no-network", action="store_true", help="no network in the guests (apppot-start --no-network)")
    parser.add_argument("--start", action="append", default=[], metavar="OPT",
                        help="one more apppot-start option, e.g. --start=--timeout=1h (repeatable)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPT",
                        help="one more sbatch option, e.g. --sbatch=--time=30 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="PROG ARGS", help="the command of every task")
    return parser


def build_status_parser(verb: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} {verb}", epilog=exit_codes_help(EXIT_CODES),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help="the submission's directory")
    if verb == "status":
        parser.add_argument("--json", action="store_true", help="the same as JSON")
    add_output_options(parser)
    return parser


COMMANDS = {"status": cmd_status, "resubmit": cmd_resubmit}


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    verb = words[0] if words and words[0] in COMMANDS else None
    if verb:
        return run_main(PROG, build_status_parser(verb), words[1:], handler=COMMANDS[verb])
    return run_main(PROG, build_parser(), words, handler=cmd_submit)


if __name__ == "__main__":
    sys.exit(main())
