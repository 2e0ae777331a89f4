"""Build the apppot-host Debian package (apppot_host/build_deb.py stages this file as setup.py).

The host side: apppot-start (boots an AppPot image in User-Mode Linux and runs a
job), apppot-build-image, and the protocol modules of apppot_guest they share
with the image.  The kernel and the guest package are added by
host/debian/rules-overrides.mk.  One version for both packages:
``__version__`` in apppot_guest/__init__.py.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "apppot_guest" / "__init__.py").read_text(), re.M).group(1)

LONG_DESCRIPTION = """\
AppPot runs a scientist's own Linux image as ordinary batch jobs: every job
boots the shared base image plus the user's delta in User-Mode Linux, as an
unprivileged process, runs the command in the job directory and exits with
the command's own exit code, so Slurm, HTCondor or ARC see a normal job.

This package is for cluster nodes and desktops: apppot-start (the launcher),
apppot-submit (Slurm job arrays of AppPot jobs), apppot-build-image (makes an
image with debootstrap), AppPot's own statically linked UML kernel
(/usr/lib/apppot/linux) and the apppot guest package that goes into images
(/usr/share/apppot).
"""

setup(
    name="apppot-host",
    version=VERSION,
    description="run AppPot images as batch jobs in User-Mode Linux",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/plain",
    author="AppPot developers",
    author_email="dev@apppot.invalid",
    url="https://apppot.invalid/",
    license="GPL-3+",
    packages=["apppot_host", "apppot_guest"],
    package_data={"apppot_guest": ["exclude.default"]},
    python_requires=">=3.11",
    # Plain scripts (the checkout's own, staged by build_deb), not console_scripts:
    # setuptools' entry-point wrapper imports importlib.metadata at every start.
    scripts=["apppot-start", "apppot-submit", "apppot-build-image"],
)
