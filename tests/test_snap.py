"""apppot-snap end to end on real trees: base, status, changes, merge, and every error."""

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from apppot_guest.errors import ALL_ERRORS, exit_code_rows, exit_codes_help
from apppot_guest.manifest import base_path
from fixtures_tree import assert_trees_equal, make_rootfs
from mutations import mutate_everything
from snaphelp import PYTHON, REPO, assert_one_error_line, copy_tree, default_sigint, snap, status_lines

IGNORE = ("var/lib/apppot",)


@pytest.fixture
def pair(rootfs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A root with a recorded base, and a pristine copy of it (the cluster's image)."""
    snap("--root", rootfs, "base")
    return rootfs, copy_tree(rootfs, tmp_path / "pristine")


def test_status_is_empty_right_after_base(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    assert snap("--root", root, "status").stdout == ""
    assert json.loads(snap("status", "--json", "--root", root).stdout)["changes"] == []


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.gz", ".tar.xz", ".tar"])
def test_round_trip_of_every_kind_of_change(pair: tuple[Path, Path], tmp_path: Path, suffix: str) -> None:
    root, pristine = pair
    mutate_everything(root)
    delta = tmp_path / f"delta{suffix}"
    snap("--root", root, "changes", delta)
    listing = subprocess.run(["tar", "-tvf", delta], capture_output=True, text=True, check=False)
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    names = subprocess.run(["tar", "-tf", delta], capture_output=True, check=True).stdout.splitlines()
    assert names[0] == b"APPPOT-DELTA"
    assert b"home/user/new-sparse" in names and b"home/user/.wh.another" in names
    header = subprocess.run(["tar", "-xOf", delta, "APPPOT-DELTA"], capture_output=True, check=True).stdout
    meta = json.loads(header.splitlines()[1])
    assert meta["base_id"] == json.loads(base_path(root).read_bytes().splitlines()[1])["id"]
    assert meta["apppot_version"]
    snap("--root", pristine, "merge", delta)
    assert_trees_equal(root, pristine, ignore=IGNORE)
    # Sparse files stay sparse through the delta and the merge.
    for name in ("home/user/new-sparse", "var/lib/sparse.img"):
        st = os.stat(pristine / name)
        assert st.st_blocks * 512 < st.st_size / 4, name
    # The merged tree shows exactly the changes the original shows.
    assert status_lines(pristine) == status_lines(root)


def test_metadata_only_changes_carry_no_content(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, pristine = pair
    os.utime(root / "usr/lib/x/lib.so", ns=(1, 1_700_000_000_000_000_001))
    os.chmod(root / "usr/lib/x/lib.so", 0o640)
    lines = snap("--root", root, "status", "-v").stdout.splitlines()
    assert lines == ["M /usr/lib/x/lib.so  (mode, mtime_ns)"]
    delta = tmp_path / "d.tar"
    snap("--root", root, "changes", delta)
    assert delta.stat().st_size < 20_000  # the 70 kB file is not in it
    with tarfile.open(delta) as tar:
        assert tar.getnames() == ["APPPOT-DELTA"]
    snap("--root", pristine, "merge", delta)
    assert_trees_equal(root, pristine, ignore=IGNORE)


def test_same_size_and_mtime_is_trusted_unless_checksum(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    target = root / "etc/hostname"
    st = target.stat()
    target.write_text("APPPOT\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status_lines(root) == []
    assert snap("--root", root, "status", "--checksum").stdout.splitlines() == ["M /etc/hostname"]


def test_touched_but_identical_file_is_a_metadata_change(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    (root / "etc/hostname").write_text("apppot\n")  # same bytes, new mtime
    out = json.loads(snap("--root", root, "status", "--json").stdout)["changes"]
    assert [(c["status"], c["path"], c["what"]) for c in out if c["path"] == "/etc/hostname"] == [("M", "/etc/hostname", ["mtime_ns"])]


def test_excluded_paths_never_appear(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    for d in ("tmp", "proc", "var/log", "home/user/job", "var/cache/apt/archives"):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "junk").write_text("x")
    extra = tmp_path / "more-excludes"
    extra.write_text("# comment\n/opt/tr*\n")
    (root / "opt/tree/new").write_text("x")
    lines = snap("--root", root, "status", "--exclude-from", extra).stdout.splitlines()
    assert not [line for line in lines if any(x in line for x in ("/tmp", "/proc", "/var/log", "/home/user/job", "/var/cache/apt", "/opt/tree"))]
    assert "A /home/user/job" not in lines


def test_output_inside_the_root_is_not_part_of_the_delta(pair: tuple[Path, Path]) -> None:
    root, _ = pair
    (root / "home/user/new").write_text("x")
    delta = root / "home/user/apppot.changes.tar.zst"
    snap("--root", root, "changes", delta)
    snap("--root", root, "changes", delta)  # again, over the old one
    names = subprocess.run(["tar", "-tf", delta], capture_output=True, text=True, check=True).stdout.split()
    assert "home/user/apppot.changes.tar.zst" not in names and "home/user/new" in names


def test_default_delta_name_in_cwd_and_in_a_mounted_job_dir(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (root / "home/user/new").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    (home / "job").mkdir(parents=True)
    snap("--root", root, "changes", cwd=work, env={"HOME": str(home)})
    assert (work / "apppot.changes.tar.zst").is_file()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "jobdir", str(home / "job")], check=True)
    try:
        snap("--root", root, "changes", cwd=work, env={"HOME": str(home)})
        written = list((home / "job").iterdir())
        assert len(written) == 1 and written[0].name.startswith("apppot.20") and written[0].name.endswith(".changes.tar.zst")
    finally:
        subprocess.run(["umount", str(home / "job")], check=True)


def test_dry_runs_change_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, pristine = pair
    before = base_path(root).read_bytes()
    (root / "etc/new").write_text("x")
    out = snap("--root", root, "-n", "base").stdout
    assert out.startswith("would record base") and base_path(root).read_bytes() == before
    delta = tmp_path / "d.tar.zst"
    out = snap("--root", root, "changes", "-n", delta).stdout
    assert "C /etc/new" in out and not delta.exists()
    snap("--root", root, "changes", delta)
    reference = copy_tree(pristine, tmp_path / "reference")
    out = snap("--root", pristine, "merge", "--just-print", delta).stdout
    assert "would create /etc/new" in out
    assert_trees_equal(pristine, reference)


def test_foreign_base_is_refused_unless_forced(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (root / "etc/new").write_text("x")
    delta = tmp_path / "d.tar.zst"
    snap("--root", root, "changes", delta)
    other = make_rootfs(tmp_path / "other")
    (other / "usr/bin/only-in-newer-base").write_text("x")
    snap("--root", other, "base")
    reference = copy_tree(other, tmp_path / "reference")
    result = snap("--root", other, "merge", delta, check=5)
    assert_one_error_line(result, str(delta), "another base", "--force")
    assert_trees_equal(other, reference)
    snap("--root", other, "merge", "--force", delta)
    assert (other / "etc/new").read_text() == "x" and (other / "usr/bin/only-in-newer-base").exists()


def test_no_base_is_an_error(rootfs: Path, tmp_path: Path) -> None:
    result = snap("--root", rootfs, "status", check=4)
    assert_one_error_line(result, "no base manifest", str(rootfs))


def test_interrupted_base_keeps_the_previous_base(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A base that cannot be written whole (here: the disk is full) leaves the old one valid."""
    root, _ = pair
    small = tmp_path / "small"
    copy_tree(root, tmp_path / "src")
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "small", str(small)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{tmp_path / 'src'}/.", str(small)], check=True)
        good = base_path(small).read_bytes()
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk
            while os.write(fd, bytes(4096)):
                pass
        except OSError:
            pass
        os.close(fd)
        for i in range(400):  # a bigger manifest than fits
            (small / f"etc/f{i:04d}-{'x' * 100}").touch()
        result = snap("--root", small, "base", check=8)
        assert_one_error_line(result, "base.manifest")
        assert base_path(small).read_bytes() == good
        assert [p.name for p in base_path(small).parent.iterdir()] == ["base.manifest"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_help_documents_every_exit_code() -> None:
    out = snap("--help").stdout
    assert exit_codes_help(exit_code_rows()) in out
    for cls in ALL_ERRORS:
        assert f"{cls.exit_code:<9}{cls.summary[:40]}" in out
    assert snap("--version").stdout.startswith("apppot-snap ")


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["changes", "delta.zip"], 2, ["delta.zip", ".tar.zst"]),
        (["frobnicate"], 2, ["invalid choice"]),
        (["status", "--exclude-from", "BAD"], 3, ["BAD:2", "not an absolute path"]),
        (["status", "--exclude-from", "MISSING"], 3, ["MISSING"]),
        (["merge", "NOFILE"], 8, ["NOFILE"]),
    ],
)
def test_bad_input_gets_one_clear_line(pair: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, fragments: list[str]) -> None:
    root, _ = pair
    (tmp_path / "BAD").write_text("/ok\nrelative/path\n")
    subs = {"BAD": str(tmp_path / "BAD"), "MISSING": str(tmp_path / "missing"), "NOFILE": str(tmp_path / "nofile.tar.zst")}
    result = snap("--root", root, *[subs.get(a, a) for a in args], check=code)
    if code == 2 and "invalid choice" in fragments:
        assert "invalid choice" in result.stderr
        return
    assert_one_error_line(result, *[subs.get(f, f) for f in fragments])


def test_a_missing_compressor_is_a_tool_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = pair
    (root / "etc/new").write_text("x")
    out = tmp_path / "d.tar.zst"
    result = snap("--root", root, "changes", out, env={"PATH": "/nonexistent"}, check=9)
    assert_one_error_line(result, "zstd")
    assert not out.exists() and list(tmp_path.glob(".d.tar.zst*")) == []


def test_debug_shows_a_traceback(rootfs: Path) -> None:
    result = snap("--root", rootfs, "--debug", "status", check=None)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_interrupt_exits_130_and_leaves_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C while apppot-snap is blocked reading its exclude list (a FIFO nobody writes yet)."""
    root, _ = pair
    fifo = tmp_path / "excludes"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "APPPOT_SNAP_NO_SUDO": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "apppot_guest.snap", "--root", str(root), "changes", "--exclude-from", str(fifo), str(tmp_path / "d.tar")],
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    # Opening the FIFO for writing returns once the reader has it open: then it is blocked in read.
    with open(fifo, "w"):
        deadline = time.monotonic() + 30
        while b"excludes" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    assert proc.stderr is not None and proc.stderr.read().strip() == "apppot-snap: error: interrupted"
    assert not (tmp_path / "d.tar").exists()


def test_progress_only_on_a_terminal(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import pty

    root, _ = pair
    (root / "etc/new").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO), "APPPOT_SNAP_NO_SUDO": "1", "TERM": "xterm"}
    for action in (["base"], ["changes", str(tmp_path / "d.tar.zst")]):
        master, slave = pty.openpty()
        proc = subprocess.Popen([PYTHON, "-m", "apppot_guest.snap", "--root", str(root), *action],
                                stdout=subprocess.DEVNULL, stderr=slave, env=env)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            seen += chunk
        os.close(master)
        assert proc.wait() == 0
        assert b"entries" in seen and b"\r" in seen, seen
        quiet = snap("--root", root, *action)
        assert quiet.stderr == ""
    # A terminal that says it is not one (a batch job's console) gets no progress either.
    master, slave = pty.openpty()
    proc = subprocess.Popen([PYTHON, "-m", "apppot_guest.snap", "--root", str(root), "base"],
                            stdout=subprocess.DEVNULL, stderr=slave, env={**env, "TERM": "dumb"})
    os.close(slave)
    assert proc.wait() == 0
    try:
        assert os.read(master, 4096) == b""
    except OSError:
        pass  # EIO: nothing was written before the other side closed
    os.close(master)
