"""The apppot Debian package: built by stdeb, checked with dpkg-deb and lintian,
installed, upgraded, removed and purged with apt in real Debian 12 trees."""

from __future__ import annotations

import gzip
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from apppot_guest.account import read_defaults
from apppot_host import build_image
from fixtures_debian import (
    CHECKOUT,
    IMAGE_PACKAGES,
    PYTHON,
    bump_version,
    host_tool,
    in_tree,
    mkrootfs,
    source_version,
)
from fixtures_user import require_root

VERSION = source_version()
DEB_VERSION = f"{VERSION}-1"
NEXT_DEB_VERSION = f"{bump_version(VERSION)}-1"
# The dependency list, in today's package names.
REQUIRED_DEPENDS = {
    "python3", "python3-psutil", "python3-daemon", "screen", "sudo", "bash", "less",
    "build-essential", "gfortran", "autoconf", "automake", "libtool", "make", "git", "subversion",
    "zstd", "xz-utils",
    "iproute2",  # the boot hook configures eth0 with ip(8) when it runs as PID 1
}
CONFFILES = {"/etc/apppot/exclude", "/etc/default/apppot", "/etc/apt/preferences.d/apppot", "/etc/init.d/apppot"}
CONSOLE_UNITS = ("console-getty.service", "getty@tty0.service", "getty@tty1.service", "serial-getty@ttyS0.service",
                 "getty-static.service")
INITTAB = (
    "id:2:initdefault:\n"
    "si::sysinit:/etc/init.d/rcS\n"
    "1:2345:respawn:/sbin/getty --noclear 38400 tty1\n"
    "2:23:respawn:/sbin/getty 38400 tty2\n"
    "#T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100\n"
    "T1:23:respawn:/sbin/getty -L ttyS1 9600 vt100\n"
)
REPO_IN_TREE = "/srv/apppot-repo"
# apt-get update from the local repository only (no network), keeping Debian's lists.
LOCAL_ONLY = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", "Dir::Etc::SourceParts=/etc/apt/sources.list.d",
              "-o", "APT::Get::List-Cleanup=0"]
APT = ["apt-get", "-q", "-y", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", deb, field], capture_output=True, text=True, check=True).stdout.strip()


def dependency_names(text: str) -> set[str]:
    names = set()
    for clause in text.split(","):
        for alternative in clause.split("|"):
            names.add(re.split(r"[\s(:]", alternative.strip(), maxsplit=1)[0])
    return names


def status(root: Path, package: str = "apppot") -> str:
    out = in_tree(root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Version}", package, check=False)
    return out.stdout.strip()


def is_enabled(root: Path, unit: str) -> str:
    result = subprocess.run(["systemctl", f"--root={root}", "is-enabled", unit], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def apppot_paths(root: Path) -> list[str]:
    """Every path in the tree whose name mentions apppot (the user's home aside)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] in (("proc",), ("sys",), ("dev",), ("home",)):
            dirnames[:] = []
            continue
        found += [f"/{rel / n}" for n in dirnames + filenames if "apppot" in n.lower()]
    return sorted(found)


# --- the conffiles in the checkout ---------------------------------------------------


def test_exclude_conffile_is_the_default_exclude_list() -> None:
    assert (CHECKOUT / "etc/apppot/exclude").read_bytes() == (CHECKOUT / "apppot_guest/exclude.default").read_bytes()


def test_defaults_conffile_names_the_account_postinst_creates() -> None:
    values = read_defaults(CHECKOUT)
    assert {k: values[k] for k in ("APPPOT_USER", "APPPOT_UID", "APPPOT_GROUP", "APPPOT_GID")} == {
        "APPPOT_USER": "user", "APPPOT_UID": "1000", "APPPOT_GROUP": "user", "APPPOT_GID": "1000",
    }


def test_tests_use_the_image_builders_package_set() -> None:
    assert tuple(build_image.BASE_PACKAGES) == IMAGE_PACKAGES


# --- the .deb itself ------------------------------------------------------------------


@pytest.mark.integration
def test_control_fields(apppot_deb: Path) -> None:
    assert apppot_deb.name == f"apppot_{DEB_VERSION}_all.deb"
    assert deb_field(apppot_deb, "Package") == "apppot"
    assert deb_field(apppot_deb, "Version") == DEB_VERSION
    assert deb_field(apppot_deb, "Architecture") == "all"
    assert deb_field(apppot_deb, "Section") == "admin"
    depends = dependency_names(deb_field(apppot_deb, "Depends"))
    assert depends >= REQUIRED_DEPENDS, f"missing from Depends: {sorted(REQUIRED_DEPENDS - depends)}"
    assert not any(name.startswith("linux-image") for name in depends)
    assert "systemd-sysv" in dependency_names(deb_field(apppot_deb, "Recommends"))


@pytest.mark.integration
def test_file_list(apppot_deb: Path, tmp_path: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "--contents", apppot_deb], capture_output=True, text=True, check=True).stdout
    entries = {line.split()[5]: line.split()[0] for line in listing.splitlines()}
    dist = "./usr/lib/python3/dist-packages/apppot_guest/"
    for path in ("./usr/bin/apppot-snap", "./usr/sbin/apppot-init", "./etc/init.d/apppot"):
        assert entries.get(path, "").startswith("-rwxr-xr-x"), path
    for path in ("./lib/systemd/system/apppot.service", "./etc/apppot/exclude", "./etc/default/apppot",
                 "./etc/apt/preferences.d/apppot", dist + "__init__.py", dist + "snap.py", dist + "exclude.default",
                 "./usr/share/doc/apppot/copyright"):
        assert entries.get(path, "").startswith("-rw-r--r--"), path
    assert entries.get("./var/lib/apppot/", "").startswith("d")
    assert "./usr/bin/apppot-init" not in entries
    # What the package installs is what is in the checkout.
    subprocess.run(["dpkg-deb", "--extract", apppot_deb, tmp_path], check=True)
    for packaged, source in (("lib/systemd/system/apppot.service", "debian/apppot.service"),
                             ("etc/init.d/apppot", "debian/apppot.init"),
                             ("etc/apppot/exclude", "apppot_guest/exclude.default"),
                             ("usr/lib/python3/dist-packages/apppot_guest/snap.py", "apppot_guest/snap.py")):
        assert (tmp_path / packaged).read_bytes() == (CHECKOUT / source).read_bytes(), packaged


@pytest.mark.integration
def test_conffiles_and_maintainer_scripts(apppot_deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "--control", apppot_deb, control], check=True)
    assert set((control / "conffiles").read_text().split()) == CONFFILES
    for script in ("postinst", "postrm"):
        path = control / script
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        subprocess.run(["sh", "-n", path], check=True)
        # Our own part of the script, plus what debhelper added.
        assert (CHECKOUT / f"debian/apppot.{script}").read_text().split("#DEBHELPER#")[0] in path.read_text()
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'apppot.service'" in postinst
    assert "update-rc.d apppot defaults" in postinst
    # Never started while dpkg runs: no start/restart of the unit or the init script.
    assert "deb-systemd-invoke" not in postinst and "invoke-rc.d" not in postinst


@pytest.mark.integration
def test_lintian_reports_no_errors(apppot_deb: Path) -> None:
    result = subprocess.run(["lintian", "--no-tag-display-limit", apppot_deb], capture_output=True, text=True, check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no-manual-page" not in result.stdout


@pytest.mark.integration
def test_manual_pages_say_what_help_says(apppot_deb: Path, tmp_path: Path) -> None:
    """Made from the parsers at build time: every option of --help is on the page."""
    subprocess.run(["dpkg-deb", "--extract", apppot_deb, tmp_path], check=True)
    for page, module in (("man1/apppot-snap.1.gz", "snap"), ("man8/apppot-init.8.gz", "init")):
        text = gzip.decompress((tmp_path / "usr/share/man" / page).read_bytes()).decode().replace("\\-", "-")
        assert text.startswith(f'.TH "APPPOT-{module.upper()}" ')
        help_text = subprocess.run([PYTHON, "-m", f"apppot_guest.{module}", "--help"], capture_output=True, text=True,
                                   cwd=CHECKOUT, env={**os.environ, "COLUMNS": "80"}, check=True).stdout
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", help_text))
        assert {"--help", "--debug"} <= options and len(options) >= 5, options
        for option in options:
            assert option in text, (page, option)


# --- installed with apt into Debian 12 ---------------------------------------------------


@pytest.mark.integration
def test_installed_files_and_version(installed_tree: Path) -> None:
    root = installed_tree
    assert status(root) == f"ii {DEB_VERSION}"
    for path in ("usr/bin/apppot-snap", "usr/sbin/apppot-init", "lib/systemd/system/apppot.service",
                 "etc/init.d/apppot", "etc/default/apppot", "etc/apt/preferences.d/apppot"):
        assert (root / path).is_file(), path
    assert (root / "var/lib/apppot").is_dir()
    assert (root / "etc/apppot/exclude").read_bytes() == (CHECKOUT / "apppot_guest/exclude.default").read_bytes()
    out = in_tree(root, "apppot-snap", "--version")
    assert VERSION in out.stdout + out.stderr
    # The commands are the plain scripts of the checkout, not setuptools' entry-point wrappers,
    # whose importlib.metadata scan cost 0.3 s of every boot in UML.
    for command in ("usr/bin/apppot-snap", "usr/sbin/apppot-init"):
        out = in_tree(root, "python3", "-X", "importtime", f"/{command}", "--version")
        assert VERSION in out.stdout and "apppot_guest" in out.stderr, out.stderr[-500:]
        assert "importlib.metadata" not in out.stderr, command
    # The package's Python is the one imported by the installed commands.
    out = in_tree(root, "python3", "-c", "import apppot_guest; print(apppot_guest.__file__, apppot_guest.__version__)")
    assert out.stdout.split() == ["/usr/lib/python3/dist-packages/apppot_guest/__init__.py", VERSION]
    # The toolchain the package promises.
    for tool in ("gcc", "g++", "gfortran", "make", "autoconf", "automake", "libtoolize", "git", "svn", "screen", "zstd"):
        in_tree(root, "sh", "-c", f"command -v {tool}")


@pytest.mark.integration
def test_account_and_passwordless_sudo(installed_tree: Path) -> None:
    root = installed_tree
    entry = in_tree(root, "getent", "passwd", "user").stdout.strip().split(":")
    assert entry[2:4] == ["1000", "1000"] and entry[5:] == ["/home/user", "/bin/bash"]
    assert in_tree(root, "getent", "group", "1000").stdout.startswith("user:")
    home = (root / "home/user").stat()
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert (root / "home/user/.bashrc").stat().st_uid == 1000
    sudoers = root / "etc/sudoers.d/apppot"
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    in_tree(root, "visudo", "-cf", "/etc/sudoers.d/apppot")
    in_tree(root, "visudo", "-c")
    with mkrootfs.chroot_session(root):
        # The user really gets root without a password.
        out = in_tree(root, "runuser", "-u", "user", "--", "sudo", "-n", "id", "-u")
        assert out.stdout.strip() == "0"
        # And root has no password: su works without one (the image policy).
        out = in_tree(root, "runuser", "-u", "user", "--", "su", "-c", "id -u", "root")
    assert out.stdout.strip() == "0"
    assert in_tree(root, "getent", "shadow", "root").stdout.split(":")[1] == ""


@pytest.mark.integration
def test_unit_enabled_and_console_given_to_apppot(installed_tree: Path) -> None:
    root = installed_tree
    assert is_enabled(root, "apppot.service") == "enabled"
    for unit in CONSOLE_UNITS:
        assert is_enabled(root, unit) == "masked", unit
    assert list((root / "etc/rc2.d").glob("S*apppot")), "init script not enabled for sysvinit"


@pytest.mark.integration
def test_debian_kernels_are_pinned_out(installed_tree: Path) -> None:
    out = in_tree(installed_tree, "apt-cache", "policy", "linux-image-amd64").stdout
    assert re.search(r"Candidate: \(none\)", out), out
    assert re.search(r"-1\n", out), out


@pytest.mark.integration
def test_reconfigure_is_idempotent_and_handles_inittab(installed_tree: Path, tree_copy: Callable[..., Path]) -> None:
    root = tree_copy(installed_tree)
    (root / "etc/inittab").write_text(INITTAB)
    watched = ["etc/passwd", "etc/group", "etc/shadow", "etc/sudoers.d/apppot", "var/lib/apppot/console-masked"]
    with mkrootfs.chroot_session(root):
        in_tree(root, "dpkg-reconfigure", "-fnoninteractive", "apppot")
        first = {p: (root / p).read_bytes() for p in [*watched, "etc/inittab"]}
        in_tree(root, "dpkg-reconfigure", "-fnoninteractive", "apppot")
    assert {p: (root / p).read_bytes() for p in [*watched, "etc/inittab"]} == first
    inittab = (root / "etc/inittab").read_text().splitlines()
    assert inittab[2] == "#AppPot#1:2345:respawn:/sbin/getty --noclear 38400 tty1"
    assert inittab[3] == "#AppPot#2:23:respawn:/sbin/getty 38400 tty2"
    assert inittab[4] == "#T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100"  # already off: left alone
    assert inittab[5] == "#AppPot#T1:23:respawn:/sbin/getty -L ttyS1 9600 vt100"
    assert inittab[:2] == INITTAB.splitlines()[:2]
    assert status(root) == f"ii {DEB_VERSION}"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("APPPOT_UID=abc", "APPPOT_UID=abc in /etc/default/apppot is not a numeric id"),
        ("APPPOT_USER=Bad.Name", "APPPOT_USER=Bad.Name in /etc/default/apppot is not a valid user or group name"),
        ("APPPOT_USER=other\nAPPPOT_UID=0", "cannot create user other: uid 0 belongs to user root"),
    ],
)
def test_reconfigure_with_bad_defaults_fails_with_one_line(
    installed_tree: Path, tree_copy: Callable[..., Path], setting: str, message: str
) -> None:
    root = tree_copy(installed_tree)
    defaults = root / "etc/default/apppot"
    defaults.write_text(defaults.read_text() + setting + "\n")
    sudoers = (root / "etc/sudoers.d/apppot").read_bytes()
    with mkrootfs.chroot_session(root):
        result = in_tree(root, "dpkg-reconfigure", "-fnoninteractive", "apppot", check=False)
    assert result.returncode != 0
    assert f"apppot postinst: error: {message}\n" in result.stderr
    assert (root / "etc/sudoers.d/apppot").read_bytes() == sudoers


@pytest.mark.integration
def test_snap_base_changes_merge_in_the_tree(installed_tree: Path, tree_copy: Callable[..., Path]) -> None:
    root = tree_copy(installed_tree, real=True)
    with mkrootfs.chroot_session(root):
        in_tree(root, "apppot-snap", "base")
        assert (root / "var/lib/apppot/base.manifest").is_file()
        # A user's session: a new program, a build in the home directory, a deleted file.
        in_tree(root, "sh", "-c", "printf '#!/bin/sh\\necho hi\\n' > /usr/local/bin/hi && chmod 755 /usr/local/bin/hi")
        in_tree(root, "runuser", "-u", "user", "--", "sh", "-c",
                "mkdir -p ~/src && printf 'int main(void){return 7;}\\n' > ~/src/seven.c && cc -o ~/src/seven ~/src/seven.c")
        motd = (root / "etc/motd").read_bytes()
        in_tree(root, "rm", "/etc/motd")
        before = in_tree(root, "apppot-snap", "status").stdout
        for path in ("/usr/local/bin/hi", "/home/user/src/seven", "/etc/motd"):
            assert path in before, (path, before)
        in_tree(root, "apppot-snap", "changes", "/tmp/delta.tar.zst")
        # Undo the session by hand, then merge the delta back.
        in_tree(root, "rm", "-r", "/usr/local/bin/hi", "/home/user/src")
        (root / "etc/motd").write_bytes(motd)
        assert "/usr/local/bin/hi" not in in_tree(root, "apppot-snap", "status").stdout
        in_tree(root, "apppot-snap", "merge", "/tmp/delta.tar.zst")
        after = in_tree(root, "apppot-snap", "status").stdout
        assert sorted(after.splitlines()) == sorted(before.splitlines())
        assert not (root / "etc/motd").exists()
        assert in_tree(root, "hi").stdout == "hi\n"
        assert in_tree(root, "runuser", "-u", "user", "--", "/home/user/src/seven", check=False).returncode == 7
    assert (root / "home/user/src/seven").stat().st_uid == 1000


# --- upgrade, remove, purge -----------------------------------------------------------------


@pytest.mark.integration
def test_upgrade_from_the_local_repository(prepared_tree: Path, apppot_deb: Path, apppot_deb_next: Path) -> None:
    root = prepared_tree
    host_tool("apt_repo", root / REPO_IN_TREE.lstrip("/"), apppot_deb, apppot_deb_next)
    (root / "etc/apt/sources.list.d/apppot.list").write_text(f"deb [trusted=yes] file:{REPO_IN_TREE} ./\n")
    with mkrootfs.chroot_session(root):
        in_tree(root, *APT, *LOCAL_ONLY, "update")
        in_tree(root, *APT, "install", f"apppot={DEB_VERSION}")
        assert status(root) == f"ii {DEB_VERSION}"
        in_tree(root, "apppot-snap", "base")
        manifest = (root / "var/lib/apppot/base.manifest").read_bytes()
        exclude = root / "etc/apppot/exclude"
        exclude.write_text(exclude.read_text() + f"# the local package repository\n{REPO_IN_TREE}\n")
        changed = exclude.read_bytes()
        in_tree(root, *APT, "upgrade")
        assert status(root) == f"ii {NEXT_DEB_VERSION}"
        out = in_tree(root, "apppot-snap", "--version")
        assert bump_version(VERSION) in out.stdout + out.stderr
        assert (root / "var/lib/apppot/base.manifest").read_bytes() == manifest
        assert exclude.read_bytes() == changed
        assert is_enabled(root, "apppot.service") == "enabled"
        for unit in CONSOLE_UNITS:
            assert is_enabled(root, unit) == "masked", unit
        in_tree(root, "visudo", "-cf", "/etc/sudoers.d/apppot")
        # The recorded base still works with the new code.
        in_tree(root, "apppot-snap", "status")


@pytest.mark.integration
def test_remove_gives_the_console_back(installed_tree: Path, tree_copy: Callable[..., Path]) -> None:
    root = tree_copy(installed_tree)
    (root / "etc/inittab").write_text(INITTAB)
    with mkrootfs.chroot_session(root):
        in_tree(root, "dpkg-reconfigure", "-fnoninteractive", "apppot")
        assert "#AppPot#" in (root / "etc/inittab").read_text()
        in_tree(root, *APT, "remove", "apppot")
    assert status(root) == f"rc {DEB_VERSION}"
    assert (root / "etc/inittab").read_text() == INITTAB
    for unit in CONSOLE_UNITS:
        assert not (root / "etc/systemd/system" / unit).is_symlink(), unit
    assert is_enabled(root, "getty@tty1.service") == "enabled"
    assert in_tree(root, "getent", "shadow", "root").stdout.split(":")[1] == "!", "root is locked again"
    assert not (root / "usr/bin/apppot-snap").exists()
    assert (root / "etc/apppot/exclude").is_file()  # conffiles stay until purge
    assert (root / "home/user").is_dir()


@pytest.mark.integration
def test_purge_leaves_no_apppot_files_and_keeps_the_home(installed_tree: Path, tree_copy: Callable[..., Path]) -> None:
    root = tree_copy(installed_tree)
    with mkrootfs.chroot_session(root):
        in_tree(root, "apppot-snap", "base")
        in_tree(root, "runuser", "-u", "user", "--", "sh", "-c", "echo results > ~/results.txt")
        in_tree(root, *APT, "purge", "apppot")
    assert status(root) == ""
    assert apppot_paths(root) == []
    assert not (root / "etc/systemd/system/multi-user.target.wants/apppot.service").is_symlink()
    for unit in CONSOLE_UNITS:
        assert not (root / "etc/systemd/system" / unit).is_symlink(), unit
    assert (root / "home/user/results.txt").read_text() == "results\n"
    assert in_tree(root, "getent", "passwd", "user").stdout.startswith("user:")


# --- bad input to the packaging scripts: one line, the right exit code ------------------------


def _script(name: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return host_tool(name.replace("-", "_"), *args, check=False)


def test_mkrootfs_refuses_a_non_empty_target(tmp_path: Path) -> None:
    require_root("mkrootfs checks that it runs as root before its arguments")
    (tmp_path / "something").write_text("x")
    result = _script("mkrootfs", tmp_path, "--packages", "hello")
    assert result.returncode == 2
    assert result.stderr == f"mkrootfs: error: {tmp_path} exists and is not an empty directory\n"
    assert (tmp_path / "something").read_text() == "x"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--packages", "Bad_Name"], "not a Debian package name: 'Bad_Name'"),
        (["--debs", "/nonexistent/apppot.deb"], "no such .deb: /nonexistent/apppot.deb"),
    ],
)
def test_mkrootfs_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    require_root("mkrootfs checks that it runs as root before its arguments")
    result = _script("mkrootfs", tmp_path / "root", *args)
    assert (result.returncode, result.stderr) == (2, f"mkrootfs: error: {message}\n")
    assert not (tmp_path / "root").exists()


def test_build_deb_refuses_a_conffile_that_differs_from_the_default_list(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run(["cp", "-a", *[CHECKOUT / i for i in ("setup.py", "stdeb.cfg", "apppot_guest", "etc", "usr", "debian")],
                    source],
                   check=True)
    for unit in ("apppot.service", "apppot.init"):  # present or not in the checkout: not what is tested here
        (source / "debian" / unit).touch()
    (source / "etc/apppot/exclude").write_text("/proc\n")
    result = _script("build-deb", "--source", source, "--out", tmp_path / "out")
    assert result.returncode == 3
    assert result.stderr.startswith(f"build-deb: error: {source}/etc/apppot/exclude differs from ")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_build_deb_names_a_missing_source(tmp_path: Path) -> None:
    result = _script("build-deb", "--source", tmp_path / "nope")
    assert (result.returncode, result.stderr) == (2, f"build-deb: error: source tree {tmp_path / 'nope'} is not a directory\n")


def test_apt_repo_rejects_what_is_not_a_package(tmp_path: Path) -> None:
    fake = tmp_path / "fake.deb"
    fake.write_text("not an archive\n")
    result = _script("apt-repo", tmp_path / "repo", fake)
    assert result.returncode == 9
    assert result.stderr.startswith("apt-repo: error: dpkg-deb --info ") and "not a Debian format archive" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "repo" / "fake.deb").exists()
    result = _script("apt-repo", tmp_path / "repo", tmp_path / "missing.deb")
    assert (result.returncode, result.stderr) == (2, f"apt-repo: error: not a .deb file: {tmp_path / 'missing.deb'}\n")


def test_build_deb_host_refuses_a_missing_kernel_before_building_anything(tmp_path: Path) -> None:
    result = _script("build-deb", "--host", "--kernel", tmp_path / "linux", "--out", tmp_path / "out")
    assert (result.returncode, result.stderr) == (
        2, f"build-deb: error: no UML kernel at {tmp_path / 'linux'}: build it first (make kernel), or give --kernel PATH\n")
    assert not (tmp_path / "out").exists(), "nothing is built or half-written"
