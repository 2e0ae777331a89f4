"""The errors AppPot's commands report, and the one exit-code table.

Library code raises an ``AppPotError`` subclass with a one-line message that
names the path or value at fault; only a command's ``main()`` catches it,
prints ``PROG: error: MESSAGE`` and exits with the class's ``exit_code``.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

# The exit codes of apppot-snap (and of apppot-init's own failures before a
# job runs).  Job launchers use the shell conventions instead (see job.py).
EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code for bad command-line words


class AppPotError(Exception):
    """Base class: a failure the user can act on, described in one line."""

    exit_code = 1
    summary = "other error"


class UsageError(AppPotError):
    exit_code = EXIT_USAGE
    summary = "bad command-line option or argument"


class ConfigError(AppPotError):
    exit_code = 3
    summary = "bad configuration (exclude list, kernel command line, defaults file)"


class ProtocolError(ConfigError):
    """The launcher and the image's boot hook speak different versions of the kernel command line."""


class NoBaseError(AppPotError):
    exit_code = 4
    summary = "no base manifest recorded under the root (run 'apppot-snap base')"


class BaseMismatchError(AppPotError):
    exit_code = 5
    summary = "the delta was made against another base (use --force to apply anyway)"


class DeltaError(AppPotError):
    exit_code = 6
    summary = "the delta or manifest file is not readable, corrupt or tampered with"


class UnsafePathError(AppPotError):
    exit_code = 7
    summary = "a path would be written outside the root or through a symlink"


class FsError(AppPotError):
    exit_code = 8
    summary = "a file system operation failed (permissions, space, missing path)"


class ToolError(AppPotError):
    exit_code = 9
    summary = "an external program (zstd, xz, gzip, mount, ...) failed"


class BusyError(AppPotError):
    exit_code = 10
    summary = "another apppot-snap is using this root (it holds var/lib/apppot/lock); nothing was done"


class Interrupted(AppPotError):
    exit_code = 130
    summary = "interrupted; nothing half-written was left behind"


ALL_ERRORS: tuple[type[AppPotError], ...] = (
    UsageError,
    ConfigError,
    NoBaseError,
    BaseMismatchError,
    DeltaError,
    UnsafePathError,
    FsError,
    ToolError,
    BusyError,
    Interrupted,
)


ExitCodes = Sequence[tuple[object, str]]  # (code or range such as "128+N", meaning): a command's one table


def exit_codes_help(rows: ExitCodes) -> str:
    """A command's exit-code table as the end of its ``--help`` shows it."""
    lines = ["exit codes:"]
    for code, meaning in rows:
        first, *rest = textwrap.wrap(meaning, 68)
        lines += [f"  {code!s:<9}{first}", *(f"  {'':<9}{line}" for line in rest)]
    return "\n".join(lines) + "\n"


def exit_codes_markdown(rows: ExitCodes) -> str:
    """The same table as the README shows it (the tests check the README has it)."""
    return "| code | meaning |\n|---|---|\n" + "".join(f"| {code} | {meaning} |\n" for code, meaning in rows)


def exit_code_rows() -> list[tuple[object, str]]:
    """apppot-snap's table, from the error classes."""
    return [(EXIT_OK, "success"), *((cls.exit_code, cls.summary) for cls in ALL_ERRORS),
            (AppPotError.exit_code, AppPotError.summary)]


def fs_error(exc: OSError, action: str, path: object) -> FsError:
    """Turn an OSError into an FsError naming the action and the path."""
    reason = exc.strerror or str(exc)
    return FsError(f"cannot {action} {display_path(path)}: {reason}")


MAX_MESSAGE = 1000  # characters: an error is one line a person reads, whatever the input


def excerpt(data: bytes, limit: int = 40) -> str:
    """A short, escaped quotation of untrusted ``data`` for a message: its start and its length."""
    shown = data[:limit].decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")
    return repr(shown) if len(data) <= limit else f"{shown!r}... ({len(data)} bytes)"


def one_line(message: str) -> str:
    """``message`` as one bounded line: control characters escaped, at most MAX_MESSAGE characters."""
    if not message.isprintable():
        message = message.encode("unicode_escape", "backslashreplace").decode("ascii")
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 30] + f"... ({len(message)} characters)"


def display_path(path: object) -> str:
    """A path for a one-line message: bytes-safe, control characters escaped."""
    if isinstance(path, (bytes, bytearray)):
        raw = bytes(path)
    elif isinstance(path, (str, os.PathLike)):
        raw = os.fsencode(path)
    else:
        raw = str(path).encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
