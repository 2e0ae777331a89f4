"""Build AppPot's statically linked User-Mode Linux kernel from Debian's kernel source.

    build-kernel [--output out/linux] [--jobs N] [--force]

Debian's `linux-source-7.3` package (from trixie-backports: fetched with
`apt-get download` through a private apt state directory, so the host's apt
sources stay as they are) is unpacked, kernel/static-vector.patch is applied,
and the kernel is configured from nothing but kernel/apppot.config
(`make ARCH=um allnoconfig KCONFIG_ALLCONFIG=...`), built and stripped.

The result is cached under ~/.cache/apppot/kernel/KEY/ (or $APPPOT_CACHE),
KEY being a hash of the source package's version, the config fragment, the
patch and this script, so a rerun copies it in a second; the source package
is cached too.  Writes OUTPUT (the kernel), OUTPUT.config and OUTPUT.version,
each atomically, and prints OUTPUT's path.  Needs flex, bison, bc, gcc, make
and patch (scripts/install-deps).  See docs/host.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from apppot_guest.atomicfile import write_atomic
from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import ConfigError, ToolError, UsageError, display_path, fs_error
from apppot_guest.proc import run

log = logging.getLogger("build-kernel")

PROG = "apppot-build-kernel"
CHECKOUT = Path(__file__).resolve().parent.parent
# The kernel source: the one place its version is pinned.
SOURCE_PACKAGE = "linux-source-7.3"
SOURCE_VERSION = "7.3.4-1~bpo13+1"
SOURCE_APT_LINE = "deb http://deb.debian.org/debian trixie-backports main"
FRAGMENT = CHECKOUT / "kernel" / "apppot.config"
PATCH = CHECKOUT / "kernel" / "static-vector.patch"
DEFAULT_OUTPUT = CHECKOUT / "out" / "linux"
# The build recipe's version: bump it when the way the kernel is configured or
# built changes (make targets, flags, how the fragment or the patch is applied).
# It keys the cache with the source version, the fragment and the patch, so
# that editing this file's messages or structure does not cost a rebuild.
RECIPE = "1"
CONFIG_LINE = re.compile(r"(CONFIG_[A-Z0-9_]+)=(.*)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("APPPOT_CACHE") or Path.home() / ".cache" / "apppot") / "kernel"


def cache_key(source_version: str) -> str:
    """What the cached kernel depends on: the recipe, the source version, the fragment and the patch."""
    digest = hashlib.sha256(f"{RECIPE}\0{source_version}".encode())
    for path in (FRAGMENT, PATCH):
        try:
            digest.update(b"\0" + path.read_bytes())
        except OSError as exc:
            raise fs_error(exc, "read", path) from exc
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One build at a time per cache: a second waits for the first and then finds its result."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another build-kernel is using %s; waiting for it", directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- the source package ---------------------------------------------------------------


def apt_options(state: Path) -> list[str]:
    """apt-get options that use a private sources list and state, never the host's."""
    return [
        "-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []),  # the files are root's, not _apt's
    ]  # fmt: skip


def fetch_source(cache: Path) -> Path:
    """The cached linux-source .deb, downloaded when missing."""
    debs = cache / "debs"
    wanted = debs / f"{SOURCE_PACKAGE}_{SOURCE_VERSION.replace(':', '%3a')}_all.deb"
    if wanted.is_file():
        return wanted
    state = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(SOURCE_APT_LINE + "\n")
    opts = apt_options(state)
    log.warning("fetching %s %s (about 170 MB)", SOURCE_PACKAGE, SOURCE_VERSION)
    run(["apt-get", "-q", *opts, "update"], capture=True)
    shown = run(["apt-cache", *opts, "madison", SOURCE_PACKAGE], capture=True).stdout.decode()
    versions = [parts[1].strip() for line in shown.splitlines() if len(parts := line.split("|")) > 2]
    if SOURCE_VERSION not in versions:
        have = ", ".join(versions) or "none"
        raise ToolError(f"{SOURCE_PACKAGE} {SOURCE_VERSION} is not in '{SOURCE_APT_LINE}' (it has: {have}); "
                        f"update SOURCE_VERSION in {display_path(Path(__file__))}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        run(["apt-get", "-q", *opts, "download", f"{SOURCE_PACKAGE}={SOURCE_VERSION}"], cwd=tmp, capture=True)
        (got,) = Path(tmp).glob("*.deb")
        debs.mkdir(exist_ok=True)
        os.replace(got, wanted)
    return wanted


def unpack_source(deb: Path, workdir: Path) -> Path:
    """The kernel tree from the package's tarball, patched for AppPot."""
    log.warning("unpacking %s", deb.name)
    pkg = workdir / "pkg"
    run(["dpkg-deb", "--extract", deb, pkg])
    (tarball,) = (pkg / "usr/src").glob(f"{SOURCE_PACKAGE}.tar.*")
    run(["tar", "-xf", tarball, "-C", workdir])
    shutil.rmtree(pkg)
    tree = workdir / SOURCE_PACKAGE
    run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", PATCH], cwd=tree)
    return tree


# --- configuring and building ----------------------------------------------------------


def read_fragment(path: Path) -> dict[str, str]:
    """The options the fragment sets (``# CONFIG_X is not set`` counts as ``n``)."""
    wanted: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if match := re.fullmatch(r"# (CONFIG_[A-Z0-9_]+) is not set", line):
            wanted[match.group(1)] = "n"
        elif line and not line.startswith("#"):
            match = CONFIG_LINE.fullmatch(line)
            if match is None:
                raise ConfigError(f"{display_path(path)}:{number}: not a CONFIG_NAME=value line: {line[:80]!r}")
            wanted[match.group(1)] = match.group(2)
    return wanted


def check_config(config: Path, wanted: dict[str, str]) -> None:
    """Kconfig drops an option whose dependencies are unmet without a word: refuse such a config."""
    have: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if match := CONFIG_LINE.fullmatch(line):
            have[match.group(1)] = match.group(2)
    wrong = [f"{name}={value} (got {have.get(name, 'n')})" for name, value in wanted.items() if have.get(name, "n") != value]
    if wrong:
        raise ConfigError(f"{display_path(FRAGMENT)}: Kconfig did not take {', '.join(wrong)}: a dependency is missing")


def build(tree: Path, jobs: int) -> None:
    make = ["make", "-C", os.fspath(tree), "ARCH=um", "SUBARCH=x86_64"]
    run([*make, "allnoconfig", f"KCONFIG_ALLCONFIG={FRAGMENT}"], capture=True)
    check_config(tree / ".config", read_fragment(FRAGMENT))
    log.warning("building the UML kernel with %d jobs (a few minutes)", jobs)
    started = time.monotonic()
    result = run([*make, f"-j{jobs}", "linux"], check=False, capture=True)
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-15:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise ToolError(f"the kernel build in {display_path(tree)} failed with exit code {result.returncode}")
    run(["strip", "--strip-all", tree / "linux"])
    log.warning("built in %.0f s", time.monotonic() - started)


def check_static(kernel: Path) -> None:
    described = run(["file", "--brief", kernel], capture=True).stdout.decode()
    if "statically linked" not in described and "static-pie linked" not in described:
        raise ToolError(f"{display_path(kernel)} is not statically linked: {described.strip()}")


def kernel_version(tree: Path) -> str:
    release = (tree / "include/config/kernel.release").read_text().strip()
    return f"{release} (Debian {SOURCE_PACKAGE} {SOURCE_VERSION}, AppPot config)"


def build_into_cache(cache: Path, entry: Path, jobs: int) -> None:
    deb = fetch_source(cache)
    with tempfile.TemporaryDirectory(prefix="build.", dir=cache) as tmp:
        tree = unpack_source(deb, Path(tmp))
        build(tree, jobs)
        check_static(tree / "linux")
        staging = Path(tmp) / "entry"
        staging.mkdir()
        shutil.copy2(tree / "linux", staging / "linux")
        shutil.copy2(tree / ".config", staging / "linux.config")
        (staging / "linux.version").write_text(kernel_version(tree) + "\n")
        staging.rename(entry)  # a cache entry appears whole or not at all


def install(entry: Path, output: Path) -> None:
    """Copy the cached kernel and its config and version next to each other, each atomically."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for name, suffix, mode in (("linux", "", 0o755), ("linux.config", ".config", 0o644), ("linux.version", ".version", 0o644)):
        write_atomic(output.with_name(output.name + suffix), (entry / name).read_bytes(), mode=mode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the kernel goes (default: out/linux)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel make jobs")
    parser.add_argument("--force", action="store_true", help="build even when the cache has this kernel")
    parser.add_argument("--print-key", action="store_true", help="print the cache key and build nothing")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet when the kernel is cached (make check runs this every time); a build says what it does.
    return run_main(PROG, build_parser(), argv, default_level=logging.WARNING, handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: not a positive number")
    cache = default_cache_dir()
    key = cache_key(SOURCE_VERSION)
    if args.print_key:
        print(key)
        return 0
    entry = cache / key
    with locked(cache):
        if args.force and entry.exists():
            shutil.rmtree(entry)
        if not (entry / "linux").is_file():
            build_into_cache(cache, entry, args.jobs)
    install(entry, args.output)
    print(os.fspath(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
