"""The kernel command line of an AppPot job: one encoding, shared by guest and host.

The host launcher builds a ``BootConfig`` and passes ``config.kernel_args()``
(or ``fit_kernel_args()`` when the command may be long) to the UML kernel; at
boot ``apppot-init`` reads ``/proc/cmdline`` back into the same ``BootConfig``
with ``parse_cmdline()``.

Encoding.  Every ``apppot.*`` word the encoder writes is a single
kernel-command-line word: no spaces, no quotes, no backslashes, ASCII only.

* ``apppot.cmd=b64:PAYLOAD``: the argv, each argument UTF-8 (with
  surrogateescape, so a file name that is not UTF-8 survives) followed by a
  NUL byte, in URL-safe base64 without padding.  ``b64:`` alone is never a
  valid command (an argv needs at least one argument).
* A hand-typed ``apppot.cmd="python3 run.py 10"`` (no ``b64:`` prefix) is split
  into words like a POSIX shell does, without any expansion (``shlex.split``).
* ``apppot.cmdfile=NAME``: the argv is in the file NAME in the job directory,
  in the payload format above (raw, not base64).  Used when the command does
  not fit: UML's whole command line is at most ``MAX_CMDLINE`` bytes.
* Single values (``cwd``, ``jobdir``, ``rundir``, ``tmpdir``, ``changes``) are written as
  they are when they only hold ``SAFE_VALUE`` characters, else as ``b64:`` and
  the UTF-8 bytes in URL-safe base64.  A hand-typed value without the prefix is
  taken literally (after the kernel's quote removal).

Kernel quoting (as the kernel's ``next_arg()``): words are separated by
white space outside double quotes; a double quote toggles quoting and there
are no escapes; the quotes around a value (``key="a b"``) or around a whole
word (``"key=a b"``) are removed, quotes inside a value are kept.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .atomicfile import write_atomic
from .errors import ConfigError, ProtocolError, display_path, fs_error

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (see cli.py)
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

# UML's COMMAND_LINE_SIZE is 4096 bytes including the terminating NUL: the
# words of the host command line, joined by single spaces, must fit in 4095
# bytes or ``linux`` refuses to start ("add_arg: Too many command line
# arguments!").  Measured with Debian's user-mode-linux 6.1um4 (kernel 6.1.176).
MAX_CMDLINE = 4095

# The file name the launcher writes a long command to (in the job directory).
CMDFILE_NAME = "apppot.argv"

B64_PREFIX = "b64:"
PREFIX = "apppot."
SAFE_VALUE = re.compile(r"[A-Za-z0-9._/+,:@%-]+\Z")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
TERM_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}\Z")
MAX_ID = 2**32 - 2  # (uid_t) -1 is "no id"

# The kernel's isspace(): the C locale's white space plus 0xA0 (its Latin-1
# no-break space), applied to bytes.
KERNEL_SPACE = frozenset(b" \t\n\v\f\r\xa0")

# The version of what the launcher and the boot hook say to each other on the
# kernel command line (the apppot.* words, the command file, the status
# record).  Bump it when an old hook would misread a new launcher or the other
# way round; apppot-init refuses another version with a status record that
# names both.  1 is AppPot 1.0's (no apppot.protocol word; its hook does not
# check it); 2 adds apppot.rundir, the run's own directory for its record.
PROTOCOL = 2

KEYS = ("protocol", "cmd", "cmdfile", "cwd", "user", "uid", "group", "gid", "jobdir", "rundir", "tmpdir", "changes",
        "timeout")


@dataclass(frozen=True, slots=True)
class BootConfig:
    """What a job's kernel command line asks for.  ``None`` means "not given".

    ``user``/``uid``/``group``/``gid`` left ``None`` take the image's defaults
    (``/etc/default/apppot``) at boot.  ``jobdir``, ``tmpdir`` and ``changes``
    are hostfs paths, as ``mount -t hostfs none MNT -o PATH`` takes them
    (relative to the kernel's ``hostfs=DIR`` when that is given).
    """

    protocol: int | None = None
    argv: tuple[str, ...] | None = None
    cmdfile: str | None = None
    cwd: str | None = None
    user: str | None = None
    uid: int | None = None
    group: str | None = None
    gid: int | None = None
    jobdir: str | None = None
    rundir: str | None = None  # this run's own directory: the status record goes there, apppot.cmdfile is read there
    tmpdir: str | None = None
    changes: str | None = None
    timeout: float | None = None
    term: str | None = None
    unknown: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    def kernel_args(self) -> list[str]:
        """The kernel command-line words for this configuration (host side)."""
        words: list[str] = []
        if self.protocol is not None:  # first: a hook checks it before it reads anything else
            words.append(f"{PREFIX}protocol={self.protocol}")
        if self.argv is not None:
            words.append(f"{PREFIX}cmd={encode_argv(self.argv)}")
        for key, encode in KERNEL_FIELDS:
            value = getattr(self, key)
            if value is not None:
                words.append(f"{PREFIX}{key}={encode(value)}")
        if self.term is not None:
            words.append(f"TERM={self.term}")
        return words

    def as_json(self) -> dict[str, object]:
        """A JSON-ready dict of every field."""
        data = dataclasses.asdict(self)
        data["argv"] = list(self.argv) if self.argv is not None else None
        data["unknown"] = list(self.unknown)
        return data


def validate(config: BootConfig) -> None:
    """Raise ConfigError if ``config`` could not be passed to a job."""
    if config.argv is not None:
        if not config.argv:
            raise ConfigError("apppot.cmd: the command is empty")
        for arg in config.argv:
            if "\0" in arg:
                raise ConfigError(f"apppot.cmd: argument {display_path(arg)} contains a NUL byte")
    if config.argv is not None and config.cmdfile is not None:
        raise ConfigError("apppot.cmd and apppot.cmdfile cannot both be given")
    if config.cmdfile is not None and not _plain_name(config.cmdfile):
        raise ConfigError(f"apppot.cmdfile={display_path(config.cmdfile)}: not a plain file name in the run or job directory")
    for key in ("user", "group"):
        value = getattr(config, key)
        if value is not None and not NAME_RE.match(value):
            raise ConfigError(f"apppot.{key}={display_path(value)}: not a valid account name")
    for key in ("uid", "gid"):
        value = getattr(config, key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
                raise ConfigError(f"apppot.{key}={value!r}: not a number from 0 to {MAX_ID}")
            if value == 0:
                raise ConfigError(f"apppot.{key}=0: the job never runs as root (leave it out to use the image's account)")
    for key in ("cwd", "jobdir", "rundir", "tmpdir", "changes"):
        value = getattr(config, key)
        if value is not None and (not value or "\0" in value):
            raise ConfigError(f"apppot.{key}={display_path(value)}: not a usable path")
    if config.timeout is not None and not (math.isfinite(config.timeout) and config.timeout > 0):
        raise ConfigError(f"apppot.timeout={config.timeout!r}: not a positive number of seconds")
    if config.term is not None and not TERM_RE.match(config.term):
        raise ConfigError(f"TERM={display_path(config.term)}: not a terminal type name")


def _plain_name(name: str) -> bool:
    """A file name in the job directory that is also a safe kernel command line word."""
    return bool(re.fullmatch(r"[A-Za-z0-9._-]{1,255}", name)) and name not in (".", "..")


# -- argv and value encoding -------------------------------------------------


def argv_to_bytes(argv: Sequence[str]) -> bytes:
    """The argv payload: each argument as UTF-8 (surrogateescape) plus a NUL."""
    return b"".join(arg.encode("utf-8", "surrogateescape") + b"\0" for arg in argv)


def argv_from_bytes(data: bytes, what: str) -> tuple[str, ...]:
    if not data or not data.endswith(b"\0"):
        raise ConfigError(f"{what}: not an encoded command (empty or not NUL-terminated)")
    return tuple(part.decode("utf-8", "surrogateescape") for part in data[:-1].split(b"\0"))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ConfigError(f"{what}: not valid URL-safe base64")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: not valid URL-safe base64") from exc


def encode_argv(argv: Sequence[str]) -> str:
    """The ``apppot.cmd=`` value for ``argv``."""
    return B64_PREFIX + _b64encode(argv_to_bytes(argv))


def decode_argv(value: str) -> tuple[str, ...]:
    """An ``apppot.cmd=`` value back to an argv (``b64:`` or hand-typed words)."""
    if value.startswith(B64_PREFIX):
        return argv_from_bytes(_b64decode(value[len(B64_PREFIX) :], "apppot.cmd"), "apppot.cmd")
    try:
        argv = shlex.split(value, posix=True)
    except ValueError as exc:
        raise ConfigError(f"apppot.cmd={display_path(value)}: {exc}") from exc
    if not argv:
        raise ConfigError("apppot.cmd: the command is empty")
    return tuple(argv)


def encode_value(value: str) -> str:
    """A single string value as a kernel-command-line-safe word part."""
    if SAFE_VALUE.match(value) and not value.startswith(B64_PREFIX):
        return value
    return B64_PREFIX + _b64encode(value.encode("utf-8", "surrogateescape"))


def decode_value(value: str, key: str) -> str:
    if value.startswith(B64_PREFIX):
        return _b64decode(value[len(B64_PREFIX) :], f"apppot.{key}").decode("utf-8", "surrogateescape")
    return value


def format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


# The apppot.* words after apppot.cmd, in the order the host writes them, with their encoders.
KERNEL_FIELDS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("cmdfile", str),
    ("cwd", encode_value),
    ("user", encode_value),
    ("uid", str),
    ("group", encode_value),
    ("gid", str),
    ("jobdir", encode_value),
    ("rundir", encode_value),
    ("tmpdir", encode_value),
    ("changes", encode_value),
    ("timeout", format_seconds),
)


# -- the kernel's word splitting ---------------------------------------------


def split_cmdline(data: bytes | str) -> list[tuple[str, str | None]]:
    """Split a kernel command line into (key, value) pairs like ``next_arg()``.

    ``value`` is None for a word without ``=``.  An unterminated double quote
    raises ConfigError (the kernel would silently swallow the rest of the line).
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    words: list[tuple[str, str | None]] = []
    i, n = 0, len(raw)
    while i < n:
        while i < n and raw[i] in KERNEL_SPACE:
            i += 1
        if i >= n:
            break
        start = i
        in_quote = quoted = raw[i] == 0x22
        if quoted:
            i += 1
        body_start = i
        equals = -1
        while i < n and (in_quote or raw[i] not in KERNEL_SPACE):
            if equals < 0 and raw[i] == 0x3D:
                equals = i
            if raw[i] == 0x22:
                in_quote = not in_quote
            i += 1
        if in_quote:
            shown = raw[start : start + 40].decode("utf-8", "backslashreplace")
            raise ConfigError(f"unterminated double quote in kernel command line word {shown!r}")
        end = i
        if quoted and end > body_start and raw[end - 1] == 0x22:
            end -= 1
        if equals < 0:
            words.append((_text(raw[body_start:end]), None))
            continue
        value = raw[equals + 1 : end]
        if value.startswith(b'"'):
            value = value[1:]
            if not quoted and value.endswith(b'"'):
                value = value[:-1]
        words.append((_text(raw[body_start:equals]), _text(value)))
    return words


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_cmdline(data: bytes | str) -> BootConfig:
    """Parse a kernel command line (e.g. /proc/cmdline) into a BootConfig.

    Words that are not ``apppot.*`` or ``TERM=`` are ignored; unknown
    ``apppot.*`` keys are logged and listed in ``unknown``.  Malformed values,
    duplicate keys and ``apppot.*`` keys without ``=`` raise ConfigError.
    """
    seen: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in split_cmdline(data):
        if key == "TERM":
            name = "term"
        elif key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            if name not in KEYS:
                log.warning("unknown kernel command line key %s (ignored)", display_path(key))
                unknown.append(key)
                continue
        else:
            continue
        if value is None:
            raise ConfigError(f"{display_path(key)} needs a value ({display_path(key)}=...)")
        if name == "protocol" and name not in seen:
            check_protocol(value)
        if name in seen:
            raise ConfigError(f"{display_path(key)} is given twice on the kernel command line")
        seen[name] = value
    return _config_from_words(seen, tuple(unknown))


def check_protocol(value: str) -> None:
    """Refuse a launcher that speaks another protocol, naming both versions."""
    if value != str(PROTOCOL):
        raise ProtocolError(
            f"the launcher speaks AppPot protocol {display_path(value)[:20]}, this image's apppot-init "
            f"(apppot {__version__}) speaks protocol {PROTOCOL}: use a launcher and an image of the same "
            "AppPot release (apppot-start --version; dpkg-query -W apppot in the image)")


def _config_from_words(seen: dict[str, str], unknown: tuple[str, ...]) -> BootConfig:
    fields: dict[str, object] = {"unknown": unknown}
    for name, value in seen.items():
        if name == "cmd":
            fields["argv"] = decode_argv(value)
        elif name in ("uid", "gid", "protocol"):
            if not re.fullmatch(r"[0-9]{1,10}", value):
                raise ConfigError(f"apppot.{name}={display_path(value)}: not a number")
            fields[name] = int(value)
        elif name == "timeout":
            fields[name] = _parse_seconds(value)
        elif name in ("cmdfile", "term"):
            fields[name] = value
        else:
            fields[name] = decode_value(value, name)
    return BootConfig(**fields)  # type: ignore[arg-type]


def _parse_seconds(value: str) -> float:
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", value):
        raise ConfigError(f"apppot.timeout={display_path(value)}: not a number of seconds")
    return float(value)


def salvage_path(data: bytes | str, name: str) -> str | None:
    """The hostfs path ``apppot.NAME`` (``rundir``, ``jobdir``) of a command line ``parse_cmdline`` rejected.

    Used only to report the failure in a status record where the launcher looks for it.
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    prefix = f"apppot.{name}=".encode()
    for word in raw.replace(b'"', b" ").split():
        if word.startswith(prefix):
            try:
                return decode_value(_text(word[len(prefix) :]), name) or None
            except ConfigError:
                return None
    return None


def salvage_jobdir(data: bytes | str) -> str | None:
    """The job directory of a command line ``parse_cmdline`` rejected, if it can be found."""
    return salvage_path(data, "jobdir")


# -- long commands: the command file ------------------------------------------


def write_cmdfile(directory: Path, argv: Sequence[str], name: str = CMDFILE_NAME) -> str:
    """Write ``argv`` to ``directory/name`` atomically (host side); return ``name``."""
    payload = argv_to_bytes(argv)
    BootConfig(argv=tuple(argv))  # validates: non-empty, no NUL
    write_atomic(directory / name, payload)
    return name


def read_cmdfile(path: Path) -> tuple[str, ...]:
    """The argv stored in a command file (guest side)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise fs_error(exc, "read the command file", path) from exc
    return argv_from_bytes(data, f"command file {display_path(path)}")


def fit_kernel_args(
    config: BootConfig,
    other_args: Iterable[str],
    jobdir: Path,
    limit: int = MAX_CMDLINE,
) -> list[str]:
    """The ``apppot.*`` words for ``config``, moving a long command into a file.

    ``other_args`` are the launcher's other kernel words (``ubd0=``, ``mem=``,
    ...); ``jobdir`` is, as the host sees it, the directory the guest reads
    the command file from: the run directory when ``config.rundir`` is given,
    else the job directory.  When all the words joined by spaces exceed
    ``limit`` bytes, the argv is written to ``jobdir/CMDFILE_NAME`` and passed
    as ``apppot.cmdfile=`` instead.  If it still does not fit, ConfigError.
    """
    others = list(other_args)

    def length(words: list[str]) -> int:
        return len(" ".join(others + words).encode("utf-8", "surrogateescape"))

    words = config.kernel_args()
    if length(words) <= limit:
        return words
    if config.argv is not None:
        if config.jobdir is None and config.rundir is None:
            raise ConfigError("the command is too long for the kernel command line and there is no job directory")
        name = write_cmdfile(jobdir, config.argv)
        words = dataclasses.replace(config, argv=None, cmdfile=name).kernel_args()
        if length(words) <= limit:
            return words
    raise ConfigError(f"the kernel command line would be {length(words)} bytes; UML takes at most {limit}")


__all__ = [
    "B64_PREFIX",
    "CMDFILE_NAME",
    "MAX_CMDLINE",
    "BootConfig",
    "decode_argv",
    "encode_argv",
    "fit_kernel_args",
    "parse_cmdline",
    "read_cmdfile",
    "salvage_jobdir",
    "salvage_path",
    "split_cmdline",
    "write_cmdfile",
]
