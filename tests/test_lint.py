"""ruff and mypy over the code base, with the settings in pyproject.toml (scripts/install-deps installs both)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"  # Debian's python, with Debian's python3-mypy and the pinned ruff
CHECKOUT = Path(__file__).resolve().parent.parent


def run_tool(module: str, *args: str) -> None:
    """Run ``python3 -m MODULE ARGS`` in the checkout; fail the test with the tool's report if it finds anything."""
    found = subprocess.run([PYTHON, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"],
                           check=False, capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"{module} is not installed for {PYTHON} (scripts/install-deps installs it)")
    result = subprocess.run([PYTHON, "-m", module, *args], cwd=CHECKOUT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join([module, *args])}:\n{result.stdout}{result.stderr}"


def test_ruff_finds_nothing() -> None:
    run_tool("ruff", "check", "--no-cache", "--output-format", "concise", ".")


def test_mypy_finds_nothing() -> None:
    run_tool("mypy")  # the files and settings: [tool.mypy] in pyproject.toml
