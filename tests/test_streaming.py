"""The streaming comparison (sorted walk merged with the sorted manifest) gives exactly what the
in-memory one gave (tests/legacy_snap.py), on the fixtures, on odd orderings and on any changes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_roundtrip_property import apply

from apppot_guest import snap
from apppot_guest.diff import Diff, Op, compare
from apppot_guest.errors import DeltaError
from apppot_guest.manifest import Entry, Kind, base_path, load_base, read_records
from apppot_guest.tree import Excluder, walk
from apppot_guest.workers import Workers
import legacy_snap
from fixtures_tree import make_rootfs
from mutations import mutate_everything
from snaphelp import snap as run_snap

# Names around '/' in byte order: "a" < "a b" < "a-b" < "a.c" < "a/..." < "a0" < "ab"; "\x01" sorts first of all.
ODD_ORDER = ["a", "a/b", "a/b/c", "a b", "a-b", "a-b/c", "a.c", "a0", "ab", "a\x01", "a\x01/x", "b/a-b", "b/a/b", "b/a.b/c"]


def streaming(root: Path, checksum: bool, for_delta: bool, workers: int) -> Diff:
    exclude = Excluder.load(root)
    # pool_after=0: workers list ahead from the first directory on (a real walk starts them after POOL_AFTER entries).
    with Workers(os.fsencode(root), exclude, None, workers=workers, pool_after=0) as pool:
        return compare(read_records(root), walk(root, exclude, lister=pool), exclude, pool, checksum=checksum, for_delta=for_delta)


def assert_same_as_before(root: Path, workers: tuple[int, ...] = (1, 2)) -> Diff:
    exclude = Excluder.load(root)
    for checksum in (False, True):
        for for_delta in (False, True):
            scan = legacy_snap.Scan(root, exclude)
            old = legacy_snap.compare(load_base(root), scan, exclude, checksum=checksum, for_delta=for_delta)
            for n in workers:
                new = streaming(root, checksum, for_delta, n)
                assert new.changes == old.changes, (checksum, for_delta, n)
                assert new.ops == old.ops, (checksum, for_delta, n)
                archived = {e.path for op, e in old.ops if op is Op.CREATE and isinstance(e, Entry) and e.kind is Kind.FILE and not e.link}
                assert new.sparse & archived == scan.sparse & archived
    return new


def make_odd_tree(root: Path) -> Path:
    make_rootfs(root)
    dirs = {"a", "a/b", "a-b", "a\x01", "b", "b/a", "b/a.b"}
    for rel in ODD_ORDER:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel in dirs:
            path.mkdir(exist_ok=True)
        else:
            path.write_text(rel)
    os.link(root / "a-b/c", root / "a/b/c-link")  # a hardlink group: "a-b/c" < "a/b/c-link" in byte order
    os.link(root / "a-b/c", root / "a.c-link")
    return root


def test_the_walk_comes_in_manifest_order(tmp_path: Path) -> None:
    root = make_odd_tree(tmp_path / "root")
    paths = [path for path, _, _ in walk(root, Excluder.load(root))]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert paths.index(b"a-b") < paths.index(b"a/b") < paths.index(b"a0")
    keys = {path: key for path, key, _ in walk(root, Excluder.load(root))}
    leader = min([b"a-b/c", b"a/b/c-link", b"a.c-link"])
    assert leader == b"a-b/c" and keys[b"a-b/c"].endswith(b"\t")
    assert keys[b"a/b/c-link"].endswith(b"\ta-b/c") and keys[b"a.c-link"].endswith(b"\ta-b/c")


@pytest.mark.parametrize("tree", ["fixture", "odd order"])
def test_base_writes_the_manifest_the_in_memory_one_wrote(tmp_path: Path, tree: str) -> None:
    root = make_rootfs(tmp_path / "root") if tree == "fixture" else make_odd_tree(tmp_path / "root")
    old = legacy_snap.Scan(root, Excluder.load(root)).manifest()
    assert snap.main(["--root", str(root), "base"]) == 0
    new = load_base(root)
    assert new.id == old.id and new.records == old.records
    assert list(new.records) == sorted(new.records)


def test_every_kind_of_change_compares_as_before(rootfs: Path) -> None:
    assert snap.main(["--root", str(rootfs), "base"]) == 0
    mutate_everything(rootfs)
    diff = assert_same_as_before(rootfs)
    assert any(op is Op.DELETE for op, _ in diff.ops) and diff.sparse


def test_deleted_trees_among_odd_names_compare_as_before(tmp_path: Path) -> None:
    root = make_odd_tree(tmp_path / "root")
    assert snap.main(["--root", str(root), "base"]) == 0
    shutil.rmtree(root / "a")  # a deleted tree between "a-b" and "a0": one D for it
    os.unlink(root / "a-b/c")  # inside a directory that stays
    shutil.rmtree(root / "b/a.b")
    (root / "a\x01").rename(root / "a\x01-moved")
    shutil.rmtree(root / "b/a")
    (root / "b/a").write_text("a directory became a file")  # b/a was a directory (b/a/b)
    diff = assert_same_as_before(root)
    deletes = [item for op, item in diff.ops if op is Op.DELETE]
    assert b"a" in deletes and b"a/b" not in deletes and b"a-b/c" in deletes and b"b/a.b" in deletes


def test_a_manifest_out_of_order_or_corrupt_is_refused(rootfs: Path) -> None:
    run_snap("--root", rootfs, "base")
    path = base_path(rootfs)
    lines = path.read_bytes().split(b"\n")
    body = lines[2:-1]
    path.write_bytes(b"\n".join([*lines[:2], body[1], body[0], *body[2:]]) + b"\n")  # same ID, wrong order
    assert "not sorted" in run_snap("--root", rootfs, "status", check=DeltaError.exit_code).stderr
    path.write_bytes(b"\n".join(lines[:2] + body[:-1]) + b"\n")  # one entry short
    assert "corrupt" in run_snap("--root", rootfs, "status", check=DeltaError.exit_code).stderr
    assert "corrupt" in run_snap("--root", rootfs, "changes", rootfs.parent / "d.tar", check=DeltaError.exit_code).stderr
    assert not (rootfs.parent / "d.tar").exists()


ODD_PATHS = ["a", "a-b", "a/b", "a/b/c", "a.c", "a0", "etc/x", "etc/x-y", "etc/x/y", "usr/bin/t", "usr/bin/t.d/u", "\udcff", "\udcff/\x01"]
path_st = st.sampled_from(ODD_PATHS)
op_st = st.one_of(
    st.tuples(st.just("write"), path_st, st.binary(max_size=100)),
    st.tuples(st.just("sparse"), path_st, st.integers(1, 2)),
    st.tuples(st.just("mkdir"), path_st),
    st.tuples(st.just("symlink"), path_st, st.sampled_from(["x", "../etc"])),
    st.tuples(st.just("hardlink"), path_st, path_st),
    st.tuples(st.just("chmod"), path_st, st.sampled_from([0o600, 0o755])),
    st.tuples(st.just("touch"), path_st, st.integers(0, 2_000_000_000_000_000_000)),
    st.tuples(st.just("xattr"), path_st, st.sampled_from(["user.a"]), st.binary(max_size=8)),
    st.tuples(st.just("remove"), path_st),
    st.tuples(st.just("rename"), path_st, path_st),
)


@pytest.fixture(scope="module")
def odd_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_rootfs(tmp_path_factory.mktemp("odd") / "root")
    odd = [("write", p, p.encode("utf-8", "surrogateescape")) for p in ("a-b", "a.c", "a0", "etc/x-y")]
    for op in [*odd, ("write", "a/b/c", b"c"), ("write", "etc/x/y", b"y")]:
        apply(root, op)
    assert snap.main(["--root", str(root), "base"]) == 0
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=1, max_size=15))
def test_any_changes_compare_as_before(odd_template: Path, ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "root")
        subprocess.run(["cp", "-a", odd_template, root], check=True)
        for op in ops:
            apply(root, op)
        assert_same_as_before(root, workers=(2,))


def test_workers_die_with_a_killed_command(tmp_path: Path) -> None:
    """SIGKILL leaves no worker behind: none holds the caller's stderr, none is left running."""
    from test_snap_faults import start

    root = make_rootfs(tmp_path / "root")
    for i in range(40):  # enough directories that listings go to workers
        (root / f"opt/many/d{i}").mkdir(parents=True)
    for action in (["base"], ["status"]):
        if action == ["status"]:
            run_snap("--root", root, "base")
        proc = start("--root", root, *action, fault="scanned:1:kill")
        proc.communicate(timeout=120)  # returns once every holder of its stderr is gone
        assert proc.returncode == -9
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    assert os.fsencode(root) not in (entry / "cmdline").read_bytes(), f"a worker survived: {entry.name}"


def test_no_process_to_fork_means_working_in_one(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert snap.main(["--root", str(rootfs), "base"]) == 0
    mutate_everything(rootfs)
    expected = streaming(rootfs, checksum=True, for_delta=True, workers=1)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert streaming(rootfs, checksum=True, for_delta=True, workers=2) == expected


def test_workers_list_ahead_only_once_the_walk_has_listed_pool_after_entries(tmp_path: Path) -> None:
    """A small tree is listed by the command's own process (forking and feeding workers would cost more);
    past ``pool_after`` entries workers list ahead, with the same result."""
    root = make_odd_tree(tmp_path / "root")
    exclude = Excluder.load(root)
    results = []
    for pool_after, forks in ((10**9, False), (5, True)):
        with Workers(os.fsencode(root), exclude, None, workers=2, pool_after=pool_after) as pool:
            results.append(list(walk(root, exclude, lister=pool)))
            assert (pool._pool is not None) is forks
    assert results[0] == results[1] == list(walk(root, exclude))
