"""The guest's memory inside a Slurm allocation (apppot_host/allocation.py), and apppot-start's use of it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.errors import UsageError
from apppot_host.allocation import MARGIN_MIB, MARGIN_PERCENT, MIN_GUEST_MIB, Allocation, guest_memory, slurm_allocation
from fixtures_uml import fake_image

LAUNCHER = Path(__file__).resolve().parent.parent / "apppot-start"


@pytest.mark.parametrize(("env", "mib"), [
    ({}, None),
    ({"SLURM_MEM_PER_NODE": "2000"}, 2000),
    ({"SLURM_MEM_PER_NODE": "2000", "SLURM_MEM_PER_CPU": "100", "SLURM_CPUS_ON_NODE": "4"}, 2000),
    ({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "3"}, 3000),
    ({"SLURM_MEM_PER_CPU": "1000"}, 1000),  # one CPU when Slurm does not say
    ({"SLURM_MEM_PER_NODE": "0"}, None),  # --mem=0: the whole node, no limit to fit in
    ({"SLURM_MEM_PER_NODE": "lots"}, None),
    ({"SLURM_CPUS_ON_NODE": "8"}, None),
])
def test_the_allocation_from_slurms_environment(env: dict[str, str], mib: int | None) -> None:
    found = slurm_allocation(env)
    assert (found.mib if found else None) == mib


def test_the_guest_gets_the_allocation_minus_the_margin() -> None:
    env = {"SLURM_MEM_PER_NODE": "2000"}
    margin = MARGIN_MIB + 2000 * MARGIN_PERCENT // 100
    assert guest_memory(None, env, "1024M") == (f"{2000 - margin}M", None)
    assert Allocation(2000, "x").guest_mib == 2000 - margin


def test_outside_slurm_the_option_or_the_default() -> None:
    assert guest_memory(None, {}, "1024M") == ("1024M", None)
    assert guest_memory("2g", {}, "1024M") == ("2048M", None)
    with pytest.raises(UsageError, match="--mem lots: not a size"):
        guest_memory("lots", {}, "1024M")


def test_a_mem_that_does_not_fit_the_allocation_is_warned_about_in_one_line() -> None:
    env = {"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "1"}
    mem, warning = guest_memory("1000M", env, "1024M")
    assert mem == "1000M" and warning is not None and "\n" not in warning
    assert "exceed the Slurm allocation of 1000 MiB" in warning and "leave out --mem" in warning
    assert guest_memory("512M", env, "1024M") == ("512M", None)


def test_an_allocation_too_small_for_uml_gets_the_minimum_and_a_warning() -> None:
    mem, warning = guest_memory(None, {"SLURM_MEM_PER_NODE": "100"}, "1024M")
    assert mem == f"{MIN_GUEST_MIB}M" and warning is not None and "ask Slurm for more" in warning


def test_apppot_start_sizes_the_guest_in_a_slurm_job(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    fake_image(image)
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "SLURM_MEM_PER_NODE": "3000"}

    def mem_word(*options: str) -> tuple[str, str]:
        result = subprocess.run(["/usr/bin/python3", LAUNCHER, "--dry-run", "--image", image, "--jobdir", tmp_path,
                                 *options, "--", "true"], env=env, capture_output=True, text=True, check=True)
        word = next(w for w in json.loads(result.stdout) if w.startswith("mem="))
        return word, result.stderr

    assert mem_word()[0] == f"mem={Allocation(3000, '').guest_mib}M"
    word, stderr = mem_word("--mem", "4g")
    assert word == "mem=4096M"
    assert [line for line in stderr.splitlines() if "warning" in line] == [
        line for line in stderr.splitlines() if "exceed the Slurm allocation of 3000 MiB" in line] != []
