"""Every job reports its own truth, in real User-Mode Linux: jobs sharing a job directory,
a writable image booted twice, signals from the batch system, paths as users have them,
and the per-machine identity a delta must not carry."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apppot_guest.account import Account
from fixtures_uml import LAUNCHER, PYTHON, as_user, fake_image, run_dirs

pytestmark = pytest.mark.integration

Start = Callable[..., subprocess.CompletedProcess[str]]
JOBS_AT_ONCE = 10
LONG_ARG = "x" * 6000  # too long for the kernel command line: the command goes through a command file


def launch(user: Account, image: Path, jobdir: Path, *prog: str, options: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    argv = as_user(user, [PYTHON, LAUNCHER, "--image", image, "--jobdir", jobdir, *options, "--", *prog])
    return subprocess.Popen(argv, cwd=jobdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path: Path, proc: subprocess.Popen[str], within: float = 180) -> None:
    """Until the job has created ``path`` (it is running); the launcher must still be running."""
    deadline = time.monotonic() + within
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def leftovers(user: Account) -> tuple[str, list[Path]]:
    """UML processes and per-run directories of ``user`` still there."""
    procs = subprocess.run(["pgrep", "-a", "-u", str(user.uid)], capture_output=True, text=True, check=False).stdout
    return procs, run_dirs(user.uid)


@pytest.fixture
def shared_jobdir(uml_jobdir: Path) -> Path:
    """A job directory with a space and a comma in its name, as users have them."""
    path = uml_jobdir / "my job, shared"
    path.mkdir()
    os.chown(path, os.stat(uml_jobdir).st_uid, os.stat(uml_jobdir).st_gid)
    return path


def test_many_jobs_in_one_job_directory_each_exit_with_their_own_code(
        uml_user: Account, apppot_image: Path, shared_jobdir: Path) -> None:
    """A Slurm array: every task starts in the submit directory.  No launcher may take another job's code."""
    procs = []
    for n in range(JOBS_AT_ONCE):
        prog = ["sh", "-c", f'sleep 0.{n % 4}; echo "job {n}" > out.{n}; exit "$1"', "sh", str(n + 1)]
        if n % 3 == 0:
            prog.append(LONG_ARG)
        procs.append((n, launch(uml_user, apppot_image, shared_jobdir, *prog, options=("--mem", "256m", "--no-network"))))
    codes = {}
    for n, proc in procs:
        _, err = proc.communicate(timeout=900)
        codes[n] = proc.returncode
        assert proc.returncode == n + 1, f"job {n} exited {proc.returncode}: {err}"
    assert all((shared_jobdir / f"out.{n}").read_text() == f"job {n}\n" for n in range(JOBS_AT_ONCE))
    record = json.loads((shared_jobdir / "apppot.status.json").read_text())
    assert record["outcome"] == "exited" and record["command"][:2] == ["sh", "-c"]
    assert record["exit_code"] == int(record["command"][4]), "the published record is one run's, complete"
    assert int((shared_jobdir / "apppot.exitcode").read_text()) in codes.values()
    assert sorted(p.name for p in shared_jobdir.iterdir()) == sorted(
        ["apppot.exitcode", "apppot.status.json", *(f"out.{n}" for n in range(JOBS_AT_ONCE))])
    procs_left, run_dirs = leftovers(uml_user)
    assert run_dirs == [] and "linux" not in procs_left


@pytest.fixture
def writable_image(apppot_image: Path, uml_user: Account) -> Iterator[Path]:
    """The user's own writable copy of the image, as on a desktop."""
    path = uml_user.home / "My Images, desktop" / "apppot.img"
    path.parent.mkdir()
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", os.fspath(apppot_image), os.fspath(path)], check=True)
    for p in (path.parent, path):
        os.chown(p, uml_user.uid, uml_user.gid)
    path.chmod(0o644)
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def test_a_writable_image_booted_twice_is_refused_at_once(
        uml_user: Account, writable_image: Path, uml_jobdir: Path, start_job: Start) -> None:
    first = launch(uml_user, writable_image, uml_jobdir, "sh", "-c",
                   "touch started; while [ ! -e go-on ]; do sleep 0.1; done; echo first > first.txt")
    try:
        wait_for(uml_jobdir / "started", first)
        second = subprocess.run(as_user(uml_user, [PYTHON, LAUNCHER, "--image", writable_image, "--jobdir", uml_jobdir,
                                                   "--", "touch", "second-ran"]),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 125
        assert second.stderr == (f"apppot-start: error: image {writable_image} in use by PID {first.pid}: a writable "
                                 "image runs one VM at a time; wait for it, or boot a copy\n")
        assert not (uml_jobdir / "second-ran").exists()
        # Not as a base either while a VM writes it (UML could not open it: a panic, not a job).
        beside = subprocess.run(as_user(uml_user, [PYTHON, LAUNCHER, "--image", writable_image, "--jobdir", uml_jobdir,
                                                   "--ephemeral", "--", "touch", "second-ran"]),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
        assert (beside.returncode, beside.stderr) == (125, f"apppot-start: error: image {writable_image} in use by PID "
                                                           f"{first.pid}: a VM writes it in place; wait for it\n")
        (uml_jobdir / "go-on").touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        assert (uml_jobdir / "first.txt").read_text() == "first\n"
    finally:
        if first.poll() is None:
            first.kill()


def test_your_own_cow_file_is_made_by_the_first_run_and_kept(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """--image COW:IMAGE with a COW file that does not exist yet: the kernel makes it, the next run boots
    it with what the first one changed, and the shared image is left as it was."""
    cow = uml_jobdir / "mine.cow"
    image_before = apppot_image.stat()
    runs = []
    for prog in (["sh", "-c", "echo kept > /home/user/mark"], ["cat", "/home/user/mark"]):
        run = subprocess.run(as_user(uml_user, [PYTHON, LAUNCHER, "--image", f"{cow}:{apppot_image}", "--jobdir", uml_jobdir,
                                                "--no-network", "--", *prog]),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
        runs.append(run)
        assert run.returncode == 0, run.stderr
    assert runs[1].stdout == "kept\n"
    assert cow.read_bytes()[:4] == b"OOOM" and cow.stat().st_uid == uml_user.uid
    other = uml_jobdir / "other.img"  # the COW file the kernel wrote names its image: another one is refused
    fake_image(other)
    refused = subprocess.run(as_user(uml_user, [PYTHON, LAUNCHER, "--image", f"{cow}:{other}", "--jobdir", uml_jobdir, "--", "true"]),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and f"it was made over {apppot_image}, not {other}" in refused.stderr, refused.stderr
    assert (apppot_image.stat().st_mtime_ns, apppot_image.stat().st_size) == (image_before.st_mtime_ns, image_before.st_size)


def test_no_command_and_no_terminal_is_refused_before_booting(start_job: Start, uml_jobdir: Path) -> None:
    result = start_job(uml_jobdir)  # stdin /dev/null, stdout a pipe: a batch script that forgot its command
    assert result.returncode == 2
    assert result.stderr.startswith("apppot-start: error: no command and no terminal")
    assert not (uml_jobdir / "apppot.status.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_from_the_batch_system_stops_the_vm_and_leaves_a_record(
        uml_user: Account, apppot_image: Path, uml_jobdir: Path, sig: signal.Signals) -> None:
    proc = launch(uml_user, apppot_image, uml_jobdir, "sh", "-c", "touch started; sleep 300")
    wait_for(uml_jobdir / "started", proc)
    proc.send_signal(sig)  # setpriv exec'd the launcher: this is apppot-start's pid
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"stopping the VM: apppot-start got {sig.name}" in err
    record = json.loads((uml_jobdir / "apppot.status.json").read_text())
    assert (record["outcome"], record["exit_code"], record["signal"]) == ("stopped", 128 + sig, sig)
    assert f"apppot-start got {sig.name}" in record["error"] and record["finished_at"].endswith("Z")
    assert record["command"] == ["sh", "-c", "touch started; sleep 300"]
    assert (uml_jobdir / "apppot.exitcode").read_text() == f"{128 + sig}\n"
    procs_left, run_dirs = leftovers(uml_user)
    assert procs_left == "" and run_dirs == [], (procs_left, run_dirs)


def test_the_vm_killed_leaves_no_process_and_no_run_directory(
        uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    proc = launch(uml_user, apppot_image, uml_jobdir, "sh", "-c", "touch started; sleep 300")
    wait_for(uml_jobdir / "started", proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True).stdout.split()
    for pid in children:  # UML's main process (the launcher's only child besides reaped helpers)
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 125, err
    assert "the VM ended without a job status (UML killed by SIGKILL)" in err
    procs_left, run_dirs = leftovers(uml_user)
    assert procs_left == "" and run_dirs == [], (procs_left, run_dirs)


def test_the_launcher_killed_takes_the_vm_with_it(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """SIGKILL, the batch system's last resort, cannot be caught: the VM must still not outlive its launcher."""
    proc = launch(uml_user, apppot_image, uml_jobdir, "sh", "-c", "touch started; sleep 300")
    wait_for(uml_jobdir / "started", proc)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while (left := leftovers(uml_user)[0]) and time.monotonic() < deadline:
        time.sleep(0.2)  # the kernel kills UML and its helpers asynchronously: poll until they are gone
    assert left == "", f"processes outlived the launcher: {left}"
    for run_dir in leftovers(uml_user)[1]:  # documented: a launcher killed by SIGKILL leaves its per-run directory
        shutil.rmtree(run_dir)


def test_a_command_not_found_names_the_path_searched(start_job: Start, uml_jobdir: Path) -> None:
    result = start_job(uml_jobdir, "my-simulation", "--steps", "3")
    assert result.returncode == 127
    line = result.stderr.splitlines()[-1]
    assert line.startswith("apppot-start: error: my-simulation: command not found: not in PATH=/usr/local/bin:")
    assert "install it under /usr/local/bin or /opt" in line


def test_a_bad_delta_is_named_as_the_user_gave_it_once(start_job: Start, uml_jobdir: Path) -> None:
    delta = uml_jobdir / "my delta, v2.tar.zst"
    delta.write_bytes(b"this is not a delta")
    result = start_job(uml_jobdir, "touch", "ran", options=["--changes", delta])
    assert result.returncode == 125
    assert "/run/apppot/changes" not in result.stdout + result.stderr
    assert "--force" not in result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("merge") == 1, result.stdout + result.stderr
    assert f"{delta}" in result.stderr
    assert not (uml_jobdir / "ran").exists()


def test_deltas_do_not_carry_the_machine_id_and_paths_with_spaces_and_commas_work(
        uml_user: Account, apppot_image: Path, shared_jobdir: Path, start_job: Start) -> None:
    """Made in one boot, a delta is merged into two jobs: each boot has its own machine ID.  The job
    directory, the image and the delta all have white space and commas in their paths."""
    images = apppot_image.parent.parent / "shared images, ro"
    images.mkdir(mode=0o755, exist_ok=True)
    image = images / "apppot base.img"
    if not image.exists():
        os.link(apppot_image, image)
    make = ("set -e; cat /etc/machine-id > id-maker; sudo touch /etc/marker-from-delta; "
            "sudo apppot-snap changes ~/job/delta.tar.zst")
    result = start_job(shared_jobdir, "sh", "-c", make, options=["--image", image])
    assert result.returncode == 0, result.stdout + result.stderr
    listing = subprocess.run(["tar", "--zstd", "-tf", shared_jobdir / "delta.tar.zst"], capture_output=True, text=True,
                             check=True).stdout
    header = subprocess.run(["tar", "--zstd", "-xOf", shared_jobdir / "delta.tar.zst", "APPPOT-DELTA"],
                            capture_output=True, check=True).stdout
    assert b"etc/marker-from-delta" in header
    for private in ("etc/machine-id", "var/lib/dbus/machine-id", "var/lib/systemd/random-seed"):
        assert private not in listing and private.encode() not in header, private
    elsewhere = uml_user.home / "deltas, mine"
    elsewhere.mkdir(exist_ok=True)
    os.chown(elsewhere, uml_user.uid, uml_user.gid)
    delta = elsewhere / "my delta.tar.zst"
    shutil.copyfile(shared_jobdir / "delta.tar.zst", delta)
    ids = [(shared_jobdir / "id-maker").read_text().strip()]
    for n, boot in enumerate(["batch", "batch", "direct"]):
        result = start_job(shared_jobdir, "sh", "-c", f"test -e /etc/marker-from-delta && cat /etc/machine-id > id{n}",
                           options=["--image", image, "--changes", delta, "--boot", boot])
        assert result.returncode == 0, result.stdout + result.stderr
        ids.append((shared_jobdir / f"id{n}").read_text().strip())
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids), f"boots share a machine ID: {ids}"


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: there is nothing to pin")
def test_uml_and_its_helpers_run_on_one_cpu_unless_told_any(uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """The guest's system calls and page faults hand off between UML's host processes: on one CPU
    (uml_host.choose_cpu).  Every process of the VM (kernel, address spaces, I/O thread, vde_plug) is pinned;
    --cpu auto takes a CPU with the fewest AppPot VMs, so a second VM does not share the first one's core."""
    from apppot_host.uml_host import vms_per_cpu

    everywhere = cpus_allowed(os.getpid())
    allowed_cpus = os.sched_getaffinity(0)
    pinned = str(max(allowed_cpus))
    runs = {}
    for option in (pinned, "auto", "any"):  # one at a time: auto sees the first VM on its CPU
        jobdir = uml_jobdir / f"cpu-{option}"
        jobdir.mkdir()
        os.chown(jobdir, uml_user.uid, uml_user.gid)
        before = vms_per_cpu()
        proc = launch(uml_user, apppot_image, jobdir, "sh", "-c", "touch started; sleep 300", options=("--cpu", option))
        runs[option] = (proc, jobdir)
        wait_for(jobdir / "started", proc)
        uml = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True).stdout.split()
        assert len(uml) == 1, uml  # UML's main process leads its own process group: the whole VM
        group = subprocess.run(["pgrep", "-g", uml[0]], capture_output=True, text=True, check=True).stdout.split()
        threads = [int(tid) for pid in group for tid in os.listdir(f"/proc/{pid}/task")]
        allowed = {cpus_allowed(tid) for tid in threads}
        assert len(threads) >= 3, threads  # the kernel, the job's address space, the I/O thread (and vde_plug)
        if option == "any":
            assert allowed == {everywhere}, allowed
        elif option == "auto":
            assert len(allowed) == 1 and allowed_cpus >= {int(cpu) for cpu in allowed}, allowed
            cpu = int(allowed.pop())
            assert before[cpu] == min(before[c] for c in allowed_cpus), (cpu, before)
            assert before[int(pinned)] >= 1 and vms_per_cpu()[cpu] == before[cpu] + 1, (cpu, before)
        else:
            assert allowed == {option}, allowed
    for proc, _ in runs.values():
        proc.send_signal(signal.SIGTERM)
    for proc, _ in runs.values():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
