"""Property: base -> any sequence of changes -> delta -> merge onto the pristine base -> identical trees."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apppot_guest import snap
from fixtures_tree import assert_trees_equal, make_rootfs

DIRS = ["", "etc", "usr/bin", "opt/tree", "opt/tree/a", "home/user", "newdir", "newdir/sub"]
NAMES = ["x", "y", ".wh.z", "caf\u00e9", "sp ace", "\udcff\udcfe"]  # the last: bytes that are not UTF-8
PATHS = [f"{d}/{n}" if d else n for d in DIRS for n in NAMES] + DIRS[1:]

path_st = st.sampled_from(PATHS)
op_st = st.one_of(
    st.tuples(st.just("write"), path_st, st.binary(max_size=300)),
    st.tuples(st.just("sparse"), path_st, st.integers(1, 4)),
    st.tuples(st.just("mkdir"), path_st),
    st.tuples(st.just("symlink"), path_st, st.sampled_from(["x", "../etc", "/etc/passwd", "nowhere/at/all"])),
    st.tuples(st.just("hardlink"), path_st, path_st),
    st.tuples(st.just("chmod"), path_st, st.sampled_from([0o600, 0o755, 0o4755, 0o1777])),
    st.tuples(st.just("chown"), path_st, st.integers(0, 2000), st.integers(0, 2000)),
    st.tuples(st.just("touch"), path_st, st.integers(0, 2_000_000_000_000_000_000)),
    st.tuples(st.just("xattr"), path_st, st.sampled_from(["user.a", "user.b", "security.capability"]), st.binary(max_size=20)),
    st.tuples(st.just("rmxattr"), path_st, st.sampled_from(["user.a", "user.dir"])),
    st.tuples(st.just("remove"), path_st),
    st.tuples(st.just("fifo"), path_st),
    st.tuples(st.just("device"), path_st, st.integers(0, 255), st.integers(0, 255)),
    st.tuples(st.just("rename"), path_st, path_st),
)


def apply(root: Path, op: tuple) -> None:
    """Apply one change; changes that make no sense for the tree as it is are skipped."""
    kind, rel, *args = op
    p = os.path.join(os.fsencode(root), os.fsencode(rel))
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if kind in ("write", "sparse", "symlink", "fifo", "device", "mkdir", "hardlink") and os.path.lexists(p):
            remove(p)
        if kind == "write":
            with open(p, "wb") as f:
                f.write(args[0])
        elif kind == "sparse":
            with open(p, "wb") as f:
                f.seek(args[0] << 20)
                f.write(b"tail")
        elif kind == "mkdir":
            os.mkdir(p)
        elif kind == "symlink":
            os.symlink(args[0], p)
        elif kind == "hardlink":
            src = os.path.join(os.fsencode(root), os.fsencode(args[0]))
            if os.path.isfile(src) and not os.path.islink(src):
                os.link(src, p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "device":
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(args[0], args[1]))
        elif not os.path.lexists(p):
            return
        elif kind == "chmod" and not os.path.islink(p):
            os.chmod(p, args[0])
        elif kind == "chown":
            os.chown(p, args[0], args[1], follow_symlinks=False)
        elif kind == "touch":
            os.utime(p, ns=(args[0], args[0]), follow_symlinks=False)
        elif kind == "xattr" and not os.path.islink(p) and (os.path.isfile(p) or os.path.isdir(p)):  # user.* only there
            value = bytes.fromhex("0100000200040000000000000000000000000000") if args[0] == "security.capability" else args[1]
            if args[0] != "security.capability" or os.path.isfile(p):
                os.setxattr(p, args[0], value)
        elif kind == "rmxattr" and not os.path.islink(p) and args[0] in os.listxattr(p):
            os.removexattr(p, args[0])
        elif kind == "remove":
            remove(p)
        elif kind == "rename":
            dst = os.path.join(os.fsencode(root), os.fsencode(args[0]))
            if not dst.startswith(p + b"/") and dst != p:
                if os.path.lexists(dst):
                    remove(dst)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.rename(p, dst)
    except (FileExistsError, NotADirectoryError, FileNotFoundError):
        pass  # e.g. a parent is a file now: the change does not apply to this tree
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        # a parent is a symlink that loops (x -> x): neither does this change


def remove(p: bytes) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_rootfs(tmp_path_factory.mktemp("template") / "root")
    assert snap.main(["--root", str(root), "base"]) == 0
    return root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=1, max_size=25))
@example(ops=[("symlink", "x", "x"), ("symlink", "newdir", "x"), ("mkdir", "newdir/sub/x")])  # a parent that loops: found by CI
def test_any_changes_survive_the_round_trip(template: Path, ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, pristine, delta = Path(tmp, "root"), Path(tmp, "pristine"), Path(tmp, "d.tar.zst")
        subprocess.run(["cp", "-a", template, root], check=True)
        subprocess.run(["cp", "-a", template, pristine], check=True)
        for op in ops:
            apply(root, op)
        assert snap.main(["--root", str(root), "changes", str(delta)]) == 0
        assert snap.main(["--root", str(pristine), "merge", str(delta)]) == 0
        assert_trees_equal(root, pristine, ignore=("var/lib/apppot",))
        assert snap.main(["--root", str(pristine), "status", "--checksum"]) == 0
