#!/usr/bin/python3
"""Benchmark apppot-snap against GNU tar --listed-incremental on the reference scenario.

Scenario (issue 2): debootstrap --variant=minbase bookworm plus build-essential
gfortran autoconf automake libtool git subversion; record the base; then, in a
chroot, apt-get install python3-numpy, compile a small Fortran program under
/home/user and delete /usr/share/doc/gfortran*; then status and changes.  GNU
tar runs on the same trees in the same run (its options in the right order:
exclusions before the member list).  A 100k-entry tree measures peak memory.

Runs as root (debootstrap, chroot).  Writes the table to docs/benchmarks.md
between the <!-- snap --> markers and prints it.

``--scale`` (``make bench-scale``) measures instead what the size of an image
does: synthetic trees of 100k, 300k and 1M entries (many small files, some
large and some sparse ones, symlinks, hardlinks across directories), each
generated once, measured and deleted; ``base``, ``status`` (nothing changed,
then 1% changed) and ``changes`` against GNU tar on the same tree in the same
run, with peak RSS.  Table between the <!-- snap-scale --> markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from apppot_guest.tree import DEFAULT_EXCLUDE, read_patterns
from apppot_host import mkrootfs

REPO = Path(__file__).resolve().parent.parent
# The checkout's packages for this and the commands it runs: `make bench` sets it too.
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PYTHON = "/usr/bin/python3"
MKROOTFS = [PYTHON, "-m", "apppot_host.mkrootfs"]

PACKAGES = ["build-essential", "gfortran", "autoconf", "automake", "libtool", "git", "subversion"]
REPEAT = 3
FORTRAN = """program demo
  implicit none
  integer :: i
  real(8) :: s = 0
  do i = 1, 1000000
    s = s + 1.0d0 / i**2
  end do
  print '(a, f12.8)', 'sum 1/i^2 = ', s
end program demo
"""


def timed(argv: list[str], **kw: object) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run of ``argv``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {argv[0]} {' '.join(map(str, argv[1:4]))}... failed with exit code {proc.returncode}")
    return elapsed, usage.ru_maxrss


def best(argv: list[str], before: Callable[[], None] | None = None, **kw: object) -> tuple[float, int]:
    runs = []
    for _ in range(REPEAT):
        if before:
            before()
        runs.append(timed(argv, **kw))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def snap(root: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "apppot_guest.snap", "--root", str(root), *args]


def tar_excludes(work: Path) -> Path:
    """The default exclude list as GNU tar --exclude-from patterns (anchored at ./)."""
    path = work / "tar-excludes"
    path.write_text("".join("." + os.fsdecode(p) + "\n" for p in read_patterns(DEFAULT_EXCLUDE)))
    return path


def tar_incremental(root: Path, snar: Path, out: str, excludes: Path, compress: list[str]) -> list[str]:
    return ["tar", "--create", "--file", out, *compress, "--listed-incremental", str(snar),
            "--exclude-from", str(excludes), "--anchored", "-C", str(root), "."]


def mutate(root: Path) -> None:
    home = root / "home/user"
    home.mkdir(parents=True, exist_ok=True)
    (home / "demo.f90").write_text(FORTRAN)
    with mkrootfs.chroot_session(root):
        mkrootfs.chroot_run(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", "python3-numpy"])
        mkrootfs.chroot_run(root, ["gfortran", "-O2", "-o", "/home/user/demo", "/home/user/demo.f90"])
    for doc in (root / "usr/share/doc").glob("gfortran*"):
        shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()


def many_entries_tree(root: Path, count: int) -> None:
    for d in range(count // 100):
        sub = root / f"d{d:04d}"
        sub.mkdir(parents=True)
        for f in range(99):
            (sub / f"file-{f:03d}.txt").write_bytes(b"%d\n" % (d * 1000 + f))


def machine() -> str:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    tar_version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    zstd_version = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()} (Debian), {tar_version}, {zstd_version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", action="store_true", help="the large-tree benchmark instead of the reference scenario")
    parser.add_argument("--sizes", default="100000,300000,1000000", help="--scale: entries per tree, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="--scale: runs of each step (one fewer at 1M entries)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    options = parser.parse_args()
    if options.scale:
        from bench_scale import run_scale  # beside this file

        return run_scale([int(n) for n in options.sizes.split(",")], write=not options.no_write, repeat=options.repeat)
    if os.geteuid() != 0:
        print("bench_snap: error: run as root (debootstrap and chroot)", file=sys.stderr)
        return 2
    # Measure the program as installed: Debian byte-compiles the package, a checkout may not.
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "apppot_guest")], check=True)
    work = Path(tempfile.mkdtemp(prefix="apppot-bench-", dir=os.environ.get("APPPOT_BENCH_DIR", "/var/tmp")))
    rows: list[tuple[str, str, str, str]] = []
    try:
        root = work / "root"
        print("bench: building the reference tree (cached under ~/.cache/apppot)", file=sys.stderr)
        subprocess.run([*MKROOTFS, str(root), "--packages", *PACKAGES], check=True, stdout=subprocess.DEVNULL, env=CHECKOUT_ENV)
        os.sync()
        entries = sum(len(d) + len(f) for _, d, f in os.walk(root))
        size = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True).stdout.split()[0])
        excludes = tar_excludes(work)
        env = {**os.environ, "PYTHONPATH": str(REPO), "APPPOT_SNAP_NO_SUDO": "1"}

        base_t, _ = best(snap(root, "base"), env=env)
        snar0 = work / "level0.snar"

        def fresh_snar0() -> None:
            snar0.unlink(missing_ok=True)

        tar0_t, _ = best(tar_incremental(root, snar0, "/dev/null", excludes, []), before=fresh_snar0)
        rows.append(("base (manifest, sha256 of every file)", f"{base_t:.2f} s", f"tar level 0 walk to /dev/null: {tar0_t:.2f} s",
                     f"{base_t / tar0_t:.2f}x (target: base <= 3 s)"))

        print("bench: changing the tree in a chroot (apt-get install python3-numpy, gfortran)", file=sys.stderr)
        mutate(root)
        os.sync()  # both tools meet a settled tree, not apt's writeback
        snar1 = work / "level1.snar"

        def fresh_snar1() -> None:
            shutil.copy(snar0, snar1)

        status_t, _ = best(snap(root, "status"), env=env)
        tar_walk_t, _ = best(tar_incremental(root, snar1, "/dev/null", excludes, []), before=fresh_snar1)
        changed = len(subprocess.run(snap(root, "status"), capture_output=True, text=True, env=env, check=True).stdout.splitlines())
        rows.append(("status", f"{status_t:.2f} s", f"tar level 1 walk to /dev/null: {tar_walk_t:.2f} s",
                     f"{status_t / tar_walk_t:.2f}x (target <= 1.0x)"))

        results = {}
        for suffix, flag in ((".tar.zst", None), (".tar.gz", ["-z"]), (".tar.xz", ["-J"])):
            out = work / f"delta{suffix}"
            t, rss = best(snap(root, "changes", str(out)), env=env)
            results[suffix] = (t, out.stat().st_size, rss)
            if flag:
                tar_out = work / f"tar-level1{suffix}"
                tt, _ = best(tar_incremental(root, snar1, str(tar_out), excludes, flag), before=fresh_snar1)
                results["tar" + suffix] = (tt, tar_out.stat().st_size, 0)
        zt, zs, _ = results[".tar.zst"]
        gt, gs, _ = results["tar.tar.gz"]
        rows.append(("changes, default (.tar.zst)", f"{zt:.2f} s, {zs / 1e6:.1f} MB", f"tar -z level 1: {gt:.2f} s, {gs / 1e6:.1f} MB",
                     f"time {zt / gt:.2f}x (target <= 0.5x), bytes {zs / gs:.2f}x (target <= 1.0x)"))
        for suffix in (".tar.gz", ".tar.xz"):
            t, s, _ = results[suffix]
            tt, ts, _ = results["tar" + suffix]
            tar_flag = "-z" if suffix == ".tar.gz" else "-J"
            rows.append((f"changes {suffix}", f"{t:.2f} s, {s / 1e6:.1f} MB", f"tar {tar_flag} level 1: {tt:.2f} s, {ts / 1e6:.1f} MB",
                         f"time {t / tt:.2f}x, bytes {s / ts:.2f}x"))

        pristine = work / "pristine"
        shutil.rmtree(root)
        subprocess.run([*MKROOTFS, str(pristine), "--packages", *PACKAGES], check=True, stdout=subprocess.DEVNULL, env=CHECKOUT_ENV)
        subprocess.run(snap(pristine, "base"), check=True, env=env, stdout=subprocess.DEVNULL)
        merge_t, _ = timed(snap(pristine, "--force", "merge", str(work / "delta.tar.zst")), env=env)
        rows.append(("merge of the default delta (boot path)", f"{merge_t:.2f} s", "-", "-"))
        shutil.rmtree(pristine)

        big = work / "big"
        many_entries_tree(big, 100_000)
        _, big_base_rss = timed(snap(big, "base"), env=env)
        for sub in list(big.iterdir())[:50]:
            (sub / "file-000.txt").write_bytes(b"changed\n")
        _, big_status_rss = timed(snap(big, "status"), env=env)
        _, big_changes_rss = timed(snap(big, "changes", str(work / "big.tar.zst")), env=env)
        peak = max(big_base_rss, big_status_rss, big_changes_rss)
        rows.append(("peak memory, 100k-entry tree (base/status/changes)",
                     f"{big_base_rss / 1024:.0f}/{big_status_rss / 1024:.0f}/{big_changes_rss / 1024:.0f} MB", "-",
                     f"max {peak / 1024:.0f} MB (target <= 200 MB)"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = [
        f"Machine: {machine()}.",
        f"Reference tree: minbase bookworm + {' '.join(PACKAGES)}: {entries} entries, {size} MB; "
        f"after the changes {changed} paths differ from the base. Best of {REPEAT} runs; peak RSS from wait4().",
        "",
        "| step | apppot-snap | GNU tar, same trees | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
    ]
    text = "\n".join(table)
    print(text)
    write_section(REPO / "docs/benchmarks.md", "snap", "## apppot-snap against GNU tar --listed-incremental\n\n"
                  "`sudo make bench` (bench/bench_snap.py) measured:\n\n" + text + "\n")
    return 0


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or add) the part of ``path`` between <!-- name --> and <!-- /name -->."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers from this repository's benchmarks, each with the machine it ran on.\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
