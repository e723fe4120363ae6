"""Crash safety with real processes: a publish killed at each stage leaves the repository consistent.

A child process publishes with ``RCDS_FAILPOINT=<stage>`` and dies there (``os._exit(137)``, no cleanup,
like ``kill -9``). The parent then checks what a client would see and that the next publish works.
Every test runs on local storage and on a real S3 server (``storage_backend``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import write_tree
from rcds.cvmfs import failpoints
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import MANIFEST, Repository

BEFORE_MANIFEST = [
    "after-objects",
    "after-first-catalog",
    "after-catalogs",
    "before-manifest",
    "after-reflog",
]

PUBLISH_SCRIPT = """
import sys
from pathlib import Path
from rcds.cvmfs.repository import MANIFEST, Repository

repo = Repository(sys.argv[1])
with repo.transaction() as txn:
    txn.add_directory(sys.argv[2], Path(sys.argv[3]))
    txn.commit()
"""

FIRST = {"one.txt": b"first CID\n" * 100, "big.bin": bytes(range(256)) * 1200, "d": {"x": b"x"}}
SECOND = {
    "two.txt": b"second CID\n",
    "big.bin": os.urandom(400 * 1024),  # chunked, new objects
    "sub": {".cvmfscatalog": b"", "inner.txt": b"nested catalog inside the CID\n"},
}


@pytest.fixture(params=["local", "s3"])
def storage_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def publish_in_child(
    repo: Repository, path: str, src: Path, failpoint: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", PUBLISH_SCRIPT, str(repo.storage), path, str(src)],
        env={**os.environ, failpoints.ENV: failpoint},
        capture_output=True,
        timeout=120,
        check=False,
    )


def read_tree(reader: RepositoryReader, top: str) -> dict[str, bytes]:
    return {e.path: reader.read(e.path) for e in reader.walk(top) if e.dirent.is_regular}


def expected_files(src: Path, top: str) -> dict[str, bytes]:
    out = {f"{top}/.cvmfscatalog": b""}
    for p in src.rglob("*"):
        if p.is_file():
            out[f"{top}/{p.relative_to(src).as_posix()}"] = p.read_bytes()
    return out


@pytest.fixture
def repo_with_one_cid(make_repo: Callable[..., Repository], tmp_path: Path) -> tuple[Repository, Path, Path]:
    repo = make_repo()
    first = write_tree(tmp_path / "first", FIRST)
    with repo.transaction() as txn:
        txn.add_directory("/cid1", first)
        assert txn.commit().revision == 1
    return repo, first, write_tree(tmp_path / "second", SECOND)


@pytest.mark.parametrize("failpoint", BEFORE_MANIFEST)
def test_publish_killed_before_the_manifest_leaves_the_previous_revision_intact_and_recoverable(
    repo_with_one_cid: tuple[Repository, Path, Path],
    failpoint: str,
    open_reader: Callable[..., RepositoryReader],
) -> None:
    repo, first, second = repo_with_one_cid
    manifest_before = repo.store.get(MANIFEST)
    scratch_before = scratch_files(repo)

    child = publish_in_child(repo, "/cid2", second, failpoint)
    assert child.returncode == failpoints.EXIT_CODE, child.stderr.decode()

    # What clients see: still revision 1, complete and consistent.
    assert repo.store.get(MANIFEST) == manifest_before
    reader = open_reader(repo)
    assert reader.manifest.revision == 1
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    assert read_tree(reader, "/cid1") == expected_files(first, "/cid1")
    assert reader.lookup("/cid2") is None

    # The next publish takes the lock, cleans up what the killed one left and publishes revision 2.
    leftovers = scratch_files(repo) - scratch_before
    assert leftovers, "the killed publish should have left its scratch files behind"
    with repo.lock(blocking=False):  # the kernel released the dead writer's lock (no hang below)
        pass
    with repo.transaction() as txn:
        txn.add_directory("/cid2", second)
        assert txn.commit().revision == 2
    assert sorted(p for p in leftovers if p.exists()) == []
    assert list((repo.storage / ".rcds" / "txn").iterdir()) == []

    reader = open_reader(repo)
    assert reader.manifest.revision == 2
    report = check_repository(reader)
    assert report.issues == [], [str(i) for i in report.issues]
    assert read_tree(reader, "/cid1") == expected_files(first, "/cid1")
    assert read_tree(reader, "/cid2") == expected_files(second, "/cid2")


def scratch_files(repo: Repository) -> set[Path]:
    """Transaction scratch directories and staging files of the private area."""
    private = repo.storage / ".rcds"
    return {p for d in ("txn", "tmp") if (private / d).is_dir() for p in (private / d).iterdir()}


def test_publish_killed_after_the_manifest_has_published_the_new_revision(
    repo_with_one_cid: tuple[Repository, Path, Path], open_reader: Callable[..., RepositoryReader]
) -> None:
    repo, first, second = repo_with_one_cid
    child = publish_in_child(repo, "/cid2", second, "after-manifest")
    assert child.returncode == failpoints.EXIT_CODE, child.stderr.decode()

    reader = open_reader(repo)
    assert reader.manifest.revision == 2
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    assert read_tree(reader, "/cid2") == expected_files(second, "/cid2")
    assert read_tree(reader, "/cid1") == expected_files(first, "/cid1")

    with repo.transaction() as txn:
        txn.remove("/cid1")
        assert txn.commit().revision == 3
    reader = open_reader(repo)
    assert reader.lookup("/cid1") is None
    assert check_repository(reader).issues == []


def test_publish_killed_after_the_reflog_is_reported_only_as_a_warning(
    repo_with_one_cid: tuple[Repository, Path, Path], open_reader: Callable[..., RepositoryReader]
) -> None:
    repo, _first, second = repo_with_one_cid
    assert publish_in_child(repo, "/cid2", second, "after-reflog").returncode == failpoints.EXIT_CODE
    report = check_repository(open_reader(repo))
    assert report.errors == []
    assert [i.where for i in report.issues] == [".cvmfsreflog"]
    assert report.issues[0].severity == "warning"


def test_a_failpoint_that_is_not_set_changes_nothing(
    repo_with_one_cid: tuple[Repository, Path, Path], open_reader: Callable[..., RepositoryReader]
) -> None:
    repo, _first, second = repo_with_one_cid
    child = publish_in_child(repo, "/cid2", second, "no-such-failpoint")
    assert child.returncode == 0, child.stderr.decode()
    assert open_reader(repo).manifest.revision == 2
