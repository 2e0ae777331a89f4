#!/usr/bin/python3
"""Build the `apppot` Debian package from setup.py with Debian's stdeb.

The source (setup.py, stdeb.cfg, apppot_guest/, etc/, debian/) is
copied to a staging directory; stdeb's `debianize` writes the generated
debian/ files (control, rules, changelog) next to our own maintainer scripts,
unit and init script there; debian/rules-overrides.mk is appended to the rules;
dpkg-buildpackage makes the binary package, which is copied to the output
directory.  Prints the path of the .deb on stdout.  See docs/package.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from apppot_guest.errors import AppPotError, ConfigError, ToolError, UsageError, fs_error
from apppot_guest.proc import run

log = logging.getLogger("build-deb")

PROG = "build-deb"
PYTHON = "/usr/bin/python3"
# What goes into the staging copy: everything setup.py and the Debian build read.
SOURCE_ITEMS = ("setup.py", "stdeb.cfg", "apppot_guest", "etc", "usr", "debian")
# Written by the boot-hook owners; the package cannot be built without them.
REQUIRED_DEBIAN = ("debian/apppot.service", "debian/apppot.init")
# The conffile must be the very list apppot-snap falls back to.
EXCLUDE_PAIR = ("apppot_guest/exclude.default", "etc/apppot/exclude")


def source_version(source: Path) -> str:
    """The one version: ``__version__`` in apppot_guest/__init__.py."""
    init = source / "apppot_guest" / "__init__.py"
    try:
        text = init.read_text(encoding="utf-8")
    except OSError as exc:
        raise fs_error(exc, "read", init) from exc
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise ConfigError(f"no __version__ = \"...\" line in {init}")
    return match.group(1)


def check_source(source: Path) -> None:
    """Refuse to build from a tree that would give a wrong package."""
    for rel in SOURCE_ITEMS + REQUIRED_DEBIAN + EXCLUDE_PAIR:
        if not (source / rel).exists():
            raise ConfigError(f"missing {source / rel}")
    canonical, conffile = (source / rel for rel in EXCLUDE_PAIR)
    if canonical.read_bytes() != conffile.read_bytes():
        raise ConfigError(f"{conffile} differs from {canonical}: copy {EXCLUDE_PAIR[0]} to {EXCLUDE_PAIR[1]}")


def stage(source: Path, staging: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    staging.mkdir(parents=True)
    for rel in SOURCE_ITEMS:
        src, dst = source / rel, staging / rel
        try:
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(src, dst)
        except OSError as exc:
            raise fs_error(exc, "copy", src) from exc


def build(source: Path, out_dir: Path, *, keep: bool, verbose: bool) -> Path:
    check_source(source)
    version = source_version(source)
    work = Path(tempfile.mkdtemp(prefix="apppot-deb-"))
    staging = work / f"apppot-{version}"
    log_path = out_dir / f"apppot_{version}.build.log"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage(source, staging)
        with log_path.open("wb") as log_file:
            debianize = [PYTHON, "setup.py", "--command-packages=stdeb.command", "debianize", "--compat", "13"]
            run_logged(debianize, staging, log_file, log_path, verbose=verbose)
            append_rules(staging)
            run_logged(["dpkg-buildpackage", "-b", "--no-sign"], staging, log_file, log_path, verbose=verbose)
        debs = sorted(work.glob("apppot_*_all.deb"))
        if len(debs) != 1:
            raise ToolError(f"dpkg-buildpackage made {len(debs)} apppot .deb files in {work}, expected 1")
        target = out_dir / debs[0].name
        shutil.copy2(debs[0], target)
        return target
    except OSError as exc:
        raise fs_error(exc, "build the package in", work) from exc
    finally:
        if keep:
            log.warning("kept the build directory %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def append_rules(staging: Path) -> None:
    rules = staging / "debian" / "rules"
    overrides = (staging / "debian" / "rules-overrides.mk").read_text(encoding="utf-8")
    with rules.open("a", encoding="utf-8") as f:
        f.write("\n" + overrides)


def run_logged(argv: list[str], cwd: Path, log_file: BinaryIO, log_path: Path, *, verbose: bool) -> None:
    """Run one build step; its output goes to the log (and the terminal with -v)."""
    log_file.write(f"$ {' '.join(argv)}\n".encode())
    log_file.flush()
    result = run(argv, check=False, capture=True, cwd=cwd)
    log_file.write(result.stdout + result.stderr)
    log_file.flush()
    if verbose:
        sys.stderr.buffer.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise ToolError(f"{shlex.join(argv)} failed with exit code {result.returncode}; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=repo, help="source tree to build (default: this checkout)")
    parser.add_argument("--out", type=Path, default=repo / "out", help="where the .deb goes (default: out/)")
    parser.add_argument("--keep", action="store_true", help="keep the staging directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the build output")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format=f"{PROG}: %(message)s")
    try:
        if not args.source.is_dir():
            raise UsageError(f"source tree {args.source} is not a directory")
        deb = build(args.source.resolve(), args.out.resolve(), keep=args.keep, verbose=args.verbose)
    except AppPotError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
