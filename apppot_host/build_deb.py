"""Build AppPot's Debian packages with Debian's stdeb: `apppot` (the guest) and, with --host, `apppot-host`.

The guest's source (setup.py, stdeb.cfg, apppot_guest/, etc/, usr/, debian/) is
copied to a staging directory; stdeb's `debianize` writes the generated
debian/ files (control, rules, changelog) next to our own maintainer scripts,
unit and init script there; debian/rules-overrides.mk is appended to the rules;
dpkg-buildpackage makes the binary package, which is copied to the output
directory.  The host package is staged the same way from host/ (its setup.py,
stdeb.cfg and debian/), apppot_host/ and apppot_guest/, AppPot's kernel and
the guest package just built; it is architecture-dependent (the kernel).
Both get the one version of apppot_guest/__init__.py.  Prints the path of
each .deb on stdout, the guest's first.  See docs/package.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import ConfigError, ToolError, UsageError, fs_error
from apppot_guest.proc import run

log = logging.getLogger("build-deb")

PROG = "build-deb"
PYTHON = "/usr/bin/python3"
# What goes into the staging copy: everything setup.py and the Debian build read.
SOURCE_ITEMS = ("setup.py", "stdeb.cfg", "apppot_guest", "etc", "usr", "debian")
# The host package's: (in the source tree, in the staging copy).
HOST_ITEMS = (("host/setup.py", "setup.py"), ("host/stdeb.cfg", "stdeb.cfg"), ("host/debian", "debian"),
              ("apppot_host", "apppot_host"), ("apppot_guest", "apppot_guest"),
              ("apppot-start", "apppot-start"), ("apppot-submit", "apppot-submit"),
              ("apppot-build-image", "apppot-build-image"))
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


@dataclass(frozen=True, slots=True)
class Recipe:
    """One binary package: what is staged where, and the .deb dpkg-buildpackage makes of it."""

    package: str
    items: tuple[tuple[Path, str], ...]  # (absolute source path, path in the staging copy)
    architecture_any: bool = False  # stdeb writes "all"; a package with a binary in it is "any"


def stage(items: tuple[tuple[Path, str], ...], staging: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    staging.mkdir(parents=True)
    for src, rel in items:
        dst = staging / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(src, dst)
        except OSError as exc:
            raise fs_error(exc, "copy", src) from exc


def build(source: Path, out_dir: Path, *, keep: bool, verbose: bool) -> Path:
    """The guest package, apppot."""
    check_source(source)
    recipe = Recipe("apppot", tuple((source / rel, rel) for rel in SOURCE_ITEMS))
    return build_package(recipe, source_version(source), out_dir, keep=keep, verbose=verbose)


def build_host(source: Path, out_dir: Path, guest_deb: Path, kernel: Path, *, keep: bool, verbose: bool) -> Path:
    """The host package, apppot-host, with the guest package ``guest_deb`` and the UML kernel ``kernel`` in it."""
    for rel, _ in HOST_ITEMS:
        if not (source / rel).exists():
            raise ConfigError(f"missing {source / rel}")
    check_kernel(kernel)
    items = (*((source / rel, dst) for rel, dst in HOST_ITEMS), (kernel, "linux"), (guest_deb, f"guest/{guest_deb.name}"))
    return build_package(Recipe("apppot-host", items, architecture_any=True), source_version(source), out_dir,
                         keep=keep, verbose=verbose)


def check_kernel(kernel: Path) -> None:
    if not (kernel.is_file() and os.access(kernel, os.X_OK)):
        raise UsageError(f"no UML kernel at {kernel}: build it first (make kernel), or give --kernel PATH")


def build_package(recipe: Recipe, version: str, out_dir: Path, *, keep: bool, verbose: bool) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f"{recipe.package}-deb-"))
    staging = work / f"{recipe.package}-{version}"
    log_path = out_dir / f"{recipe.package}_{version}.build.log"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage(recipe.items, staging)
        with log_path.open("wb") as log_file:
            debianize = [PYTHON, "setup.py", "--command-packages=stdeb.command", "debianize", "--compat", "13"]
            run_logged(debianize, staging, log_file, log_path, verbose=verbose)
            if recipe.architecture_any:
                control = staging / "debian" / "control"
                control.write_text(re.sub(r"(?m)^Architecture: all$", "Architecture: any", control.read_text()))
            append_rules(staging)
            run_logged(["dpkg-buildpackage", "-b", "--no-sign"], staging, log_file, log_path, verbose=verbose)
        debs = sorted(work.glob(f"{recipe.package}_*.deb"))
        if len(debs) != 1:
            raise ToolError(f"dpkg-buildpackage made {len(debs)} {recipe.package} .deb files in {work}, expected 1")
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
    parser.add_argument("--host", action="store_true", help="also build apppot-host (needs the kernel: make kernel)")
    parser.add_argument("--kernel", type=Path, default=repo / "out" / "linux",
                        help="the UML kernel apppot-host ships (default: out/linux)")
    parser.add_argument("--keep", action="store_true", help="keep the staging directory")
    add_output_options(parser)  # -v also shows the build tools' output
    return run_main(PROG, parser, argv, default_level=logging.INFO, handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    if not args.source.is_dir():
        raise UsageError(f"source tree {args.source} is not a directory")
    if args.host:
        check_kernel(args.kernel)
    verbose = args.verbose or args.debug
    debs = [build(args.source.resolve(), args.out.resolve(), keep=args.keep, verbose=verbose)]
    if args.host:
        debs.append(build_host(args.source.resolve(), args.out.resolve(), debs[0], args.kernel.resolve(),
                               keep=args.keep, verbose=verbose))
    for deb in debs:
        print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
