"""Merging refuses tampered and foreign deltas before it changes anything."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from apppot_guest.delta import HEADER_MAGIC, HEADER_NAME, TarWriter, tarinfo_for
from apppot_guest.manifest import Entry, Kind, format_entry, load_base
from fixtures_tree import assert_trees_equal
from snaphelp import assert_one_error_line, copy_tree, snap

CONTENT = b"owned\n"
DIGEST = __import__("hashlib").sha256(CONTENT).hexdigest()


@pytest.fixture
def target(rootfs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A root with a base, and an untouched copy to compare with after a refused merge."""
    snap("--root", rootfs, "base")
    return rootfs, copy_tree(rootfs, tmp_path / "reference")


def file_entry(path: bytes) -> Entry:
    return Entry(path, Kind.FILE, 0o644, 0, 0, len(CONTENT), 1_700_000_000_000_000_000, DIGEST)


def forge(path: Path, base_id: str, lines: list[bytes], members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A delta written by hand: a header with ``lines``, then ``members`` as given."""
    meta = json.dumps({"apppot_version": "x", "base_id": base_id, "created": "", "create": 0, "meta": 0, "delete": 0}).encode()
    header = b"\n".join([HEADER_MAGIC, meta, *lines]) + b"\n"
    buf = io.BytesIO()
    writer = TarWriter(buf)
    info = tarfile.TarInfo(HEADER_NAME)
    info.size = len(header)
    writer.add(info, header)
    for member, data in members:
        member.size = len(data)
        writer.add(member, data)
    writer.close()
    path.write_bytes(buf.getvalue())
    return path


def refused(root: Path, reference: Path, delta: Path, code: int, *fragments: str) -> None:
    result = snap("--root", root, "merge", delta, check=code)
    assert_one_error_line(result, *fragments)
    assert_trees_equal(root, reference)  # nothing changed, nothing left behind
    assert sorted(p.name for p in (root / "var/lib/apppot").iterdir()) == ["base.manifest"]


def member(entry: Entry, name: bytes | None = None) -> tarfile.TarInfo:
    info = tarinfo_for(entry)
    if name is not None:
        info.name = os.fsdecode(name)
    return info


@pytest.mark.parametrize("bad", [b"../escaped", b"/etc/abs", b"usr/../../escaped", b"usr/./x", b"usr//x"])
def test_paths_leaving_the_root_are_refused(target: tuple[Path, Path], tmp_path: Path, bad: bytes) -> None:
    root, reference = target
    entry = file_entry(bad)
    delta = forge(tmp_path / "evil.tar", load_base(root).id, [b"C\t" + format_entry(entry)], [(member(entry), CONTENT)])
    refused(root, reference, delta, 7, "refusing")
    assert not (tmp_path / "escaped").exists()


def test_a_symlink_then_a_file_through_it_is_refused(target: tuple[Path, Path], tmp_path: Path) -> None:
    root, reference = target
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Entry(b"etc/evil", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=os.fsencode(outside))
    through = file_entry(b"etc/evil/planted")
    delta = forge(
        tmp_path / "evil.tar", load_base(root).id,
        [b"C\t" + format_entry(link), b"C\t" + format_entry(through)],
        [(member(link), b""), (member(through), CONTENT)],
    )
    refused(root, reference, delta, 7, "etc/evil")
    assert list(outside.iterdir()) == []


def test_a_file_through_an_existing_symlink_is_refused(target: tuple[Path, Path], tmp_path: Path) -> None:
    """The root already has a symlink (usr/bin/tool-link -> tool); nothing is written through it."""
    root, reference = target
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "etc/to-outside")
    reference = copy_tree(root, tmp_path / "reference2")
    entry = file_entry(b"etc/to-outside/planted")
    delta = forge(tmp_path / "evil.tar", load_base(root).id, [b"C\t" + format_entry(entry)], [(member(entry), CONTENT)])
    refused(root, reference, delta, 7, "etc/to-outside", "symlink")
    assert list(outside.iterdir()) == []


def test_a_hard_link_to_outside_is_refused(target: tuple[Path, Path], tmp_path: Path) -> None:
    root, reference = target
    entry = Entry(b"etc/shadow-link", Kind.FILE, 0o644, 0, 0, 0, 0, link=b"../../etc/shadow")
    delta = forge(tmp_path / "evil.tar", load_base(root).id, [b"C\t" + format_entry(entry)], [(member(entry), b"")])
    refused(root, reference, delta, 7, "refusing")


def test_writing_into_an_excluded_path_is_refused(target: tuple[Path, Path], tmp_path: Path) -> None:
    """Excluded paths include the job directory, which in a job is the host's."""
    root, reference = target
    entry = file_entry(b"home/user/job/planted")
    delta = forge(tmp_path / "evil.tar", load_base(root).id, [b"C\t" + format_entry(entry)], [(member(entry), CONTENT)])
    refused(root, reference, delta, 7, "excluded")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("renamed-member", "does not match its header"),
        ("wrong-content", "does not match its hash"),
        ("missing-member", "truncated"),
        ("extra-member", "unexpected member"),
        ("wrong-type", "type or size differs"),
        ("bad-header-line", "malformed"),
        ("duplicate-path", "appears twice"),
    ],
)
def test_archives_that_disagree_with_their_header_are_refused(target: tuple[Path, Path], tmp_path: Path, case: str, fragment: str) -> None:
    root, reference = target
    base_id = load_base(root).id
    a, b = file_entry(b"etc/a"), file_entry(b"etc/b")
    lines = [b"C\t" + format_entry(a), b"C\t" + format_entry(b)]
    members = [(member(a), CONTENT), (member(b), CONTENT)]
    if case == "renamed-member":
        members[1] = (member(b, b"etc/../../b"), CONTENT)
    elif case == "wrong-content":
        members[1] = (member(b), b"OWNED\n")
    elif case == "missing-member":
        members.pop()
    elif case == "extra-member":
        members.append((member(file_entry(b"etc/c")), CONTENT))
    elif case == "wrong-type":
        members[1] = (member(Entry(b"etc/b", Kind.DIR, 0o755, 0, 0)), b"")
    elif case == "bad-header-line":
        lines.append(b"X\tnonsense")
    elif case == "duplicate-path":
        lines.append(b"D\tetc/a")
    delta = forge(tmp_path / "evil.tar", base_id, lines, members)
    refused(root, reference, delta, 6, fragment)
    assert not (root / "etc/a").exists()


def test_not_a_delta_at_all(target: tuple[Path, Path], tmp_path: Path) -> None:
    root, reference = target
    plain = tmp_path / "plain.tar.gz"
    (tmp_path / "payload").write_text("x")
    subprocess.run(["tar", "-czf", plain, "-C", tmp_path, "payload"], check=True)
    refused(root, reference, plain, 6, "not an AppPot delta")
    garbage = tmp_path / "garbage.tar.zst"
    garbage.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(3000))
    refused(root, reference, garbage, 6, "garbage.tar.zst")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    refused(root, reference, empty, 6, "empty")


def test_a_truncated_compressed_delta_is_refused(target: tuple[Path, Path], tmp_path: Path) -> None:
    root, reference = target
    source = copy_tree(root, tmp_path / "source")
    (source / "usr/lib/x/big").write_bytes(os.urandom(1 << 20))
    delta = tmp_path / "d.tar.zst"
    snap("--root", source, "changes", delta)
    data = delta.read_bytes()
    delta.write_bytes(data[: len(data) // 2])
    refused(root, reference, delta, 6, "d.tar.zst")


def test_merge_keeps_excluded_paths_and_other_mounts_when_deleting_a_tree(target: tuple[Path, Path], tmp_path: Path) -> None:
    """Deleting /home/user in the delta must not delete the job directory mounted under it."""
    root, _ = target
    pristine = copy_tree(root, tmp_path / "pristine")
    subprocess.run(["rm", "-rf", "--", root / "home/user"], check=True)
    delta = tmp_path / "d.tar.zst"
    snap("--root", root, "changes", delta)
    job = pristine / "home/user/job"
    job.mkdir()
    (job / "results.dat").write_text("precious")
    snap("--root", pristine, "merge", delta)
    assert (job / "results.dat").read_text() == "precious"
    assert sorted(p.name for p in (pristine / "home/user").iterdir()) == ["job"]
