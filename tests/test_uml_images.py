"""Images people can work in, for each suite AppPot builds (Debian 13 and 12), booted in real UML:
the tools a scientist reaches for, the single-user image policy, upgrading the apppot package
inside a booted desktop image from a local apt repository, and an image made of nothing but a
Debian tree with the package installed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from apppot_guest.account import Account
from fixtures_debian import host_tool
from fixtures_uml import JOB_TIMEOUT, LAUNCHER, PYTHON, as_user

pytestmark = pytest.mark.integration

SuiteImage = tuple[str, Path]
RELEASES = {"trixie": "13", "bookworm": "12"}


def start(user: Account, image: Path, jobdir: Path, *prog: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = as_user(user, [PYTHON, LAUNCHER, "--image", image, "--jobdir", jobdir, *options, "--", *prog])
    return subprocess.run(argv, cwd=jobdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT, check=False)


def test_the_tools_a_scientist_reaches_for(suite_image: SuiteImage, uml_user: Account, uml_jobdir: Path) -> None:
    suite, image = suite_image
    script = """set -e
    cut -d. -f1 /etc/debian_version
    jed --version | head -1
    nano --version | head -1
    less --version | head -1
    ps -o comm= -p 1
    top -b -n 1 >/dev/null && echo top
    wget --version | head -1 | cut -d' ' -f1-2
    file --brief --mime-type /etc/hostname
    test -s /etc/ssl/certs/ca-certificates.crt && echo ca-certificates
    gcc --version | head -1 | cut -d' ' -f1
    gfortran --version | head -1 | cut -d' ' -f1-3
    """
    result = start(uml_user, image, uml_jobdir, "sh", "-c", script, options=("--no-network",))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == RELEASES[suite], lines
    assert "jed" in lines[1].lower() and "nano" in lines[2] and lines[3].startswith("less "), lines
    assert lines[4:] == ["systemd", "top", "GNU Wget", "text/plain", "ca-certificates", "gcc", "GNU Fortran (Debian"], lines


def test_the_single_user_policy_in_a_batch_boot(suite_image: SuiteImage, uml_user: Account, uml_jobdir: Path) -> None:
    """One user with passwordless sudo, root without a password, no cron, nothing listening on the network."""
    _, image = suite_image
    script = """
    id -un
    sudo -n true && echo sudo-ok
    su -c 'id -u' root </dev/null
    echo cron=$(sudo systemctl is-active cron.service)
    echo listening=$(ss -H -lntu | wc -l)
    getent passwd | awk -F: '$3 >= 1000 && $3 < 60000 {print "account=" $1}'
    echo console-getty=$(sudo systemctl is-enabled console-getty.service)
    """
    result = start(uml_user, image, uml_jobdir, "sh", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["user", "sudo-ok", "0"], result.stdout + result.stderr
    assert lines[3] in ("cron=inactive", "cron=unknown"), lines[3]  # cron is not installed
    assert lines[4] == "listening=0"
    # The image's user; the test user's own uid is another account only if the hook had to make it.
    assert "account=user" in lines[5:-1], lines
    assert lines[-1] == "console-getty=masked"


def test_a_full_boot_keeps_logs_and_runs_no_getty(suite_image: SuiteImage, uml_user: Account, uml_jobdir: Path) -> None:
    """The desktop's boot: journald keeps the log in /var/log/journal (persistent); no getty competes for the console."""
    _, image = suite_image
    script = """
    echo journald=$(sudo systemctl is-active systemd-journald.service)
    echo storage=$(sudo journalctl --header 2>/dev/null | grep -c '^File path: /var/log/journal/')
    echo gettys=$(pgrep -c getty)
    echo listening=$(ss -H -lntu | wc -l)
    """
    result = start(uml_user, image, uml_jobdir, "sh", "-c", script, options=("--boot", "full", "--no-network"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "journald=active"
    assert lines[1] != "storage=0", "the journal is kept on disk, not only in /run"
    assert lines[2:] == ["gettys=0", "listening=0"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_apt_get_upgrade_apppot_in_a_booted_desktop_image(
        suite_image: SuiteImage, uml_user: Account, uml_jobdir: Path, apppot_deb_next: Path) -> None:
    """A writable desktop copy, upgraded from a local repository inside the guest: the new version
    stays, and the recorded base survives the upgrade."""
    suite, image = suite_image
    desktop = uml_user.home / f"desktop-{suite}.img"
    subprocess.run(["cp", "--sparse=always", image, desktop], check=True)
    os.chown(desktop, uml_user.uid, uml_user.gid)
    desktop.chmod(0o644)
    repo = uml_jobdir / "repo"
    host_tool("apt_repo", repo, apppot_deb_next)
    subprocess.run(["chown", "-R", f"{uml_user.uid}:{uml_user.gid}", repo], check=True)
    new_version = subprocess.run(["dpkg-deb", "--field", apppot_deb_next, "Version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    only_local = ("-o Dir::Etc::SourceList=/etc/apt/sources.list.d/apppot-test.list -o Dir::Etc::SourceParts=/dev/null "
                  "-o APT::Get::List-Cleanup=0")
    script = f"""set -e
    before=$(sha256sum /var/lib/apppot/base.manifest)
    echo 'deb [trusted=yes] file:/home/user/job/repo ./' | sudo tee /etc/apt/sources.list.d/apppot-test.list >/dev/null
    sudo apt-get -q {only_local} update >/dev/null
    sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y {only_local} install --only-upgrade apppot >/dev/null
    sudo rm /etc/apt/sources.list.d/apppot-test.list
    dpkg-query -W -f '${{Version}}\\n' apppot
    test "$before" = "$(sha256sum /var/lib/apppot/base.manifest)" && echo base-kept
    """
    result = start(uml_user, desktop, uml_jobdir, "sh", "-c", script, options=("--no-network",))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-2:] == [new_version, "base-kept"]
    # The next boot of the same image runs the new hook, and apppot-snap still has its base.
    result = start(uml_user, desktop, uml_jobdir, "sh", "-c", "dpkg-query -W -f '${Version}\\n' apppot; "
                   "apppot-snap status >/dev/null && echo status-ok", options=("--no-network",))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [new_version, "status-ok"]
    record = json.loads((uml_jobdir / "apppot.status.json").read_text())
    assert record["apppot_version"] == new_version.partition("-")[0]
    desktop.unlink()
    shutil.rmtree(repo, ignore_errors=True)


def test_the_package_alone_makes_a_tree_an_image(installed_tree: Path, tree_copy: Callable[..., Path],
                                                 uml_user: Account, uml_jobdir: Path, uml_kernel: Path) -> None:
    """Everything a boot needs comes with the apppot package: a Debian tree with only the package
    installed, made an image by plain mkfs.ext4 -d with nothing but what is specific to one image
    (fstab, hostname, the name server), runs a batch job with its network."""
    root = tree_copy(installed_tree)
    (root / "etc/fstab").write_text("/dev/ubda / ext4 defaults 0 0\n")
    (root / "etc/hostname").write_text("plain\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    image = uml_user.home.parent / "images" / "plain.img"
    image.parent.mkdir(mode=0o755, exist_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", root, image, "3G"], check=True, capture_output=True)
    image.chmod(0o444)
    try:
        result = start(uml_user, image, uml_jobdir, "sh", "-c", "hostname; ip -br -4 address show dev vec0; exit 9")
        assert result.returncode == 9, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "plain" and "10.0.2.15/24" in lines[1], result.stdout
        assert json.loads((uml_jobdir / "apppot.status.json").read_text())["network"] == ["vec0"]
    finally:
        image.unlink()
