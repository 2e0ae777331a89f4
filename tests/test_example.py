"""The worked example (examples/gauss): a numerical code built inside the image, saved in a delta,
and run as jobs on the pristine image, each checking its own residual.  Real UML, as a user."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.account import Account
from fixtures_uml import CHECKOUT, as_user

pytestmark = pytest.mark.integration

RUN_EXAMPLE = CHECKOUT / "examples" / "gauss" / "run-example"


def test_the_worked_example_builds_once_and_every_run_passes_its_residual_check(
        uml_user: Account, apppot_image: Path, uml_jobdir: Path) -> None:
    work = uml_jobdir / "gauss work"  # a path with a space, as users have them
    result = subprocess.run(as_user(uml_user, ["sh", RUN_EXAMPLE, apppot_image, work, "60:1", "150:2", "0:3"]),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900, check=False)
    # 0:3 is a bad argument: that run fails with gauss's own exit code 2, and so does the example.
    assert result.returncode == 1, result.stdout + result.stderr
    runs = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert runs[0].startswith("run 60-1: exit 0: n=60 seed=1 scaled_residual=")
    assert runs[1].startswith("run 150-2: exit 0: n=150 seed=2 scaled_residual=")
    # The guest has one console: the job's stderr arrives on the launcher's stdout too.
    assert runs[2] == "run 0-3: exit 2: gauss: error: N must be an integer from 1 to 20000: 0 (usage: gauss N SEED)"
    assert result.stdout.splitlines()[-1] == "== 4. 3 runs, 1 failed"
    for name, code in (("60-1", 0), ("150-2", 0), ("0-3", 2)):
        record = json.loads((work / "runs" / name / "apppot.status.json").read_text())
        assert (record["exit_code"], record["command"][0]) == (code, "gauss"), record
    assert not (work / "desktop.img").exists()
    assert os.stat(work / "src" / "gauss.tar.zst").st_uid == uml_user.uid
