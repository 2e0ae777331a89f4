"""A root tree with every kind of entry, and a thorough tree comparison."""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from pathlib import Path

import pytest

from fixtures_user import require_root

# A file capability (cap_net_bind_service+ep), as setcap writes it: VFS_CAP_REVISION_2.
CAP_NET_BIND = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")
ODD_NAME = b"odd \n\t name \xff\xfe.bin"  # newline, tab, not UTF-8


def _xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def make_rootfs(root: Path) -> Path:
    """Fill ``root`` with one of everything apppot-snap must carry."""
    require_root("the tree holds files of other owners and device nodes")
    root.mkdir(parents=True, exist_ok=True)
    for d in ("etc", "usr/bin", "usr/lib/x", "usr/share/doc/pkg", "home/user/src", "var/lib", "empty", "opt/tree/a/b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("apppot\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n")
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "usr/bin/suid").write_bytes(b"\x7fELF not really")
    os.chmod(root / "usr/bin/suid", 0o4755)
    (root / "usr/bin/ping").write_bytes(b"ping binary")
    (root / "usr/lib/x/lib.so").write_bytes(os.urandom(70000))
    (root / "usr/share/doc/pkg/README").write_text("docs\n" * 100)
    (root / "usr/share/doc/pkg/copyright").write_text("GPL\n")
    (root / "home/user/src/main.f90").write_text("program hi\nprint *, 'hi'\nend program\n")
    (root / "home/user/.wh.notawhiteout").write_text("a user file with a whiteout-like name\n")
    (root / "home/user/empty-file").write_bytes(b"")
    os.chown(root / "home/user", 1000, 1000)
    os.chown(root / "home/user/src/main.f90", 1000, 1000)
    (root / "opt/tree/a/b/leaf").write_text("leaf\n")
    (root / "opt/tree/a/file").write_text("file\n")
    # Links of every flavour.
    os.symlink("tool", root / "usr/bin/tool-link")
    os.symlink("/etc/hostname", root / "etc/abs-link")
    os.symlink("does/not/exist", root / "etc/dangling")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hard")
    os.link(root / "usr/bin/tool", root / "usr/lib/x/tool-hard2")
    # Special files.
    os.mkfifo(root / "var/lib/fifo")
    os.mknod(root / "etc/null-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "etc/blk-dev", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    (root / ODD_NAME.decode("utf-8", "surrogateescape")).write_bytes(b"odd")
    os.write(os.open(os.path.join(os.fsencode(root), b"etc", ODD_NAME), os.O_CREAT | os.O_WRONLY, 0o600), b"odd2")
    # Sparse: 1 MiB hole, data, 1 MiB hole.
    with open(root / "var/lib/sparse.img", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data in the middle")
        f.truncate(3 << 20)
    if _xattrs_supported(root):
        os.setxattr(root / "usr/share/doc/pkg/README", "user.comment", b"hello \x00 binary \xff")
        os.setxattr(root / "usr/bin/ping", "security.capability", CAP_NET_BIND)
        os.setxattr(root / "opt/tree", "user.dir", b"on a directory")
    # Deterministic, distinct mtimes (ns precision) on everything, directories last.
    stamp = 1_600_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in sorted(filenames) + sorted(dirnames):
            stamp += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(stamp, stamp), follow_symlinks=False)
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A fresh root tree with one of every kind of entry."""
    return make_rootfs(tmp_path / "root")


def _snapshot(root: Path, ignore: set[bytes], dir_mtimes: bool) -> dict[bytes, tuple]:
    broot = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(broot):
        rel_dir = os.path.relpath(dirpath, broot)
        keep = []
        for name in dirnames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel not in ignore:
                keep.append(name)
        dirnames[:] = keep
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in ignore:
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = f.read()
                if st.st_nlink > 1:
                    inodes[(st.st_dev, st.st_ino)].append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            try:
                names = os.listxattr(full, follow_symlinks=False)
                xattrs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False)) for n in names))
            except OSError:
                xattrs = ()
            rdev = st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
            mtime = st.st_mtime_ns if (dir_mtimes or not stat.S_ISDIR(st.st_mode)) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, mtime, rdev, xattrs, content)
    groups = sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1)
    out[b"\0hardlink-groups"] = tuple(groups)
    return out


def assert_trees_equal(a: Path, b: Path, ignore: tuple[str, ...] = (), dir_mtimes: bool = True) -> None:
    """Assert two trees hold the same entries: lstat fields, content, xattrs and hardlink groups.

    ``ignore`` names relative paths (with everything below them) left out of the comparison.
    """
    skip = {os.fsencode(p) for p in ignore}
    sa, sb = _snapshot(a, skip, dir_mtimes), _snapshot(b, skip, dir_mtimes)
    only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
    assert not only_a and not only_b, f"only in {a}: {only_a[:10]}; only in {b}: {only_b[:10]}"
    fields = ("type", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "xattrs", "content")
    diffs = []
    for path in sorted(sa):
        if sa[path] != sb[path]:
            if path == b"\0hardlink-groups":
                diffs.append(f"hardlink groups: {sa[path]} != {sb[path]}")
                continue
            pairs = [(f, x, y) for f, x, y in zip(fields, sa[path], sb[path], strict=True) if x != y]
            shown = [(x, y) for f, x, y in pairs if f != "content"]
            diffs.append(f"{path!r}: {', '.join(f for f, _, _ in pairs)} differ: {shown}")
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:20])
