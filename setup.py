"""Build the apppot guest package (run with Debian's /usr/bin/python3; stdeb makes the .deb)."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "apppot_guest" / "__init__.py").read_text(), re.M).group(1)


# The package description (also the Debian package's extended description).
LONG_DESCRIPTION = """\
AppPot turns a minimal Debian image into one that scientists can run on a
cluster: they boot it in User-Mode Linux on the desktop, install and build
their software with sudo, apt-get and make, and save what they changed as a
small delta with apppot-snap.  On the cluster every job boots the pristine
shared image with that delta; the boot hook (apppot-init) merges it, runs the
job's command as the unprivileged user in the job directory, records the exit
status and powers off.

This package holds the guest side: apppot-snap, apppot-init with its systemd
unit and init script, the job account with passwordless sudo, and the
compilers and tools an AppPot image promises.
"""

setup(
    name="apppot",
    version=VERSION,
    description="run your own Linux image as batch jobs in User-Mode Linux",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/plain",
    author="AppPot developers",
    author_email="dev@apppot.invalid",
    url="https://apppot.invalid/",
    license="GPL-3+",
    packages=["apppot_guest"],
    package_data={"apppot_guest": ["exclude.default"]},
    # Configuration installed as Debian conffiles (everything under /etc is one);
    # the systemd unit, init script and maintainer scripts come from debian/.
    data_files=[
        ("/etc/apppot", ["etc/apppot/exclude"]),
        ("/etc/default", ["etc/default/apppot"]),
        ("/etc/apt/preferences.d", ["etc/apt/preferences.d/apppot"]),
        # Not configuration: what a boot needs (docs/package.md).  apppot.service
        # itself and the masks come from debian/ (dh_installsystemd, dh_link).
        ("/usr/lib/systemd/system", ["usr/lib/systemd/system/apppot-batch.target",
                                     "usr/lib/systemd/system/apppot-network.service"]),
        ("/usr/lib/systemd/system/systemd-remount-fs.service.d",
         ["usr/lib/systemd/system/systemd-remount-fs.service.d/apppot.conf"]),
        *((f"/usr/lib/systemd/system/{unit}.d", [f"usr/lib/systemd/system/{unit}.d/apppot-uml.conf"])
          for unit in ("proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
                       "systemd-binfmt.service", "systemd-modules-load.service")),
    ],
    python_requires=">=3.11",
    # The commands are plain scripts, not console_scripts: setuptools' entry-point
    # wrapper imports importlib.metadata and scans the installed distributions,
    # which cost 0.3 s of every boot in UML (docs/benchmarks.md).
    # debian/rules-overrides.mk moves apppot-init to /usr/sbin.
    scripts=["usr/bin/apppot-snap", "usr/sbin/apppot-init"],
)
