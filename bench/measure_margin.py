#!/usr/bin/python3
"""How much memory a UML process tree needs beyond its guest's memory (docs/submit.md).

    sudo python3 bench/measure_margin.py --image IMAGE [--mem 256 512 1024] [--try 16 24 32 48 64] [--procs N] [--network]

For each guest size M (MiB) it boots ``apppot-start --mem M -- FILLER`` (a
guest program that allocates and touches memory until the guest's OOM killer
stops it) inside a fresh cgroup (v1 memory controller, or v2), as a batch
system's job would run, and reports:

* the peak of the cgroup's memory that cannot be reclaimed (usage minus file
  cache: the guest's memory file in /dev/shm, UML's own pages, page tables,
  kernel memory), sampled every 50 ms, and that minus M: the margin;
* for each candidate margin m: with the cgroup's limit at M + m, whether the
  job still ends inside (exit 137, ``oom_killed`` in its record) and the
  host's OOM killer did not strike (the cgroup's oom_kill count).

Runs as root (cgroups); the job runs as ``nobody`` through a job directory
it owns.  Not a test: a measurement, written down in docs/submit.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
LAUNCHER = CHECKOUT / "apppot-start"
FILLER = "a = []\nwhile True:\n    a.append(b'x' * (8 << 20))\n"
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


class Cgroup:
    def __init__(self, name: str) -> None:
        self.v1 = (V1 / "memory.usage_in_bytes").exists()
        self.path = (V1 if self.v1 else V2) / name
        self.path.mkdir()

    def limit(self, mib: int | None) -> None:
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(mib << 20) if mib else "-1")
        else:
            (self.path / "memory.max").write_text(str(mib << 20) if mib else "max")

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in (self.path / "memory.stat").read_text().splitlines())}

    def unreclaimable(self) -> int:
        """Usage minus the file cache the kernel can drop (shmem, e.g. the guest's memory file, is not dropped)."""
        stat = self.stat()
        if self.v1:
            usage = int((self.path / "memory.usage_in_bytes").read_text())
            return usage - stat["total_inactive_file"] - stat["total_active_file"]
        usage = int((self.path / "memory.current").read_text())
        return usage - stat["inactive_file"] - stat["active_file"]

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.v1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run(image: Path, mem: int, limit: int | None, jobdir: Path, procs: int, network: bool) -> dict[str, object]:
    group = Cgroup(f"apppot-margin-{os.getpid()}-{mem}-{limit or 0}")
    # With --procs N the guest first starts N sleeping processes: each has a host process of its own in UML.
    job = ["sh", "-c", f'i=0; while [ $i -lt {procs} ]; do sleep 1000 & i=$((i+1)); done; exec python3 -c "$1"', "sh",
           FILLER]
    try:
        group.limit(limit)
        members = group.path / "cgroup.procs"
        argv = ["sh", "-c", f'echo $$ > {members} && exec "$@"', "sh", "/usr/bin/python3", os.fspath(LAUNCHER),
                "--image", os.fspath(image), "--ephemeral", *([] if network else ["--no-network"]), "--mem",
                f"{mem}M", "--jobdir", os.fspath(jobdir), "--", *job]
        for name in ("apppot.status.json", "apppot.exitcode"):
            (jobdir / name).unlink(missing_ok=True)
        peak = 0
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            while proc.poll() is None:
                peak = max(peak, group.unreclaimable())
                time.sleep(0.05)
            stderr = proc.stderr.read() if proc.stderr else ""
        status = json.loads((jobdir / "apppot.status.json").read_text()) if (jobdir / "apppot.status.json").exists() else {}
        return {"mem": mem, "limit": limit, "procs": procs, "network": network, "exit": proc.returncode,
                "oom_inside": status.get("oom_killed"),
                "host_oom_kills": group.oom_kills(), "peak_mib": round(peak / 2**20, 1),
                "margin_mib": round(peak / 2**20 - mem, 1), "stderr": stderr.strip().splitlines()[-1:]}
    finally:
        group.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--mem", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--try", dest="margins", nargs="*", type=int, default=[16, 32, 48, 64])
    parser.add_argument("--procs", type=int, default=0, help="sleeping guest processes started before the filler")
    parser.add_argument("--network", action="store_true", help="with the guest's network (vde_plug and slirp)")
    args = parser.parse_args()
    jobdir = Path(tempfile.mkdtemp(prefix="apppot-margin-"))
    os.chown(jobdir, 65534, 65534)
    try:
        for mem in args.mem:
            print(json.dumps(run(args.image, mem, None, jobdir, args.procs, args.network)), flush=True)
            for margin in args.margins:
                print(json.dumps(run(args.image, mem, mem + margin, jobdir, args.procs, args.network)), flush=True)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
