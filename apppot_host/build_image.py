"""Build an AppPot image: a sparse raw ext4 image of Debian with the apppot package, ready for UML.

    apppot-build-image [--suite trixie|bookworm] [--mirror URL] [--size 4G] [--output apppot.img] [--deb FILE.deb]

Runs as root (mkrootfs needs debootstrap and chroot).  The steps, each
announced on stderr:

1. the apppot .deb: ``--deb FILE`` or built now from this source tree;
2. a Debian tree from apppot_host.mkrootfs: minbase, systemd-sysv, the toolchain,
   iproute2 and the .deb with its dependencies (cached under ~/.cache/apppot);
3. configured for this image: / on /dev/ubda, hostname, slirp's name server
   (10.0.2.3), an empty machine-id; everything a boot needs (the network unit,
   the batch target, generator masks) comes with the apppot package;
4. the base recorded with ``apppot-snap base`` (run inside the tree);
5. written with ``mkfs.ext4 -d`` to a sparse raw image (no loop mount), then
   renamed into place.  See docs/host.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from apppot_guest.cli import add_output_options, run_main
from apppot_guest.errors import ToolError, UsageError, fs_error
from apppot_guest.proc import run
from . import mkrootfs
from .build_deb import build as build_deb_from

log = logging.getLogger("build-image")

PROG = "apppot-build-image"
CHECKOUT = Path(__file__).resolve().parent.parent  # build_deb's default source tree
INSTALLED_DEBS = Path("/usr/share/apppot")  # where apppot-host puts the guest package
# Debian 13 (trixie): Debian's stable release since August 2025, with Python 3.13
# and GCC 14; Debian 12 (bookworm) images keep working (--suite bookworm) and
# get the same apppot package.
DEFAULT_SUITE = "trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SIZE = "4G"
DEFAULT_OUTPUT = "apppot.img"
HOSTNAME = "apppot"
# systemd-sysv: minbase has no init.  build-essential: the image is for building
# software.  iproute2: apppot-network.service configures the network with ip(8).
BASE_PACKAGES = ("systemd-sysv", "build-essential", "iproute2")
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}

FSTAB = """\
# Written by AppPot's build-image: the root is UML's first block device (ubd0).
/dev/ubda  /  ext4  defaults,noatime  0  0
"""

def step(message: str, *args: object) -> None:
    log.info(message, *args)


def default_deb() -> Path:
    """The apppot package: built now from the source tree this runs from, else the one apppot-host ships."""
    if (CHECKOUT / "setup.py").is_file():
        step("building the apppot package from %s", CHECKOUT)
        return build_deb_from(CHECKOUT, CHECKOUT / "out", keep=False, verbose=False)
    shipped = sorted(INSTALLED_DEBS.glob("apppot_*_all.deb"))
    if len(shipped) != 1:
        raise UsageError(f"no --deb, no AppPot source tree and {len(shipped)} apppot packages in {INSTALLED_DEBS} "
                         "(apppot-host ships one): give --deb FILE.deb")
    return shipped[0]


def make_tree(tree: Path, args: argparse.Namespace, deb: Path) -> None:
    packages = [*BASE_PACKAGES, *args.packages]
    step("making the Debian %s tree (packages: %s; .deb: %s)", args.suite, " ".join(packages), deb.name)
    mkrootfs.make_tree(tree, suite=args.suite, mirror=args.mirror, security=mkrootfs.DEFAULT_SECURITY,
                       packages=packages, debs=[deb], cache=mkrootfs.default_cache_dir())


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def configure(tree: Path) -> None:
    """What is specific to one image; everything a boot needs comes with the apppot package."""
    step("configuring the tree for UML: fstab, hostname, slirp's name server")
    if not (tree / "lib/systemd/system/apppot.service").exists() and not (tree / "usr/lib/systemd/system/apppot.service").exists():
        raise UsageError(f"{tree}: the apppot package did not install apppot.service")
    write_file(tree / "etc/fstab", FSTAB)
    write_file(tree / "etc/hostname", HOSTNAME + "\n")
    write_file(tree / "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    write_file(tree / "etc/resolv.conf", "# slirp's DNS forwarder (AppPot build-image)\nnameserver 10.0.2.3\n")
    # An empty machine-id: each boot gets a fresh one in memory, so a shared base
    # image gives no two VMs the same id, and it is not a first boot either.
    write_file(tree / "etc/machine-id", "", 0o444)


def whole_second_mtimes(tree: Path) -> None:
    """Drop the nanoseconds of every mtime, as mkfs.ext4 -d (e2fsprogs 1.47) will.

    apppot-snap counts a whole-second copy of an mtime as unchanged anyway; with
    the tree already in whole seconds, the image matches its recorded base
    exactly and every comparison in the image takes apppot-snap's fast path.
    """
    second = 1_000_000_000
    broot = os.fsencode(tree)
    for dirpath, dirnames, filenames in os.walk(broot, topdown=False):
        for name in [*filenames, *dirnames, *([b"."] if dirpath == broot else [])]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mtime_ns % second or st.st_atime_ns % second:
                os.utime(path, ns=(st.st_atime_ns - st.st_atime_ns % second, st.st_mtime_ns - st.st_mtime_ns % second),
                         follow_symlinks=False)


def record_base(tree: Path) -> None:
    step("recording the base with apppot-snap base (inside the tree), mtimes in whole seconds as in the image")
    whole_second_mtimes(tree)
    if run(["chroot", tree, "apppot-snap", "base"], env=CHROOT_ENV, check=False, stdin=None).returncode != 0:
        raise ToolError(f"apppot-snap base in {tree} failed (its message is above)")


def write_image(tree: Path, output: Path, size: str) -> None:
    step("writing %s (%s, sparse raw ext4) with mkfs.ext4 -d", output, size)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        run(["mkfs.ext4", "-q", "-F", "-L", "apppot", "-d", tree, tmp, size], stdin=None)
        tmp.chmod(0o644)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    used = output.stat().st_blocks * 512 // 2**20
    step("done: %s (%d MiB used on disk)", output, used)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build an AppPot image (sparse raw ext4) for User-Mode Linux. Run as root.",
    )
    parser.add_argument("--suite", default=DEFAULT_SUITE, help=f"Debian suite (default: {DEFAULT_SUITE})")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror (default: {DEFAULT_MIRROR})")
    parser.add_argument("--size", default=DEFAULT_SIZE, help=f"image size, e.g. 4G (default: {DEFAULT_SIZE}; sparse)")
    parser.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT), help=f"image file (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--deb", type=Path,
                        help="the apppot .deb to install (default: build it from this source tree, "
                             f"or the one apppot-host installed in {INSTALLED_DEBS})")
    parser.add_argument("--packages", nargs="+", default=[], metavar="PKG", help="more Debian packages for the image")
    parser.add_argument("--workdir", type=Path, help="where to make the tree (default: next to --output)")
    add_output_options(parser)  # -v: each command it runs
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv, default_level=logging.INFO, handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    tree_parent: Path | None = None
    try:
        if os.geteuid() != 0:
            raise UsageError("must run as root (debootstrap and chroot need it)")
        if not re.fullmatch(r"[1-9][0-9]*[KMGT]?", args.size):
            raise UsageError(f"--size {args.size!r}: not a size like 4G")
        output = args.output.resolve()
        if not output.parent.is_dir():
            raise UsageError(f"--output {output}: directory {output.parent} does not exist")
        if args.deb is not None and not args.deb.is_file():
            raise UsageError(f"--deb {args.deb}: no such file")
        deb = args.deb.resolve() if args.deb is not None else default_deb()
        workdir = (args.workdir or output.parent).resolve()
        try:
            tree_parent = Path(tempfile.mkdtemp(prefix=".build-image-", dir=workdir))
        except OSError as exc:
            raise fs_error(exc, "make a work directory in", workdir) from exc
        tree = tree_parent / "tree"
        make_tree(tree, args, deb)
        configure(tree)
        record_base(tree)
        write_image(tree, output, args.size)
        return 0
    finally:
        if tree_parent is not None:
            step("removing the work tree %s", tree_parent)
            shutil.rmtree(tree_parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
