"""The status record: every field, written atomically, read back by the launcher's helpers."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from apppot_guest import __version__
from apppot_guest.errors import FsError
from apppot_guest.job import JobResult, Outcome
from apppot_guest.status import EXITCODE_FILE, FIELDS, STATUS_FILE, read_exitcode, read_status, status_of, write_status

T0 = datetime(2026, 11, 25, 9, 30, 0, 123456, tzinfo=UTC)


def a_status(code: int = 7, argv: tuple[str, ...] = ("python3", "run.py", "a b")):
    result = JobResult(Outcome.EXITED, code, None, None, T0, T0 + timedelta(seconds=2.5), 2.5, 1.25, 0.5, 2048, False)
    return status_of(result, argv, "/home/user/job", "user", 1000, 1000)


def test_every_field_is_written(tmp_path: Path) -> None:
    write_status(tmp_path, a_status())
    data = json.loads((tmp_path / STATUS_FILE).read_text())
    assert list(data) == list(FIELDS)
    assert data == {
        "exit_code": 7,
        "signal": None,
        "outcome": "exited",
        "error": None,
        "command": ["python3", "run.py", "a b"],
        "cwd": "/home/user/job",
        "user": "user",
        "uid": 1000,
        "gid": 1000,
        "started_at": "2026-11-25T09:30:00.123456Z",
        "finished_at": "2026-11-25T09:30:02.623456Z",
        "wall_seconds": 2.5,
        "cpu_user_seconds": 1.25,
        "cpu_system_seconds": 0.5,
        "max_rss_kib": 2048,
        "oom_killed": False,
        "network": [],
        "apppot_version": __version__,
    }
    assert (tmp_path / EXITCODE_FILE).read_text() == "7\n"
    assert read_status(tmp_path) == data
    assert read_exitcode(tmp_path) == 7


def test_failed_setup_record(tmp_path: Path) -> None:
    result = JobResult.failed(Outcome.MERGE_FAILED, "delta.tar: not a delta archive", T0)
    write_status(tmp_path, status_of(result, ("true",), None, "user", 1000, 1000))
    data = read_status(tmp_path)
    assert (data["outcome"], data["exit_code"], data["error"]) == ("merge-failed", 125, "delta.tar: not a delta archive")
    assert data["cpu_user_seconds"] == 0 and data["max_rss_kib"] == 0
    assert read_exitcode(tmp_path) == 125


def test_a_previous_status_is_replaced_whole(tmp_path: Path) -> None:
    (tmp_path / STATUS_FILE).write_text("x" * 100000)  # longer than the new one: no tail may survive
    (tmp_path / EXITCODE_FILE).write_text("99999\n")
    with open(tmp_path / STATUS_FILE) as reader:  # a reader of the old record keeps the old record
        old_inode = os.fstat(reader.fileno()).st_ino
        write_status(tmp_path, a_status(0))
        assert reader.read() == "x" * 100000
    assert (tmp_path / STATUS_FILE).stat().st_ino != old_inode  # renamed over, never truncated in place
    assert read_status(tmp_path)["exit_code"] == 0
    assert (tmp_path / EXITCODE_FILE).read_text() == "0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXITCODE_FILE, STATUS_FILE]  # no temporary files left
    assert (tmp_path / STATUS_FILE).stat().st_mode & 0o777 == 0o644


def test_an_interrupted_write_leaves_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_status(tmp_path, a_status(3))
    before = (tmp_path / STATUS_FILE).read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(FsError, match=r"cannot write .*apppot.status.json: No space left on device"):
        write_status(tmp_path, a_status(4))
    assert (tmp_path / STATUS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXITCODE_FILE, STATUS_FILE]


def test_unwritable_job_directory(tmp_path: Path) -> None:
    with pytest.raises(FsError, match="cannot write"):
        write_status(tmp_path / "missing", a_status())


def test_arguments_that_are_not_utf8_are_escaped(tmp_path: Path) -> None:
    name = b"data-\xff.bin".decode("utf-8", "surrogateescape")
    write_status(tmp_path, a_status(argv=("cat", name, "é")))
    assert read_status(tmp_path)["command"] == ["cat", "data-\\xff.bin", "é"]


@pytest.mark.parametrize("content", ["", "abc\n", "256\n", "-1\n"])
def test_a_bad_exitcode_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / EXITCODE_FILE).write_text(content)
    with pytest.raises(FsError, match="not an exit code"):
        read_exitcode(tmp_path)


@pytest.mark.parametrize("content", ["{", "[]", '{"exit_code": 0}'])
def test_a_bad_status_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / STATUS_FILE).write_text(content)
    with pytest.raises(FsError, match="not a status record"):
        read_status(tmp_path)


def test_missing_status_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FsError, match=r"apppot\.status\.json"):
        read_status(tmp_path)
    with pytest.raises(FsError, match=r"apppot\.exitcode"):
        read_exitcode(tmp_path)


def test_the_readme_names_every_field_of_the_record_in_order() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("`apppot.status.json` has ")
    paragraph = readme[start:readme.index("\n\n", start)]
    assert re.findall(r"`(\w+)`", paragraph) == list(FIELDS)
