"""An AppPot image built by apppot-build-image, and a non-root user who boots it in UML.

``apppot_image`` is built once per session from the ``apppot_deb`` of this
checkout and cached under ~/.cache/apppot/images, keyed by the package's
contents (not its build timestamps) and by build-image itself, so a change to
either rebuilds it and an unchanged checkout reuses it.  Tests see it as a
root-owned, read-only file in a directory the test user can reach, as a
shared base image is on a cluster.  ``uml_user`` is a temporary account;
``start_job`` runs ./apppot-start as that account; it boots AppPot's
own kernel (``uml_kernel``), which apppot-start finds in the checkout's out/.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from apppot_guest.account import Account
from fixtures_user import temporary_user

CHECKOUT = Path(__file__).resolve().parent.parent
LAUNCHER = CHECKOUT / "apppot-start"  # the checkout's shim, as a user runs it
PYTHON = "/usr/bin/python3"
IMAGE_SIZE = "3G"  # sparse: the tree is about 0.8 GB, the rest is room for a user's installs
JOB_TIMEOUT = 300  # seconds: no single boot in these tests comes near it
DEFAULT_SUITE = "trixie"  # build-image's default (Debian 13)
SUITES = ("trixie", "bookworm")  # the Debian suites AppPot builds images of
KEEP_IMAGES = 2  # cached images per suite, and any used in the last KEEP_SECONDS
KEEP_SECONDS = 6 * 3600


def fake_image(path: Path, size: int = 4096) -> Path:
    """A file apppot-start takes for an image without booting it (--dry-run): zeros with the ext2/3/4
    superblock's magic where the kernel looks for it."""
    data = bytearray(size)
    data[1080:1082] = b"\x53\xef"
    path.write_bytes(bytes(data))
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("APPPOT_CACHE") or Path.home() / ".cache" / "apppot")


def deb_content_key(deb: Path) -> str:
    """A hash of what the package installs and declares, not of when it was built."""
    digest = hashlib.sha256()
    control = subprocess.run(["dpkg-deb", "--field", os.fspath(deb)], capture_output=True, check=True).stdout
    digest.update(control)
    payload = subprocess.run(["dpkg-deb", "--fsys-tarfile", os.fspath(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            digest.update(f"{member.name}\0{member.mode:o}\0{member.type!r}\0{member.linkname}\0".encode())
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                digest.update(extracted.read())
    for module in ("build_image", "mkrootfs"):
        digest.update((CHECKOUT / "apppot_host" / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def uml_kernel() -> Path:
    """AppPot's static kernel, built by apppot-build-kernel (cached) into out/linux, where apppot-start finds it."""
    result = subprocess.run([PYTHON, CHECKOUT / "apppot-build-kernel"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"build-kernel failed:\n{result.stderr[-4000:]}"
    kernel = Path(result.stdout.strip())
    assert kernel == CHECKOUT / "out" / "linux" and os.access(kernel, os.X_OK)
    return kernel


def cached_image(deb: Path, suite: str, uml_home: Path, name: str) -> Path:
    """The image of ``suite`` with ``deb`` (built by build-image once and kept in the cache), as a
    root-owned, read-only file ``name`` in a directory the test user can read."""
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    cached = images / f"apppot-{suite}-{deb_content_key(deb)}.img"
    shared = uml_home.parent / "images"
    shared.mkdir(mode=0o755, exist_ok=True)
    image = shared / name
    while not image.exists():
        if not cached.is_file():
            evict_old_images(images, suite)
            result = subprocess.run(
                [PYTHON, CHECKOUT / "apppot-build-image", "--suite", suite, "--deb", deb, "--size", IMAGE_SIZE, "--output", cached],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            )
            assert result.returncode == 0, f"build-image --suite {suite} failed:\n{result.stderr[-4000:]}"
        try:
            os.link(cached, image)  # ours from here on, whatever happens to the cache entry
        except FileNotFoundError:
            continue  # evicted by another checkout's tests just now: build it again
        except OSError:  # another file system
            subprocess.run(["cp", "--sparse=always", os.fspath(cached), os.fspath(image)], check=True)
        with contextlib.suppress(FileNotFoundError):
            os.utime(cached)
    os.chown(image, 0, 0)
    image.chmod(0o444)
    return image


def evict_old_images(images: Path, suite: str) -> None:
    """Keep the newest few of a suite, and any used in the last hours (other checkouts on this machine)."""
    found = []
    for path in images.glob(f"apppot-{suite}-*.img"):
        with contextlib.suppress(FileNotFoundError):
            found.append((path.stat().st_mtime, path))
    for mtime, path in sorted(found)[:-KEEP_IMAGES]:
        if time.time() - mtime > KEEP_SECONDS:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def apppot_image(apppot_deb: Path, uml_home: Path, uml_kernel: Path) -> Path:
    """The image of the default suite (read-only, root-owned) in a directory the test user can read."""
    return cached_image(apppot_deb, DEFAULT_SUITE, uml_home, "apppot.img")


@pytest.fixture(scope="session", params=SUITES)
def suite_image(request: pytest.FixtureRequest, apppot_deb: Path, uml_home: Path, uml_kernel: Path) -> tuple[str, Path]:
    """(suite, image) for each Debian suite AppPot builds images of; the same .deb in each."""
    suite: str = request.param
    return suite, cached_image(apppot_deb, suite, uml_home, "apppot.img" if suite == DEFAULT_SUITE else f"apppot-{suite}.img")


@pytest.fixture(scope="session")
def uml_home() -> Iterator[Path]:
    """A temporary directory other users can traverse, for the test user's home and the image."""
    path = Path(tempfile.mkdtemp(prefix="apppot-uml-"))
    path.chmod(0o755)
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_dirs(uid: int) -> list[Path]:
    """The launcher's per-run directories in $TMPDIR (or /tmp) that belong to ``uid``."""
    found = []
    for path in Path(os.environ.get("TMPDIR") or "/tmp").glob("apppot-run-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_uid == uid:
                found.append(path)
    return found


@pytest.fixture(scope="session")
def uml_user(uml_home: Path) -> Iterator[Account]:
    """A real unprivileged account on the test machine that runs apppot-start."""
    with temporary_user("apppot-u", uml_home) as account:
        for stale in run_dirs(account.uid):  # an earlier account with this uid left them (a killed launcher)
            shutil.rmtree(stale, ignore_errors=True)
        yield account


@pytest.fixture
def uml_jobdir(uml_user: Account) -> Iterator[Path]:
    """A fresh job directory owned by the test user."""
    path = Path(tempfile.mkdtemp(prefix="job-", dir=uml_user.home))
    os.chown(path, uml_user.uid, uml_user.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(user: Account, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``argv`` run as ``user`` with a clean login-like environment."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--reset-env",
            *(os.fspath(a) for a in argv)]


@pytest.fixture
def start_job(uml_user: Account, apppot_image: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``start_job(jobdir, *prog, options=[...])``: run apppot-start as the test user, wait, return the result."""

    def start(jobdir: Path, *prog: str, options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        argv = as_user(uml_user, [PYTHON, LAUNCHER, "--image", apppot_image, "--jobdir", jobdir, *options, "--", *prog])
        return subprocess.run(argv, cwd=jobdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT, check=False)

    return start
