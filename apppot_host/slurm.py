"""Talking to Slurm for apppot-submit: ``sbatch`` to submit, and each array task's record.

The record comes from accounting (``sacct --parsable2 --noheader``) and, on a
cluster without it (no slurmdbd: sacct says accounting is disabled), from the
controller's memory (``scontrol show job --oneliner``), which keeps a finished
job for MinJobAge seconds and has no MaxRSS.  Imported by apppot_host.submit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from apppot_guest import proc
from apppot_guest.errors import AppPotError, ToolError, UsageError, one_line
from .tasks import parse_array

log = logging.getLogger("apppot-submit")

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "MaxRSS", "NodeList")
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
                            "STAGE_OUT"})
TASK_ID = re.compile(r"([0-9]+)_(?:([0-9]+)|\[([^\]]*)\])")


TIMEOUT = 120.0  # seconds a Slurm command may take to answer


class SlurmError(AppPotError):
    exit_code = 5
    summary = "sbatch, sacct or scontrol failed or is not installed (the message says which and why)"


@dataclass(frozen=True, slots=True)
class Record:
    """Slurm's word on one array task."""

    job_id: str  # the array's job id (what sbatch printed)
    task: int
    state: str  # COMPLETED, FAILED, TIMEOUT, CANCELLED, RUNNING, PENDING, ...
    exit_code: int | None
    signal: int | None
    elapsed: str | None  # Slurm's [D-]HH:MM:SS
    max_rss: str | None  # sacct's MaxRSS of the batch step (e.g. 123456K); None without accounting
    node: str | None


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """A Slurm command through the one subprocess wrapper, its output as text."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]}: not found (is Slurm installed here? Debian: slurm-client)")
    try:
        result = proc.run(argv, check=False, capture=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{argv[0]}: no answer from Slurm within {exc.timeout:g} s") from exc
    except ToolError as exc:  # it could not be started after all
        raise SlurmError(str(exc)) from exc
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def sbatch(options: Sequence[str], script: os.PathLike[str]) -> str:
    """Submit ``script``; the job id sbatch printed (``--parsable``: ID or ID;CLUSTER)."""
    result = run(["sbatch", "--parsable", *options, os.fspath(script)])
    job_id = result.stdout.strip().partition(";")[0]
    if result.returncode != 0 or not job_id.isdigit():
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        said = lines[-1] if lines else f"exit code {result.returncode}"  # sbatch's last line is its verdict
        raise SlurmError(f"sbatch refused the job: {one_line(said)}")
    return job_id


def records(job_ids: Iterable[str]) -> dict[tuple[str, int], Record]:
    """Slurm's record of every task of the arrays ``job_ids``, keyed by (array job id, task)."""
    ids = sorted(set(job_ids), key=int)
    if not ids:
        return {}
    result = run(["sacct", "--parsable2", "--noheader", f"--jobs={','.join(ids)}", f"--format={','.join(SACCT_FIELDS)}"])
    found: dict[tuple[str, int], Record] = {}
    if result.returncode == 0:
        found = parse_sacct(result.stdout)
    else:
        log.info("sacct: %s; asking scontrol", one_line(result.stderr.strip()))
    known = {job_id for job_id, _ in found}
    for job_id in ids:  # without accounting, or a job accounting has not heard of yet: the controller's record
        if job_id in known:
            continue
        shown = run(["scontrol", "show", "job", "--oneliner", job_id])
        if shown.returncode == 0:
            found.update(parse_scontrol(shown.stdout))
        elif "Invalid job id" not in shown.stderr:  # a job Slurm has forgotten (older than MinJobAge) is no error
            raise SlurmError(f"scontrol show job {job_id}: {one_line(shown.stderr.strip())}")
    return found


def task_numbers(text: str) -> list[int]:
    """``3``, ``3-6``, ``[3-6,8]``, ``3-6%2`` (a pending array's tasks, as Slurm shows them) as numbers; none for
    anything else Slurm may show there."""
    try:
        return list(parse_array(text.strip("[]")))
    except UsageError:
        return []


def exit_and_signal(text: str) -> tuple[int | None, int | None]:
    """Slurm's ``CODE:SIGNAL``."""
    code, _, sig = text.partition(":")
    return (int(code) if code.isdigit() else None, int(sig) if sig.isdigit() else None)


def parse_sacct(text: str) -> dict[tuple[str, int], Record]:
    """``sacct --parsable2 --noheader --format=JobID,State,ExitCode,Elapsed,MaxRSS,NodeList`` as records.

    A task's own line (``41_3``) gives its state, exit code, wall time and node;
    its steps' lines (``41_3.batch``) the MaxRSS; pending tasks come as one line
    (``41_[4-6]``).
    """
    found: dict[tuple[str, int], Record] = {}
    rss: dict[tuple[str, int], str] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != len(SACCT_FIELDS):
            continue
        job, state, exit_text, elapsed, max_rss, node = fields
        head, _, step = job.partition(".")
        match = TASK_ID.fullmatch(head)
        if match is None:
            continue
        array_id = match.group(1)
        numbers = [int(match.group(2))] if match.group(2) else task_numbers(match.group(3))
        if step:
            if max_rss and len(numbers) == 1:
                key = (array_id, numbers[0])
                rss[key] = max(rss.get(key, max_rss), max_rss, key=rss_kib)
            continue
        code, sig = exit_and_signal(exit_text)
        for number in numbers:
            found[(array_id, number)] = Record(array_id, number, state.split()[0] if state else "UNKNOWN", code, sig,
                                               elapsed or None, None, node if node not in ("", "None assigned") else None)
    for key, value in rss.items():
        if key in found:
            record = found[key]
            found[key] = Record(record.job_id, record.task, record.state, record.exit_code, record.signal,
                                record.elapsed, value, record.node)
    return found


def rss_kib(text: str) -> float:
    """sacct's MaxRSS (``123K``, ``1.5M``, ``0``) in KiB, for comparing steps."""
    match = re.fullmatch(r"([0-9.]+)([KMGT]?)", text)
    if match is None:
        return 0.0
    return float(match.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}[match.group(2)]


SCONTROL_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def scontrol_fields(line: str) -> dict[str, str]:
    """One line of ``scontrol show job --oneliner``: ``Key=value`` pairs (values may contain spaces)."""
    marks = list(SCONTROL_FIELD.finditer(line))
    return {m.group(1): line[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(line)].strip()
            for i, m in enumerate(marks)}


def parse_scontrol(text: str) -> dict[tuple[str, int], Record]:
    """``scontrol show job --oneliner ARRAY_ID`` as records: one line per task, pending tasks on one line."""
    found: dict[tuple[str, int], Record] = {}
    for line in text.splitlines():
        fields = scontrol_fields(line)
        array_id = fields.get("ArrayJobId")
        if not array_id or "ArrayTaskId" not in fields:
            continue
        code, sig = exit_and_signal(fields.get("ExitCode", ""))
        node = fields.get("NodeList") or None
        for number in task_numbers(fields["ArrayTaskId"]):
            found[(array_id, number)] = Record(array_id, number, fields.get("JobState", "UNKNOWN"), code, sig,
                                               fields.get("RunTime") or None, None,
                                               node if node not in ("(null)", "None") else None)
    return found
