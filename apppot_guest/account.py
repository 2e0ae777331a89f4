"""The job's account: the image's defaults, the account itself, sudo, a login environment.

``ensure_account()`` makes the account exist with the requested numeric ids, a
home directory and passwordless sudo, under any root directory (``/`` at boot,
a scratch tree in tests), using the image's own useradd/groupadd/usermod.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .atomicfile import write_atomic
from .errors import ConfigError, FsError, display_path, fs_error
from .proc import run

log = logging.getLogger(__name__)

USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"  # Debian's login.defs ENV_PATH
DEFAULTS_FILE = "etc/default/apppot"
SUDOERS_FILE = "etc/sudoers.d/apppot"
DEFAULT_ACCOUNT = {"APPPOT_USER": "user", "APPPOT_UID": "1000", "APPPOT_GROUP": "user", "APPPOT_GID": "1000"}  # as the package


@dataclass(frozen=True, slots=True)
class Account:
    """The job's account; ``home`` is the path as this process sees it (under the root)."""

    name: str
    uid: int
    group: str
    gid: int
    home: Path
    shell: str
    groups: tuple[int, ...] = ()



@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    fields: tuple[str, ...]


def _read_table(path: Path) -> list[_Row]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise fs_error(exc, "read", path) from exc
    rows = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[0] and not line.startswith(("#", "+", "-")):
            rows.append(_Row(parts[0], tuple(parts)))
    return rows


def _num(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def read_defaults(root: Path) -> dict[str, str]:
    """``/etc/default/apppot`` (shell KEY=VALUE lines) over the built-in defaults."""
    values = dict(DEFAULT_ACCOUNT)
    path = root / DEFAULTS_FILE
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise fs_error(exc, "read", path) from exc
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("\"'")
    return values


def requested_account(root: Path, user: str | None, uid: int | None, group: str | None, gid: int | None) -> tuple[str, int, str, int]:
    """The account the job asks for: the kernel command line over the image's defaults."""
    defaults = read_defaults(root)
    try:
        want_uid = uid if uid is not None else int(defaults["APPPOT_UID"])
        want_gid = gid if gid is not None else int(defaults["APPPOT_GID"])
    except ValueError as exc:
        raise ConfigError(f"{display_path(root / DEFAULTS_FILE)}: APPPOT_UID/APPPOT_GID is not a number") from exc
    if want_uid <= 0 or want_gid <= 0:
        raise ConfigError(f"{display_path(root / DEFAULTS_FILE)}: the job never runs as root (uid/gid 0)")
    return (user or defaults["APPPOT_USER"], want_uid, group or defaults["APPPOT_GROUP"], want_gid)


def _root_args(root: Path) -> list[str]:
    return [] if root == Path("/") else ["--root", os.fspath(root.resolve())]


def ensure_account(root: Path, name: str, uid: int, group: str, gid: int) -> Account:
    """Make the job's account exist under ``root`` with exactly ``uid`` and primary ``gid``.

    The numeric ids win (they decide who owns the files written to the job
    directory): an existing group with ``gid`` is used whatever its name; if
    ``group`` names another gid, a group named after the user (or
    ``apppot<gid>``) is created instead.  An existing account with ``uid`` is
    used whatever its name; else an account called ``name`` is moved to
    ``uid`` or created.  Then the home directory and passwordless sudo.
    """
    etc = root / "etc"
    groups = _read_table(etc / "group")
    by_gid = {_num(r.fields[2]): r for r in groups}
    names = {r.name for r in groups}
    if gid in by_gid:
        group_name = by_gid[gid].name
        if group_name != group:
            log.info("using group %s for gid %d (asked for %s)", group_name, gid, group)
    else:
        group_name = group
        for candidate in (group, name, f"apppot{gid}"):
            if candidate not in names:
                group_name = candidate
                break
        if group_name != group:
            log.info("group %s exists with another gid; creating group %s with gid %d", group, group_name, gid)
        run(["groupadd", *_root_args(root), "--gid", str(gid), group_name])

    users = _read_table(etc / "passwd")
    by_uid = {_num(r.fields[2]): r for r in users}
    by_name = {r.name: r for r in users}
    if uid in by_uid:
        row = by_uid[uid]
        if row.name != name:
            log.info("using account %s for uid %d (asked for %s)", row.name, uid, name)
        if _num(row.fields[3]) != gid:
            run(["usermod", *_root_args(root), "--gid", str(gid), row.name])
        account_name = row.name
    elif name in by_name:
        log.info("moving account %s to uid %d", name, uid)
        run(["usermod", *_root_args(root), "--uid", str(uid), "--gid", str(gid), name])
        account_name = name
    else:
        shell = "/bin/bash" if (root / "bin/bash").exists() else "/bin/sh"
        run(["useradd", *_root_args(root), "--create-home", "--uid", str(uid), "--gid", str(gid), "--shell", shell, name])
        account_name = name

    made = {r.name: r for r in _read_table(etc / "passwd")}.get(account_name)
    if made is None or len(made.fields) < 7:
        raise FsError(f"account {account_name} is missing from {display_path(etc / 'passwd')} after creating it")
    home = root / made.fields[5].lstrip("/") if made.fields[5] else root / "home" / account_name
    _ensure_home(home, uid, gid, root)
    _ensure_sudo(root, account_name)
    supplementary = tuple(
        sorted(
            {g for r in _read_table(etc / "group") if account_name in r.fields[3].split(",") and (g := _num(r.fields[2])) is not None}
            - {gid}
        )
    )
    return Account(account_name, uid, group_name, gid, home, made.fields[6] or "/bin/sh", supplementary)


def _ensure_home(home: Path, uid: int, gid: int, root: Path) -> None:
    if home.is_dir():
        st = home.stat()
        if st.st_uid != uid:  # e.g. the delta carried a passwd with other ids
            os.chown(home, uid, gid)
        return
    try:
        home.mkdir(mode=0o755, parents=True)
        skel = root / "etc/skel"
        if skel.is_dir():
            run(["cp", "-a", "--no-target-directory", os.fspath(skel), os.fspath(home)])
        run(["chown", "-R", f"{uid}:{gid}", os.fspath(home)])
    except OSError as exc:
        raise fs_error(exc, "create the home directory", home) from exc


def _ensure_sudo(root: Path, name: str) -> None:
    """Passwordless sudo for ``name``: /etc/sudoers.d/apppot, checked with visudo."""
    path = root / SUDOERS_FILE
    rule = f"{name} ALL=(ALL:ALL) NOPASSWD: ALL"
    content = f"# Written by apppot-init: the job's user may administer this image.\n{rule}\n"
    try:
        if rule in path.read_text().splitlines():  # ours, or the package's (postinst) for the same user
            return
    except OSError:
        pass
    if not (root / "etc/sudoers").exists():
        log.warning("sudo is not installed in the image; %s gets no sudo rights", name)
        return
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, "create", path.parent) from exc
    write_atomic(path, content.encode(), mode=0o440, check=visudo_check)


def visudo_check(candidate: Path) -> None:
    """Refuse a sudoers file that sudo would not parse (a broken one locks everybody out of sudo)."""
    run(["visudo", "-cqf", candidate])


def login_env(account: Account, term: str | None, root: Path = Path("/")) -> dict[str, str]:
    """The environment a login shell of ``account`` would start with."""
    lang = "C.UTF-8"
    try:
        for line in (root / "etc/default/locale").read_text(errors="replace").splitlines():
            if line.startswith("LANG="):
                lang = line[5:].strip().strip("\"'") or lang
    except OSError:
        pass
    env = {
        "HOME": os.fspath(account.home),
        "USER": account.name,
        "LOGNAME": account.name,
        "SHELL": account.shell,
        "PATH": USER_PATH,
        "LANG": lang,
        "TERM": term or "linux",
    }
    if term == "dumb":
        # The job's output goes to a file or a pipe on the host, but in the guest it is
        # the console, a terminal: programs that colour a terminal whatever TERM says
        # (ip(8) since iproute2 6.x) honour NO_COLOR (no-color.org).
        env["NO_COLOR"] = "1"
    return env
