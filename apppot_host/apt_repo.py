"""Put .deb files into a flat local apt repository and (re)write its index.

    apt-repo DIR [FILE.deb ...]

Copies the .debs into DIR (created if missing), then writes DIR/Packages,
DIR/Packages.gz (dpkg-scanpackages --multiversion, so every version stays
installable) and DIR/Release (apt-ftparchive).  An image uses it with

    echo 'deb [trusted=yes] file:/path/to/DIR ./' > /etc/apt/sources.list.d/apppot.list
    apt-get update && apt-get install --only-upgrade apppot

(or an http:// URL if DIR is served).  The repository is unsigned: trust it
only on the machine that built it.  See docs/package.md.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import UsageError, fs_error
from apppot_guest.proc import run

log = logging.getLogger("apt-repo")

PROG = "apt-repo"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise fs_error(exc, "write", path) from exc


def add_debs(repo: Path, debs: list[Path]) -> None:
    for deb in debs:
        # dpkg-deb rejects anything that is not a Debian package, with the path in its message.
        run(["dpkg-deb", "--info", deb], capture=True)
        try:
            shutil.copy2(deb, repo / deb.name)
        except OSError as exc:
            raise fs_error(exc, "copy", deb) from exc
        log.info("added %s", deb.name)


def write_index(repo: Path) -> int:
    """Rewrite Packages, Packages.gz and Release; return the number of packages listed."""
    packages = run(["dpkg-scanpackages", "--multiversion", "."], capture=True, cwd=repo).stdout
    write_atomic(repo / "Packages", packages)
    write_atomic(repo / "Packages.gz", gzip.compress(packages, mtime=0))
    release = run(
        ["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=AppPot",
         "-o", "APT::FTPArchive::Release::Label=AppPot local", "release", "."],
        capture=True, cwd=repo,
    ).stdout
    write_atomic(repo / "Release", release)
    return packages.count(b"\nPackage: ") + packages.startswith(b"Package: ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, metavar="DIR", help="the repository directory (created if missing)")
    parser.add_argument("debs", type=Path, nargs="*", metavar="FILE.deb", help="packages to add")
    add_output_options(parser)
    return run_main(PROG, parser, argv, default_level=logging.INFO, handler=cmd_add)


def cmd_add(args: argparse.Namespace) -> int:
    for deb in args.debs:
        if not deb.is_file() or deb.suffix != ".deb":
            raise UsageError(f"not a .deb file: {deb}")
    if args.repo.exists() and not args.repo.is_dir():
        raise UsageError(f"{args.repo} is not a directory")
    try:
        args.repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, "create", args.repo) from exc
    add_debs(args.repo, args.debs)
    count = write_index(args.repo)
    log.info("%s lists %d package(s)", args.repo / "Packages", count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
