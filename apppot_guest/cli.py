"""The one way an AppPot command starts and ends, shared by every CLI of both packages.

``run_main`` parses the command line, sets up logging once, calls the handler
the parser chose (``args.handler``, a ``cmd_<verb>(args) -> int``) and turns
whatever ends it into one line on stderr and an exit code:

- an ``AppPotError``: ``PROG: error: MESSAGE`` and the error's ``exit_code``
  (or what the command's ``failure_code`` maps it to: the launcher's 125);
- Ctrl-C: ``Interrupted`` (130); stdout closed early (``| head``): quietly 141;
- an ``OSError`` nobody turned into an AppPotError: an ``FsError`` naming the path;
- anything else is a bug: ``internal error: ...`` and exit 1 (``--debug`` shows where).

``-v`` means one step more detail than the command's default (the builders
say what they do by default, so ``-v`` adds the commands they run);
``--debug`` is full detail plus the traceback of an error, and keeps the exit
code the error would have had without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from .errors import AppPotError, FsError, Interrupted, UsageError, display_path, one_line

# typing.TYPE_CHECKING without importing typing, nor argparse, which apppot-init's boot
# path needs neither of (each import costs milliseconds of every boot in UML); mypy and
# ruff read any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class InternalError(AppPotError):
    """A bug: an exception no AppPot code expected."""


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--debug``, worded the same in every command."""
    parser.add_argument("-v", "--verbose", action="store_true", help="say more: one step more detail")
    parser.add_argument("--debug", action="store_true",
                        help="full detail, and the traceback of an error (the exit code stays the same)")


def setup_logging(prog: str, *, verbose: bool = False, debug: bool = False, default: int = logging.WARNING) -> None:
    """Configure the root logger once: ``PROG: message`` on stderr, at the level the options ask for."""
    level = logging.DEBUG if debug else (max(default - 10, logging.DEBUG) if verbose else default)
    logging.basicConfig(level=level, format=f"{prog}: %(message)s", stream=sys.stderr, force=True)


def as_error(exc: BaseException) -> AppPotError:
    """What ends a command, as the AppPotError it is reported as."""
    if isinstance(exc, AppPotError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("interrupted")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return FsError(f"{reason}: {display_path(exc.filename)}" if exc.filename else reason)
    return InternalError(f"internal error: {exc!r} (--debug shows where)")


def report(prog: str, error: AppPotError) -> None:
    """The one line a failed command prints."""
    sys.stderr.write(f"{prog}: error: {one_line(str(error))}\n")
    sys.stderr.flush()


def quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush says nothing."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    default_level: int = logging.WARNING,
    failure_code: Callable[[AppPotError], int] | None = None,
    handler: Callable[[argparse.Namespace], int] | None = None,
) -> int:
    """Parse ``argv``, run ``handler(args)`` (default: ``args.handler(args)``), and end as the module's
    docstring says."""
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # parsers that raise instead of exiting (apppot-snap's)
        report(prog, exc)
        return exc.exit_code
    debug = bool(getattr(args, "debug", False))
    setup_logging(prog, verbose=bool(getattr(args, "verbose", False)), debug=debug, default=default_level)
    try:
        code = int(handler(args) if handler is not None else args.handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        quiet_stdout()
        return EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt) as exc:
        error = as_error(exc)
        if debug:
            traceback.print_exc()
        report(prog, error)
        return failure_code(error) if failure_code is not None else error.exit_code
