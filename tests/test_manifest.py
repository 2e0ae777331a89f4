import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from apppot_guest.errors import DeltaError
from apppot_guest.manifest import Entry, Kind, Manifest, format_entry, load_base, parse_entry, same_mtime
from fixtures_tree import ODD_NAME
from snaphelp import snap

ODD_ENTRIES = [
    Entry(b"usr/bin/x", Kind.FILE, 0o4755, 0, 0, 12, 1_600_000_000_123_456_789, "ab" * 32),
    Entry(b"etc/" + ODD_NAME, Kind.FILE, 0o600, 1000, 100, 0, 5, "cd" * 32, link=b"etc/\\odd\tlink"),
    Entry(b"a\\x41 \\ b", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=b"../\n\xff"),
    Entry(b"dev/null", Kind.CHAR, 0o666, 0, 0, rdev=os.makedev(1, 3)),
    Entry(b"dev/loop300", Kind.BLOCK, 0o660, 0, 6, rdev=os.makedev(7, 300)),
    Entry(b"d", Kind.DIR, 0o1777, 0, 0, xattrs=((b"user.a,b=c", b"\x00\xff,="), (b"security.capability", b"\x01\x02"))),
    Entry(b"fifo", Kind.FIFO, 0o644, 3, 4),
]


@pytest.mark.parametrize("entry", ODD_ENTRIES, ids=lambda e: repr(e.path))
def test_entry_line_round_trip_is_bytes_safe(entry: Entry) -> None:
    line = format_entry(entry)
    assert b"\n" not in line and line.count(b"\t") == 11
    assert parse_entry(line) == entry


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"path\tf\t644\t0\t0\t0\t0\t\t\t\t",  # 11 fields
        b"path\tz\t644\t0\t0\t0\t0\t\t\t\t\t",  # unknown kind
        b"path\tf\t9z\t0\t0\t0\t0\t\t\t\t\t",  # mode not octal
        b"path\tf\t644\tx\t0\t0\t0\t\t\t\t\t",  # uid not a number
        b"\tf\t644\t0\t0\t0\t0\t\t\t\t\t",  # empty path
        b"p\tc\t644\t0\t0\t0\t0\t\t1\t\t\t",  # rdev without ':'
        b"p\td\t755\t0\t0\t0\t0\t\t\tuser.x\t\t",  # xattr without '='
        b"p\td\t755\t0\t0\t0\t0\t\t\tuser.x=zz\t\t",  # xattr value not hex
        b"p\tf\t644\t0\t0\t0\t0\t\t\t\t\t\xff",  # digest not ASCII
        b"a\\q\tf\t644\t0\t0\t0\t0\t\t\t\t\t",  # bad escape
    ],
)
def test_malformed_entry_lines_are_rejected(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_entry(line)


def test_manifest_id_depends_on_entries_only() -> None:
    a = Manifest.from_entries(reversed(ODD_ENTRIES))
    b = Manifest.from_entries(ODD_ENTRIES)
    assert a.id == b.id and a.id.startswith("sha256:")
    assert list(a.records) == sorted(e.path for e in ODD_ENTRIES)
    again = Manifest.from_bytes(a.to_bytes(), "test")
    assert again.records == a.records and again.id == a.id
    assert [again.entry(e.path) for e in ODD_ENTRIES] == ODD_ENTRIES
    changed = Manifest.from_entries([*ODD_ENTRIES[1:], Entry(b"usr/bin/x", Kind.FILE, 0o755, 0, 0)])
    assert changed.id != a.id


def test_a_corrupted_manifest_is_refused(tmp_path: Path) -> None:
    data = Manifest.from_entries(ODD_ENTRIES).to_bytes().replace(b"\t4755\t", b"\t4777\t")
    with pytest.raises(DeltaError, match="corrupt"):
        Manifest.from_bytes(data, "m")
    with pytest.raises(DeltaError, match="not an apppot manifest"):
        Manifest.from_bytes(b"hello\n", "m")


def test_base_records_every_kind_and_hardlink_groups(rootfs: Path) -> None:
    out = snap("--root", rootfs, "base").stdout
    manifest = load_base(rootfs)
    assert manifest.id in out
    e = {path: entry for path in manifest.records if (entry := manifest.entry(path)) is not None}
    assert e[b"usr/bin/tool"].link == b"" and e[b"usr/bin/tool-hard"].link == b"usr/bin/tool"
    assert e[b"usr/lib/x/tool-hard2"].link == b"usr/bin/tool"
    assert e[b"usr/bin/suid"].mode == 0o4755
    assert e[b"usr/bin/tool-link"].kind is Kind.SYMLINK and e[b"usr/bin/tool-link"].target == b"tool"
    assert e[b"etc/null-dev"].kind is Kind.CHAR and e[b"etc/null-dev"].rdev == os.makedev(1, 3)
    assert e[b"etc/blk-dev"].kind is Kind.BLOCK
    assert e[b"var/lib/fifo"].kind is Kind.FIFO
    assert e[b"etc/" + ODD_NAME].size == 4
    assert e[b"home/user/src/main.f90"].uid == 1000
    sparse = e[b"var/lib/sparse.img"]
    assert sparse.size == 3 << 20
    assert sparse.digest == hashlib.sha256((rootfs / "var/lib/sparse.img").read_bytes()).hexdigest()
    assert (b"security.capability", bytes.fromhex("0100000200040000000000000000000000000000")) in e[b"usr/bin/ping"].xattrs
    assert b"var/lib/apppot" not in e and not any(p.startswith(b"var/lib/apppot/") for p in e)
    assert e[b"home/user/.wh.notawhiteout"].kind is Kind.FILE
    assert e[b"usr/bin/tool"].mtime_ns % 1_000_000_000 != 0  # nanoseconds kept


def test_whole_second_copies_keep_the_same_mtime() -> None:
    assert same_mtime(1_600_000_000_123_456_789, 1_600_000_000_123_456_789)
    assert same_mtime(1_600_000_000_123_456_789, 1_600_000_000_000_000_000)
    assert not same_mtime(1_600_000_000_123_456_789, 1_600_000_001_000_000_000)
    assert not same_mtime(1_600_000_000_123_456_789, 1_600_000_000_123_456_000)


@pytest.mark.parametrize("copy", ["cp -a", "rsync -aHAX", "mkfs.ext4 -d"])
def test_a_recreated_tree_shows_no_changes(rootfs: Path, tmp_path: Path, copy: str) -> None:
    """Inode numbers, ctimes and lost nanoseconds are not evidence of change."""
    snap("--root", rootfs, "base")
    dest = tmp_path / "copy"
    if copy == "cp -a":
        subprocess.run(["cp", "-a", f"{rootfs}/.", str(dest)], check=True)
    elif copy == "rsync -aHAX":
        subprocess.run(["rsync", "-aHAX", "--devices", "--specials", f"{rootfs}/", str(dest)], check=True)
    else:
        image = tmp_path / "image.ext4"
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(image)], check=True)
        dest.mkdir()
        subprocess.run(["mount", "-o", "loop,ro", str(image), str(dest)], check=True)
    try:
        assert snap("--root", dest, "status").stdout == ""
        assert snap("--root", dest, "status", "--checksum").stdout == ""
    finally:
        if copy == "mkfs.ext4 -d":
            subprocess.run(["umount", str(dest)], check=True)
