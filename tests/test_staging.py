"""Staged ingests: a subtree built without the writer lock (``StagingTransaction``), grafted in a short
transaction (``Transaction.graft``), and garbage collection's sweep waiting for staged ingests alive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Hardlink, Symlink, write_tree
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.errors import TransactionError, TreeError
from rcds.cvmfs.gc import collect_garbage
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry, entries_from_directory
from rcds.cvmfs.writer import StagedTree
from test_gc import (
    Timeline,
    assert_healthy,
    data_listing,
    expectation,
    expected_revision,
    read_revision,
    revision_objects,
    source_files,
    timeline,  # noqa: F401  (a fixture)
)

WHEN = int(time.time()) + 10


@pytest.fixture(params=["local", "s3"])
def storage_backend(request: pytest.FixtureRequest) -> str:
    """Every staged-ingest test runs with the public files in a directory and in a real S3 bucket."""
    return str(request.param)


def spec(tag: str) -> dict[str, object]:
    return {
        "README": f"{tag} readme\n".encode() * 40,
        "bin": {"run": f"#!/bin/sh\necho {tag}\n".encode(), "alias": Hardlink("bin/run")},
        "lib": {".cvmfscatalog": b"", "big.so": (tag.encode() * 97)[:300_000] * 2, "deep": {"x": b"x"}},
        "link": Symlink("README"),
        "empty": {},
    }


def healthy(open_reader: Callable[..., RepositoryReader], repo: Repository) -> RepositoryReader:
    reader = open_reader(repo)
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    return reader


def listing(reader: RepositoryReader, top: str) -> dict[str, tuple[int, int, str | None, bool]]:
    """Each entry below ``top`` (relative): mode, size, symlink, is nested root; plus file content."""
    out: dict[str, tuple[int, int, str | None, bool]] = {}
    stack = [top]
    while stack:
        path = stack.pop()
        for d in reader.listdir(path):
            full = f"{path}/{d.name}"
            out[full[len(top) :]] = (d.mode, d.size, d.symlink or None, d.is_nested_mountpoint)
            if d.is_dir:
                stack.append(full)
    return out


def stage(repo: Repository, path: str, src: Path) -> tuple[StagedTree, Callable[[], None]]:
    staging = repo.staging()
    staging.clock = lambda: WHEN
    tree = staging.stage(path, entries_from_directory(src))
    staging.seal()
    return tree, staging.abort


def test_a_grafted_tree_reads_as_add_tree_writes_it(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", spec("one"))
    direct, grafted = make_repo(), make_repo()
    with direct.transaction() as txn:
        txn.clock = lambda: WHEN
        txn.add_directory("/sw/one", src)
        txn.commit()
    staged, release = stage(grafted, "/sw/one", src)
    assert staged.path == "/sw/one" and staged.mount_row.is_nested_mountpoint
    with grafted.transaction() as txn:
        txn.clock = lambda: WHEN
        txn.graft(staged)
        result = txn.commit()
    release()
    a, b = healthy(open_reader, direct), healthy(open_reader, grafted)
    assert listing(a, "/sw/one") == listing(b, "/sw/one")
    assert read_revision(b, result.root_hash) == read_revision(a, a.manifest.root_catalog)
    assert {m for m, _, _ in b.iter_catalogs()} == {"", "/sw/one", "/sw/one/lib"}
    # The root's counters match the direct publish's (the checker verified each catalog's own too).
    counters = [r.root_catalog.counters() for r in (a, b)]
    assert counters[0] is not None and counters[1] is not None
    assert counters[0].totals() == counters[1].totals()


def test_grafts_replace_and_stage_concurrently(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader], tmp_path: Path
) -> None:
    repo = make_repo()
    old = write_tree(tmp_path / "old", {"gone.txt": b"old\n", "sub": {".cvmfscatalog": b"", "y": b"y"}})
    with repo.transaction() as txn:
        txn.add_directory("/sw/a", old)
        txn.commit()
    sources = {c: write_tree(tmp_path / c, spec(c)) for c in ("a", "b", "c")}
    staged: dict[str, StagedTree] = {}
    releases: list[Callable[[], None]] = []

    def build(c: str) -> None:
        tree, release = stage(Repository(repo.storage), f"/sw/{c}", sources[c])
        staged[c] = tree
        releases.append(release)

    threads = [threading.Thread(target=build, args=(c,)) for c in sources]
    with repo.transaction() as txn:  # a writer holding the lock meanwhile does not stop them
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        txn.abort()
    assert set(staged) == {"a", "b", "c"}
    with repo.transaction() as txn:
        for c in "abc":
            txn.graft(staged[c])
        result = txn.commit()
    for release in releases:
        release()
    reader = healthy(open_reader, repo)
    files = read_revision(reader, result.root_hash)
    assert "/sw/a/gone.txt" not in files and "/sw/a/sub/y" not in files
    for c in "abc":
        expected = {k: v for k, v in source_files(sources[c], f"/sw/{c}").items() if not k.endswith("/link")}
        assert {k: v for k, v in files.items() if k.startswith(f"/sw/{c}/")} == expected
    assert not list((repo.private / "txn").iterdir())  # no scratch left behind


def test_gc_never_sweeps_an_object_a_staged_ingest_reused(
    timeline: Timeline,  # noqa: F811
    open_reader: Callable[..., RepositoryReader],
) -> None:
    """A staged ingest of /sw/a-again reuses the objects only revision 1 references (GC would sweep them)
    while GC runs: GC's sweep waits until the staged tree is grafted and committed, then keeps them."""
    t, repo = timeline, timeline.repo
    expected = expectation(t, open_reader(repo), swept=[0, 1, 2], kept=[3, 4, 5])
    a_objects = {
        k
        for k in revision_objects(open_reader(repo), t.roots[1])
        - revision_objects(open_reader(repo), t.roots[2])
        if not k.endswith("C")
    }
    staging = Repository(repo.storage).staging()
    staging.clock = lambda: t.gc_time
    staged = staging.stage("/sw/a-again", entries_from_directory(t.sources["a"]))
    staging.seal()
    assert staged.stats.objects_written == 0  # everything deduplicated against revision 1's objects
    waited: list[float] = []
    results = []

    def graft_later() -> None:
        time.sleep(0.5)  # GC has planned the sweep and waits for the ingest lock
        with Repository(repo.storage).transaction() as txn:
            txn.clock = lambda: t.gc_time
            txn.graft(staged)
            results.append(txn.commit())
        staging.abort()

    grafter = threading.Thread(target=graft_later)

    def progress(phase: str, done: int, total: int) -> None:
        if (phase, done) == ("lock", 0):
            grafter.start()
            waited.append(time.monotonic())
        elif (phase, done) == ("lock", 1):
            waited.append(time.monotonic())

    report = collect_garbage(repo, now=t.gc_time, progress=progress)
    grafter.join(30)
    assert waited[1] - waited[0] >= 0.4, "GC should have waited for the staged ingest"
    (result,) = results
    assert report.revisions_kept == [3, 4, 5, 6]
    assert report.objects_swept == len(expected.objects - a_objects)
    assert a_objects <= set(data_listing(repo))
    reader = assert_healthy(open_reader, repo)
    assert read_revision(reader, result.root_hash) == {
        **expected_revision(t, "cdef"),
        **source_files(t.sources["a"], "/sw/a-again"),
    }


def test_one_staging_stages_several_trees_and_survives_a_bad_one(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader], tmp_path: Path
) -> None:
    repo = make_repo()
    sources = {c: write_tree(tmp_path / c, spec(c)) for c in ("x", "y")}
    bad = [
        TreeEntry("", EntryKind.DIRECTORY, 0o755),
        TreeEntry("alias", EntryKind.HARDLINK, 0o644, target="missing"),  # a hard link out of the tree
    ]
    with repo.staging() as staging:
        x = staging.stage("/sw/g/x", entries_from_directory(sources["x"]))
        with pytest.raises(TreeError):
            staging.stage("/sw/g/bad", bad)
        y = staging.stage("/sw/g/y", entries_from_directory(sources["y"]))
        with pytest.raises(TransactionError):
            staging.stage("/sw/g/x/inner", entries_from_directory(sources["y"]))  # inside a staged tree
        staging.seal()
        assert x.stats.files == y.stats.files > 0 and x.stats.bytes_in == y.stats.bytes_in
        with repo.transaction() as txn:
            txn.mkdir("/sw/g", nested=True)
            txn.graft(x)
            txn.graft(y)
            result = txn.commit()
    files = read_revision(healthy(open_reader, repo), result.root_hash)
    assert not any(k.startswith("/sw/g/bad") for k in files)
    for c in "xy":
        expected = {
            k: v for k, v in source_files(sources[c], f"/sw/g/{c}").items() if not k.endswith("/link")
        }
        assert {k: v for k, v in files.items() if k.startswith(f"/sw/g/{c}/")} == expected
