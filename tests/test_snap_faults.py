"""apppot-snap under concurrency, crashes, interrupts, full disks and hostile input.

Every fault is placed at an exact point with the test-only hook
APPPOT_TEST_FAULT (apppot_guest/faults.py): a process is paused there (a FIFO
tells the test it arrived and holds it until the test lets go), killed with
SIGKILL, or sent SIGINT.  Nothing waits on a timer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apppot_guest.delta import HEADER_MAGIC, HEADER_NAME, TarWriter
from apppot_guest.errors import ALL_ERRORS, BusyError, exit_code_rows, exit_codes_markdown
from apppot_guest.manifest import load_base
from fixtures_tree import assert_trees_equal
from mutations import mutate_everything
from snaphelp import PYTHON, REPO, assert_one_error_line, copy_tree, default_sigint, have, snap, status_lines

IGNORE = ("var/lib/apppot",)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "APPPOT_SNAP_NO_SUDO": "1"}


def start(*args: str | Path, fault: str | None = None, new_session: bool = False) -> subprocess.Popen[str]:
    env = {**ENV, "APPPOT_TEST_FAULT": fault} if fault else ENV
    return subprocess.Popen([PYTHON, "-m", "apppot_guest.snap", *(str(a) for a in args)], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_session,
                            preexec_fn=default_sigint)


@dataclass
class Paused:
    """A run of apppot-snap held at a point; ``stdout``, ``stderr`` and ``returncode`` once it ended."""

    proc: subprocess.Popen[str]
    stdout: str = ""
    stderr: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


@contextlib.contextmanager
def paused(tmp_path: Path, point: str, *args: str | Path, nth: int = 1, new_session: bool = False) -> Iterator[Paused]:
    """Run apppot-snap ARGS until it reaches POINT the NTH time; it waits there until the block ends."""
    fifo = tmp_path / f"pause-{point}-{nth}"
    os.mkfifo(fifo)
    run = Paused(start(*args, fault=f"{point}:{nth}:pause:{fifo}", new_session=new_session))
    keep_open: list[int] = []

    def unblock_if_it_ends() -> None:  # a process that never gets there must not hang the test
        run.proc.wait()
        with contextlib.suppress(OSError):
            keep_open.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock_if_it_ends, daemon=True).start()
    writer = os.open(fifo, os.O_WRONLY)  # returns once the process opened the FIFO: it is at POINT
    try:
        assert run.proc.poll() is None, f"apppot-snap {args} ended before reaching {point}: {run.proc.communicate()}"
        yield run
    finally:
        os.close(writer)  # lets it go on
        run.stdout, run.stderr = run.proc.communicate()
        for fd in keep_open:
            os.close(fd)


def traces(root: Path) -> list[str]:
    """Every name AppPot may leave behind by mistake, anywhere in the tree."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if ".apppot-" in name or name.startswith("merge.") or name.endswith(".tmp"):
                found.append(os.path.join(dirpath, name))
    return found


def state_dir(root: Path) -> list[str]:
    return sorted(os.listdir(root / "var/lib/apppot"))


@pytest.fixture
def pair(rootfs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A root with a base, and a pristine copy of it."""
    snap("--root", rootfs, "base")
    return rootfs, copy_tree(rootfs, tmp_path / "pristine")


def make_delta(source: Path, delta: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (source / name).write_bytes(data)
    snap("--root", source, "changes", delta)
    return delta


# -- 1. one writer at a time ------------------------------------------------------------------


def test_a_second_merge_is_refused_while_one_runs(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, pristine = pair
    one = make_delta(copy_tree(pristine, tmp_path / "one"), tmp_path / "one.tar", {f"etc/one{i}": b"1" * i for i in range(20)})
    two = make_delta(copy_tree(pristine, tmp_path / "two"), tmp_path / "two.tar", {f"etc/two{i}": b"2" * i for i in range(20)})
    target = copy_tree(pristine, tmp_path / "target")
    with paused(tmp_path, "staged", "--root", target, "merge", one) as first:
        second = snap("--root", target, "merge", two, check=BusyError.exit_code)
        assert_one_error_line(second, str(target), f"apppot-snap merge (pid {first.pid})", "did nothing")
        actions: list[list[str | Path]] = [["base"], ["status"], ["changes", tmp_path / "d.tar"]]
        for action in actions:  # nobody else either
            assert_one_error_line(snap("--root", target, *action, check=BusyError.exit_code), f"pid {first.pid}")
    assert first.returncode == 0, first.stderr
    assert_trees_equal(target, tmp_path / "one", ignore=IGNORE)
    assert not (target / "etc/two0").exists() and state_dir(target) == ["base.manifest"]


def test_merge_during_base_is_refused_and_base_records_a_consistent_tree(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, pristine = pair
    delta = make_delta(copy_tree(pristine, tmp_path / "source"), tmp_path / "d.tar", {f"etc/new{i}": b"x" * i for i in range(50)})
    with paused(tmp_path, "scanned", "--root", root, "base") as base:
        assert_one_error_line(snap("--root", root, "merge", delta, check=BusyError.exit_code), f"apppot-snap base (pid {base.pid})")
    assert base.returncode == 0, base.stderr
    assert snap("--root", root, "status", "-v").stdout == ""


def test_base_never_records_a_hash_with_metadata_it_does_not_belong_to(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Files rewritten between base's walk and its reading them: the record is what was read."""
    root, _ = pair
    with paused(tmp_path, "scanned", "--root", root, "base") as base:
        (root / "etc/hostname").write_text("renamed-while-base-ran\n")  # new size, new mtime
        with open(root / "usr/lib/x/lib.so", "r+b") as f:  # same size, new mtime
            f.write(b"changed")
    assert base.returncode == 0, base.stderr
    assert snap("--root", root, "status", "-v").stdout == ""
    assert snap("--root", root, "status", "--checksum").stdout == ""


def test_readers_share_the_root(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (root / "etc/new").write_text("x")
    with paused(tmp_path, "locked", "--root", root, "status") as first:
        assert snap("--root", root, "changes", tmp_path / "d.tar").returncode == 0
    assert first.returncode == 0 and "A /etc/new" in first.stdout.splitlines()


# -- 2. crashes and interrupts leave nothing behind ------------------------------------------------


@pytest.mark.parametrize("fault", ["stage:2:kill", "staged:1:kill", "rename:1:kill", "rename:4:kill"])
def test_a_killed_merge_is_cleaned_up_by_the_next_run(pair: tuple[Path, Path], tmp_path: Path, fault: str) -> None:
    root, pristine = pair
    mutate_everything(root)
    delta = tmp_path / "d.tar.zst"
    snap("--root", root, "changes", delta)
    proc = start("--root", pristine, "merge", delta, fault=fault)
    assert proc.wait() == -signal.SIGKILL
    leftovers = [name for name in state_dir(pristine) if name != "base.manifest"]
    assert [n for n in leftovers if n != "lock"] and all(".apppot-tmp." in n for n in leftovers if n != "lock")
    outside_state = [t for t in traces(pristine) if "/var/lib/apppot/" not in t]
    assert outside_state == []  # a merge never puts a temporary name in the tree
    status = snap("--root", pristine, "status")
    assert "removed" in status.stderr and "left by an interrupted apppot-snap" in status.stderr
    assert ".apppot" not in status.stdout
    assert state_dir(pristine) == ["base.manifest"]
    snap("--root", pristine, "merge", delta)  # again, whole this time
    assert_trees_equal(root, pristine, ignore=IGNORE)
    assert traces(pristine) == [] and state_dir(pristine) == ["base.manifest"]


def test_ctrl_c_while_merging_files_in_waits_for_the_whole_delta(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, pristine = pair
    mutate_everything(root)
    delta = tmp_path / "d.tar.zst"
    snap("--root", root, "changes", delta)
    proc = start("--root", pristine, "merge", delta, fault="rename:2:int")
    _, err = proc.communicate()
    assert proc.returncode == 130 and err.strip() == f"apppot-snap: error: interrupted after {delta} was applied in full"
    assert_trees_equal(root, pristine, ignore=IGNORE)
    assert traces(pristine) == [] and state_dir(pristine) == ["base.manifest"]


def test_ctrl_c_while_staging_changes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, pristine = pair
    mutate_everything(root)
    delta = tmp_path / "d.tar.zst"
    snap("--root", root, "changes", delta)
    reference = copy_tree(pristine, tmp_path / "reference")
    proc = start("--root", pristine, "merge", delta, fault="stage:2:int")
    _, err = proc.communicate()
    assert proc.returncode == 130 and err.strip() == "apppot-snap: error: interrupted"
    assert_trees_equal(pristine, reference)
    assert state_dir(pristine) == ["base.manifest"]


def test_a_base_killed_before_its_rename_is_cleaned_up(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    good = (root / "var/lib/apppot/base.manifest").read_bytes()
    proc = start("--root", root, "base", fault="rename:1:kill")
    assert proc.wait() == -signal.SIGKILL
    assert (root / "var/lib/apppot/base.manifest").read_bytes() == good
    assert any(n.startswith(".base.manifest.apppot-tmp.") for n in state_dir(root))
    again = snap("--root", root, "base")
    assert re.search(r"removed \S+/var/lib/apppot/\.base\.manifest\.apppot-tmp\.\d+\.[0-9a-f]{12}, left by an interrupted apppot-snap", again.stderr)
    assert state_dir(root) == ["base.manifest"] and traces(root) == []


def test_a_killed_changes_inside_the_tree_is_never_listed_and_is_cleaned_up(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (root / "usr/lib/x/big").write_bytes(os.urandom(3 << 20))
    (root / "srv").mkdir()
    inside = root / "srv/d.tar"
    proc = start("--root", root, "changes", inside, fault="write:3:kill")
    assert proc.wait() == -signal.SIGKILL
    assert not inside.exists() and [n for n in os.listdir(root / "srv") if ".apppot-tmp." in n]
    status = snap("--root", root, "status")
    assert status.stdout.splitlines() == ["A /srv", "M /usr/lib/x", "A /usr/lib/x/big"] and "removed" in status.stderr
    assert traces(root) == []
    # Outside the tree, the next 'changes' to the same file removes its dead temporary.
    outside = tmp_path / "out" / "d.tar"
    outside.parent.mkdir()
    assert start("--root", root, "changes", outside, fault="write:3:kill").wait() == -signal.SIGKILL
    again = snap("--root", root, "changes", outside)
    assert "removed" in again.stderr and os.listdir(outside.parent) == ["d.tar"]


def test_leftovers_of_earlier_versions_are_removed_too(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    (root / "etc/.apppot-merge.4242.hostname").write_text("stray")
    (root / "var/lib/apppot/merge.4243").mkdir()
    (root / "var/lib/apppot/merge.4243/0").write_text("staged")
    (root / "var/lib/apppot/.base.manifest.4244.0.tmp").write_text("half a manifest")
    status = snap("--root", root, "status")
    assert status.stdout == "M /etc\n"  # the stray file is gone; its directory's mtime shows it was there
    assert status.stderr.count("removed") == 3
    assert state_dir(root) == ["base.manifest"] and traces(root) == []


@pytest.mark.skipif(not have("zstd"), reason="needs zstd")
@pytest.mark.parametrize("nth", range(1, 9))
def test_ctrl_c_during_changes_to_zstd_always_exits_130_and_leaves_nothing(pair: tuple[Path, Path], tmp_path: Path, nth: int) -> None:
    """Ctrl-C reaches the terminal's whole process group; the N-th write to the compressor is where it lands."""
    root, _ = pair
    mutate_everything(root)
    (root / "usr/lib/x/big").write_bytes(os.urandom(6 << 20))
    out = tmp_path / "out" / "d.tar.zst"
    out.parent.mkdir()
    with paused(tmp_path, "write", "--root", root, "changes", out, nth=nth, new_session=True) as proc:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to apppot-snap and whatever shares its group
    assert proc.returncode == 130 and proc.stderr.strip() == "apppot-snap: error: interrupted"
    assert os.listdir(out.parent) == []


# -- 3. the destination: full, a directory, not writable --------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst", ".tar.xz"])
def test_a_full_destination_is_named_as_the_culprit(pair: tuple[Path, Path], tmp_path: Path, suffix: str) -> None:
    root, _ = pair
    for i in range(16):
        (root / f"srv-f{i:02d}").write_bytes(os.urandom(256 << 10))  # incompressible: 4 MiB in all
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "small", str(small)], check=True)
    try:
        out = small / f"d{suffix}"
        result = snap("--root", root, "changes", out, check=8)
        assert_one_error_line(result, f"cannot write {out}", "No space left on device")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_the_destination_is_checked_before_the_scan(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (tmp_path / "adir.tar.zst").mkdir()
    result = snap("--root", root, "changes", tmp_path / "adir.tar.zst", check=2)
    assert_one_error_line(result, str(tmp_path / "adir.tar.zst"), "is a directory")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "ro", str(readonly)], check=True)
    try:
        # Recognisably before the scan: a base whose walk would stop at the fault point never gets there.
        proc = start("--root", root, "changes", readonly / "d.tar", fault="scanned:1:kill")
        _, err = proc.communicate()
        assert proc.returncode == 8
        assert err.strip() == f"apppot-snap: error: cannot write {readonly / 'd.tar'}: Read-only file system"
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


# -- 4. hostile deltas: bounded reading, bounded messages -----------------------------------------


def header_delta(path: Path, header: bytes, declared_size: int | None = None) -> Path:
    buf = io.BytesIO()
    writer = TarWriter(buf)
    info = tarfile.TarInfo(HEADER_NAME)
    info.size = len(header)
    writer.add(info, header)
    writer.close()
    data = bytearray(buf.getvalue())
    if declared_size is not None:  # a header block that claims more than follows
        forged = tarfile.TarInfo(HEADER_NAME)
        forged.size = declared_size
        data[:512] = forged.tobuf(tarfile.GNU_FORMAT)[:512]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_megabytes_of_junk_in_the_header_get_a_short_line(pair: tuple[Path, Path], tmp_path: Path, compress: bool) -> None:
    root, _ = pair
    reference = copy_tree(root, tmp_path / "reference")
    meta = json.dumps({"base_id": load_base(root).id}).encode()
    delta = header_delta(tmp_path / "junk.tar", b"\n".join([HEADER_MAGIC, meta, b""]) + bytes(4 << 20))
    if compress:
        subprocess.run(["zstd", "-q", "--rm", delta], check=True)
        delta = delta.with_name("junk.tar.zst")
        assert delta.stat().st_size < 10_000  # a small file, a big header
    result = snap("--root", root, "merge", delta, check=6)
    assert_one_error_line(result, str(delta), "line 3")
    assert len(result.stderr) < 500, len(result.stderr)
    assert_trees_equal(root, reference)


def test_a_header_that_claims_gigabytes_is_refused_unread(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    delta = header_delta(tmp_path / "huge.tar", HEADER_MAGIC + b"\n{}\n", declared_size=8 << 30)
    result = snap("--root", root, "merge", delta, check=6)
    assert_one_error_line(result, str(delta), "more than any real delta")


def test_a_junk_json_line_is_quoted_short(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    delta = header_delta(tmp_path / "j.tar", HEADER_MAGIC + b"\n" + b"{\x1b[31m" + b"z" * 100_000 + b"\n")
    result = snap("--root", root, "merge", delta, check=6)
    assert_one_error_line(result, str(delta), "line 2", "bytes)")
    assert len(result.stderr) < 500 and "\x1b" not in result.stderr


# -- 5. the command line and stdout -----------------------------------------------------------


@pytest.mark.parametrize("args", [["frobnicate"], [], ["--bogus", "status"], ["merge"], ["status", "extra"]])
def test_every_usage_error_is_one_line(pair: tuple[Path, Path], args: list[str]) -> None:
    root, _ = pair
    result = snap("--root", root, *args, check=2)
    assert_one_error_line(result, "--help")


def test_a_closed_stdout_ends_quietly(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    for i in range(5000):
        (root / f"etc/added-{i:05d}-{'x' * 40}").touch()
    # status | head -1
    status = start("--root", root, "status")
    head = subprocess.run(["head", "-1"], stdin=status.stdout, capture_output=True, text=True, check=True)
    assert status.stdout is not None
    status.stdout.close()
    assert status.wait() == 128 + signal.SIGPIPE and status.stderr is not None and status.stderr.read() == ""
    assert head.stdout == "M /etc\n"
    # A pipe already closed before the first write: the same, for certain.
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([PYTHON, "-m", "apppot_guest.snap", "--root", root, "status"], env=ENV, stdout=write_end,
                            stderr=subprocess.PIPE, text=True, check=False)
    os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == ""


def test_a_fresh_base_on_a_tree_without_var_lib_lists_nothing(rootfs: Path) -> None:
    subprocess.run(["rm", "-rf", "--", rootfs / "var"], check=True)
    snap("--root", rootfs, "base")
    assert status_lines(rootfs) == []
    assert sorted(os.listdir(rootfs / "var/lib/apppot")) == ["base.manifest"]


def test_readme_exit_code_table_matches_the_code() -> None:
    """One table, from the error classes: the README shows it (test_snap checks --help)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## `apppot-snap`") : readme.index("## The boot hook")]
    assert exit_codes_markdown(exit_code_rows()) in section
    codes = {code for code, _ in exit_code_rows()}
    assert codes == {0, 1} | {cls.exit_code for cls in ALL_ERRORS} and BusyError.exit_code in codes
