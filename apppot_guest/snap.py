"""apppot-snap: record an image's base, list and save what changed since, apply a delta."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import pwd
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from . import __version__, faults
from .cli import run_main
from .delta import DEFAULT_SUFFIX, DeltaOutput, compressor_for
from .diff import Diff, compare, with_read_metadata
from .errors import UsageError, display_path, exit_code_rows, exit_codes_help
from .manifest import KEY_SIZE, BaseRecords, BaseWriter, base_path, read_records
from .state import RootLock, recover, remove_leftover
from .tree import Excluder, Item, walk
from .workers import Workers

PROG = "apppot-snap"
log = logging.getLogger(PROG)


class Progress:
    """A self-updating line on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        # A batch job's console is a terminal in the guest but a file on the host:
        # apppot-start says so with TERM=dumb.
        terminal = sys.stderr.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        self.label, self.enabled = label, enabled and terminal
        self.last = 0.0
        self.shown = False
        self.entries = self.nbytes = 0

    def __call__(self, entries: int, nbytes: int) -> None:
        """Entries walked and bytes read so far (0: no news of that count)."""
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        self.shown = True
        self.entries, self.nbytes = entries or self.entries, nbytes or self.nbytes
        sys.stderr.write(f"\r{self.label}: {self.entries} entries, {self.nbytes / 1e6:.1f} MB read\x1b[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def invoking_user_home() -> Path:
    """The home of the user who ran us, also under sudo."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and os.geteuid() == 0:
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path.home()


def default_delta_path() -> Path:
    job = invoking_user_home() / "job"
    if os.path.ismount(job):
        return job / f"apppot.{datetime.date.today().isoformat()}.changes{DEFAULT_SUFFIX}"
    return Path.cwd() / f"apppot.changes{DEFAULT_SUFFIX}"


def load_excluder(args: argparse.Namespace, extra_paths: tuple[Path, ...] = ()) -> Excluder:
    return Excluder.load(args.root, args.exclude_from or (), extra_paths)


def walk_tree(root: Path, exclude: Excluder, workers: Workers) -> Iterator[Item]:
    """Walk the root in manifest order; AppPot temporaries met on the way are never listed, and dead ones are removed."""
    items = walk(root, exclude, on_temporary=remove_leftover, lister=workers)
    first = next(items, None)  # the root is listed: the walk has begun, no file was read yet
    faults.reached("scanned")
    if first is not None:
        yield first
        yield from items


def scan_and_compare(args: argparse.Namespace, for_delta: bool, exclude: Excluder) -> tuple[BaseRecords, Diff]:
    base = read_records(args.root)
    progress = Progress("scanning", args.progress)
    with Workers(os.fsencode(args.root), exclude, remove_leftover) as workers:
        diff = compare(base, walk_tree(args.root, exclude, workers), exclude, workers, checksum=args.checksum, for_delta=for_delta, progress=progress)
    progress.done()
    return base, diff


def _file_of(item: Item) -> tuple[bytes, int, bool] | None:
    path, key, sparse = item
    return (path, int(key.split(b"\t", KEY_SIZE + 1)[KEY_SIZE]), sparse) if key[:1] == b"f" else None


def cmd_base(args: argparse.Namespace) -> int:
    """Walk, hash and write in one stream: the manifest is written as the walk goes."""
    progress = Progress("recording base", args.progress)
    exclude = load_excluder(args)
    writer = BaseWriter(None if args.just_print else base_path(args.root))
    try:
        entries = nbytes = 0
        with Workers(os.fsencode(args.root), exclude, remove_leftover) as workers:
            for (path, key, _), digest in workers.map(walk_tree(args.root, exclude, workers), _file_of):
                if digest is None:
                    writer.add(path, key + b"\t")
                else:
                    writer.add(path, with_read_metadata(key, digest) + b"\t" + digest.sha256.encode())
                    nbytes += digest.size
                entries += 1
                if entries == 1 or not entries & 1023:
                    progress(entries, nbytes)
        progress.done()
        manifest_id = writer.finish()
    finally:
        writer.discard()
    summary = f"{manifest_id} ({entries} entries, {nbytes / 1e6:.1f} MB)"
    if args.just_print:
        print(f"would record base {summary} in {args.root}")
        return 0
    print(f"recorded base {summary} in {base_path(args.root)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    base, diff = scan_and_compare(args, for_delta=False, exclude=load_excluder(args))
    if args.json:
        items = [{"status": str(c.status), "path": "/" + os.fsdecode(c.path), "what": list(c.what)} for c in diff.changes]
        json.dump({"root": os.fspath(args.root), "base_id": base.id, "changes": items}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for change in diff.changes:
        detail = f"  ({', '.join(change.what)})" if args.verbose and change.what else ""
        print(f"{change.status} /{display_path(change.path)}{detail}")
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    out = Path(os.path.abspath(args.file or default_delta_path()))
    compressor_for(out)  # a bad file name is refused before any work
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: {out.parent} is not a directory")
    if out.is_dir():
        raise UsageError(f"cannot write the delta {out}: it is a directory")
    exclude = load_excluder(args, extra_paths=(out,))
    output = None if args.just_print else DeltaOutput(out)  # an unwritable destination is reported before the scan
    try:
        base, diff = scan_and_compare(args, for_delta=True, exclude=exclude)
        if args.just_print or args.verbose:
            for op, item in diff.ops:
                path = item if isinstance(item, bytes) else item.path
                print(f"{op} /{display_path(path)}")
        if output is None:
            print(f"would write {out}: {len(diff.changes)} changed paths against base {base.id}")
            return 0
        progress = Progress("writing", args.progress)
        size = output.write(os.fsencode(args.root), diff, base.id, progress)
        progress.done()
    finally:
        if output is not None:
            output.discard()
    if os.geteuid() == 0 and "SUDO_UID" in os.environ:
        os.chown(out, int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "-1")))
    print(f"wrote {out}: {len(diff.changes)} changed paths, {size / 1e6:.2f} MB, against base {base.id}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import apply_delta  # only merging needs it

    report = apply_delta(args.root, Path(args.file), force=args.force, dry_run=args.just_print, exclude=load_excluder(args))
    if args.just_print or args.verbose:
        for line in report.plan:
            print(("would " if args.just_print else "") + line)
    verb = "would apply" if args.just_print else "applied"
    print(f"{verb} {args.file}: {report.created} created, {report.updated} updated, {report.deleted} deleted")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one error line like every other error (sub-parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{PROG} --help')")


def build_parser() -> argparse.ArgumentParser:
    # Options may stand before or after the action word: the sub-parsers' copies
    # default to SUPPRESS, so they only override what was given after the word.
    main = Parser(
        prog=PROG,
        description="Record an AppPot image's base, list and save what changed since, and apply such deltas.",
        epilog=exit_codes_help(exit_code_rows()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(main, suppress=False)
    main.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = main.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions = {
        "base": ("record the base manifest of the root in var/lib/apppot/", cmd_base),
        "status": ("list what differs from the base: A added, M modified, D deleted", cmd_status),
        "changes": ("write a delta archive of everything that differs from the base", cmd_changes),
        "merge": ("apply a delta archive made against this root's base", cmd_merge),
    }
    for name, (help_text, handler) in actions.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=exit_codes_help(exit_code_rows()),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common(p, suppress=True)
        p.set_defaults(handler=handler)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the changes as JSON")
        if name == "changes":
            p.add_argument("file", nargs="?", metavar="FILE",
                           help=f"the delta to write (.tar.zst, .tar.gz, .tar.xz or .tar; default: ~/job/apppot.DATE.changes"
                                f"{DEFAULT_SUFFIX} when ~/job is mounted, else ./apppot.changes{DEFAULT_SUFFIX})")
        if name == "merge":
            p.add_argument("file", metavar="FILE", help="the delta to apply")
    return main


def add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS

    def opt(*names: str, value: object, **kw: object) -> None:
        parser.add_argument(*names, default=default if suppress else value, **kw)  # type: ignore[arg-type]

    opt("--root", value=Path("/"), type=Path, metavar="DIR", help="operate on the image tree DIR (default: /)")
    opt("-v", "--verbose", value=False, action="store_true", help="say more: each path and what changed")
    opt("-n", "--just-print", value=False, action="store_true", help="dry run: say what would happen, change nothing")
    opt("--exclude-from", value=None, action="append", type=Path, metavar="FILE", help="also exclude the patterns in FILE (repeatable)")
    opt("--checksum", value=False, action="store_true", help="hash every file instead of trusting size and mtime")
    opt("--force", value=False, action="store_true", help="merge: apply a delta made against another base")
    opt("--debug", value=False, action="store_true", help="log everything and show tracebacks")


def maybe_sudo(args: argparse.Namespace) -> None:
    """Reading and writing a whole system needs root: re-run through sudo when that is possible."""
    if os.geteuid() == 0 or args.root.resolve() != Path("/") or os.environ.get("APPPOT_SNAP_NO_SUDO"):
        return
    sudo = shutil.which("sudo")
    if sudo is None:
        return
    log.debug("re-running as root through sudo")
    os.execv(sudo, [sudo, "-n", "--", sys.executable, "-m", "apppot_guest.snap", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    # A short-lived command that builds large acyclic tables (one entry per path):
    # the cyclic garbage collector's passes only cost time (about 5 % of a status).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return run_command(argv)
    finally:
        if was_enabled:
            gc.enable()


# Which actions change the root (and hold its lock exclusively); the others only read it.
WRITERS = ("base", "merge")


def run_command(argv: list[str] | None) -> int:
    def locked(args: argparse.Namespace) -> int:
        """The action, holding the root's lock (shared to read, exclusive to write)."""
        args.progress = True
        if not args.root.is_dir():
            raise UsageError(f"the root {display_path(args.root)} is not a directory")
        writer = args.action in WRITERS and not args.just_print
        lock = RootLock(args.root, args.action, exclusive=writer)
        try:
            if argv is None:
                maybe_sudo(args)
            if lock.acquire(create=writer):
                recover(args.root)  # what dead runs left in var/lib/apppot, before anything else
            return int(args.handler(args))
        finally:
            lock.release()

    return run_main(PROG, build_parser(), argv, handler=locked)


if __name__ == "__main__":
    sys.exit(main())
