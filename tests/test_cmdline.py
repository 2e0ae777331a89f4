"""The kernel command line: kernel quoting, the argv encoding, BootConfig, long commands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apppot_guest import __version__
from apppot_guest.cmdline import (
    CMDFILE_NAME,
    MAX_CMDLINE,
    BootConfig,
    decode_argv,
    encode_argv,
    fit_kernel_args,
    parse_cmdline,
    read_cmdfile,
    salvage_jobdir,
    salvage_path,
    split_cmdline,
)
from apppot_guest.errors import ConfigError

UML_WORDS = ["ubd0=/srv/base.img", "mem=512M", "con0=fd:0,fd:1", "con=null", "hostfs=/scratch/job 1", "root=/dev/ubda"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("a b  c\n", [("a", None), ("b", None), ("c", None)]),
        ("k=v", [("k", "v")]),
        ('k="a b" x', [("k", "a b"), ("x", None)]),
        ('"k=a b" x', [("k", "a b"), ("x", None)]),
        ('k=a"b c"d', [("k", 'a"b c"d')]),  # quotes inside a value stay
        ('k="a""b"', [("k", 'a""b')]),
        ("k=a=b", [("k", "a=b")]),
        ("k= x", [("k", ""), ("x", None)]),
        ("\tk=v\n", [("k", "v")]),
        ("k=a\xa0b", [("k", "a"), ("b", None)]),  # the kernel's isspace() includes 0xA0
        ('k="a\\" b', [("k", "a\\"), ("b", None)]),  # no escapes: the backslash is literal
        ("", []),
    ],
)
def test_split_like_the_kernel(line: str, words: list[tuple[str, str | None]]) -> None:
    raw = line.encode("latin-1")
    assert split_cmdline(raw) == words


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('apppot.cmd="python3 run.py 10"', BootConfig(argv=("python3", "run.py", "10"))),
        ("apppot.cmd=\"sh -c 'echo $HOME; ls'\"", BootConfig(argv=("sh", "-c", "echo $HOME; ls"))),
        ("apppot.cmd=hostname", BootConfig(argv=("hostname",))),
        (
            "apppot.uid=1234 apppot.gid=1235 apppot.user=alice apppot.group=lab",
            BootConfig(user="alice", uid=1234, group="lab", gid=1235),
        ),
        ("apppot.jobdir=/ apppot.tmpdir=/tmp/x apppot.changes=/d/c.tar.zst", BootConfig(jobdir="/", tmpdir="/tmp/x", changes="/d/c.tar.zst")),
        ('apppot.cwd="/home/user/my job"', BootConfig(cwd="/home/user/my job")),
        ("apppot.cwd=b64:L2hvbWUvdXNlci9qb2IgZGly", BootConfig(cwd="/home/user/job dir")),
        ("apppot.timeout=3600", BootConfig(timeout=3600.0)),
        ("apppot.timeout=0.5", BootConfig(timeout=0.5)),
        ("TERM=xterm-256color quiet", BootConfig(term="xterm-256color")),
        ("apppot.cmdfile=apppot.argv", BootConfig(cmdfile="apppot.argv")),
        ("ubd0=x apppot mem=1G init=/usr/sbin/apppot-init -- single", BootConfig()),
        ("apppot.colour=blue apppot.cmd=true", BootConfig(argv=("true",), unknown=("apppot.colour",))),
    ],
)
def test_parse(line: str, expected: BootConfig) -> None:
    assert parse_cmdline(line) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('apppot.cmd="python3 run.py', "unterminated double quote"),
        ('x="a apppot.uid=5', "unterminated double quote"),
        ("apppot.uid=abc", "apppot.uid=abc: not a number"),
        ("apppot.gid=-1", "apppot.gid=-1: not a number"),
        ("apppot.uid=99999999999", "apppot.uid=99999999999: not a number"),
        ("apppot.uid=0", "never runs as root"),
        ("apppot.uid=5000000000", "not a number from 0"),
        ("apppot.cmd=a apppot.cmd=b", "apppot.cmd is given twice"),
        ("apppot.uid=1 apppot.uid=1", "apppot.uid is given twice"),
        ("TERM=a TERM=b", "TERM is given twice"),
        ("apppot.cmd", "apppot.cmd needs a value"),
        ("apppot.jobdir", "apppot.jobdir needs a value"),
        ("apppot.cmd=", "the command is empty"),
        ('apppot.cmd=""', "the command is empty"),
        ("apppot.cmd=b64:", "not an encoded command"),
        ("apppot.cmd=b64:YQ", "not an encoded command"),  # 'a' without its NUL
        ("apppot.cmd=b64:a$b", "not valid URL-safe base64"),
        ("apppot.cmd=b64:AAAAA", "not valid URL-safe base64"),
        ("apppot.cmd=\"a 'b\"", "No closing quotation"),
        ("apppot.cmd=a apppot.cmdfile=f", "cannot both be given"),
        ("apppot.cmdfile=../etc/passwd", "not a plain file name"),
        ('apppot.cmdfile="a b"', "not a plain file name"),
        ("apppot.cmdfile=..", "not a plain file name"),
        ("apppot.user=ro:ot", "not a valid account name"),
        ("apppot.group=", "not a valid account name"),
        ("apppot.timeout=soon", "not a number of seconds"),
        ("apppot.timeout=0", "not a positive number"),
        ("apppot.timeout=-5", "not a number of seconds"),
        ("apppot.jobdir=", "not a usable path"),
        ("TERM=a;b", "not a terminal type name"),
    ],
)
def test_parse_rejects(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")) as info:
        parse_cmdline(line)
    assert "\n" not in str(info.value)


def test_salvage_jobdir_from_a_rejected_line() -> None:
    line = "apppot.uid=abc apppot.jobdir=b64:L2pvYiBkaXI"
    with pytest.raises(ConfigError):
        parse_cmdline(line)
    assert salvage_jobdir(line) == "/job dir"
    assert salvage_jobdir('apppot.cmd="x apppot.jobdir=/j') == "/j"
    assert salvage_jobdir("apppot.uid=abc") is None
    assert salvage_path("apppot.protocol=9 apppot.rundir=/run apppot.jobdir=/job", "rundir") == "/run"


ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))


@given(argv=st.lists(ARG, min_size=1, max_size=8), cwd=st.one_of(st.none(), ARG.filter(bool)))
@settings(max_examples=400)
def test_argv_round_trips_through_the_kernel_command_line(argv: list[str], cwd: str | None) -> None:
    config = BootConfig(argv=tuple(argv), cwd=cwd, uid=1000, gid=100, jobdir="/", timeout=60)
    words = config.kernel_args()
    for word in words:  # each is one kernel word, and one argv element for UML
        assert word.isascii() and word.isprintable()
        assert not any(c in word for c in ' "\'\\')
    line = " ".join(['ubd0=x', 'foo="a b"', *words, "quiet"]) + "\n"
    assert parse_cmdline(line.encode("ascii")) == config
    assert decode_argv(encode_argv(argv)) == tuple(argv)


@pytest.mark.parametrize(
    "argv",
    [[""], ["", ""], ["a b", "c"], ["$HOME", "`id`", "$(id)", ";", "&&", "|", ">"], ['"', "'", "\\", "\\n"], ["é", "日本", "\n", "\t"]],
)
def test_awkward_arguments_survive(argv: list[str]) -> None:
    assert parse_cmdline(" ".join(BootConfig(argv=tuple(argv)).kernel_args())).argv == tuple(argv)


def test_non_utf8_argument_survives() -> None:
    name = b"data-\xff\xfe.bin".decode("utf-8", "surrogateescape")
    assert parse_cmdline(" ".join(BootConfig(argv=("cat", name)).kernel_args())).argv == ("cat", name)


@pytest.mark.parametrize("argv", [(), ("a\0b",)])
def test_unencodable_argv_is_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        BootConfig(argv=argv)


def test_long_command_travels_in_a_file(tmp_path: Path) -> None:
    argv = ("python3", "-c", "x = 1\n" * 2000, "a b")
    config = BootConfig(argv=argv, jobdir="/", uid=1000)
    words = fit_kernel_args(config, UML_WORDS, tmp_path)
    assert f"apppot.cmdfile={CMDFILE_NAME}" in words
    assert not any(w.startswith("apppot.cmd=") for w in words)
    assert len(" ".join(UML_WORDS + words)) <= MAX_CMDLINE
    parsed = parse_cmdline(" ".join(UML_WORDS + words))
    assert parsed.cmdfile == CMDFILE_NAME and parsed.argv is None
    assert read_cmdfile(tmp_path / CMDFILE_NAME) == argv
    assert [p.name for p in tmp_path.iterdir()] == [CMDFILE_NAME]


def test_short_command_stays_inline(tmp_path: Path) -> None:
    config = BootConfig(argv=("true",), jobdir="/")
    assert fit_kernel_args(config, UML_WORDS, tmp_path) == config.kernel_args()
    assert list(tmp_path.iterdir()) == []


def test_command_too_long_without_jobdir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no job directory"):
        fit_kernel_args(BootConfig(argv=("x" * 5000,)), [], tmp_path)


def test_too_long_even_with_a_command_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="UML takes at most 4095"):
        fit_kernel_args(BootConfig(argv=("true",), cwd="/" + "d" * 5000, jobdir="/"), [], tmp_path)


def test_bad_command_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"no terminating nul")
    with pytest.raises(ConfigError, match="not NUL-terminated"):
        read_cmdfile(tmp_path / "f")


@pytest.mark.skipif(shutil.which("linux") is None, reason="user-mode-linux is not installed")
def test_max_cmdline_is_umls_real_limit() -> None:
    """The UML kernel accepts a command line of MAX_CMDLINE bytes and refuses one more."""

    def refused(length: int) -> bool:
        word = "apppot.x=" + "y" * (length - len("apppot.x="))
        out = subprocess.run(["linux", word, "--version"], capture_output=True, text=True, timeout=60, check=False)
        return "Too many command line arguments" in out.stdout + out.stderr

    assert not refused(MAX_CMDLINE)
    assert refused(MAX_CMDLINE + 1)


def test_the_protocol_goes_first_and_another_one_is_refused_naming_both() -> None:
    from apppot_guest.cmdline import PROTOCOL
    from apppot_guest.errors import ProtocolError

    words = BootConfig(protocol=PROTOCOL, argv=("true",)).kernel_args()
    assert words[0] == f"apppot.protocol={PROTOCOL}"
    assert parse_cmdline(" ".join(words)).protocol == PROTOCOL
    assert parse_cmdline("apppot.cmd=b64:dHJ1ZQA").protocol is None  # AppPot 1.0's launcher did not send it
    with pytest.raises(ProtocolError) as caught:
        parse_cmdline(f"apppot.protocol=99 {' '.join(words)}")  # checked before anything else
    assert f"the launcher speaks AppPot protocol 99, this image's apppot-init (apppot {__version__}) speaks protocol " \
           f"{PROTOCOL}" in str(caught.value)
    with pytest.raises(ProtocolError):
        parse_cmdline("apppot.protocol=1x")
