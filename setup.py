"""Build the apppot guest package (run with Debian's /usr/bin/python3; stdeb makes the .deb)."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "apppot_guest" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="apppot",
    version=VERSION,
    description="AppPot: run your own Linux image as ordinary batch jobs in User-Mode Linux",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="AppPot developers",
    author_email="dev@apppot.invalid",
    url="https://apppot.invalid/",
    license="GPL-3+",
    packages=["apppot_guest"],
    package_data={"apppot_guest": ["exclude.default"]},
    python_requires=">=3.11",
    entry_points={
        "console_scripts": [
            "apppot-snap = apppot_guest.snap:main",
            "apppot-init = apppot_guest.init:main",
        ],
    },
)
