#!/usr/bin/python3
"""Boot benchmark: `apppot-start -- true` in each boot mode against the bare boot of the same kernel.

    bench/bench_boot.py [--image out/apppot.img] [--rounds 7] [--write docs/benchmarks.md]

The floor is the same kernel booting the same image (same COW set-up, memory
and console) with ``init=/bin/true``: kernel, root mount, one process, and
UML's exit when init ends; on one CPU (taskset), as apppot-start runs UML, and
also not pinned.  Each mode is measured with ``--cpu any`` too: what pinning
UML to one CPU gives.  Each round runs the floor and every case once,
interleaved, so load on the machine hits them alike; medians and the ratio to
the floor are reported, with the targets (batch <= 0.7 s, direct <= 0.4 s).

Where the time goes, per mode, from the same runs' medians: the launcher's
own start (``apppot-start --dry-run``: Python, planning), the guest's uptime
when the job starts (``cat /proc/uptime`` as the job: kernel, then systemd or
apppot-init), and the rest (the job, writing the status, power-off, UML's exit
and the launcher reading the status).  Debian's UML kernel is measured too
where it runs.  The results replace the ``<!-- boot -->`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apppot_host.uml_host import current_cpu

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
LAUNCHER = CHECKOUT / "apppot-start"
KERNEL = CHECKOUT / "out" / "linux"
DEBIAN_KERNEL = Path("/usr/bin/linux")
PYTHON = "/usr/bin/python3"
MEM = "1024M"
BEGIN, END = "<!-- boot -->", "<!-- /boot -->"
PIN = "pin"  # a case's argv[0]: run the rest with taskset on the CPU we run on
TARGETS = {"batch": 0.7, "direct": 0.4}  # seconds, median, on the 2-core reference machine
# Run by root (make bench-boot under sudo), the boots run as the sudo user (else uid 1000).
USER_ID = (int(os.environ.get("SUDO_UID") or 1000), int(os.environ.get("SUDO_GID") or 1000))


def as_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={USER_ID[0]}", f"--regid={USER_ID[1]}", "--clear-groups", *argv]


def pinned(argv: list[str]) -> list[str]:
    """A bare UML boot on one CPU, as apppot-start runs UML (--cpu auto: the CPU it runs on)."""
    return ["taskset", "-c", str(current_cpu()), *argv]


def timed(argv: list[str], cwd: Path, *, any_exit: bool = False) -> tuple[float, str]:
    argv = as_user(pinned(argv[1:]) if argv[0] == PIN else argv)
    start = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    elapsed = time.monotonic() - start
    if result.returncode != 0 and not any_exit:
        sys.exit(f"bench_boot: error: {' '.join(argv[:6])} ... exited {result.returncode}:\n"
                 f"{result.stdout.decode(errors='replace')[-1500:]}{result.stderr.decode(errors='replace')[-1500:]}")
    return elapsed, result.stdout.decode(errors="replace")


def floor_argv(kernel: Path, image: Path, work: Path) -> list[str]:
    return [os.fspath(kernel), f"ubd0={work / 'floor.cow'},{image}", "root=/dev/ubda", f"mem={MEM}", f"uml_dir={work}",
            "con0=fd:0,fd:1", "con=null", "ssl=null", "loglevel=3", "init=/bin/true"]


def cases(image: Path, work: Path, debian: bool) -> dict[str, tuple[list[str], bool]]:
    """name -> (argv, any exit code is fine)"""
    start = [PYTHON, os.fspath(LAUNCHER), "--image", os.fspath(image), "--ephemeral", "--mem", MEM, "--jobdir", os.fspath(work)]
    plan = {
        "floor: the same kernel, init=/bin/true, on one CPU": ([PIN, *floor_argv(KERNEL, image, work)], True),
        "floor, not pinned: the same kernel, init=/bin/true": (floor_argv(KERNEL, image, work), True),
        "launcher alone: apppot-start --dry-run -- true": ([*start, "--dry-run", "--", "true"], False),
        "batch: apppot-start -- true": ([*start, "--", "true"], False),
        "batch, job start: apppot-start -- cat /proc/uptime": ([*start, "--", "cat", "/proc/uptime"], False),
        "batch --no-network: apppot-start --no-network -- true": ([*start, "--no-network", "--", "true"], False),
        "direct: apppot-start --boot direct -- true": ([*start, "--boot", "direct", "--", "true"], False),
        "direct, job start: apppot-start --boot direct -- cat /proc/uptime":
            ([*start, "--boot", "direct", "--", "cat", "/proc/uptime"], False),
        "full: apppot-start --boot full -- true": ([*start, "--boot", "full", "--", "true"], False),
        "batch, not pinned: apppot-start --cpu any -- true": ([*start, "--cpu", "any", "--", "true"], False),
        "direct, not pinned: apppot-start --cpu any --boot direct -- true":
            ([*start, "--cpu", "any", "--boot", "direct", "--", "true"], False),
    }
    if debian:
        plan["Debian's UML kernel, floor: init=/bin/true, on one CPU"] = ([PIN, *floor_argv(DEBIAN_KERNEL, image, work)], True)
        plan["Debian's UML kernel, batch: apppot-start --linux /usr/bin/linux --no-network -- true"] = (
            [*start, "--linux", os.fspath(DEBIAN_KERNEL), "--no-network", "--", "true"], False)
    return plan


def debian_kernel_runs(image: Path, work: Path) -> bool:
    """Debian's UML runs here (not on CPUs with AMX, where it panics at the first process)."""
    if not DEBIAN_KERNEL.exists():
        return False
    start = [PYTHON, os.fspath(LAUNCHER), "--image", os.fspath(image), "--ephemeral", "--jobdir", os.fspath(work)]
    result = subprocess.run(as_user([*start, "--linux", os.fspath(DEBIAN_KERNEL), "--no-network", "--", "true"]),
                            cwd=work, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    return result.returncode == 0


def run_rounds(image: Path, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    times: dict[str, list[float]] = {}
    uptimes: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="apppot-bench-boot-") as tmp:
        work = Path(tmp)
        if os.geteuid() == 0:
            os.chown(work, *USER_ID)
        plan = cases(image, work, debian_kernel_runs(image, work))
        for argv, any_exit in plan.values():  # warm the page cache once, untimed
            timed(argv, work, any_exit=any_exit)
            (work / "floor.cow").unlink(missing_ok=True)
        for n in range(rounds):
            for name, (argv, any_exit) in plan.items():
                elapsed, out = timed(argv, work, any_exit=any_exit)
                times.setdefault(name, []).append(elapsed)
                if "/proc/uptime" in name:
                    uptimes.setdefault(name, []).append(float(out.split()[0]))
                (work / "floor.cow").unlink(missing_ok=True)
            print(f"bench_boot: round {n + 1}/{rounds} done", file=sys.stderr)
    return times, uptimes


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(times: dict[str, list[float]], uptimes: dict[str, list[float]], image: Path, rounds: int) -> str:
    med = {name: statistics.median(t) for name, t in times.items()}
    names = list(times)
    floor = med[names[0]]
    version = (KERNEL.with_name("linux.version").read_text().strip() if KERNEL.with_name("linux.version").exists()
               else "AppPot's kernel")
    lines = [
        BEGIN,
        "## Boot: `apppot-start -- true` against the bare boot of the same kernel",
        "",
        f"Measured by `bench/bench_boot.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu_model()}, "
        f"{os.cpu_count()} CPUs, host Linux {platform.release()}; kernel {version}; image `{image.name}` "
        f"({image.stat().st_blocks * 512 // 2**20} MiB used), mem={MEM}, per-run COW file, run as uid "
        f"{USER_ID[0] if os.geteuid() == 0 else os.geteuid()}. {rounds} rounds, the cases interleaved in each round; "
        "wall time of the whole command.",
        "",
        "| case | median s | min s | max s | × floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        t = times[name]
        lines.append(f"| {name} | {med[name]:.2f} | {min(t):.2f} | {max(t):.2f} | {med[name] / floor:.2f} |")
    launcher = med[next(n for n in names if n.startswith("launcher alone"))]
    lines += ["", "Where the time of `apppot-start -- true` goes (medians):", "",
              "| mode | total s | launcher start s | guest boot to the job s | job, status, power-off, exit s |",
              "|---|---:|---:|---:|---:|"]
    for mode in ("batch", "direct"):
        total = next(med[n] for n in names if n.startswith(f"{mode}: "))
        up_name = next(n for n in names if n.startswith(f"{mode}, job start"))
        to_job = statistics.median(uptimes[up_name])
        lines.append(f"| {mode} | {total:.2f} | {launcher:.2f} | {to_job:.2f} | {total - launcher - to_job:.2f} |")
    lines.append("")
    for mode, target in TARGETS.items():
        total = next(med[n] for n in names if n.startswith(f"{mode}: "))
        verdict = "meets" if total <= target else "MISSES"
        lines.append(f"- {mode}: {total:.2f} s median, {total / floor:.1f}× the floor: {verdict} the target of ≤ {target} s.")
    if not any(n.startswith("Debian") for n in names):
        lines.append("- Debian's UML kernel: not installed or cannot run on this CPU (not measured).")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the part of ``path`` between ``begin`` and ``end`` (or append it), atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_boot", description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=CHECKOUT / "out" / "apppot.img")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace the boot section of FILE (docs/benchmarks.md)")
    args = parser.parse_args()
    if not args.image.is_file():
        sys.exit(f"bench_boot: error: no image {args.image} (make image)")
    if not KERNEL.is_file() or shutil.which("vde_plug") is None:
        sys.exit("bench_boot: error: no out/linux or no vde_plug (make kernel; scripts/install-deps)")
    times, uptimes = run_rounds(args.image.resolve(), args.rounds)
    section = report(times, uptimes, args.image, args.rounds)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
