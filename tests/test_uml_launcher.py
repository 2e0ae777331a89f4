"""scripts/apppot-start without booting: the UML command it would run (--dry-run) and its errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.cmdline import parse_cmdline

LAUNCHER = Path(__file__).resolve().parent.parent / "scripts" / "apppot-start"
PYTHON = "/usr/bin/python3"
NASTY_ARGV = ["printf", "%s\n", "two words", "quote\"s", "it's", "$HOME", "", "ünïcödé", "back\\slash", "new\nline"]


def launcher(*args: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run([PYTHON, LAUNCHER, *map(os.fspath, args)], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)


def dry_run(*args: str | os.PathLike[str], **kw: object) -> list[str]:
    result = launcher("--dry-run", *args, **kw)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def words(argv: list[str]) -> dict[str, str]:
    return {w.partition("=")[0]: w.partition("=")[2] for w in argv[1:] if "=" in w}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_dry_run_read_only_image_gets_a_per_run_cow_and_the_argv_round_trips(tmp_path: Path, image: Path) -> None:
    image.chmod(0o444)  # read-only even for root (the tests run as root)
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    argv = dry_run("--image", image, "--jobdir", jobdir, "--", *NASTY_ARGV)
    w = words(argv)
    assert argv[0].endswith("/linux")
    cow, _, backing = w["ubd0"].partition(",")
    assert backing == os.fspath(image.resolve()) and cow.endswith("/cow") and cow != backing
    assert w["hostfs"] == os.fspath(jobdir.resolve())
    assert w["root"] == "/dev/ubda" and w["con0"] == "fd:0,fd:1" and w["con"] == "null"
    assert w["vec0:transport"] == "vde,vnl=slirp://"
    assert w["systemd.unit"] == "apppot-batch.target"
    assert all(" " not in a for a in argv), "every word must survive UML joining them with spaces"
    config = parse_cmdline(" ".join(argv[1:]))
    assert config.argv == tuple(NASTY_ARGV)
    assert config.jobdir == "/"
    assert not Path(cow).parent.exists(), "the per-run directory is removed after a dry run"


def test_dry_run_writable_image_is_used_in_place_and_cow_image_form(tmp_path: Path, image: Path) -> None:
    assert words(dry_run("--image", image, "--jobdir", tmp_path, "true"))["ubd0"] == os.fspath(image.resolve())
    assert words(dry_run("--image", image, "--jobdir", tmp_path, "--ephemeral", "true"))["ubd0"].endswith(f"/cow,{image.resolve()}")
    cow = tmp_path / "mine.cow"
    assert words(dry_run("--image", f"{cow}:{image}", "--jobdir", tmp_path, "true"))["ubd0"] == f"{cow},{image.resolve()}"


def test_dry_run_options_and_environment_defaults(tmp_path: Path, image: Path) -> None:
    env = {"APPPOT_IMAGE": os.fspath(image), "APPPOT_MEM": "768M", "APPPOT_KERNEL": "/usr/bin/linux"}
    argv = dry_run("--jobdir", tmp_path, "--no-network", "--id", "job42", "--extra", "foo=bar", "--timeout", "30",
                   "--cwd", "/tmp", "--boot", "direct", "--", "true", env=env)
    w = words(argv)
    assert argv[0] == "/usr/bin/linux"
    assert w["mem"] == "768M" and w["umid"] == "job42" and w["foo"] == "bar" and w["init"] == "/usr/sbin/apppot-init"
    assert not any(word.startswith("vec") for word in argv) and "systemd.unit" not in w
    config = parse_cmdline(" ".join(argv[1:]))
    assert config.timeout == 30 and config.cwd == "/tmp" and config.argv == ("true",)
    # No PROG: an interactive session, booted fully by default.
    w = words(dry_run("--jobdir", tmp_path, env=env))
    assert "apppot.cmd" not in w and "systemd.unit" not in w


def test_changes_inside_the_jobdir_pass_by_relative_path(tmp_path: Path, image: Path) -> None:
    (tmp_path / "deltas").mkdir()
    delta = tmp_path / "deltas" / "my.tar.zst"
    delta.write_bytes(b"x")
    argv = dry_run("--image", image, "--jobdir", tmp_path, "--changes", delta, "true")
    assert parse_cmdline(" ".join(argv[1:])).changes == "/deltas/my.tar.zst"


def test_changes_outside_the_jobdir_go_through_a_per_run_copy(tmp_path: Path, image: Path) -> None:
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    delta = tmp_path / "elsewhere.tar.zst"
    delta.write_bytes(b"x")
    argv = dry_run("--image", image, "--jobdir", jobdir, "--id", "r1", "--changes", delta, "true")
    assert parse_cmdline(" ".join(argv[1:])).changes == "/.apppot-run-r1/elsewhere.tar.zst"
    assert list(jobdir.iterdir()) == [], "a dry run copies nothing"


def test_long_command_goes_to_a_command_file(tmp_path: Path, image: Path) -> None:
    argv = dry_run("--image", image, "--jobdir", tmp_path, "--", "echo", "x" * 6000)
    assert words(argv)["apppot.cmdfile"] == "apppot.argv"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/nonexistent/base.img", "true"], "image /nonexistent/base.img: no such file"),
        (["--mem", "lots", "true"], "--mem lots: not a size"),
        (["--id", "a b", "true"], "--id a b: use letters"),
        (["--jobdir", "/nonexistent-dir", "true"], "not a directory"),
        (["--changes", "/nonexistent.tar.zst", "true"], "changes /nonexistent.tar.zst: no such file"),
        (["--linux", "/nonexistent/linux", "true"], "UML kernel /nonexistent/linux: not found"),
        (["--timeout", "-3", "true"], "not a positive number of seconds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, image: Path, args: list[str], message: str) -> None:
    result = launcher("--image", image, "--jobdir", tmp_path, *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") <= 3  # argparse adds its usage line for its own errors


def test_path_with_space_is_refused(tmp_path: Path, image: Path) -> None:
    jobdir = tmp_path / "job dir"
    jobdir.mkdir()
    result = launcher("--image", image, "--jobdir", jobdir, "true")
    assert result.returncode == 2
    assert result.stderr.startswith("apppot-start: error: job directory ") and "white space" in result.stderr


def test_no_image_at_all(tmp_path: Path) -> None:
    result = launcher("--jobdir", tmp_path, "true")
    assert (result.returncode, result.stderr) == (2, "apppot-start: error: no image: give --image PATH or set APPPOT_IMAGE\n")


def test_kernel_next_to_the_image_is_found_and_an_explicit_one_wins(tmp_path: Path, image: Path) -> None:
    """As the original AppPot shipped them: the image with its kernel beside it."""
    beside = tmp_path / "linux"
    beside.write_bytes(b"#!/bin/sh\n")
    beside.chmod(0o755)
    env = {"APPPOT_KERNEL": ""}
    assert dry_run("--image", image, "--jobdir", tmp_path, "true", env=env)[0] == os.fspath(beside)
    assert dry_run("--image", image, "--jobdir", tmp_path, "--linux", "/bin/true", "true")[0] == "/bin/true"
    other = tmp_path / "elsewhere"
    other.mkdir()
    image.rename(other / "base.img")
    argv = dry_run("--image", other / "base.img", "--jobdir", tmp_path, "true", env=env)
    assert argv[0] != os.fspath(beside) and Path(argv[0]).name == "linux"


def test_network_needs_vde_plug_and_says_how_to_get_it(tmp_path: Path, image: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = launcher("--image", image, "--jobdir", tmp_path, "--linux", "/bin/true", "true", env={"PATH": os.fspath(bin_dir)})
    assert result.returncode == 2
    assert result.stderr == ("apppot-start: error: network: vde_plug not found "
                             "(install vdeplug and libvdeplug-slirp, or use --no-network)\n")
    result = launcher("--image", image, "--jobdir", tmp_path, "--linux", "/bin/true", "--no-network", "--dry-run", "true",
                      env={"PATH": os.fspath(bin_dir)})
    assert result.returncode == 0, result.stderr


def test_help_documents_exit_codes() -> None:
    result = launcher("--help")
    assert result.returncode == 0
    for text in ("125", "124", "127", "128+N", "APPPOT_IMAGE", "--dry-run", "--changes"):
        assert text in result.stdout


def test_batch_output_to_a_file_tells_the_guest_term_dumb(tmp_path: Path, image: Path) -> None:
    """stdout is a pipe here, as in a batch system: programs in the guest must not draw progress."""
    argv = dry_run("--image", image, "--jobdir", tmp_path, "--", "true", env={"TERM": "xterm-256color"})
    assert words(argv)["TERM"] == "dumb"
