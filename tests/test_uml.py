"""End to end in real User-Mode Linux: an image from apppot-build-image, booted by
./apppot-start run as an unprivileged host user, with a real systemd boot."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from apppot_guest.account import Account
from apppot_guest.cmdline import PROTOCOL
from fixtures_uml import LAUNCHER, PYTHON, as_user, run_dirs

pytestmark = pytest.mark.integration

Start = Callable[..., subprocess.CompletedProcess[str]]
STATUS_FIELDS = {
    "exit_code", "signal", "outcome", "error", "command", "cwd", "user", "uid", "gid", "started_at", "finished_at",
    "wall_seconds", "cpu_user_seconds", "cpu_system_seconds", "max_rss_kib", "oom_killed", "network", "apppot_version",
}


def status(jobdir: Path) -> dict[str, object]:
    return json.loads((jobdir / "apppot.status.json").read_text())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("prog", "options", "code", "outcome"),
    [
        (["sh", "-c", "echo job-output; exit 0"], [], 0, "exited"),
        (["sh", "-c", "exit 7"], [], 7, "exited"),
        (["sh", "-c", "kill -TERM $$"], [], 128 + signal.SIGTERM, "killed"),
        (["no-such-command-anywhere"], [], 127, "not-found"),
        (["sleep", "60"], ["--timeout", "2"], 124, "timeout"),
    ],
    ids=["0", "7", "signal", "not-found", "timeout"],
)
def test_exit_codes_reach_the_launcher(start_job: Start, uml_jobdir: Path, uml_user: Account,
                                       prog: list[str], options: list[str], code: int, outcome: str) -> None:
    result = start_job(uml_jobdir, *prog, options=options)
    assert result.returncode == code, result.stderr
    record = status(uml_jobdir)
    assert set(record) >= STATUS_FIELDS, sorted(STATUS_FIELDS - set(record))
    assert record["exit_code"] == code and record["outcome"] == outcome
    assert record["command"] == prog
    assert (record["uid"], record["gid"]) == (uml_user.uid, uml_user.gid)
    assert (uml_jobdir / "apppot.exitcode").read_text().strip() == str(code)
    if code == 0:
        assert "job-output\n" in result.stdout


def test_argv_cwd_ownership_and_a_real_systemd_boot(start_job: Start, uml_jobdir: Path, uml_user: Account) -> None:
    nasty = ["two words", "quote\"s", "it's", "$HOME `id`", "", "ünïcödé ☃", "back\\slash", ";|&", "*"]
    (uml_jobdir / "sub").mkdir()
    os.chown(uml_jobdir / "sub", uml_user.uid, uml_user.gid)
    script = ('import json, os, sys; json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), '
              '"pid1": open("/proc/1/comm").read().strip()}, open("seen.json", "w"))')
    result = start_job(uml_jobdir, "python3", "-c", script, *nasty, options=["--cwd", "/home/user/job/sub"])
    assert result.returncode == 0, result.stderr
    seen_path = uml_jobdir / "sub" / "seen.json"
    seen = json.loads(seen_path.read_text())
    assert seen["argv"] == nasty
    assert seen["cwd"] == "/home/user/job/sub"
    assert seen["pid1"] == "systemd"
    st = seen_path.stat()
    assert (st.st_uid, st.st_gid) == (uml_user.uid, uml_user.gid)


def test_user_story_change_snapshot_and_rerun_on_the_pristine_base(
        start_job: Start, uml_jobdir: Path, uml_user: Account, apppot_image: Path) -> None:
    before = sha256(apppot_image)
    (uml_jobdir / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hello from the delta"); return 3; }\n')
    build = ("set -e; gcc -o hello hello.c; sudo install -m 755 hello /usr/local/bin/hello; "
             "echo installed-with-sudo | sudo tee /etc/apppot-story >/dev/null; "
             "sudo apppot-snap changes ~/job/story.tar.zst")
    result = start_job(uml_jobdir, "sh", "-c", build)
    assert result.returncode == 0, result.stdout + result.stderr
    delta = uml_jobdir / "story.tar.zst"
    assert delta.stat().st_uid == uml_user.uid

    # A fresh boot of the pristine base does not have the change ...
    result = start_job(uml_jobdir, "sh", "-c", "test ! -e /etc/apppot-story && ! command -v hello")
    assert result.returncode == 0, result.stdout + result.stderr
    # ... one with --changes has it (the delta inside the job directory) ...
    result = start_job(uml_jobdir, "sh", "-c", "cat /etc/apppot-story; exec hello", options=["--changes", delta])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "installed-with-sudo\nhello from the delta\n" in result.stdout
    # ... also from outside the job directory (a per-run copy, removed afterwards).
    elsewhere = uml_user.home / "deltas"
    elsewhere.mkdir(exist_ok=True)
    outside = elsewhere / "story.tar.zst"
    outside.write_bytes(delta.read_bytes())
    other_job = uml_jobdir / "other"
    other_job.mkdir()
    for path in (elsewhere, outside, other_job):
        os.chown(path, uml_user.uid, uml_user.gid)
    result = start_job(other_job, "hello", options=["--changes", outside])
    assert result.returncode == 3, result.stdout + result.stderr
    assert sorted(p.name for p in other_job.iterdir()) == ["apppot.exitcode", "apppot.status.json"]
    assert sha256(apppot_image) == before, "the base image changed"


def test_four_jobs_at_once_on_one_read_only_base(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    assert not os.access(apppot_image, os.W_OK) or os.stat(apppot_image).st_uid != uml_user.uid
    procs = []
    for n in range(4):
        jobdir = uml_jobdir / f"job{n}"
        jobdir.mkdir()
        os.chown(jobdir, uml_user.uid, uml_user.gid)
        argv = as_user(uml_user, [PYTHON, LAUNCHER, "--image", apppot_image, "--jobdir", jobdir, "--",
                                  "sh", "-c", f'echo "job {n}" > out.txt; sync; exit {10 + n}'])
        procs.append((n, jobdir, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)))
    for n, jobdir, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 10 + n, err
        assert (jobdir / "out.txt").read_text() == f"job {n}\n"
    leftovers = run_dirs(uml_user.uid)
    assert leftovers == [], "per-run COW directories must be removed"


def test_vm_ending_without_a_status_exits_125_with_the_console_tail(start_job: Start, uml_jobdir: Path) -> None:
    result = start_job(uml_jobdir, "true", options=["--boot", "direct", "--extra", "init=/bin/false"])
    assert result.returncode == 125
    assert "Kernel panic" in result.stderr
    assert "the VM ended without a job status" in result.stderr.splitlines()[-1]


def test_hostfs_reaches_only_the_runs_view_of_the_job_directory(start_job: Start, uml_jobdir: Path, uml_user: Account) -> None:
    """hostfs is confined to the run's view: the job directory (a link, /job) and the run's own directory (/run)."""
    (uml_jobdir / "inside").mkdir()
    (uml_jobdir / "inside" / "marker").write_text("in the job dir\n")
    (uml_user.home / "outside-marker").write_text("must not be seen\n")
    # mount(8) of Debian 13 uses the new mount API, where the host path is the option hostfs=PATH;
    # Debian 12's passes the options as one string, which hostfs takes as the path itself.
    probe = (
        "sudo mkdir -p /mnt/plain /mnt/abs /mnt/sub; "
        "if sudo mount -t hostfs -o hostfs=/job/inside none /mnt/sub 2>/dev/null; then sudo umount /mnt/sub; k=hostfs=; "
        "else k=; fi; "
        "sudo mount -t hostfs none /mnt/plain && ls -a /mnt/plain > plain.txt; "
        f"sudo mount -t hostfs -o $k{shlex.quote(os.fspath(uml_user.home))} none /mnt/abs; echo $? > abs-rc.txt; "
        "ls -a /mnt/abs > abs.txt; "
        "sudo mount -t hostfs -o ${k}/job/inside none /mnt/sub && cat /mnt/sub/marker > sub.txt; "
        "sudo mount -t hostfs -o ${k}/etc none /mnt/abs; echo $? > etc-rc.txt"
    )
    result = start_job(uml_jobdir, "sh", "-c", probe)
    assert result.returncode == 0, result.stdout + result.stderr
    plain = (uml_jobdir / "plain.txt").read_text().split()
    assert sorted(plain) == [".", "..", "job", "run"]
    # An absolute host path is taken relative to the job directory: there is no such directory there.
    assert (uml_jobdir / "abs-rc.txt").read_text().strip() != "0"
    assert "outside-marker" not in (uml_jobdir / "abs.txt").read_text()
    assert (uml_jobdir / "sub.txt").read_text() == "in the job dir\n"
    assert (uml_jobdir / "etc-rc.txt").read_text().strip() != "0"


def wait_for_pane(session: str, predicate: Callable[[str], bool], timeout: float) -> str:
    """Poll tmux's pane until ``predicate(text)`` holds; the pane text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", session],
                              capture_output=True, text=True, check=False).stdout
        if predicate(text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"tmux pane never matched; it shows:\n{text}")


def test_interactive_session_through_tmux(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    session = f"apppot-test-{os.getpid()}"
    launch = shlex.join(as_user(uml_user, [PYTHON, LAUNCHER, "--image", apppot_image, "--jobdir", uml_jobdir]))
    shell = f"cd {shlex.quote(os.fspath(uml_jobdir))} && TERM=xterm {launch}; echo LAUNCHER-EXIT=$?; sleep 600"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", shell], check=True)
    try:
        wait_for_pane(session, lambda t: "user@apppot" in t and t.rstrip().endswith("$"), 180)
        subprocess.run(["tmux", "send-keys", "-t", session, "id -un; sudo true && echo SUDO-$((6*7))", "Enter"], check=True)
        text = wait_for_pane(session, lambda t: "SUDO-42" in t, 60)
        assert "\nuser\n" in text.replace("\r", "")
        subprocess.run(["tmux", "send-keys", "-t", session, "exit", "Enter"], check=True)
        text = wait_for_pane(session, lambda t: "LAUNCHER-EXIT=" in t, 120)
        assert "LAUNCHER-EXIT=0" in text
        said = text.replace("\n", "")  # screen's own screen is gone: what apppot-start said before and after shows
        assert "is read-only: what you change in this session is thrown away at `exit`" in said
        assert "were thrown away" in said
        assert "login:" not in text.lower()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, stderr=subprocess.DEVNULL)


def test_network_reaches_the_debian_archive_and_no_network_means_only_lo(start_job: Start, uml_jobdir: Path) -> None:
    """The guest's network (vec0: vde_plug and a user-mode slirp on the host) resolves and fetches the archive's
    Release file; only Debian's archive is contacted."""
    fetch = ("import urllib.request; r = urllib.request.urlopen('http://deb.debian.org/debian/dists/bookworm/Release', "
             "timeout=30); print(r.status, r.read().decode().splitlines()[0])")
    result = start_job(uml_jobdir, "sh", "-c", f'ip -br -4 address show dev vec0; python3 -c "{fetch}"')
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10.0.2.15/24" in result.stdout and "200 Origin: Debian" in result.stdout
    assert status(uml_jobdir)["network"] == ["vec0"]
    # apppot-init as PID 1 (no systemd) configures the same network with the same script.
    result = start_job(uml_jobdir, "sh", "-c", "cat /proc/1/comm; ip -br -4 address show dev vec0; getent hosts deb.debian.org",
                       options=["--boot", "direct"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("apppot-init\n") and "10.0.2.15/24" in result.stdout
    result = start_job(uml_jobdir, "ls", "/sys/class/net", options=["--no-network"])
    assert (result.returncode, result.stdout) == (0, "lo\n"), result.stderr
    assert "warning" not in result.stderr


def test_job_output_appears_while_the_job_runs(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    argv = as_user(uml_user, [PYTHON, LAUNCHER, "--image", apppot_image, "--jobdir", uml_jobdir, "--",
                              "sh", "-c", "echo first-line; while [ ! -e go-on ]; do sleep 0.1; done; echo second-line"])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the job is still waiting for go-on: this line came live
        assert line == "first-line\n" and proc.poll() is None
        (uml_jobdir / "go-on").touch()
        rest, _ = proc.communicate(timeout=120)
        assert rest == "second-line\n" and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


EAT_MEMORY = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"


def test_oom_killed_job(start_job: Start, uml_jobdir: Path) -> None:
    # Filling 256 MB takes UML about 10 s before the OOM killer acts; --timeout is only a safety net
    # (should the unit lose OOMPolicy=continue, systemd would stop apppot-init and the VM would hang).
    result = start_job(uml_jobdir, "python3", "-c", EAT_MEMORY, options=["--mem", "256M", "--timeout", "120"])
    record = status(uml_jobdir)
    assert (result.returncode, record["outcome"], record["oom_killed"]) == (137, "killed", True)


def test_oom_killed_job_without_systemd(start_job: Start, uml_jobdir: Path) -> None:
    result = start_job(uml_jobdir, "python3", "-c", EAT_MEMORY, options=["--mem", "256M", "--boot", "direct"])
    record = status(uml_jobdir)
    assert (result.returncode, record["outcome"], record["oom_killed"]) == (137, "killed", True)


def test_a_bad_delta_stops_the_job_with_125_and_says_why(start_job: Start, uml_jobdir: Path) -> None:
    (uml_jobdir / "bad.tar.zst").write_bytes(b"this is not a delta")
    result = start_job(uml_jobdir, "touch", "ran", options=["--changes", uml_jobdir / "bad.tar.zst"])
    assert result.returncode == 125
    assert status(uml_jobdir)["outcome"] == "merge-failed"
    assert "apppot-start: error: the job did not run (merge-failed): " in result.stderr
    assert not (uml_jobdir / "ran").exists()


def test_a_fresh_image_shows_no_changes_but_the_boots_own(start_job: Start, uml_jobdir: Path) -> None:
    """The base was recorded in the tree, the image made by mkfs.ext4 -d: a copy, not a change.

    Only what the boot itself did may show: the machine-id and the job account (/etc, /home).
    """
    result = start_job(uml_jobdir, "apppot-snap", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line[:2] in ("A ", "M ", "D ")]
    outside = [line for line in lines if line[2:] not in ("/etc", "/home") and not line[2:].startswith(("/etc/", "/home/"))]
    assert outside == [] and len(lines) < 40, result.stdout


def test_a_launcher_of_another_protocol_is_refused_naming_both_versions(start_job: Start, uml_jobdir: Path) -> None:
    """An image whose hook speaks another protocol than the launcher: 125 and one line naming both, no guessing."""
    result = start_job(uml_jobdir, "touch", "ran", options=["--extra", "apppot.protocol=99"])
    assert result.returncode == 125, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("apppot-start: error: ")]
    assert len(errors) == 1 and "protocol 99" in errors[0] and f"speaks protocol {PROTOCOL}:" in errors[0], result.stderr
    assert not (uml_jobdir / "ran").exists()
    assert status(uml_jobdir)["outcome"] == "setup-failed"

