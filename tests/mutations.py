"""Changes a user makes to an image, one of every kind apppot-snap must carry."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from fixtures_tree import CAP_NET_BIND, ODD_NAME


def mutate_everything(root: Path) -> None:
    """Apply one change of every kind to a tree made by ``make_rootfs``."""
    r = root
    (r / "usr/bin/newtool").write_bytes(b"#!/bin/sh\necho new\n")  # new file
    os.chmod(r / "usr/bin/newtool", 0o755)
    (r / "usr/lib/x/lib.so").write_bytes(os.urandom(90000))  # content change
    os.chmod(r / "etc/hostname", 0o600)  # mode only
    os.chown(r / "usr/share/doc/pkg/copyright", 1000, 1000)  # owner only
    os.utime(r / "etc/passwd", ns=(1_700_000_000_5, 1_700_000_000_987_654_321))  # mtime only
    os.setxattr(r / "home/user/src/main.f90", "user.note", b"new xattr")  # xattr added
    os.removexattr(r / "usr/share/doc/pkg/README", "user.comment")  # xattr removed
    os.setxattr(r / "opt/tree", "user.dir", b"changed")  # xattr changed, on a directory
    os.setxattr(r / "usr/bin/tool", "security.capability", CAP_NET_BIND)  # file capability
    shutil.rmtree(r / "usr/share/doc/pkg")  # a whole deleted tree
    os.unlink(r / "etc/dangling")  # a deleted symlink
    # Type changes in every direction.
    os.unlink(r / "home/user/empty-file")
    (r / "home/user/empty-file").mkdir()  # file -> dir
    (r / "home/user/empty-file/inside").write_text("x")
    shutil.rmtree(r / "opt/tree/a/b")
    (r / "opt/tree/a/b").write_text("dir became a file")  # dir -> file
    os.unlink(r / "etc/abs-link")
    (r / "etc/abs-link").write_text("symlink became a file")  # symlink -> file
    os.unlink(r / "opt/tree/a/file")
    os.symlink("../../../etc/hostname", r / "opt/tree/a/file")  # file -> symlink
    os.unlink(r / "usr/bin/tool-link")
    (r / "usr/bin/tool-link").mkdir()  # symlink -> dir
    shutil.rmtree(r / "empty")
    os.symlink("usr/lib", r / "empty")  # dir -> symlink
    # Hard links: a new link to an unchanged base file, and a broken group.
    os.link(r / "usr/bin/suid", r / "home/user/suid-link")
    os.unlink(r / "usr/lib/x/tool-hard2")
    shutil.copy2(r / "usr/bin/tool", r / "usr/lib/x/tool-hard2")
    # Special files.
    os.mkfifo(r / "home/user/new-fifo", 0o640)
    os.mknod(r / "etc/zero-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    # Sparse: a new sparse file and a sparse file changed in the middle.
    with open(r / "home/user/new-sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    with open(r / "var/lib/sparse.img", "r+b") as f:
        f.seek(2 << 20)
        f.write(b"more data")
    # Odd names: whiteout-like, newline and non-UTF-8.
    (r / "home/user/.wh.another").write_text("not a deletion marker")
    (r / "home/user/.wh..wh..opq").write_text("not an opaque-dir marker either")
    os.unlink(os.path.join(os.fsencode(r), ODD_NAME))
    with open(os.path.join(os.fsencode(r), b"home/user/\xe9t\xe9 \n.txt"), "wb") as f:
        f.write(b"latin-1 name")
