"""apppot-submit under a real Slurm (tests/fixtures_slurm.py), run as an ordinary user: job arrays of AppPot
jobs, each task in its own directory; Slurm's record and `apppot-submit status` agree; parameters reach argv
intact; time limits, scancel and the guest's memory inside the allocation; resubmitting only failed tasks."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apppot_guest.account import Account
from apppot_host.allocation import Allocation
from fixtures_slurm import SlurmCluster
from fixtures_uml import CHECKOUT, PYTHON, as_user

pytestmark = pytest.mark.integration

SUBMIT = CHECKOUT / "apppot-submit"
DEADLINE = 300.0  # seconds for a submission to finish; none here comes near it but the time-limit one (~100 s)
# A guest program that allocates and touches memory until the guest's OOM killer stops it.
FILLER = "a = []\nwhile True:\n    a.append(b'x' * (8 << 20))\n"


def apppot_submit(cluster: SlurmCluster, user: Account, cwd: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    argv = as_user(user, ["env", f"SLURM_CONF={cluster.conf}", PYTHON, SUBMIT, *args])
    return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)


def submitted(cluster: SlurmCluster, user: Account, cwd: Path, *args: str | os.PathLike[str]) -> str:
    """Submit (as the user, with --no-network: no test needs it); the new array's job id."""
    result = apppot_submit(cluster, user, cwd, "--no-network", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    name = next(str(a) for a in args if str(a).startswith("--name=")).partition("=")[2]
    return (cwd / name / "jobids").read_text().splitlines()[-1].split()[0]


def wait_finished(cluster: SlurmCluster, user: Account, cwd: Path, name: str) -> tuple[int, dict[str, Any]]:
    """Poll `apppot-submit status --json` (with a deadline) until no task is pending or running."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = apppot_submit(cluster, user, cwd, "status", name, "--json")
        assert result.returncode in (0, 1, 4), result.stderr
        if result.returncode != 4:
            return result.returncode, json.loads(result.stdout)
        assert time.monotonic() < deadline, f"{name} did not finish:\n{result.stdout}"
        time.sleep(1)  # polling Slurm for a condition, with a deadline


def by_task(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(t["task"]): t for t in status["tasks"]}


def slurm_records(cluster: SlurmCluster, job_id: str) -> dict[int, dict[str, str]]:
    """Slurm's own job-completion records of the array ``job_id``, by task."""
    return {int(r["ArrayTaskId"]): r for r in cluster.records() if r.get("ArrayJobId") == job_id}


def uml_processes(uid: int, kernel: Path) -> list[int]:
    """The PIDs of ``uid``'s processes that run the UML kernel (the VM and its helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and os.readlink(entry / "exe") == os.fspath(kernel):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_an_array_of_six_each_task_in_its_own_directory_with_its_own_exit_code(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    job = submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", "--array=0-5", "--name=six", "--",
                    "sh", "-c", "echo task {task} > out.txt; echo task {task}; exit {task}")
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "six")
    assert code == 1 and status["summary"] == {"done": 1, "failed": 5, "running": 0, "pending": 0}, status
    records = slurm_records(slurm_cluster, job)
    tasks = by_task(status)
    for task in range(6):
        assert records[task]["ExitCode"] == f"{task}:0", records[task]
        assert records[task]["JobState"] == ("COMPLETED" if task == 0 else "FAILED")
        assert (tasks[task]["exit_code"], tasks[task]["state"], tasks[task]["outcome"]) == (
            task, "COMPLETED" if task == 0 else "FAILED", "exited"), tasks[task]
        task_dir = uml_jobdir / "six" / str(task)
        assert (task_dir / "out.txt").read_text() == f"task {task}\n"
        assert (task_dir / f"slurm-{job}_{task}.out").read_text().splitlines()[-1] == f"task {task}"
        assert json.loads((task_dir / "apppot.status.json").read_text())["exit_code"] == task
    text = apppot_submit(slurm_cluster, uml_user, uml_jobdir, "status", "six")
    lines = text.stdout.splitlines()
    assert text.returncode == 1 and lines[-1] == "6 task(s): 1 done, 5 failed, 0 running, 0 pending"
    assert [line.split()[:4] for line in lines[1:7]] == [
        [str(t), "COMPLETED" if t == 0 else "FAILED", str(t), "exited"] for t in range(6)]


PARAMS = """\
# four fields a line: number, words, more words, the rest
1 "two words" 'single "double" inside' plain
2 "it's `date` $HOME" "" '*'
3 ünïcödé 'back\\slash' "a;b|c&d *"
"""


def test_a_parameters_file_with_spaces_and_quotes_reaches_each_tasks_argv_intact(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    params = uml_jobdir / "runs.txt"
    params.write_text(PARAMS, encoding="utf-8")
    submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", f"--params={params}", "--name=params",
              "--", "python3", "-c", "import json, sys; json.dump(sys.argv[1:], open('args.json', 'w'))",
              "{1}", "{2}", "{3}", "{4}", "line: {0}")
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "params")
    assert code == 0, status
    lines = [line for line in PARAMS.splitlines() if not line.startswith("#")]
    for task, line in enumerate(lines, 1):
        got = json.loads((uml_jobdir / "params" / str(task) / "args.json").read_text(encoding="utf-8"))
        assert got == [*shlex.split(line), f"line: {line}"], (task, got)


def test_a_task_over_its_time_limit_is_timeout_and_resubmit_runs_only_the_failed_tasks(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """Task 1 succeeds, 2 exits 3, 3 sleeps past Slurm's limit; with their inputs fixed, only 2 and 3 run again."""
    script = "if [ -e fixed ]; then echo fixed; exit 0; fi; case {task} in 1) exit 0;; 2) exit 3;; *) sleep 600;; esac"
    first = submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", "--array=1-3", "--name=limits",
                      "--sbatch=--time=1", "--", "sh", "-c", script)
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "limits")
    tasks = by_task(status)
    assert code == 1 and [tasks[t]["state"] for t in (1, 2, 3)] == ["COMPLETED", "FAILED", "TIMEOUT"], status
    assert (tasks[2]["exit_code"], tasks[3]["outcome"]) == (3, "stopped"), status
    assert slurm_records(slurm_cluster, first)[3]["JobState"] == "TIMEOUT"
    root = uml_jobdir / "limits"
    task1_record = (root / "1" / "apppot.status.json").read_bytes()
    for task in (2, 3):
        (root / str(task) / "fixed").touch()
    result = apppot_submit(slurm_cluster, uml_user, uml_jobdir, "resubmit", "limits")
    assert result.returncode == 0, result.stderr
    second = (root / "jobids").read_text().splitlines()[-1].split()[0]
    assert (root / "jobids").read_text() == f"{first} 1-3\n{second} 2-3\n"
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "limits")
    tasks = by_task(status)
    assert code == 0 and [tasks[t]["job_id"] for t in (1, 2, 3)] == [first, second, second], status
    assert sorted(slurm_records(slurm_cluster, second)) == [2, 3]
    assert (root / "1" / "apppot.status.json").read_bytes() == task1_record
    assert sorted(p.name for p in (root / "1").glob("slurm-*.out")) == [f"slurm-{first}_1.out"]
    for task, old_outcome in ((2, "exited"), (3, "stopped")):
        old = json.loads((root / str(task) / f"attempt-{first}" / "apppot.status.json").read_text())
        assert old["outcome"] == old_outcome, old
        assert (root / str(task) / f"slurm-{second}_{task}.out").read_text().splitlines()[-1] == "fixed"


def test_a_guest_filling_its_memory_is_oom_killed_inside_an_allocation_sized_by_the_launcher(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """Slurm limits each job's memory with its cgroup (fixtures_slurm).  Sized by the launcher, the guest runs out
    inside and its own OOM killer stops the job; given more than the allocation (--mem), UML is killed from outside
    (Slurm: OUT_OF_MEMORY, no record).  The guest's memory file is on a tmpfs, where its pages count as memory."""
    tmpfs = "--sbatch=--export=ALL,TMPDIR=/dev/shm"  # else Slurm's TMPDIR=/tmp: on disk here, see docs/submit.md
    job = submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", "--mem=600M", "--name=oom",
                    "--start=--verbose", tmpfs, "--", "python3", "-c", FILLER)
    whole = submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", "--mem=600M", "--name=whole",
                      "--start=--mem=800M", tmpfs, "--", "python3", "-c", FILLER)
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "oom")
    task = by_task(status)[1]
    assert code == 1 and (task["exit_code"], task["outcome"], task["oom_killed"]) == (137, "killed", True), task
    assert (task["state"], slurm_records(slurm_cluster, job)[1]["ExitCode"]) == ("FAILED", "137:0"), task
    record = json.loads((uml_jobdir / "oom" / "1" / "apppot.status.json").read_text())
    assert record["oom_killed"] and record["signal"] == 9, record
    guest = Allocation(600, "").guest_mib
    output = (uml_jobdir / "oom" / "1" / f"slurm-{job}_1.out").read_text(errors="replace")
    assert f"guest memory {guest} MiB: the Slurm allocation (SLURM_MEM_PER_NODE=600) minus" in output
    assert f" mem={guest}M " in output  # the UML command line apppot-start logs with --verbose
    assert "(oom)" in apppot_submit(slurm_cluster, uml_user, uml_jobdir, "status", "oom").stdout
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "whole")
    if not slurm_cluster.memory_limited:
        pytest.skip("the oom_killed guest passed; Slurm limits no job's memory here (no cgroup v1 memory controller)")
    task = by_task(status)[1]
    assert code == 1 and task["state"] == "OUT_OF_MEMORY" and task["outcome"] is None, task
    assert not (uml_jobdir / "whole" / "1" / "apppot.status.json").exists()
    output = (uml_jobdir / "whole" / "1" / f"slurm-{whole}_1.out").read_text(errors="replace")
    assert "warning: --mem 800M and" in output and "exceed the Slurm allocation of 600 MiB" in output


def test_scancel_of_a_running_task_is_cancelled_in_slurm_and_in_its_record_and_leaves_no_uml(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path, uml_kernel: Path) -> None:
    job = submitted(slurm_cluster, uml_user, uml_jobdir, f"--image={apppot_image}", "--name=cancel", "--",
                    "sh", "-c", "touch started; sleep 600")
    started = uml_jobdir / "cancel" / "1" / "started"
    deadline = time.monotonic() + DEADLINE
    while not started.exists():
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.5)  # polling for the job's own sign of life, with a deadline
    assert uml_processes(uml_user.uid, uml_kernel), "the VM runs while the task runs"
    cancel = subprocess.run(as_user(uml_user, ["env", f"SLURM_CONF={slurm_cluster.conf}", "scancel", job]),
                            capture_output=True, text=True, check=False)
    assert cancel.returncode == 0, cancel.stderr
    record_path = uml_jobdir / "cancel" / "1" / "apppot.status.json"
    while not record_path.exists():  # apppot-start writes it once the VM has stopped
        assert time.monotonic() < deadline, "no status record after scancel"
        time.sleep(0.5)  # polling for the record, with a deadline
    code, status = wait_finished(slurm_cluster, uml_user, uml_jobdir, "cancel")
    task = by_task(status)[1]
    assert code == 1 and (task["state"], task["outcome"]) == ("CANCELLED", "stopped"), status
    record = json.loads(record_path.read_text())
    assert (record["outcome"], record["exit_code"]) == ("stopped", 143), record
    assert uml_processes(uml_user.uid, uml_kernel) == []


def test_the_worked_example_runs_as_a_slurm_array_and_every_task_passes_its_residual_check(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    work = uml_jobdir / "gauss work"  # a path with a space, as users have them: sbatch's --chdir and --output too
    example = CHECKOUT / "examples" / "gauss" / "run-example"
    result = subprocess.run(as_user(uml_user, ["env", f"SLURM_CONF={slurm_cluster.conf}", "sh", example, apppot_image,
                                               work, "60:1", "150:2", "300:3"]),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a Slurm job array" in result.stdout
    runs = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert [line.partition(" scaled_residual=")[0] for line in runs] == [
        "run 60-1: exit 0: n=60 seed=1", "run 150-2: exit 0: n=150 seed=2", "run 300-3: exit 0: n=300 seed=3"]
    assert "3 task(s): 3 done, 0 failed, 0 running, 0 pending" in result.stdout
    for task, n in ((1, "60"), (2, "150"), (3, "300")):
        record = json.loads((work / "sweep" / str(task) / "apppot.status.json").read_text())
        assert (record["exit_code"], record["command"]) == (0, ["gauss", n, str(task)]), record
