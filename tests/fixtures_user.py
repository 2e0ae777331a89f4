"""A temporary unprivileged account on the test machine (the tests run as root), removed afterwards."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot_guest.account import Account


def require_root(why: str) -> None:
    """Skip the running test, saying ``why`` it needs root, unless it runs as root (as CI runs the suite)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def free_id(start: int = 23000) -> int:
    """A number that is neither a uid nor a gid on this machine, drawn at random above ``start``: two test
    runs on one machine (two checkouts) must not pick the same one, since each kills its ids' processes
    when it is done (an id that is not in passwd is not reserved by using it)."""
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    free = [n for n in range(start, start + 20000) if n not in used]
    return random.SystemRandom().choice(free)


@pytest.fixture(scope="session")
def shared_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="apppot-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temporary_user(prefix: str, home: Path) -> Iterator[Account]:
    """A real account with its own group and its home at ``home``; removed, with its processes, afterwards."""
    require_root("it creates a temporary user")
    ident = free_id()
    name = f"{prefix}{ident}"
    subprocess.run(["groupadd", "--gid", str(ident), name], check=True)
    subprocess.run(
        ["useradd", "--uid", str(ident), "--gid", str(ident), "--home-dir", str(home), "--create-home",
         "--shell", "/bin/sh", name],
        check=True,
    )
    try:
        yield Account(name, ident, name, ident, home, "/bin/sh", ())
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(ident)], check=False)
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", name], check=False, stderr=subprocess.DEVNULL)  # userdel may have removed it


@pytest.fixture(scope="session")
def job_user(shared_tmp: Path) -> Iterator[Account]:
    """A real account (own group, home under a temporary directory) to run jobs as."""
    with temporary_user("apppot-t", shared_tmp / "job-user") as account:
        yield account


@pytest.fixture
def job_dir(job_user: Account, shared_tmp: Path) -> Path:
    """An empty directory the job's user owns, reachable by that user."""
    path = Path(tempfile.mkdtemp(prefix="job-", dir=shared_tmp))
    os.chown(path, job_user.uid, job_user.gid)
    return path
