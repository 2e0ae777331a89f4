"""apppot-start without booting: the UML command it would run (--dry-run) and its errors."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from apppot_guest.cmdline import parse_cmdline
from apppot_guest.errors import EXIT_USAGE, exit_codes_help, exit_codes_markdown
from apppot_guest.job import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND
from apppot_host import uml_launch
from fixtures_uml import fake_image

LAUNCHER = Path(__file__).resolve().parent.parent / "apppot-start"
PYTHON = "/usr/bin/python3"
NASTY_ARGV = ["printf", "%s\n", "two words", "quote\"s", "it's", "$HOME", "", "ünïcödé", "back\\slash", "new\nline"]


def launcher(*args: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run([PYTHON, LAUNCHER, *(os.fspath(a) for a in args)], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
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
    fake_image(path)
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
    assert w["hostfs"].startswith(os.path.dirname(cow)) and w["hostfs"].endswith("/host")
    assert w["root"] == "/dev/ubda" and w["con0"] == "fd:0,fd:1" and w["con"] == "null"
    assert w["vec0:transport"] == "vde,vnl=slirp://"
    assert w["systemd.unit"] == "apppot-batch.target"
    assert all(" " not in a for a in argv), "every word must survive UML joining them with spaces"
    config = parse_cmdline(" ".join(argv[1:]))
    assert config.argv == tuple(NASTY_ARGV)
    assert (config.jobdir, config.rundir) == ("/job", "/run")
    assert not Path(cow).parent.exists(), "the per-run directory is removed after a dry run"


def test_dry_run_writable_image_is_used_in_place_and_cow_image_form(tmp_path: Path, image: Path) -> None:
    assert words(dry_run("--image", image, "--jobdir", tmp_path, "true"))["ubd0"] == os.fspath(image.resolve())
    assert words(dry_run("--image", image, "--jobdir", tmp_path, "--ephemeral", "true"))["ubd0"].endswith(f"/cow,{image.resolve()}")
    cow = tmp_path / "mine.cow"
    assert words(dry_run("--image", f"{cow}:{image}", "--jobdir", tmp_path, "true"))["ubd0"] == f"{cow},{image.resolve()}"
    assert not cow.exists()  # UML makes it when it boots


@pytest.mark.parametrize(("content", "problem"), [(b"", "empty, not a UML copy-on-write file"),
                                                  (b"\0" * 4096, "not a UML copy-on-write file (no COW header)")])
def test_a_cow_file_that_is_not_one_is_refused_in_one_line(tmp_path: Path, image: Path, content: bytes, problem: str) -> None:
    """UML itself panics on it ("Unable to mount root fs"), and the file could be someone's data."""
    cow = tmp_path / "mine.cow"
    cow.write_bytes(content)
    result = launcher("--dry-run", "--image", f"{cow}:{image}", "--jobdir", tmp_path, "true")
    assert result.returncode == 2 and result.stderr == f"apppot-start: error: COW file {cow}: {problem}; name a file that " \
        "does not exist yet and the kernel makes a new one\n", result.stderr
    assert cow.read_bytes() == content


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


@pytest.mark.parametrize("inside", [True, False], ids=["inside-jobdir", "elsewhere"])
def test_changes_reach_the_guest_through_the_run_directory(tmp_path: Path, image: Path, inside: bool) -> None:
    jobdir = tmp_path / "job"
    (jobdir / "deltas, mine").mkdir(parents=True)
    delta = (jobdir / "deltas, mine" if inside else tmp_path) / "my delta.tar.zst"
    delta.write_bytes(b"x")
    argv = dry_run("--image", image, "--jobdir", jobdir, "--changes", delta, "true")
    assert parse_cmdline(" ".join(argv[1:])).changes == "/changes/my delta.tar.zst"
    assert [p.name for p in jobdir.iterdir()] == ["deltas, mine"], "nothing is written into the job directory"


def test_long_command_goes_to_a_command_file_of_the_run_and_the_dry_run_says_it_is_a_preview(
        tmp_path: Path, image: Path) -> None:
    result = launcher("--dry-run", "--image", image, "--jobdir", tmp_path, "--", "echo", "x" * 6000)
    assert result.returncode == 0, result.stderr
    assert words(json.loads(result.stdout))["apppot.cmdfile"] == "apppot.argv"
    assert list(tmp_path.iterdir()) == [image], "the command file is not written into the job directory"
    assert "--dry-run: a preview, not a command to run" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/nonexistent/base.img", "true"], "image /nonexistent/base.img: no such file"),
        (["--mem", "lots", "true"], "--mem lots: not a size"),
        (["--mem", "2x", "true"], "--mem 2x: not a size"),
        (["--mem", "10M", "true"], "--mem 10M: at least 64M"),
        (["--id", "a b", "true"], "--id a b: use letters"),
        (["--jobdir", "/nonexistent-dir", "true"], "not a directory"),
        (["--changes", "/nonexistent.tar.zst", "true"], "changes /nonexistent.tar.zst: no such file"),
        (["--linux", "/nonexistent/linux", "true"], "UML kernel /nonexistent/linux: not found"),
        (["--timeout", "-3", "true"], "not a duration like 90, 90s, 30m, 1h or 1:30:00"),
        (["--timeout", "0", "true"], "not a positive duration"),
        (["--timeout", "1:2:3:4", "true"], "not a duration"),
        (["--mem", "100000G", "true"], "--mem 100000G: 102400000 MiB, more than this host's memory ("),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, image: Path, args: list[str], message: str) -> None:
    result = launcher("--image", image, "--jobdir", tmp_path, *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") <= 3  # argparse adds its usage line for its own errors


def test_paths_with_spaces_commas_and_quotes_reach_uml_through_links(tmp_path: Path) -> None:
    odd = tmp_path / "My Images, \"new\" it's"
    odd.mkdir()
    image = odd / "apppot.img"
    fake_image(image)
    image.chmod(0o444)
    kernel = odd / "my linux"
    kernel.symlink_to("/bin/true")
    jobdir = odd / "my job"
    jobdir.mkdir()
    result = launcher("--dry-run", "--image", image, "--jobdir", jobdir, "--linux", kernel, "--no-network", "true")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert all(not re.search(r"[\s,\"'\\]", a) for a in argv if not a.startswith(("ubd0=", "con0="))), argv
    cow, _, backing = words(argv)["ubd0"].partition(",")
    assert cow.endswith("/cow") and backing.endswith("/image") and "," not in backing
    assert argv[0].endswith("/kernel")


@pytest.mark.parametrize(
    ("text", "mem"),
    [("2g", "2048M"), ("2G", "2048M"), ("2048M", "2048M"), ("2GiB", "2048M"), ("2gb", "2048M"), ("1.5G", "1536M"),
     ("512", "512M"), ("524288K", "512M"), ("1T", "1048576M")],
)
def test_mem_as_people_write_it(tmp_path: Path, image: Path, text: str, mem: str) -> None:
    from apppot_host.uml_run import parse_size

    assert parse_size(text) == mem
    if int(mem.removesuffix("M")) <= 1024:  # larger than some hosts: refused there (test_bad_input_is_one_line_and_exit_2)
        assert words(dry_run("--image", image, "--jobdir", tmp_path, "--mem", text, "true"))["mem"] == mem


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("1.5", 1.5), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1:30:00", 5400),
     ("30:00", 1800), ("2-12", 216000), ("1-00:00:10", 86410)],
)
def test_timeout_as_people_write_it(tmp_path: Path, image: Path, text: str, seconds: float) -> None:
    argv = dry_run("--image", image, "--jobdir", tmp_path, "--timeout", text, "true")
    assert parse_cmdline(" ".join(argv[1:])).timeout == seconds


def test_no_command_and_no_terminal_is_refused(tmp_path: Path, image: Path) -> None:
    """A batch script that forgot its command must not report success."""
    result = launcher("--image", image, "--jobdir", tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("apppot-start: error: no command and no terminal: an interactive session needs one; give "
                             "the job's command (apppot-start [OPTIONS] -- PROG ARGS) or run it in a terminal\n")


def test_root_refuses_a_job_directory_root_owns(tmp_path: Path, image: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the rule is about apppot-start run as root")
    result = launcher("--image", image, "--jobdir", tmp_path, "touch", "f")
    assert result.returncode == 2
    assert result.stderr.startswith(f"apppot-start: error: job directory {tmp_path} belongs to root")
    assert result.stderr.count("\n") == 1


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
    for text in ("125", "124", "127", "128+N", "130, 143", "APPPOT_IMAGE", "--dry-run", "--changes", "1:30:00", "2GiB"):
        assert text in result.stdout


def test_batch_output_to_a_file_tells_the_guest_term_dumb(tmp_path: Path, image: Path) -> None:
    """stdout is a pipe here, as in a batch system: programs in the guest must not draw progress."""
    argv = dry_run("--image", image, "--jobdir", tmp_path, "--", "true", env={"TERM": "xterm-256color"})
    assert words(argv)["TERM"] == "dumb"


def test_the_exit_code_table_is_the_one_in_the_code_in_help_and_readme() -> None:
    """One table (uml_launch.EXIT_CODES): --help prints it, the README shows it, and the codes it names are
    the ones the code returns."""
    assert exit_codes_help(uml_launch.EXIT_CODES) in launcher("--help").stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert exit_codes_markdown(uml_launch.EXIT_CODES) in readme, "README's apppot-start table: paste exit_codes_markdown()"
    named = {code for code, _ in uml_launch.EXIT_CODES}
    assert {str(c) for c in (uml_launch.EXIT_TIMEOUT, uml_launch.EXIT_LAUNCHER, uml_launch.EXIT_CHECK_FAILED,
                             EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE)} <= named


def test_cpu_choice_auto_any_a_number_and_the_cpu_list_notation() -> None:
    from apppot_host.uml_host import choose_cpu, cpu_list, current_cpu, stat_field

    allowed = os.sched_getaffinity(0)
    assert stat_field(b"4242 (a) b (c)) S 1 4240 4239 0 -1", 5) == b"4240"  # a command name with ") " in it
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and cpu_list({3}) == "3"
    assert current_cpu() in set(range(os.cpu_count() or 1))
    cpu, why = choose_cpu("auto")
    assert cpu in allowed and cpu_list(allowed) in why
    assert choose_cpu("any")[0] is None
    assert choose_cpu(str(min(allowed)))[0] == min(allowed)


@pytest.mark.parametrize(("value", "message"), [("x", "--cpu x: give a CPU number, 'auto' or 'any'"),
                                                ("-1", "--cpu -1: give a CPU number"),
                                                ("4096", "--cpu 4096: not one of the CPUs this process may use")])
def test_a_bad_cpu_is_one_line_and_exit_2(tmp_path: Path, image: Path, value: str, message: str) -> None:
    hows: list[list[str]] = [["--cpu", value], []]  # the option, then $APPPOT_CPU
    for how in hows:
        result = launcher("--dry-run", "--image", image, "--jobdir", tmp_path, *how, "true",
                          env={"APPPOT_CPU": value} if not how else None)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result


def uml_cow_header(backing: Path, size: int, mtime: int) -> bytes:
    """The start of a COW file as UML's kernel writes it (version 3, big-endian; arch/um/drivers/cow_user.c)."""
    return struct.pack(">4sIIQIII4096s", b"OOOM", 3, mtime, size, 512, 512, 0, os.fsencode(backing))


def test_a_cow_file_is_booted_only_over_the_image_it_was_made_over_as_that_was(tmp_path: Path, image: Path) -> None:
    """Else UML boots the image the COW file names instead, without a word, or panics."""
    cow, other = tmp_path / "mine.cow", tmp_path / "other.img"
    fake_image(other, 8192)
    st = image.stat()
    cow.write_bytes(uml_cow_header(image, st.st_size, int(st.st_mtime)))
    assert words(dry_run("--image", f"{cow}:{image}", "--jobdir", tmp_path, "true"))["ubd0"] == f"{cow},{image.resolve()}"
    fix = "; name a file that does not exist yet and the kernel makes a new one\n"
    result = launcher("--dry-run", "--image", f"{cow}:{other}", "--jobdir", tmp_path, "true")
    assert (result.returncode, result.stderr) == (2, f"apppot-start: error: COW file {cow}: it was made over {image.resolve()}, "
                                                     f"not {other} (give that image to go on with it){fix}")
    os.utime(image, (st.st_atime, st.st_mtime + 60))  # the image changed since
    result = launcher("--dry-run", "--image", f"{cow}:{image}", "--jobdir", tmp_path, "true")
    assert (result.returncode, result.stderr) == (2, f"apppot-start: error: COW file {cow}: the image {image.resolve()} changed "
                                                     "since the COW file was made over it (its size or modification time "
                                                     f"differ), so the COW file's blocks no longer fit it{fix}")


@pytest.mark.parametrize("content", [b"", b"\0" * 8192, b"(a delta, a qcow2 file, a partitioned disk...)" * 100])
def test_a_file_that_is_no_ext4_image_is_refused_before_booting(tmp_path: Path, content: bytes) -> None:
    """The kernel would panic ("VFS: Unable to mount root fs") with a stack trace."""
    image = tmp_path / "not-an-image.img"
    image.write_bytes(content)
    result = launcher("--dry-run", "--image", image, "--jobdir", tmp_path, "true")
    assert (result.returncode, result.stderr) == (2, f"apppot-start: error: image {image}: not an ext2/3/4 file system; an "
                                                     "AppPot image is a raw ext4 image, as apppot-build-image makes (not a "
                                                     "partitioned disk, a qcow2 file or a delta)\n")
