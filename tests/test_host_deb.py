"""apppot-host, the package a cluster admin installs: built from this checkout with the guest package and
AppPot's kernel in it, installed with apt into a fresh Debian 12 tree, and used from PATH there, a real boot
included (the launcher, its modules and the kernel all from the package; no checkout anywhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot_host import mkrootfs
from fixtures_debian import CHECKOUT, host_tool, in_tree, source_version

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
JOB_ENV = {"HOME": "/var/tmp/job", "TMPDIR": "/var/tmp"}  # nobody's home does not exist


@pytest.fixture(scope="session")
def host_debs(tmp_path_factory: pytest.TempPathFactory, uml_kernel: Path) -> tuple[Path, Path]:
    """(the guest package, apppot-host) as `make deb` builds them."""
    out = tmp_path_factory.mktemp("host-deb")
    lines = host_tool("build_deb", "--host", "--out", out).stdout.split()
    assert len(lines) == 2, lines
    guest, host = map(Path, lines)
    assert guest.name.startswith("apppot_") and host.name.startswith("apppot-host_"), lines
    return guest, host


@pytest.fixture(scope="session")
def host_tree(tmp_path_factory: pytest.TempPathFactory, host_debs: tuple[Path, Path]) -> Iterator[Path]:
    """Debian 12 minbase with man-db and apppot-host installed by apt (its dependencies from Debian)."""
    root = tmp_path_factory.mktemp("host-tree") / "root"
    host_tool("mkrootfs", root, "--packages", "man-db", "--debs", host_debs[1])
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_both_packages_share_one_version_and_are_lintian_clean_of_errors(host_debs: tuple[Path, Path]) -> None:
    version = f"{source_version()}-1"
    for deb in host_debs:
        fields = subprocess.run(["dpkg-deb", "--field", deb, "Version"], capture_output=True, text=True, check=True)
        assert fields.stdout.strip() == version, deb
        lintian = subprocess.run(["lintian", "--fail-on", "error", "--suppress-tags", "initial-upload-closes-no-bugs",
                                  deb], capture_output=True, text=True, check=False)
        assert lintian.returncode == 0, f"{deb.name}:\n{lintian.stdout}{lintian.stderr}"


def test_apt_installs_the_launcher_the_kernel_and_the_guest_package(host_tree: Path, host_debs: tuple[Path, Path],
                                                                     uml_kernel: Path) -> None:
    guest, _ = host_debs
    commands = "command -v apppot-start; command -v apppot-submit; command -v apppot-build-image"
    assert in_tree(host_tree, "sh", "-c", commands).stdout.split() == [
        "/usr/bin/apppot-start", "/usr/bin/apppot-submit", "/usr/sbin/apppot-build-image"]
    assert in_tree(host_tree, "apppot-start", "--version").stdout == f"apppot-start {source_version()}\n"
    for command, name in ((CHECKOUT / "apppot-start", "/usr/bin/apppot-start"),
                          (CHECKOUT / "apppot-submit", "/usr/bin/apppot-submit"),
                          (CHECKOUT / "apppot-build-image", "/usr/sbin/apppot-build-image")):
        # The checkout's plain scripts, not setuptools' entry-point wrappers (importlib.metadata at every start).
        assert (host_tree / name.lstrip("/")).read_bytes() == command.read_bytes(), name
    where = in_tree(host_tree, "python3", "-c", "import apppot_host.start as m; print(m.__file__)").stdout
    assert where == "/usr/lib/python3/dist-packages/apppot_host/start.py\n"
    assert (host_tree / "usr/lib/apppot/linux").read_bytes() == uml_kernel.read_bytes()
    assert (host_tree / "usr/share/apppot" / guest.name).read_bytes() == guest.read_bytes()
    for vde in ("/usr/bin/vde_plug", "/usr/lib/x86_64-linux-gnu/vdeplug/libvdeplug_slirp.so"):
        assert (host_tree / vde.lstrip("/")).exists(), f"{vde}: apppot-host must depend on what provides it"


def test_man_apppot_start_shows_the_page_made_from_its_parser(host_tree: Path) -> None:
    page = in_tree(host_tree, "man", "-P", "cat", "apppot-start").stdout
    assert page.lstrip().startswith("APPPOT-START(1)"), page[:200]
    assert "--dry-run" in page and "--changes" in page
    assert in_tree(host_tree, "man", "-w", "8", "apppot-build-image").stdout.strip().endswith("apppot-build-image.8.gz")
    assert in_tree(host_tree, "man", "-w", "1", "apppot-submit").stdout.strip().endswith("apppot-submit.1.gz")


def test_a_job_runs_with_the_installed_launcher_and_kernel(host_tree: Path, apppot_image: Path) -> None:
    """Inside the tree (chroot: its python3, its /usr/bin/apppot-start, its /usr/lib/apppot/linux) as nobody."""
    image = host_tree / "var/tmp/apppot.img"
    try:
        os.link(apppot_image, image)
    except OSError:
        subprocess.run(["cp", "--sparse=always", apppot_image, image], check=True)
    jobdir = host_tree / "var/tmp/job"
    jobdir.mkdir()
    os.chown(jobdir, 65534, 65534)
    start = ["apppot-start", "--image", "/var/tmp/apppot.img", "--jobdir", "/var/tmp/job", "--no-network"]
    try:
        with mkrootfs.chroot_session(host_tree):
            plan = mkrootfs.chroot_run(host_tree, [*NOBODY, *start, "--dry-run", "--", "true"], check=False,
                                       capture=True, env=JOB_ENV)
            assert plan.returncode == 0, plan.stderr.decode()
            assert json.loads(plan.stdout)[0] == "/usr/lib/apppot/linux", "the package's kernel, found by itself"
            job = mkrootfs.chroot_run(host_tree, [*NOBODY, *start, "--", "sh", "-c", "uname -r > out; exit 7"],
                                      check=False, capture=True, env=JOB_ENV)
        assert job.returncode == 7, job.stderr.decode()[-3000:]
        kernel = subprocess.run(["file", "-b", host_tree / "usr/lib/apppot/linux"], capture_output=True, text=True)
        assert "statically linked" in kernel.stdout
        assert (jobdir / "out").read_text().strip()[:1].isdigit()
        assert json.loads((jobdir / "apppot.status.json").read_text())["exit_code"] == 7
    finally:
        image.unlink(missing_ok=True)
