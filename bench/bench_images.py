#!/usr/bin/python3
"""The images of each Debian suite side by side: size, packages, boot time of a trivial job.

    bench/bench_images.py trixie=out/apppot.img bookworm=out/apppot-bookworm.img [--rounds 5] [--write docs/benchmarks.md]

For each image: the blocks it uses on disk (sparse raw ext4), the number of
installed packages and the apppot version (asked in a booted guest), and the
median wall time of `apppot-start -- true` (batch) and `--boot direct`,
rounds interleaved across the images so load hits them alike.  The results
replace the ``<!-- images -->`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_boot import LAUNCHER, PYTHON, USER_ID, as_user, cpu_model, timed, write_section

BEGIN, END = "<!-- images -->", "<!-- /images -->"
PROBE = "dpkg-query -W -f '.\\n' | wc -l; dpkg-query -W -f '${Version}\\n' apppot; cat /etc/debian_version"


def probe(image: Path, work: Path) -> tuple[int, str, str]:
    argv = as_user([PYTHON, os.fspath(LAUNCHER), "--image", os.fspath(image), "--ephemeral", "--no-network",
                    "--jobdir", os.fspath(work), "--", "sh", "-c", PROBE])
    out = subprocess.run(argv, cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout
    count, version, debian = out.split()
    return int(count), version, debian


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_images", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="SUITE=IMAGE")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path, metavar="FILE")
    args = parser.parse_args()
    images = {}
    for item in args.images:
        suite, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            sys.exit(f"bench_images: error: {item!r}: not SUITE=IMAGE with an existing image")
        images[suite] = Path(path).resolve()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="apppot-bench-images-") as tmp:
        work = Path(tmp)
        if os.geteuid() == 0:
            os.chown(work, *USER_ID)
        facts = {suite: probe(image, work) for suite, image in images.items()}
        for n in range(args.rounds):
            for suite, image in images.items():
                start = [PYTHON, os.fspath(LAUNCHER), "--image", os.fspath(image), "--ephemeral", "--jobdir", os.fspath(work)]
                for mode in ("batch", "direct"):
                    times.setdefault((suite, mode), []).append(timed([*start, "--boot", mode, "--", "true"], work)[0])
            print(f"bench_images: round {n + 1}/{args.rounds} done", file=sys.stderr)
    lines = [
        BEGIN,
        "## Images: each Debian suite",
        "",
        f"Measured by `bench/bench_images.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu_model()}, "
        f"{os.cpu_count()} CPUs; AppPot's kernel; medians of {args.rounds} interleaved rounds of `apppot-start -- true`.",
        "",
        "| suite | Debian | apppot | packages | used on disk | batch s | direct s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for suite, image in images.items():
        count, version, debian = facts[suite]
        used = image.stat().st_blocks * 512 / 2**20
        lines.append(f"| {suite} | {debian} | {version} | {count} | {used:.0f} MiB | "
                     f"{statistics.median(times[(suite, 'batch')]):.2f} | {statistics.median(times[(suite, 'direct')]):.2f} |")
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_section(args.write, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
