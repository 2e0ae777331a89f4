"""The tasks of an apppot-submit job array: Slurm's array specification, a parameters file, placeholders.

A task's command is the submitted PROG ARGS with its placeholders filled in:
``{task}`` the task's number, and with a parameters file (one task per line,
split like a shell's words with ``shlex``, so spaces and quotes survive)
``{0}`` the whole line and ``{1}``, ``{2}``, ... its fields.  ``{{`` and
``}}`` are literal braces.  A placeholder without a value (``{3}`` on a line
of two fields, ``{1}`` without a parameters file, ``{name}``) is refused
before anything is written.  Imported by apppot_host.submit.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apppot_guest.errors import UsageError, display_path, fs_error

MAX_TASKS = 100_000  # far beyond any Slurm's MaxArraySize; a typo such as 1-10000000 is refused here
ARRAY_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?")
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True, slots=True)
class Task:
    """One task: its number (Slurm's SLURM_ARRAY_TASK_ID) and its parameters line, if any."""

    number: int
    line: str | None = None  # the parameters file's line, stripped
    fields: tuple[str, ...] = ()
    line_number: int | None = None  # in the parameters file, for messages


def parse_array(spec: str) -> tuple[int, ...]:
    """The task numbers of Slurm's ``--array`` form: 1-6, 0-15:4, 1,3,5-7, 1-100%10 (``%`` limits how many run)."""
    body, _, throttle = spec.strip().partition("%")
    if throttle and not throttle.isdigit():
        raise UsageError(f"--array {display_path(spec)}: the part after % must be a number (how many tasks run at once)")
    numbers: set[int] = set()
    for item in body.split(","):
        match = ARRAY_ITEM.fullmatch(item.strip())
        if match is None:
            raise UsageError(f"--array {display_path(spec)}: {display_path(item)} is not N, N-M or N-M:STEP")
        first, last, step = int(match.group(1)), int(match.group(2) or match.group(1)), int(match.group(3) or 1)
        if last < first or step < 1:
            raise UsageError(f"--array {display_path(spec)}: {display_path(item)} is an empty range")
        if (last - first) // step + len(numbers) >= MAX_TASKS:
            raise UsageError(f"--array {display_path(spec)}: more than {MAX_TASKS} tasks")
        numbers.update(range(first, last + 1, step))
    return tuple(sorted(numbers))


def array_spec(numbers: Iterable[int]) -> str:
    """The shortest plain Slurm ``--array`` form of ``numbers``: 1-3,5,7-8."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def read_params(path: Path, given: str) -> tuple[Task, ...]:
    """One task per line of the parameters file, numbered from 1; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise fs_error(exc, "read the parameters file", given) from exc
    tasks: list[Task] = []
    for line_number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            fields = tuple(shlex.split(line))
        except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
            raise UsageError(f"--params {display_path(given)}, line {line_number}: {str(exc).lower()}: "
                             f"{display_path(line)}") from exc
        tasks.append(Task(len(tasks) + 1, line, fields, line_number))
    if not tasks:
        raise UsageError(f"--params {display_path(given)}: no parameters (one task per line; # starts a comment)")
    if len(tasks) > MAX_TASKS:
        raise UsageError(f"--params {display_path(given)}: more than {MAX_TASKS} tasks")
    return tuple(tasks)


def expand(template: Sequence[str], task: Task) -> tuple[str, ...]:
    """The task's command: ``template`` with every placeholder filled in (see the module's docstring)."""
    return tuple(_expand_word(word, task) for word in template)


def _expand_word(word: str, task: Task) -> str:
    def value(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        name = match.group(1)
        if name is None:
            raise UsageError(f"a single {text!r} in {display_path(word)}: write {{{{ and }}}} for literal braces")
        if name == "task":
            return str(task.number)
        if name.isdigit() and task.line is not None:
            index = int(name)
            if index == 0:
                return task.line
            if index <= len(task.fields):
                return task.fields[index - 1]
            raise UsageError(f"placeholder {{{name}}} in {display_path(word)} has no value: line {task.line_number} "
                             f"of the parameters file has {len(task.fields)} field(s): {display_path(task.line)}")
        if name.isdigit():
            raise UsageError(f"placeholder {{{name}}} in {display_path(word)} has no value: {{0}}, {{1}}, ... come "
                             "from a parameters file (--params FILE)")
        raise UsageError(f"placeholder {{{display_path(name)}}} in {display_path(word)} has no value: there are "
                         "{task}, and with --params {0} (the line), {1}, {2}, ...; write {{ and }} for literal braces")

    return PLACEHOLDER.sub(value, word)
