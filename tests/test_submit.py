"""apppot-submit without Slurm: tasks, placeholders, parameters files, refusals, the written submission,
the batch script's argv, and the status lines from Slurm's (fabricated) records and AppPot's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from apppot_guest.errors import UsageError, exit_codes_help, exit_codes_markdown
from apppot_host import submit
from apppot_host.slurm import Record, parse_sacct, parse_scontrol
from apppot_host.submit_status import Category, collect, exit_code, summary_line, table, task_status
from apppot_host.tasks import Task, array_spec, expand, parse_array, read_params
from fixtures_uml import fake_image

CHECKOUT = Path(__file__).resolve().parent.parent
SUBMIT = CHECKOUT / "apppot-submit"
PYTHON = "/usr/bin/python3"
NASTY = ["two words", "quote\"s", "it's", "$HOME", "", "ünïcödé", "back\\slash", "new\nline", "*"]


def run_submit(*args: str | os.PathLike[str], cwd: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path if path is not None else os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([PYTHON, SUBMIT, *(os.fspath(a) for a in args)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    fake_image(path)
    return path


@pytest.fixture
def fake_sbatch(tmp_path: Path) -> str:
    """A PATH whose sbatch records its arguments and answers like Slurm's (--parsable: the job id)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/sbatch.args\necho '4242;cluster'\n")
    script.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


# -- tasks and placeholders ---------------------------------------------------------------


@pytest.mark.parametrize(("spec", "tasks"), [
    ("1-6", (1, 2, 3, 4, 5, 6)), ("0", (0,)), ("0-15:4", (0, 4, 8, 12)), ("1,3,5-7", (1, 3, 5, 6, 7)),
    ("1-100%10", tuple(range(1, 101))), (" 2,1 ", (1, 2)),
])
def test_array_specs_as_slurm_writes_them(spec: str, tasks: tuple[int, ...]) -> None:
    assert parse_array(spec) == tasks
    assert parse_array(array_spec(tasks)) == tasks


@pytest.mark.parametrize("spec", ["", "a", "1-", "5-3", "1-6:0", "1-6%x", "1;2", "0-1000000000"])
def test_bad_array_specs_are_refused(spec: str) -> None:
    with pytest.raises(UsageError, match="--array"):
        parse_array(spec)


def test_array_spec_is_compact() -> None:
    assert array_spec([7, 1, 2, 3, 5, 8]) == "1-3,5,7-8"


@pytest.mark.parametrize(("word", "task", "expected"), [
    ("{task}", Task(7), "7"),
    ("out-{task}.dat", Task(12), "out-12.dat"),
    ("{{task}}", Task(7), "{task}"),
    ("${{HOME}}/{task}", Task(3), "${HOME}/3"),
    ("{1}", Task(1, "a 'b c'", ("a", "b c")), "a"),
    ("{2}-{1}", Task(1, "a 'b c'", ("a", "b c")), "b c-a"),
    ("{0}", Task(1, "a 'b c'", ("a", "b c")), "a 'b c'"),
    ("no placeholder", Task(1), "no placeholder"),
])
def test_placeholders(word: str, task: Task, expected: str) -> None:
    assert expand([word], task) == (expected,)


@pytest.mark.parametrize(("word", "task", "message"), [
    ("{1}", Task(1), "placeholder {1} in {1} has no value: {0}, {1}, ... come from a parameters file"),
    ("{3}", Task(2, "a b", ("a", "b"), 5), "placeholder {3} in {3} has no value: line 5 of the parameters file has 2"),
    ("{name}", Task(1), "placeholder {name} in {name} has no value"),
    ("${HOME}", Task(1), "placeholder {HOME} in ${HOME} has no value"),
    ("a}b", Task(1), "a single '}' in a}b: write {{ and }} for literal braces"),
    ("a{b", Task(1), "a single '{' in a{b"),
])
def test_a_placeholder_without_a_value_is_refused(word: str, task: Task, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        expand(["prog", word], task)
    assert str(caught.value).startswith(message)


def test_a_parameters_file_keeps_spaces_and_quotes(tmp_path: Path) -> None:
    params = tmp_path / "params"
    params.write_text('# size, label\n\n100 "two words" \'single "quoted"\'\n  200 it\\\'s  \n300 "" "$HOME"\n')
    tasks = read_params(params, "params")
    assert [(t.number, t.fields, t.line_number) for t in tasks] == [
        (1, ("100", "two words", 'single "quoted"'), 3),
        (2, ("200", "it's"), 4),
        (3, ("300", "", "$HOME"), 5),
    ]
    assert tasks[1].line == "200 it\\'s"


@pytest.mark.parametrize(("text", "message"), [
    ("1 'open\n", "line 1: no closing quotation"),
    ("# only a comment\n\n", "no parameters"),
    ("ok\n2 trailing\\", "line 2: no escaped character"),
])
def test_a_bad_parameters_file_is_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    params = tmp_path / "params"
    params.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_params(params, "params")


# -- the command line: refusals, dry run, what a submission writes ---------------------------------


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--", "true"], 2, "no image: give --image PATH or set APPPOT_IMAGE"),
    (["--image", "IMAGE"], 2, "no command"),
    (["--image", "IMAGE", "--", "prog", "{1}"], 2, "placeholder {1} in {1} has no value"),
    (["--image", "IMAGE", "--array", "1-3", "--", "prog", "{task"], 2, "a single '{' in {task"),
    (["--image", "IMAGE", "--array", "x", "--", "true"], 2, "--array x: x is not N, N-M or N-M:STEP"),
    (["--image", "IMAGE", "--sbatch=--array=1-3", "--", "true"], 2, "--sbatch=--array=1-3: apppot-submit sets --array"),
    (["--image", "IMAGE", "--sbatch=-o", "--", "true"], 2, "--sbatch=-o: apppot-submit sets -o itself"),
    (["--image", "IMAGE", "--mem", "lots", "--", "true"], 2, "--mem lots: not a size"),
    (["--image", "IMAGE", "--changes", "missing.tar.zst", "--", "true"], 2, "changes missing.tar.zst: No such file"),
    (["--image", "missing.img", "--", "true"], 2, "image missing.img: no such file"),
    (["--image", "taken", "--", "true"], 2, "image taken: no such file"),
    (["--image", "delta.tar.zst", "--", "true"], 2, "image delta.tar.zst: not an ext2/3/4 file system; an AppPot image is"),
    (["--image", "IMAGE", "--params", "missing", "--", "true"], 8, "cannot read the parameters file missing"),
    (["--image", "IMAGE", "--name", "taken", "--", "true"], 3, "taken already exists: give a new --name"),
    (["status", "nothing-here"], 6, "nothing-here: no submit.json: not a directory apppot-submit wrote"),
    (["resubmit", "nothing-here"], 6, "nothing-here: no submit.json"),
])
def test_refusals_are_one_line_with_their_exit_code_and_write_nothing(
        tmp_path: Path, image: Path, args: list[str], code: int, message: str) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "delta.tar.zst").write_bytes(b"(a delta given as the image)" * 100)
    before = sorted(tmp_path.rglob("*"))
    result = run_submit(*[str(image) if a == "IMAGE" else a for a in args], cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"apppot-submit: error: {message}"), result.stderr
    assert sorted(tmp_path.rglob("*")) == before and result.stdout == ""


def test_array_and_params_together_are_a_usage_error(tmp_path: Path, image: Path) -> None:
    result = run_submit("--image", image, "--array", "1-2", "--params", "p", "--", "true", cwd=tmp_path)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path: Path, image: Path) -> None:
    delta = tmp_path / "my delta.tar.zst"
    delta.write_bytes(b"delta")
    result = run_submit("--image", image, "--changes", delta, "--array", "1-3", "--name", "sweep", "--mem", "2g",
                        "--no-network", "--sbatch=--time=10", "--dry-run", "--", "prog", "{task}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "my delta.tar.zst"]
    script = result.stdout
    root = tmp_path / "sweep"
    assert script.startswith("#!/usr/bin/python3\n")
    assert (f"# Submitted as: sbatch --parsable --job-name=sweep --array=1-3 --chdir={root} "
            f"--output={root}/%a/slurm-%A_%a.out --mem=2048M --time=10 {root}/job.sbatch") in script
    assert f"LAUNCHER = {os.fspath(CHECKOUT / 'apppot-start')!r}" in script
    assert f"OPTIONS = ['--image', {os.fspath(image)!r}, '--changes', '{root}/changes.delta', '--no-network']" in script
    assert f"CHANGES_SHA256 = '{hashlib.sha256(b'delta').hexdigest()}'" in script
    compile(script, "job.sbatch", "exec")


def test_the_array_throttle_and_a_percent_in_name_reach_sbatch(tmp_path: Path, image: Path) -> None:
    result = run_submit("--image", image, "--array", "1-9:2%2", "--name", "50%", "--dry-run", "--", "true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"--array=1,3,5,7,9%2 --chdir={tmp_path}/50% --output={tmp_path}/50%%/%a/slurm-%A_%a.out" in result.stdout


def test_a_submission_is_written_before_sbatch_and_its_job_id_recorded(
        tmp_path: Path, image: Path, fake_sbatch: str) -> None:
    delta = tmp_path / "gauss.tar.zst"
    delta.write_bytes(b"the delta")
    params = tmp_path / "params"
    params.write_text('100 "first run"\n200 "it\'s the second"\n')
    result = run_submit("--image", image, "--changes", delta, "--params", params, "--name", "sweep", "--",
                        "gauss", "{1}", "--label", "{2}", "--task={task}", cwd=tmp_path, path=fake_sbatch)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "sweep"
    assert "job 4242: 2 task(s)" in result.stdout
    assert (root / "jobids").read_text() == "4242 1-2\n"
    assert json.loads((root / "1" / "argv.json").read_text()) == ["gauss", "100", "--label", "first run", "--task=1"]
    assert json.loads((root / "2" / "argv.json").read_text()) == ["gauss", "200", "--label", "it's the second", "--task=2"]
    staged = root / "changes.delta"
    assert staged.read_bytes() == b"the delta" and stat.S_IMODE(staged.stat().st_mode) == 0o444
    record = json.loads((root / "submit.json").read_text())
    assert record["changes_sha256"] == hashlib.sha256(b"the delta").hexdigest() and record["tasks"] == [1, 2]
    assert record["command"] == ["gauss", "{1}", "--label", "{2}", "--task={task}"]
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    assert args[0] == "--parsable" and "--array=1-2" in args and args[-1] == f"{root}/job.sbatch"
    again = run_submit("--image", image, "--name", "sweep", "--", "true", cwd=tmp_path, path=fake_sbatch)
    assert again.returncode == 3


def test_without_sbatch_the_submission_is_kept_for_resubmit(tmp_path: Path, image: Path) -> None:
    result = run_submit("--image", image, "--name", "sweep", "--", "true", cwd=tmp_path, path="/nonexistent")
    assert result.returncode == 5, result.stderr
    assert "sbatch: not found" in result.stderr and "apppot-submit resubmit" in result.stderr
    assert (tmp_path / "sweep" / "submit.json").is_file() and not (tmp_path / "sweep" / "jobids").exists()


def test_the_batch_script_passes_each_tasks_argv_intact_and_checks_the_delta(tmp_path: Path, image: Path) -> None:
    """The script run by hand (as another batch system would) with a launcher that prints what it got."""
    launcher = tmp_path / "fake-start"
    launcher.write_text("#!/usr/bin/python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    launcher.chmod(0o755)
    root = tmp_path / "sweep"
    (root / "3").mkdir(parents=True)
    (root / "changes.delta").write_bytes(b"delta")
    sub = submit.Submission(
        name=os.fspath(root), command=("prog",), tasks=(3,), array="3", params=None, image=os.fspath(image),
        changes="d", changes_sha256=hashlib.sha256(b"delta").hexdigest(), mem=None, no_network=True,
        start_options=("--timeout=1h",), sbatch_extra=(), launcher=os.fspath(launcher), created_at="now")
    (root / "job.sbatch").write_text(submit.render_script(sub))
    (root / "3" / "argv.json").write_text(json.dumps(["prog", *NASTY]))
    result = subprocess.run([PYTHON, root / "job.sbatch", "3"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["--image", os.fspath(image), "--changes", f"{root}/changes.delta",
                                         "--no-network", "--timeout=1h", "--jobdir", f"{root}/3", "--", "prog", *NASTY]
    (root / "changes.delta").write_bytes(b"another delta")
    result = subprocess.run([PYTHON, root / "job.sbatch"], env={"SLURM_ARRAY_TASK_ID": "3"}, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 125 and "changes.delta was changed after submission" in result.stderr


# -- Slurm's records and the status lines --------------------------------------------------

SACCT = """\
41_1|COMPLETED|0:0|00:00:05||node1
41_1.batch|COMPLETED|0:0|00:00:05|123456K|node1
41_1.extern|COMPLETED|0:0|00:00:05|900K|node1
41_2|FAILED|2:0|00:00:04||node1
41_2.batch|FAILED|2:0|00:00:04|2.5M|node1
41_3|TIMEOUT|0:0|00:01:31||node1
41_3.batch|CANCELLED|0:15|00:01:32|500K|node1
41_4|CANCELLED by 1000|0:15|00:00:09||node1
41_5|RUNNING|0:0|00:00:10||node1
41_[6-7]|PENDING|0:0|00:00:00||None assigned
"""


def test_sacct_lines_become_one_record_per_task() -> None:
    found = parse_sacct(SACCT)
    assert sorted(found) == [("41", n) for n in range(1, 8)]
    assert found[("41", 1)] == Record("41", 1, "COMPLETED", 0, 0, "00:00:05", "123456K", "node1")
    assert (found[("41", 2)].exit_code, found[("41", 2)].max_rss) == (2, "2.5M")
    assert found[("41", 3)].state == "TIMEOUT" and found[("41", 4)].state == "CANCELLED"
    assert found[("41", 7)] == Record("41", 7, "PENDING", 0, 0, "00:00:00", None, None)


SCONTROL = """\
JobId=43 ArrayJobId=41 ArrayTaskId=2 JobName=my sweep UserId=u(1000) JobState=FAILED Reason=NonZeroExitCode \
Dependency=(null) ExitCode=2:0 RunTime=00:00:04 TimeLimit=UNLIMITED NodeList=node1 BatchHost=node1 \
Command=/tmp/my sweep/job.sbatch WorkDir=/tmp/my sweep StdOut=/tmp/my sweep/2/slurm-41_2.out
JobId=44 ArrayJobId=41 ArrayTaskId=3 JobName=my sweep JobState=CANCELLED Reason=None ExitCode=0:15 RunTime=00:00:09 \
NodeList=node1
JobId=41 ArrayJobId=41 ArrayTaskId=4-5%1 JobName=my sweep JobState=PENDING Reason=JobArrayTaskLimit ExitCode=0:0 \
RunTime=00:00:00 NodeList=(null)
"""


def test_scontrol_lines_become_records_without_maxrss() -> None:
    found = parse_scontrol(SCONTROL)
    assert sorted(found) == [("41", 2), ("41", 3), ("41", 4), ("41", 5)]
    assert found[("41", 2)] == Record("41", 2, "FAILED", 2, 0, "00:00:04", None, "node1")
    assert (found[("41", 3)].state, found[("41", 3)].signal) == ("CANCELLED", 15)
    assert found[("41", 5)] == Record("41", 5, "PENDING", 0, 0, "00:00:00", None, None)


def apppot_record(code: int, outcome: str = "exited", oom: bool = False) -> dict[str, object]:
    return {"exit_code": code, "outcome": outcome, "oom_killed": oom, "wall_seconds": 3.2}


@pytest.mark.parametrize(("record", "apppot", "state", "category"), [
    (Record("41", 1, "COMPLETED", 0, 0, "00:00:05", "1K", "n"), apppot_record(0), "COMPLETED", Category.DONE),
    (Record("41", 1, "FAILED", 3, 0, "00:00:05", None, "n"), apppot_record(3), "FAILED", Category.FAILED),
    (Record("41", 1, "TIMEOUT", 0, 0, "00:01:31", None, "n"), apppot_record(143, "stopped"), "TIMEOUT", Category.FAILED),
    (Record("41", 1, "RUNNING", 0, 0, "00:00:05", None, "n"), None, "RUNNING", Category.RUNNING),
    (Record("41", 1, "PENDING", 0, 0, None, None, None), None, "PENDING", Category.PENDING),
    (None, apppot_record(0), "UNKNOWN", Category.DONE),  # Slurm forgot the job; AppPot's record says it went well
    (None, None, "UNKNOWN", Category.FAILED),
])
def test_a_tasks_category(record: Record | None, apppot: dict[str, object] | None, state: str, category: Category) -> None:
    status = task_status(1, "41", record, apppot)
    assert (status.state, status.category) == (state, category)


def test_the_status_table_and_summary_from_slurm_and_the_tasks_records(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for task, record in {1: apppot_record(0), 2: apppot_record(2), 3: apppot_record(143, "stopped"),
                         4: apppot_record(137, "killed", oom=True)}.items():
        (root / str(task)).mkdir(parents=True)
        (root / str(task) / "apppot.status.json").write_text(json.dumps(record))
    (root / "8").mkdir()
    (root / "jobids").write_text("41 1-7\n")
    records = parse_sacct(SACCT)
    records[("41", 4)] = Record("41", 4, "FAILED", 137, 0, "00:00:09", None, "node1")
    statuses = collect(root, (1, 2, 3, 4, 5, 6, 7, 8), records)
    lines = table(statuses)
    assert lines[0].split() == ["task", "state", "exit", "outcome", "wall", "maxrss", "node"]
    assert lines[1].split() == ["1", "COMPLETED", "0", "exited", "00:00:05", "123456K", "node1"]
    assert lines[2].split() == ["2", "FAILED", "2", "exited", "00:00:04", "2.5M", "node1"]
    assert lines[3].split() == ["3", "TIMEOUT", "0", "stopped", "00:01:31", "500K", "node1"]
    assert lines[4].split() == ["4", "FAILED", "137", "killed", "(oom)", "00:00:09", "-", "node1"]
    assert lines[5].split() == ["5", "RUNNING", "0", "-", "00:00:10", "-", "node1"]
    assert lines[8].split() == ["8", "NOT_SUBMITTED", "-", "-", "-", "-", "-"]
    assert summary_line(statuses) == "8 task(s): 1 done, 4 failed, 1 running, 2 pending"
    assert exit_code(statuses, 4, 1) == 4
    assert exit_code(statuses[:4], 4, 1) == 1 and exit_code(statuses[:1], 4, 1) == 0


# -- the exit codes, one table ---------------------------------------------------------


def test_the_exit_code_table_is_in_help_and_readme_and_covers_every_error() -> None:
    help_text = subprocess.run([PYTHON, SUBMIT, "--help"], capture_output=True, text=True, check=True).stdout
    assert exit_codes_help(submit.EXIT_CODES) in help_text
    assert exit_codes_markdown(submit.EXIT_CODES) in (CHECKOUT / "README.md").read_text()
    for error in (UsageError, submit.ExistsError, submit.NotASubmission, submit.slurm.SlurmError, submit.FsError):
        assert error.exit_code in dict(submit.EXIT_CODES)


def fake_tools(tmp_path: Path, **scripts: str) -> str:
    """A PATH with these commands (name: shell script body) before the system's."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize(("sacct", "asked"), [
    ("echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1", ["41", "57"]),  # no slurmdbd
    ("printf '%s\\n' '41_1|COMPLETED|0:0|00:00:05||node1'", ["57"]),  # accounting has not heard of 57 yet
])
def test_records_from_sacct_else_from_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sacct: str,
                                                asked: list[str]) -> None:
    scontrol = (f'echo "$@" >> {tmp_path}/asked; case "$4" in 41) echo "JobId=42 ArrayJobId=41 ArrayTaskId=1 '
                'JobState=COMPLETED ExitCode=0:0 RunTime=00:00:05 NodeList=node1";; 57) echo "JobId=57 ArrayJobId=57 '
                'ArrayTaskId=2-3 JobState=PENDING ExitCode=0:0 RunTime=00:00:00 NodeList=(null)";; '
                '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac')
    monkeypatch.setenv("PATH", fake_tools(tmp_path, sacct=sacct, scontrol=scontrol))
    found = submit.slurm.records(["57", "41", "99"])
    assert sorted(found) == [("41", 1), ("57", 2), ("57", 3)]
    assert found[("41", 1)].state == "COMPLETED" and found[("57", 3)].state == "PENDING"
    asked_lines = (tmp_path / "asked").read_text().split("\n")
    assert [line.split()[-1] for line in asked_lines if line] == [*asked, "99"]


def test_status_and_resubmit_through_the_command_line(tmp_path: Path, image: Path) -> None:
    """A submission with Slurm's answers fabricated: resubmit sends only the failed task, keeps its old record."""
    path = fake_tools(tmp_path, sbatch=f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args; echo 41',
                      sacct="echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1",
                      scontrol=f'cat {tmp_path}/scontrol.$4')
    assert run_submit("--image", image, "--array=1-2", "--name", "sweep", "--", "true", cwd=tmp_path,
                      path=path).returncode == 0
    (tmp_path / "scontrol.41").write_text(
        "JobId=42 ArrayJobId=41 ArrayTaskId=1 JobState=COMPLETED ExitCode=0:0 RunTime=00:00:05 NodeList=n1\n"
        "JobId=43 ArrayJobId=41 ArrayTaskId=2 JobState=FAILED ExitCode=3:0 RunTime=00:00:04 NodeList=n1\n")
    for task, code in ((1, 0), (2, 3)):
        (tmp_path / "sweep" / str(task) / "apppot.status.json").write_text(json.dumps(apppot_record(code)))
        (tmp_path / "sweep" / str(task) / "apppot.exitcode").write_text(f"{code}\n")
    status = run_submit("status", "sweep", cwd=tmp_path, path=path)
    assert status.returncode == 1 and status.stdout.splitlines()[-1] == "2 task(s): 1 done, 1 failed, 0 running, 0 pending"
    path = fake_tools(tmp_path, sbatch=f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args; echo 57')
    (tmp_path / "scontrol.57").write_text("JobId=57 ArrayJobId=57 ArrayTaskId=2 JobState=PENDING ExitCode=0:0\n")
    again = run_submit("resubmit", "sweep", cwd=tmp_path, path=path)
    assert again.returncode == 0, again.stderr
    assert "--array=2" in (tmp_path / "sbatch.args").read_text().splitlines()
    assert (tmp_path / "sweep" / "jobids").read_text() == "41 1-2\n57 2\n"
    old = tmp_path / "sweep" / "2" / "attempt-41"
    assert json.loads((old / "apppot.status.json").read_text())["exit_code"] == 3
    assert not (tmp_path / "sweep" / "2" / "apppot.status.json").exists()
    assert (tmp_path / "sweep" / "1" / "apppot.status.json").exists()
    status = run_submit("status", "sweep", "--json", cwd=tmp_path, path=path)
    assert status.returncode == 4 and json.loads(status.stdout)["summary"] == {
        "done": 1, "failed": 0, "running": 0, "pending": 1}
    nothing = fake_tools(tmp_path, scontrol="echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1")
    broken = run_submit("status", "sweep", cwd=tmp_path, path=nothing)
    assert broken.returncode == 5 and broken.stderr == (
        "apppot-submit: error: scontrol show job 41: slurm_load_jobs error: Unable to contact slurm controller\n")
