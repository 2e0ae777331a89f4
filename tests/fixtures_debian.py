"""The apppot .deb and real debootstrapped Debian 12 trees, made once per session.

``apppot_deb`` is built from this checkout by apppot_host.build_deb (stdeb);
``apppot_deb_next`` from a temporary copy with the version's last number bumped.
``prepared_tree`` is minbase + systemd-sysv + apppot's dependencies from Debian
(no apppot, a fresh one per test), ``installed_tree`` the same with the .deb
installed by ``mkrootfs --debs`` (the image builder's path, once per
session).  Both come from mkrootfs's cache under ~/.cache/apppot after the
first run.  Tests that change the installed tree work on ``tree_copy(...)``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apppot_host import mkrootfs

CHECKOUT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
# What apppot-build-image asks mkrootfs for besides the .deb (its BASE_PACKAGES;
# test_deb checks they agree): the same package set means the same cached tree,
# so the image and these tests pay for one cold tree.  minbase has no init system.
IMAGE_PACKAGES = ("systemd-sysv", "build-essential", "iproute2")
# What build_deb reads from a source tree.
SOURCE_ITEMS = ("setup.py", "stdeb.cfg", "apppot_guest", "etc", "usr", "debian")


def host_tool(module: str, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -m apppot_host.<module> ARGS`` from this checkout with Debian's python; unless ``check`` is
    false, fail the test with its stderr if it fails."""
    argv = [PYTHON, "-m", f"apppot_host.{module}", *(os.fspath(a) for a in args)]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": os.fspath(CHECKOUT)})
    if not check:
        return result
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def in_tree(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``root`` (chroot, clean environment); text output captured."""
    result = mkrootfs.chroot_run(root, list(argv), check=False, capture=True)
    out = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                      result.stderr.decode(errors="replace"))
    if check:
        assert out.returncode == 0, f"{' '.join(argv)} in {root} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def bump_version(version: str) -> str:
    """1.0.0 -> 1.0.1: the next version, newer to dpkg as well."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    assert match, f"cannot bump version {version!r}"
    return f"{match.group(1)}{int(match.group(2)) + 1}"


def source_version(source: Path = CHECKOUT) -> str:
    text = (source / "apppot_guest/__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match
    return match.group(1)


def build_deb(source: Path, out: Path) -> Path:
    deb = Path(host_tool("build_deb", "--source", source, "--out", out).stdout.strip())
    assert deb.is_file(), deb
    return deb


@pytest.fixture(scope="session")
def apppot_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(CHECKOUT, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def apppot_deb_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same package at the next version, built from a copy with ``__version__`` bumped."""
    source = tmp_path_factory.mktemp("source-next")
    for item in SOURCE_ITEMS:
        src = CHECKOUT / item
        if src.is_dir():
            shutil.copytree(src, source / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, source / item)
    init = source / "apppot_guest/__init__.py"
    old = source_version(source)
    init.write_text(init.read_text().replace(f'__version__ = "{old}"', f'__version__ = "{bump_version(old)}"'))
    return build_deb(source, tmp_path_factory.mktemp("deb-next"))


def _make_tree(path: Path, *mkrootfs_args: str | os.PathLike[str]) -> Path:
    host_tool("mkrootfs", path, *mkrootfs_args)
    return path


@pytest.fixture
def prepared_tree(tmp_path: Path, apppot_deb: Path) -> Iterator[Path]:
    """Debian 12 minbase + systemd-sysv + every dependency of apppot, apppot not installed (a fresh tree)."""
    deps = sorted(mkrootfs.deb_dependencies([apppot_deb]))
    root = _make_tree(tmp_path / "prepared", "--packages", *IMAGE_PACKAGES, *deps)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def installed_tree(tmp_path_factory: pytest.TempPathFactory, apppot_deb: Path) -> Iterator[Path]:
    """Debian 12 with the apppot .deb installed by apt (``mkrootfs --debs``); treat as read-only."""
    root = _make_tree(tmp_path_factory.mktemp("installed") / "root", "--packages", *IMAGE_PACKAGES, "--debs", apppot_deb)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tree_copy(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tree_copy(tree, real=False)``: a private copy of a session tree, gone after the test.

    By default an overlayfs mount over the tree (copy-on-write: dpkg and apt
    work on it as on any file system, and it costs nothing); ``real=True``, or
    where overlayfs cannot be mounted, a ``cp -a`` copy, for tests whose
    subject is the files' own metadata (apppot-snap's manifests).
    """
    overlays: list[Path] = []
    copies: list[Path] = []

    def copy(tree: Path, *, real: bool = False) -> Path:
        n = len(overlays) + len(copies)
        if not real:
            upper, work, merged = (tmp_path / f"overlay{n}" / d for d in ("upper", "work", "merged"))
            for d in (upper, work, merged):
                d.mkdir(parents=True)
            options = f"lowerdir={tree},upperdir={upper},workdir={work}"
            mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, os.fspath(merged)],
                                     stdin=subprocess.DEVNULL, capture_output=True, check=False)
            if mounted.returncode == 0:
                overlays.append(merged)
                return merged
        target = tmp_path / f"tree{n}"
        subprocess.run(["cp", "-a", os.fspath(tree), os.fspath(target)], check=True, stdin=subprocess.DEVNULL)
        copies.append(target)
        return target

    yield copy
    for merged in overlays:
        subprocess.run(["umount", os.fspath(merged)], stdin=subprocess.DEVNULL, check=True)
        shutil.rmtree(merged.parent, ignore_errors=True)
    for target in copies:
        shutil.rmtree(target, ignore_errors=True)
