"""The job's exit-status record: ``apppot.status.json`` and ``apppot.exitcode`` in the job directory.

Both files are written atomically (temporary file in the same directory,
fsync, rename, then fsync of the directory): a reader never sees half a file
and an interrupted writer leaves the previous one whole.  The host launcher
reads them back with ``read_status()`` / ``read_exitcode()``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .atomicfile import write_atomic
from .errors import FsError, fs_error
from .job import JobResult

log = logging.getLogger(__name__)

STATUS_FILE = "apppot.status.json"
EXITCODE_FILE = "apppot.exitcode"

@dataclass(frozen=True, slots=True)
class Status:
    """What the job directory is told about the job: its fields are the record's JSON keys, in this order."""

    exit_code: int
    signal: int | None
    outcome: str
    error: str | None
    command: tuple[str, ...] | None
    cwd: str | None
    user: str | None
    uid: int | None
    gid: int | None
    started_at: datetime
    finished_at: datetime
    wall_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    max_rss_kib: int
    oom_killed: bool
    network: tuple[str, ...]  # the network interfaces besides lo that were up when the job ended
    apppot_version: str = __version__

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {name: getattr(self, name) for name in FIELDS}
        data.update(outcome=str(self.outcome), command=list(self.command) if self.command is not None else None,
                    started_at=_iso(self.started_at), finished_at=_iso(self.finished_at), network=list(self.network))
        return data


# The record's keys: declared once, by the dataclass above.
FIELDS: tuple[str, ...] = tuple(field.name for field in fields(Status))


def _iso(moment: datetime) -> str:
    """UTC in ISO 8601 with a ``Z``: 2026-11-25T09:30:00.123456Z."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _display_argv(argv: Sequence[str]) -> list[str]:
    # JSON needs valid Unicode: bytes that are not UTF-8 (surrogateescape) are shown escaped.
    return [a.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for a in argv]


def write_status(jobdir: Path, status: Status) -> Path:
    """Write ``apppot.status.json`` and ``apppot.exitcode`` into ``jobdir`` atomically."""
    data = status.to_json()
    if status.command is not None:
        data["command"] = _display_argv(status.command)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_atomic(jobdir / STATUS_FILE, text.encode("utf-8", "surrogateescape"))
    write_atomic(jobdir / EXITCODE_FILE, f"{status.exit_code}\n".encode("ascii"))
    log.info("status: %s, exit code %d (%s)", status.outcome, status.exit_code, jobdir / STATUS_FILE)
    return jobdir / STATUS_FILE


def parse_status(raw: bytes, path: Path, *, complete: bool = True) -> dict[str, object]:
    """The one reader of a record: its bytes (read from ``path``) as its fields.

    A record always has an integer ``exit_code``; with ``complete`` it has every
    field of ``Status``.  The launcher asks for the exit code only, so that an
    image with an older boot hook still gets its job's exit code through.
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise FsError(f"{path}: not a status record: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("exit_code"), int):
        raise FsError(f"{path}: not a status record (no integer exit_code)")
    missing = [name for name in FIELDS if name not in data] if complete else []
    if missing:
        raise FsError(f"{path}: not a status record (missing {', '.join(missing)})")
    return data


def read_status(jobdir: Path) -> dict[str, object]:
    """The status record of a finished job (host side)."""
    path = jobdir / STATUS_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise fs_error(exc, "read", path) from exc
    return parse_status(raw, path)


def read_exitcode(jobdir: Path) -> int:
    """The bare exit code a finished job left in ``apppot.exitcode`` (host side)."""
    path = jobdir / EXITCODE_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise fs_error(exc, "read", path) from exc
    except UnicodeDecodeError as exc:
        raise FsError(f"{path}: not an exit code (not ASCII)") from exc
    if not text.isdigit() or int(text) > 255:
        raise FsError(f"{path}: not an exit code: {text[:20]!r}")
    return int(text)


def status_of(
    result: JobResult,
    command: Sequence[str] | None,
    cwd: str | os.PathLike[str] | None,
    user: str | None,
    uid: int | None,
    gid: int | None,
    network: Sequence[str] = (),
) -> Status:
    """The record for a job's result and what was asked for."""
    return Status(
        exit_code=result.exit_code,
        signal=result.signal,
        outcome=str(result.outcome),
        error=result.error,
        command=tuple(command) if command is not None else None,
        cwd=os.fsdecode(cwd) if cwd is not None else None,
        user=user,
        uid=uid,
        gid=gid,
        started_at=result.started_at,
        finished_at=result.finished_at,
        wall_seconds=result.wall_seconds,
        cpu_user_seconds=result.cpu_user_seconds,
        cpu_system_seconds=result.cpu_system_seconds,
        max_rss_kib=result.max_rss_kib,
        oom_killed=result.oom_killed,
        network=tuple(network),
    )
