"""How each task of an apppot-submit array went: Slurm's record and AppPot's, side by side.

For every task: Slurm's state and exit code (apppot_host/slurm.py), the
outcome in its ``apppot.status.json`` (``oom`` when the guest's OOM killer
struck), the wall time, MaxRSS and node; then a summary line.  A task is
*done* when it finished with exit code 0, *failed* when it finished any other
way (failed, timeout, cancelled, out of memory, never submitted, forgotten by
Slurm without a record), else *running* or *pending*.  Imported by
apppot_host.submit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from apppot_guest.errors import AppPotError, display_path, fs_error
from apppot_guest.status import EXITCODE_FILE, STATUS_FILE, parse_status
from .slurm import PENDING_STATES, RUNNING_STATES, Record
from .tasks import parse_array

JOBIDS_FILE = "jobids"
NOT_SUBMITTED = "NOT_SUBMITTED"
UNKNOWN = "UNKNOWN"  # Slurm has no record (forgotten after MinJobAge) and the task left none


class NotASubmission(AppPotError):
    exit_code = 6
    summary = "NAME is not a directory apppot-submit wrote, or its files were changed (submit.json, jobids, the delta)"


class Category(StrEnum):
    DONE = "done"
    FAILED = "failed"
    RUNNING = "running"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class TaskStatus:
    task: int
    job_id: str | None  # the array job that ran it last
    state: str  # Slurm's (COMPLETED, FAILED, TIMEOUT, CANCELLED, RUNNING, PENDING, ...), NOT_SUBMITTED or UNKNOWN
    exit_code: int | None  # Slurm's, else the status record's
    signal: int | None
    outcome: str | None  # AppPot's, from apppot.status.json (None: no record yet)
    oom_killed: bool
    wall: str | None  # Slurm's elapsed time, else the record's
    max_rss: str | None  # Slurm's MaxRSS (needs accounting)
    node: str | None
    category: Category

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "category": str(self.category)}


def read_jobids(root: Path, tasks: Sequence[int]) -> dict[int, str]:
    """Which array job ran each task last: NAME/jobids has one line per sbatch, ``JOBID TASKS``."""
    path = root / JOBIDS_FILE
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise fs_error(exc if isinstance(exc, OSError) else OSError(str(exc)), "read", path) from exc
    latest: dict[int, str] = {}
    for line in lines:
        job_id, _, spec = line.partition(" ")
        try:
            numbers = parse_array(spec)
        except AppPotError:
            numbers = ()
        if not job_id.isdigit() or not numbers:
            raise NotASubmission(f"{display_path(path)}: not a line of apppot-submit's (JOBID TASKS): {line[:80]!r}")
        latest.update(dict.fromkeys((n for n in numbers if n in tasks), job_id))
    return latest


def read_record(task_dir: Path) -> dict[str, object] | None:
    """The task's apppot.status.json, or None when there is none (yet) or it cannot be read."""
    path = task_dir / STATUS_FILE
    try:
        return parse_status(path.read_bytes(), path, complete=False)
    except (OSError, AppPotError):
        return None


def clock(seconds: object) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    whole = round(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def task_status(task: int, job_id: str | None, record: Record | None, apppot: Mapping[str, object] | None) -> TaskStatus:
    """One task's line from Slurm's record and AppPot's (either may be missing)."""
    outcome = apppot.get("outcome") if apppot else None
    own_code = apppot.get("exit_code") if apppot else None
    own_code = own_code if isinstance(own_code, int) else None
    oom = bool(apppot.get("oom_killed")) if apppot else False
    wall = clock(apppot.get("wall_seconds")) if apppot else None
    if job_id is None:
        return TaskStatus(task, None, NOT_SUBMITTED, None, None, None, False, None, None, None, Category.FAILED)
    if record is None:
        state = UNKNOWN
        category = Category.FAILED if own_code != 0 else Category.DONE
        return TaskStatus(task, job_id, state, own_code, None, str(outcome) if outcome else None, oom, wall, None, None,
                          category)
    if record.state in PENDING_STATES:
        category = Category.PENDING
    elif record.state in RUNNING_STATES:
        category = Category.RUNNING
    elif record.state == "COMPLETED" and record.exit_code == 0 and own_code in (0, None):
        category = Category.DONE
    else:
        category = Category.FAILED
    code = record.exit_code if record.exit_code is not None else own_code
    return TaskStatus(task, job_id, record.state, code, record.signal or None, str(outcome) if outcome else None, oom,
                      record.elapsed or wall, record.max_rss, record.node, category)


def collect(root: Path, tasks: Sequence[int], records: Mapping[tuple[str, int], Record]) -> list[TaskStatus]:
    jobs = read_jobids(root, tasks)
    found = []
    for task in tasks:
        job_id = jobs.get(task)
        record = records.get((job_id, task)) if job_id is not None else None
        found.append(task_status(task, job_id, record, read_record(root / str(task))))
    return found


COLUMNS = ("task", "state", "exit", "outcome", "wall", "maxrss", "node")


def table(statuses: Sequence[TaskStatus]) -> list[str]:
    """One line per task under a header, columns aligned."""
    rows = [COLUMNS]
    for s in statuses:
        exit_text = "-" if s.exit_code is None else str(s.exit_code) if not s.signal else f"{s.exit_code}:{s.signal}"
        outcome = (s.outcome or "-") + (" (oom)" if s.oom_killed else "")
        rows.append((str(s.task), s.state, exit_text, outcome, s.wall or "-", s.max_rss or "-", s.node or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def summary(statuses: Sequence[TaskStatus]) -> dict[str, int]:
    return {str(c): sum(1 for s in statuses if s.category is c) for c in Category}


def summary_line(statuses: Sequence[TaskStatus]) -> str:
    counts = summary(statuses)
    return f"{len(statuses)} task(s): " + ", ".join(f"{counts[str(c)]} {c}" for c in Category)


def exit_code(statuses: Sequence[TaskStatus], unfinished: int, failed: int) -> int:
    """``unfinished`` while any task is pending or running, else ``failed`` if any failed, else 0."""
    counts = summary(statuses)
    if counts[Category.RUNNING] or counts[Category.PENDING]:
        return unfinished
    return failed if counts[Category.FAILED] else 0


def move_aside(task_dir: Path, job_id: str) -> Path:
    """A resubmitted task's old record goes to TASK/attempt-JOBID/, kept, not overwritten by the new run."""
    attempt = task_dir / f"attempt-{job_id}"
    try:
        attempt.mkdir(exist_ok=True)
        for name in (STATUS_FILE, EXITCODE_FILE):
            if os.path.lexists(task_dir / name):
                os.replace(task_dir / name, attempt / name)
    except OSError as exc:
        raise fs_error(exc, "move the old record into", attempt) from exc
    return attempt
