import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.errors import ConfigError
from apppot_guest.hashing import hash_fd
from apppot_guest.tree import DEFAULT_EXCLUDE, Excluder, read_patterns, walk


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (b"proc", True),
        (b"proc/1/status", True),
        (b"processes", False),
        (b"home/user/job", True),
        (b"home/alice/job/out.dat", True),
        (b"home/user/jobs", False),
        (b"home/user/src/job", False),
        (b"var/cache/apt/archives/x.deb", True),
        (b"var/cache/man", False),
        (b"var/lib/apppot/base.manifest", True),
        (b"var/lib/apt", False),
        (b"lost+found", True),
        (b"tmp", True),
        (b"etc/tmp", False),
    ],
)
def test_default_exclusions(path: bytes, excluded: bool) -> None:
    exclude = Excluder(read_patterns(DEFAULT_EXCLUDE))
    assert exclude(path) is excluded


@pytest.mark.parametrize(
    ("pattern", "path", "excluded"),
    [
        (b"/opt/a?c", b"opt/abc/x", True),
        (b"/opt/a?c", b"opt/ac", False),
        (b"/opt/[ab]*", b"opt/bee", True),
        (b"/opt/[!ab]*", b"opt/bee", False),
        (b"/opt/*.log", b"opt/x.log", True),
        (b"/opt/*.log", b"opt/sub/x.log", False),
        (b"/weird (1)+", b"weird (1)+/f", True),
        (b"/\xff", b"\xff/f", True),
    ],
)
def test_glob_patterns_match_within_one_component(pattern: bytes, path: bytes, excluded: bool) -> None:
    assert Excluder([pattern])(path) is excluded


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("relative/path\n", "not an absolute path"),
        ("/\n", "would exclude everything"),
        ("/ok\n/a/../b\n", "would exclude everything"),
    ],
)
def test_bad_exclude_lists_name_the_line(tmp_path: Path, text: str, problem: str) -> None:
    source = tmp_path / "list"
    source.write_text(text)
    with pytest.raises(ConfigError, match=problem) as info:
        read_patterns(source)
    assert str(source) in str(info.value)


def test_the_image_exclude_list_replaces_the_default(rootfs: Path) -> None:
    (rootfs / "etc/apppot").mkdir()
    (rootfs / "etc/apppot/exclude").write_text("/opt\n")
    exclude = Excluder.load(rootfs)
    assert exclude(b"opt/tree") and not exclude(b"proc")


def test_scan_does_not_cross_into_other_mounts(rootfs: Path) -> None:
    mnt = rootfs / "srv"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    try:
        (mnt / "remote-data").write_text("x")
        entries = {path: key for path, key, _ in walk(rootfs, Excluder([]))}
        assert b"srv/remote-data" not in entries and b"srv" not in entries
        assert b"etc/hostname" in entries
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_sparse_hash_equals_the_plain_hash(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as out:
        out.write(b"head")
        out.seek(3 << 20)
        out.write(b"middle")
        out.truncate(7 << 20)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert hash_fd(fd, sparse=True) == hash_fd(fd, sparse=False) == hashlib.sha256(f.read_bytes()).hexdigest()
    finally:
        os.close(fd)


def test_walk_from_a_relative_root_leaves_our_working_directory_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """list_dir looks at entries from inside each directory (fchdir): the caller's working directory
    is back after every listing, and AppPot's temporaries are named by paths that hold from it."""
    from apppot_guest.atomicfile import temp_name

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_text("x")
    (tree / "a" / "link").symlink_to("b/file")
    temporary = tree / "a" / temp_name("file")
    temporary.write_text("half-written")
    monkeypatch.chdir(tmp_path)
    seen: list[bytes] = []
    paths = [path for path, _key, _sparse in walk(Path("tree"), Excluder([]), on_temporary=seen.append)]
    assert paths == [b"a", b"a/b", b"a/b/file", b"a/link"]
    assert os.getcwd() == os.fspath(tmp_path)
    assert seen == [os.fsencode(Path("tree") / "a" / temporary.name)] and os.path.exists(seen[0])


def test_a_root_given_as_a_symlink_is_walked(tmp_path: Path) -> None:
    """The root is opened as given (a directory met on the walk is never followed if it became a symlink)."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "file").write_text("x")
    (tmp_path / "root").symlink_to("real")
    paths = [path for path, _key, _sparse in walk(tmp_path / "root", Excluder([]))]
    assert paths == [b"sub", b"sub/file"]


def test_walk_without_a_way_back_to_the_working_directory_gives_the_same_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the working directory cannot be opened to come back to, list_dir stays in it and looks at
    entries by their full paths: the same keys (symlink targets, xattrs, fifos, hardlinks) either way."""
    from apppot_guest.atomicfile import temp_name

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_text("x")
    (tree / "a" / "link").symlink_to("b/file")
    os.link(tree / "a" / "b" / "file", tree / "a" / "hard")
    os.mkfifo(tree / "a" / "fifo")
    (tree / "a" / temp_name("file")).write_text("half-written")
    try:
        os.setxattr(tree / "a" / "b" / "file", "user.apppot.test", b"v")
    except OSError:
        pass  # a file system without user xattrs: the rest still holds
    seen: list[bytes] = []
    expected = list(walk(tree, Excluder([]), on_temporary=seen.append))
    real_open = os.open

    def no_dot(path: object, flags: int, *args: object, **kw: object) -> int:
        if path == "." and flags & os.O_PATH:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_dot)
    seen_full: list[bytes] = []
    assert list(walk(tree, Excluder([]), on_temporary=seen_full.append)) == expected
    assert seen_full == seen and len(seen) == 1
    assert [p for p, _k, _s in expected] == [b"a", b"a/b", b"a/b/file", b"a/fifo", b"a/hard", b"a/link"]
