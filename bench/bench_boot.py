#!/usr/bin/python3
"""Boot benchmark: `apppot-start -- true` against the floor of booting the same image with init=/bin/sh.

    bench/bench_boot.py [--image out/apppot.img] [--rounds 5] [--write docs/benchmarks.md]

The floor is the bare UML boot of the same image (same COW set-up, memory and
console) with ``init=/bin/sh -c "poweroff -f"``: kernel, root mount, one
process, power-off.  Each round runs the floor and every apppot-start boot
mode once, interleaved, so load on the machine hits them alike; medians and
the ratio to the floor are reported (target: batch <= 3x the floor).  The
results replace the ``<!-- boot -->`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
LAUNCHER = CHECKOUT / "scripts" / "apppot-start"
PYTHON = "/usr/bin/python3"
MEM = "1024M"
BEGIN, END = "<!-- boot -->", "<!-- /boot -->"
TARGET_RATIO = 3.0
# Run by root (make bench-boot under sudo), the boots run as the sudo user (else uid 1000).
USER_ID = (int(os.environ.get("SUDO_UID") or 1000), int(os.environ.get("SUDO_GID") or 1000))


def floor_argv(image: Path, cow: Path) -> list[str]:
    # uml_dir as apppot-start passes it: UML panics when it cannot write ~/.uml.
    return ["linux", f"ubd0={cow},{image}", "root=/dev/ubda", f"mem={MEM}", f"uml_dir={cow.parent}", "con0=fd:0,fd:1",
            "con=null", "ssl=null", "loglevel=3", "init=/bin/sh", "--", "-c", '"poweroff -f"']


def as_user(argv: list[str]) -> list[str]:
    """Run by root (make bench-boot under sudo), boot as the sudo user (else uid 1000), as users do."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={USER_ID[0]}", f"--regid={USER_ID[1]}", "--clear-groups", *argv]


def timed(argv: list[str], cwd: Path) -> float:
    argv = as_user(argv)
    start = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"bench_boot: error: {' '.join(argv[:3])} ... exited {result.returncode}:\n"
                 f"{result.stdout.decode(errors='replace')[-1500:]}{result.stderr.decode(errors='replace')[-1500:]}")
    return elapsed


def cases(image: Path, work: Path) -> dict[str, list[str]]:
    start = [PYTHON, os.fspath(LAUNCHER), "--image", os.fspath(image), "--ephemeral", "--mem", MEM, "--jobdir", os.fspath(work)]
    return {
        "floor: init=/bin/sh, poweroff": floor_argv(image, work / "floor.cow"),
        "apppot-start -- true (batch: systemd, apppot-batch.target)": [*start, "--", "true"],
        "apppot-start --no-network -- true (batch)": [*start, "--no-network", "--", "true"],
        "apppot-start --boot direct -- true (apppot-init as PID 1)": [*start, "--boot", "direct", "--", "true"],
        "apppot-start --boot full -- true (systemd default.target)": [*start, "--boot", "full", "--", "true"],
    }


def run_rounds(image: Path, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="apppot-bench-boot-") as tmp:
        work = Path(tmp)
        if os.geteuid() == 0:
            os.chown(work, *USER_ID)
        plan = cases(image, work)
        for name, argv in plan.items():  # warm the page cache once, untimed
            timed(argv, work)
            (work / "floor.cow").unlink(missing_ok=True)
        for n in range(rounds):
            for name, argv in plan.items():
                times.setdefault(name, []).append(timed(argv, work))
                (work / "floor.cow").unlink(missing_ok=True)
            print(f"bench_boot: round {n + 1}/{rounds} done", file=sys.stderr)
    return times


def report(times: dict[str, list[float]], image: Path, rounds: int) -> str:
    names = list(times)
    floor = statistics.median(times[names[0]])
    lines = [
        BEGIN,
        "## Boot: `apppot-start -- true` against the bare UML boot",
        "",
        f"Measured by `bench/bench_boot.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, {platform.release()}, Debian's UML kernel, image `{image.name}` "
        f"({image.stat().st_blocks * 512 // 2**20} MiB used), mem={MEM}, per-run COW file, run as uid {USER_ID[0] if os.geteuid() == 0 else os.geteuid()}. "
        f"{rounds} rounds, the cases interleaved in each round; wall time of the whole command.",
        "",
        "| case | median s | min s | max s | × floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        t = times[name]
        lines.append(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {statistics.median(t) / floor:.2f} |")
    batch = statistics.median(times[names[1]]) / floor
    verdict = "meets" if batch <= TARGET_RATIO else "MISSES"
    lines += ["", f"Default (batch) boot: {batch:.2f}× the floor — {verdict} the target of ≤ {TARGET_RATIO:g}×.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_boot", description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=CHECKOUT / "out" / "apppot.img")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace the boot section of FILE (docs/benchmarks.md)")
    args = parser.parse_args()
    if not args.image.is_file():
        sys.exit(f"bench_boot: error: no image {args.image} (make image)")
    times = run_rounds(args.image.resolve(), args.rounds)
    section = report(times, args.image, args.rounds)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
