"""Running apppot-snap as a user does: a separate process, its stdout, stderr and exit code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def default_sigint() -> None:
    """In a child about to exec: Ctrl-C's SIGINT as a terminal delivers it, also when the test run itself ignores
    it (a non-interactive shell starts background jobs with SIGINT ignored, and Python keeps that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snap(*args: str | os.PathLike[str], env: dict[str, str] | None = None, check: int | None = 0,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``apppot-snap ARGS``; assert the exit code is ``check`` (None: any)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "APPPOT_SNAP_NO_SUDO": "1", **(env or {})}
    result = subprocess.run(
        [PYTHON, "-m", "apppot_guest.snap", *(os.fspath(a) for a in args)],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, stdin=subprocess.DEVNULL, check=False,
    )
    if check is not None:
        assert result.returncode == check, f"exit {result.returncode}, wanted {check}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The failure is reported as exactly one 'apppot-snap: error:' line naming what is wrong."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apppot-snap: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", "--", os.fspath(src), os.fspath(dst)], check=True)
    return dst


def status_lines(root: Path) -> list[str]:
    return snap("--root", root, "status").stdout.splitlines()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
