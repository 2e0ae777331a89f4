"""apppot_host.uml_run without booting: units as people write them, the disk locks, the stopped record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from apppot_guest.errors import UsageError
from apppot_guest.status import FIELDS
from apppot_host import uml_launch, uml_run, uml_vm
from fixtures_uml import fake_image

PYTHON = "/usr/bin/python3"


@pytest.mark.parametrize(
    ("text", "mem"),
    [("2g", "2048M"), ("2G", "2048M"), ("2048M", "2048M"), ("2048m", "2048M"), ("2GiB", "2048M"), ("2gb", "2048M"),
     ("2 GiB", "2048M"), ("1.5G", "1536M"), ("512", "512M"), ("524288K", "512M"), ("1T", "1048576M"), ("64M", "64M")],
)
def test_sizes(text: str, mem: str) -> None:
    assert uml_run.parse_size(text) == mem


@pytest.mark.parametrize(
    ("text", "message"),
    [("lots", "not a size like 512M, 2G or 2GiB"), ("", "not a size"), ("2X", "not a size"), ("-1G", "not a size"),
     ("1e3M", "not a size"), ("2GiBs", "not a size"), ("63M", "at least 64M"), ("0", "at least 64M")],
)
def test_bad_sizes(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        uml_run.parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("90S", 90), ("1.5", 1.5), ("30m", 1800), ("1h", 3600), ("2d", 172800),
     ("1:30:00", 5400), ("30:00", 1800), ("0:30", 30), ("2-12", 216000), ("2-12:30", 217800), ("1-00:00:10", 86410)],
)
def test_durations(text: str, seconds: float) -> None:
    assert uml_run.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [("soon", "not a duration like 90, 90s, 30m, 1h or 1:30:00"), ("", "not a duration"), ("-3", "not a duration"),
     ("1:2:3:4", "not a duration"), ("1h30m", "not a duration"), ("inf", "not a duration"), ("0", "not a positive"),
     ("0:00", "not a positive")],
)
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        uml_run.parse_duration(text)


@pytest.mark.parametrize("exclusive", [True, False], ids=["in-place", "base"])
def test_a_disk_in_use_is_refused_naming_the_holder(tmp_path: Path, exclusive: bool) -> None:
    image = tmp_path / "my image, v1.img"
    fake_image(image)
    holder = subprocess.Popen(  # another apppot-start writing the image in place: it holds it until told to go
        [PYTHON, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", image],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(uml_run.BusyError) as caught:
            uml_run.lock_image(image, exclusive)
        assert str(caught.value).startswith(f"image {image} in use by PID {holder.pid}: ")
        assert caught.value.exit_code == 125
    finally:
        holder.communicate("")
    fd = uml_run.lock_image(image, exclusive)  # free again
    os.close(fd)


def test_bases_are_shared_and_a_base_in_use_cannot_be_written_in_place(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    fake_image(image)
    first, second = uml_run.lock_image(image, False), uml_run.lock_image(image, False)  # two jobs on one base
    try:
        with pytest.raises(uml_run.BusyError, match="a writable image runs one VM at a time"):
            uml_run.lock_image(image, True)
    finally:
        os.close(first)
        os.close(second)
    os.close(uml_run.lock_image(image, True))


def test_the_stopped_record_has_every_field_and_says_why(tmp_path: Path) -> None:
    started = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    record = uml_run.stopped_status(signal.SIGTERM, "SIGTERM", ("sh", "-c", "sleep 300"), 1000, 1000, started)
    data: dict[str, Any] = record.to_json()
    assert set(data) == set(FIELDS)
    assert (data["exit_code"], data["signal"], data["outcome"]) == (143, 15, "stopped")
    assert "apppot-start got SIGTERM (the batch system's time limit or scancel) at 20" in data["error"]
    assert data["command"] == ["sh", "-c", "sleep 300"] and data["finished_at"].endswith("Z")
    ctrl_c = uml_run.stopped_status(signal.SIGINT, "SIGINT", None, None, None, started)
    assert (ctrl_c.exit_code, "Ctrl-C" in (ctrl_c.error or "")) == (130, True)
    json.dumps(data)


def test_paths_uml_cannot_take_go_through_links_and_others_do_not(tmp_path: Path) -> None:
    run = uml_run.RunDir(tmp_path / "run")
    run.path.mkdir()
    plain = tmp_path / "plain.img"
    odd = tmp_path / "My Images, \"new\"" / "apppot.img"
    assert run.safe(plain, "image") == plain
    link = run.safe(odd, "image")
    assert link == run.path / "image" and os.readlink(link) == os.fspath(odd)
    assert not uml_run.UNSAFE_PATH.search(os.fspath(link))


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("/run/apppot/changes/my delta, v2.tar.zst: not a readable tar archive: truncated header",
         "~/deltas/my delta, v2.tar.zst: not a readable tar archive: truncated header"),
        ("the delta /run/apppot/changes/my delta, v2.tar.zst was made against base 1234 rather than / has (abcd); "
         "--force applies it anyway",
         "the delta ~/deltas/my delta, v2.tar.zst was made against base 1234 rather than / has (abcd); make the delta "
         "again in a boot of this image (apppot-snap changes), or merge it there by hand (sudo apppot-snap merge --force)"),
        ("no base manifest in /var/lib/apppot: cannot check that /run/apppot/changes/my delta, v2.tar.zst fits this "
         "image (--force applies it anyway)",
         "no base manifest in /var/lib/apppot: cannot check that ~/deltas/my delta, v2.tar.zst fits this image; make "
         "the delta again in a boot of this image (apppot-snap changes), or merge it there by hand "
         "(sudo apppot-snap merge --force)"),
    ],
    ids=["unreadable", "other-base", "no-base"],
)
def test_a_merge_failure_names_the_delta_as_given_with_a_hint_that_exists(
        monkeypatch: pytest.MonkeyPatch, error: str, said: str) -> None:
    monkeypatch.setenv("HOME", "/nonexistent-home")
    assert uml_launch.guest_error(error, "~/deltas/my delta, v2.tar.zst") == said


def test_an_older_apppot_init_is_recognised_on_the_console() -> None:
    """Its record is then in the job directory: apppot-start reads it there and says why that is weaker."""
    read, write = os.pipe()
    try:
        console = uml_vm.ConsoleFilter(write)
        console.feed(b"apppot-init: the job\r\n")
        assert not console.old_guest
        console.feed(b"apppot-init: unknown kernel command line key apppot.rundir (ignored)\r\n")
        assert console.old_guest
    finally:
        os.close(read)
        os.close(write)
