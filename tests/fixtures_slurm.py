"""A real single-node Slurm (Debian's slurm-wlm and munge) on 127.0.0.1, started for the session.

``slurm_cluster`` writes a throw-away ``slurm.conf`` and munge key in a temporary
directory, starts ``munged``, ``slurmctld`` and ``slurmd`` (as root, on free
loopback ports), waits until the node is idle, and at the end stops each by
the PID in its pid file.  Slurm records every finished job in a job-completion
file (``jobcomp/filetxt``): ``records()`` reads it, Slurm's own word on each
job's state and exit code.  Where the host has cgroup v1's memory controller,
each job's memory is limited by its cgroup (task/cgroup), as on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 60.0  # seconds for the node to become idle
NODE_MEMORY_MB = 8000
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order
MEMORY_CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class SlurmCluster:
    root: Path
    conf: Path
    memory_limited: bool = MEMORY_CGROUP_V1  # each job's memory limited by its cgroup (task/cgroup)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": os.fspath(self.conf)}

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=False, timeout=60)

    def records(self) -> list[dict[str, str]]:
        """Slurm's job-completion records, one dict per finished job (array tasks each have their own)."""
        path = self.root / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(field.partition("=")[::2] for field in line.split(" ") if "=" in field)
                for line in path.read_text().splitlines() if line.strip()]


def write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# A throw-away single-node Slurm for AppPot's tests (tests/fixtures_slurm.py).
ClusterName=apppottest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/{"cgroup" if MEMORY_CGROUP_V1 else "linuxproc"}
TaskPlugin=task/{"cgroup" if MEMORY_CGROUP_V1 else "none"}
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
MinJobAge=3600
ReturnToService=2
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    # Each job's memory is limited by its cgroup, as on a real cluster: a job that uses more than it asked
    # for is killed by the kernel on Slurm's behalf (OUT_OF_MEMORY).  Only with cgroup v1's memory controller:
    # Slurm 22.05's cgroup/v2 wants slurmd under systemd, which this fixture does not use.
    if MEMORY_CGROUP_V1:
        (root / "cgroup.conf").write_text("""\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
AllowedSwapSpace=0
""")
    return conf


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie that no init reaps has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop(root: Path) -> None:
    """Stop every daemon by the PID it wrote, and wait until it is gone."""
    for name in DAEMONS:
        try:
            pid = int((root / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for its end, with a deadline
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}: scripts/install-deps installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs as their users")
    root = Path(tempfile.mkdtemp(prefix="apppot-slurm-"))  # users read slurm.conf: not under root's pytest dir
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = SlurmCluster(root, write_conf(root))
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"],
                       check=True, capture_output=True)
        (root / "munge.socket").chmod(0o777)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon], env={**os.environ, **cluster.env}, check=True, capture_output=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while cluster.run("sinfo", "--noheader", "--format=%t").stdout.strip() != "idle":
            assert time.monotonic() < deadline, f"the Slurm node did not become idle:\n{(root / 'slurmd.log').read_text()[-2000:]}"
            time.sleep(0.2)  # polling a condition, with a deadline
        yield cluster
    finally:
        stop(root)
        shutil.rmtree(root, ignore_errors=True)
