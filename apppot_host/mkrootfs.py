"""Make a Debian root tree for an AppPot image: debootstrap, packages, local .debs.

    mkrootfs DIR [--suite bookworm] [--mirror URL] [--packages P ...] [--debs FILE.deb ...]

DIR (missing or empty) gets a `debootstrap --variant=minbase` tree of the
suite, then the listed packages and the dependencies of the listed .debs from
Debian (apt-get install --no-install-recommends), then the .debs themselves.
Everything before the .debs is cached as a tarball under ~/.cache/apppot keyed
by suite, mirror and the sorted package set, and downloaded packages are kept
in an apt archive there, so a rerun only unpacks the tarball and installs the
.debs.  Services never start inside the tree (policy-rc.d), and proc, sys and
dev are mounted only while apt runs and always unmounted.  See docs/package.md.

This file is also imported (by path) by the tests for `chroot_session` and
`chroot_run`, the one way AppPot runs commands inside a tree.
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
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import ToolError, UsageError, fs_error
from apppot_guest.proc import run

log = logging.getLogger("mkrootfs")

PROG = "mkrootfs"
CACHE_FORMAT = "3"  # bump when the way a cached tree is made changes
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
POLICY_RC_D = b"#!/bin/sh\n# Written by AppPot's mkrootfs while it installs packages: start no service.\nexit 101\n"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
}
APT_GET = ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0"]


@dataclass(frozen=True, slots=True)
class Spec:
    """What goes into a cached tree (everything but the local .debs)."""

    suite: str
    mirror: str
    security: str | None
    packages: tuple[str, ...]

    def key(self) -> str:
        text = "\n".join([CACHE_FORMAT, self.suite, self.mirror, self.security or "-", *self.packages])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def sources_list(self) -> str:
        lines = [f"deb {self.mirror} {self.suite} main"]
        if self.security is not None:
            lines.append(f"deb {self.mirror} {self.suite}-updates main")
            lines.append(f"deb {self.security} {self.suite}-security main")
        return "\n".join(lines) + "\n"


def default_cache_dir() -> Path:
    return Path(os.environ.get("APPPOT_CACHE") or Path.home() / ".cache" / "apppot")


# --- running commands inside a tree -------------------------------------------------


@contextlib.contextmanager
def chroot_session(root: Path, *, apt_archives: Path | None = None) -> Iterator[None]:
    """Mount proc, sys and dev (and the shared apt archive) in ``root``; stop services starting.

    Everything mounted or written here is undone on the way out, also after a failure.
    """
    mounted: list[Path] = []
    policy = root / "usr/sbin/policy-rc.d"
    wrote_policy = False
    try:
        try:
            if not (policy.exists() or policy.is_symlink()):
                policy.write_bytes(POLICY_RC_D)
                policy.chmod(0o755)
                wrote_policy = True
            mounts: list[tuple[list[str], Path]] = [
                (["-t", "proc", "proc"], root / "proc"),
                (["-t", "sysfs", "sysfs"], root / "sys"),
                (["--bind", "/dev"], root / "dev"),
                (["--bind", "/dev/pts"], root / "dev/pts"),
            ]
            if apt_archives is not None:
                (apt_archives / "partial").mkdir(parents=True, exist_ok=True)
                mounts.append((["--bind", os.fspath(apt_archives)], root / "var/cache/apt/archives"))
            for args, target in mounts:
                target.mkdir(parents=True, exist_ok=True)
                run(["mount", *args, target])
                mounted.append(target)
            resolv, target = Path("/etc/resolv.conf"), root / "etc/resolv.conf"
            if resolv.is_file() and (target.is_symlink() or not target.is_file()
                                     or target.read_bytes() != resolv.read_bytes()):
                target.unlink(missing_ok=True)
                shutil.copyfile(resolv, target)  # apt needs the host's name servers
        except OSError as exc:
            raise fs_error(exc, "prepare the tree", root) from exc
        yield
    finally:
        for target in reversed(mounted):
            if run(["umount", target], check=False).returncode != 0:
                log.warning("umount %s failed; detaching it lazily", target)
                run(["umount", "--lazy", target], check=False)
        if wrote_policy:
            policy.unlink(missing_ok=True)


def chroot_run(
    root: Path, argv: Sequence[str], *, check: bool = True, capture: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside ``root`` (with a clean environment) through the one subprocess wrapper."""
    return run(["chroot", os.fspath(root), *argv], check=check, capture=capture, env={**CHROOT_ENV, **(env or {})})


# --- building a tree ------------------------------------------------------------------


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "--field", deb, field], capture=True).stdout.decode().strip()


def deb_dependencies(debs: Sequence[Path]) -> set[str]:
    """The packages the .debs depend on (first alternative, no versions), less the .debs themselves."""
    names: set[str] = set()
    own = {deb_field(d, "Package") for d in debs}
    for deb in debs:
        for field in ("Pre-Depends", "Depends"):
            for clause in deb_field(deb, field).split(","):
                first = clause.split("|")[0].strip()
                name = re.split(r"[\s(:]", first, maxsplit=1)[0]
                if name:
                    names.add(name)
    return names - own


def tar_create(root: Path, tarball: Path) -> None:
    """Write the tree to ``tarball`` atomically (temporary file, then rename)."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
    try:
        run(["tar", "--create", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
             "--use-compress-program=zstd -T0 -3", "--file", tmp, "--directory", root, "."])
        os.replace(tmp, tarball)
    finally:
        tmp.unlink(missing_ok=True)


def tar_extract(tarball: Path, root: Path) -> None:
    run(["tar", "--extract", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--preserve-permissions",
         "--use-compress-program=zstd", "--file", tarball, "--directory", root])


def debootstrap(spec: Spec, root: Path, cache: Path) -> None:
    """A minbase tree of the suite, from a cached tarball when there is one."""
    base = cache / f"base-{spec.suite}-{arch()}-{Spec(spec.suite, spec.mirror, spec.security, ()).key()}.tar.zst"
    if base.is_file():
        log.info("unpacking the cached %s base tree %s", spec.suite, base.name)
        tar_extract(base, root)
        return
    debs = cache / f"debootstrap-{spec.suite}-{arch()}"
    debs.mkdir(parents=True, exist_ok=True)
    log.info("debootstrap --variant=minbase %s from %s", spec.suite, spec.mirror)
    result = run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", spec.suite, root, spec.mirror],
                 check=False, capture=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()[-3:]
        raise ToolError(f"debootstrap {spec.suite} into {root} failed: {' / '.join(tail)}")
    (root / "etc/apt/sources.list").write_text(spec.sources_list())
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):  # debootstrap's copies; kept in its cache dir
        deb.unlink()
    tar_create(root, base)


def arch() -> str:
    return run(["dpkg", "--print-architecture"], capture=True).stdout.decode().strip()


def install_packages(root: Path, packages: Sequence[str], archives: Path) -> None:
    """Install from Debian; downloads stay in ``archives`` (bind-mounted over the tree's own, which stays empty)."""
    with chroot_session(root, apt_archives=archives):
        chroot_run(root, [*APT_GET, "update"])
        chroot_run(root, [*APT_GET, "dist-upgrade"])
        log.info("installing %d packages with their dependencies", len(packages))
        chroot_run(root, [*APT_GET, "install", "--no-install-recommends", *packages])


def install_debs(root: Path, debs: Sequence[Path], archives: Path) -> None:
    """Install local .debs with apt (their dependencies are already in the tree)."""
    inbox = root / "var/tmp/mkrootfs-debs"
    inbox.mkdir(parents=True, exist_ok=True)
    try:
        names = []
        for deb in debs:
            shutil.copy2(deb, inbox / deb.name)
            names.append(f"/var/tmp/mkrootfs-debs/{deb.name}")
        with chroot_session(root, apt_archives=archives):
            if not any((root / "var/lib/apt/lists").glob("*_Packages")):
                chroot_run(root, [*APT_GET, "update"])
            log.info("installing %s", ", ".join(d.name for d in debs))
            chroot_run(root, [*APT_GET, "install", "--no-install-recommends", *names])
    except OSError as exc:
        raise fs_error(exc, "copy the .debs into", inbox) from exc
    finally:
        shutil.rmtree(inbox, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache for this run: apt locks its (shared) archive, and two runs
    making the same tree should make it once."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "wb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another mkrootfs that is using %s", cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_rootfs(root: Path, spec: Spec, debs: Sequence[Path], cache: Path | None) -> None:
    work_cache = cache if cache is not None else Path(tempfile.mkdtemp(prefix="mkrootfs-cache-"))
    archives = work_cache / f"apt-archives-{spec.suite}-{arch()}"
    try:
        tree = work_cache / f"rootfs-{spec.suite}-{arch()}-{spec.key()}.tar.zst"
        if spec.packages and tree.is_file():
            log.info("unpacking the cached tree %s", tree.name)
            tar_extract(tree, root)
        else:
            debootstrap(spec, root, work_cache)
            if spec.packages:
                install_packages(root, spec.packages, archives)
                if cache is not None:
                    log.info("caching the tree as %s", tree.name)
                    tar_create(root, tree)
        if debs:
            install_debs(root, debs, archives)
    finally:
        if cache is None:
            shutil.rmtree(work_cache, ignore_errors=True)


def check_target(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} exists and is not an empty directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, "create", root) from exc


def make_tree(root: Path, *, suite: str, mirror: str, security: str | None, packages: Sequence[str],
              debs: Sequence[Path], cache: Path | None) -> None:
    """Check the request, then make the tree ``root`` (missing or empty): mkrootfs's CLI and build-image call this."""
    if os.geteuid() != 0:
        raise UsageError("must run as root (debootstrap, chroot and mount need it)")
    for deb in debs:
        if not deb.is_file():
            raise UsageError(f"no such .deb: {deb}")
    resolved = [d.resolve() for d in debs]
    for pkg in packages:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*(=[\w.+:~-]+)?", pkg):
            raise UsageError(f"not a Debian package name: {pkg!r}")
    spec = Spec(suite, mirror, security, tuple(sorted(set(packages) | deb_dependencies(resolved))))
    check_target(root)
    with cache_lock(cache) if cache is not None else contextlib.nullcontext():
        make_rootfs(root.resolve(), spec, resolved, cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make a Debian root tree (debootstrap minbase + packages + local .debs), cached under ~/.cache/apppot.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="target directory (missing or empty)")
    parser.add_argument("--suite", default=DEFAULT_SUITE, help=f"Debian suite (default: {DEFAULT_SUITE})")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror (default: {DEFAULT_MIRROR})")
    parser.add_argument("--security-mirror", default=DEFAULT_SECURITY, help="mirror of SUITE-security")
    parser.add_argument("--no-updates", action="store_true", help="use only SUITE, not SUITE-updates and SUITE-security")
    parser.add_argument("--packages", nargs="+", default=[], metavar="PKG", help="Debian packages to install")
    parser.add_argument("--debs", nargs="+", type=Path, default=[], metavar="FILE.deb",
                        help="local .deb files to install last (their dependencies come from Debian)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache (default: $APPPOT_CACHE or ~/.cache/apppot)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    add_output_options(parser)  # -v: each command it runs
    return run_main(PROG, parser, argv, default_level=logging.INFO, handler=cmd_make)


def cmd_make(args: argparse.Namespace) -> int:
    security = None if args.no_updates else args.security_mirror
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    make_tree(args.dir, suite=args.suite, mirror=args.mirror, security=security, packages=args.packages,
              debs=args.debs, cache=cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
