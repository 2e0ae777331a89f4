"""AppPot jobs under a real Slurm (tests/fixtures_slurm.py): Slurm sees ordinary jobs whose exit codes
are the jobs' own, also when every task of an array runs in the same submit directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.account import Account
from fixtures_slurm import SlurmCluster
from fixtures_uml import LAUNCHER, PYTHON, as_user

pytestmark = pytest.mark.integration

TASKS = 6


def test_an_array_of_apppot_jobs_in_one_directory_each_reports_its_own_exit_code(
        slurm_cluster: SlurmCluster, uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    """Every task of an array starts in the submit directory, which is then every task's job directory:
    Slurm must record exit code i for task i (a task reading another's status record would not)."""
    script = uml_jobdir / "array.sh"
    script.write_text(f"""#!/bin/sh
#SBATCH --array=1-{TASKS}
#SBATCH --output=task-%a.out
#SBATCH --mem-per-cpu=2000M
# The task's number is expanded here, on the host: the guest has no Slurm environment.
exec {PYTHON} {LAUNCHER} --image {apppot_image} --no-network -- \\
    sh -c "sleep $((SLURM_ARRAY_TASK_ID % 3)); echo task $SLURM_ARRAY_TASK_ID; exit $SLURM_ARRAY_TASK_ID"
""")
    os.chown(script, uml_user.uid, uml_user.gid)
    submit = as_user(uml_user, ["env", f"SLURM_CONF={slurm_cluster.conf}", "sbatch", "--wait", "--parsable", script])
    result = subprocess.run(submit, cwd=uml_jobdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=900, check=False)
    array_id = result.stdout.strip().split(";")[0]
    assert array_id.isdigit(), result.stdout + result.stderr
    records = {int(r["ArrayTaskId"]): r for r in slurm_cluster.records() if r.get("ArrayJobId") == array_id}
    assert sorted(records) == list(range(1, TASKS + 1)), records
    for task, record in records.items():
        output = (uml_jobdir / f"task-{task}.out").read_text()
        assert (record["ExitCode"], record["JobState"]) == (f"{task}:0", "FAILED"), (task, record, output)
        assert output.splitlines()[-1] == f"task {task}", output
