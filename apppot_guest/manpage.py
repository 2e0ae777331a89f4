"""Manual pages from the commands' own argparse parsers, made when the packages are built.

    python3 -m apppot_guest.manpage MODULE:FUNCTION SECTION > PAGE

FUNCTION returns the command's ``ArgumentParser``; the page has NAME (the
parser's ``prog`` and the first sentence of its description), SYNOPSIS (its
usage) and the whole ``--help`` text (options, exit codes, environment) as
DESCRIPTION, so the page says exactly what ``--help`` says and cannot drift
from it.  debian/rules-overrides.mk runs it for apppot-snap and apppot-init.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from . import __version__


def roff_escape(text: str) -> str:
    """Text safe in a roff line: backslashes doubled, a leading dot or quote protected."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def render(parser: argparse.ArgumentParser, section: str, date: str) -> str:
    prog = parser.prog
    summary = (parser.description or prog).split(". ")[0].rstrip(".")
    os.environ["COLUMNS"] = "80"  # argparse wraps --help at the terminal's width
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [
        f'.TH "{prog.upper()}" "{section}" "{date}" "apppot {__version__}" "AppPot"',
        ".SH NAME",
        f"{roff_escape(prog)} \\- {roff_escape(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        ".nf",
        *(roff_escape(line) for line in usage.splitlines()),
        ".fi",
        ".SH DESCRIPTION",
        ".nf",
        *(roff_escape(line) for line in parser.format_help().splitlines()),
        ".fi",
        ".SH SEE ALSO",
        "The AppPot README and docs/ in the AppPot sources.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or ":" not in args[0]:
        print("usage: python3 -m apppot_guest.manpage MODULE:FUNCTION SECTION", file=sys.stderr)
        return 2
    module_name, _, function = args[0].partition(":")
    parser = getattr(importlib.import_module(module_name), function)()
    # Reproducible builds: the date of SOURCE_DATE_EPOCH (dpkg-buildpackage sets it from the changelog).
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    sys.stdout.write(render(parser, args[1], time.strftime("%Y-%m-%d", time.gmtime(epoch))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
