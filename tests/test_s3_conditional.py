"""The conditional replace of a bucket repository's root files, against an S3 server that enforces
``If-None-Match``/``If-Match``: moto's standalone server (``python -m moto.server``, tests/s3server.py), in
its own process on 127.0.0.1. Only these tests use moto (it checks no signatures and keeps the bucket in
memory); every other S3 test runs on the juicefs gateway, which ignores the headers.

Two writers on one bucket repository are two machines here: two state directories (each its own
``.rcds/``, hence its own writer flock, content index and catalog cache) with the same keys and
``repo.json``, so the local lock stops neither; only the bucket's conditional writes keep them apart.

What they guard: the two root files a commit replaces, the reflog and then the manifest (``If-Match`` on
the versions its transaction started from), and a new repository's manifest (``If-None-Match: *``). The
objects, catalogs and history a losing commit wrote are content-addressed: unreferenced, harmless, GC's.
The whitelist is not guarded (README, "A repository in an S3 bucket").
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import FQRN, write_tree
from rcds.cvmfs import failpoints
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.gc import GcReport, collect_garbage
from rcds.cvmfs.repository import MANIFEST, PRIVATE_DIR, REFLOG, Repository, RepositoryError
from rcds.storage import ConditionFailed
from rcds.storage.s3 import S3Settings, S3Store
from s3server import S3Server, moto_available, run_moto_server, server_environment
from tools import REQUIRE_ENV

BUCKET = "rcds-conditional"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if not moto_available():
        message = (
            "moto's S3 server not installed (pip install 'moto[s3]' flask flask-cors, in the test extra)"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(message)
    with run_moto_server(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        with server_environment(server):
            yield server


@pytest.fixture
def bucket_store(moto: S3Server) -> Callable[[], dict[str, object]]:
    """Store settings for a repository of its own in the moto bucket."""
    return lambda: {"url": f"s3://{BUCKET}/{secrets.token_hex(4)}/{FQRN}", "endpoint": moto.endpoint}


@pytest.fixture
def first(make_repo: Callable[..., Repository], bucket_store: Callable[[], dict[str, object]]) -> Repository:
    return make_repo(store=bucket_store())


def second_machine(repo: Repository, storage: Path) -> Repository:
    """The same repository as another machine sees it: its keys and repo.json, nothing else of the state."""
    private = storage / PRIVATE_DIR
    private.mkdir(parents=True, mode=0o700)
    shutil.copy(repo.private / "repo.json", private / "repo.json")
    shutil.copytree(repo.keys_dir, private / "keys")
    (private / "tmp").mkdir()
    return Repository(storage)


def publish(repo: Repository, path: str, src: Path) -> int:
    with repo.transaction() as txn:
        txn.add_directory(path, src)
        return txn.commit().revision


def assert_clean(repo: Repository, cache: Path) -> None:
    with repo.reader(cache_dir=cache) as reader:
        report = check_repository(reader)
        assert report.issues == [], [str(i) for i in report.issues]


def test_the_store_detects_that_moto_honours_conditional_writes(first: Repository) -> None:
    store = first.store
    assert isinstance(store, S3Store)
    assert store.conditional_writes is True
    assert store.version(MANIFEST)  # an ETag: the commit replaces the manifest with If-Match on it
    assert not [k for k in store.iter_keys("") if ".rcds-probe" in k]  # the probe cleaned up


def test_of_two_writers_from_the_same_revision_the_second_commit_is_refused(
    first: Repository, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"base.txt": b"base\n"})
    assert publish(first, "/base", src) == 1
    second = second_machine(first, tmp_path / "machine2")
    ours = write_tree(tmp_path / "a", {"a.txt": b"first writer\n" * 100})
    theirs = write_tree(tmp_path / "b", {"b.txt": b"second writer\n" * 100})

    txn_a = first.transaction()
    txn_b = second.transaction()  # not stopped: its flock is another machine's
    try:
        assert txn_a.base.revision == txn_b.base.revision == 1
        txn_a.add_directory("/a", ours)
        txn_b.add_directory("/b", theirs)
        won = txn_a.commit()
        assert won.revision == 2
        # A reader on the second machine (a service thread's status, say) sees revision 2 meanwhile: the
        # open transaction's base stays the revision it started from.
        assert second.manifest().revision == 2
        with pytest.raises(ConditionFailed):
            txn_b.commit()
    finally:
        txn_a.abort()
        txn_b.abort()

    # The bucket holds the first writer's revision 2, whole: manifest, catalogs, reflog, history.
    with second.reader(cache_dir=tmp_path / "c1") as reader:
        assert reader.manifest.revision == 2
        assert reader.manifest.root_catalog == won.root_hash
        assert reader.read("/a/a.txt") == b"first writer\n" * 100
        assert reader.lookup("/b") is None
    assert_clean(first, tmp_path / "c2")

    # The second writer starts again on top of revision 2 and commits revision 3, losing nothing.
    assert publish(second, "/b", theirs) == 3
    with first.reader(cache_dir=tmp_path / "c3") as reader:
        assert reader.manifest.revision == 3
        assert reader.read("/a/a.txt") == b"first writer\n" * 100
        assert reader.read("/b/b.txt") == b"second writer\n" * 100
        assert reader.read("/base/base.txt") == b"base\n"
    assert_clean(first, tmp_path / "c4")
    # And the first, whose last commit is now stale, commits on top of 3, not over it.
    assert publish(first, "/a2", ours) == 4
    assert_clean(second, tmp_path / "c5")


def test_a_repository_cannot_be_created_over_a_bucket_key_that_holds_one(
    first: Repository, tmp_path: Path
) -> None:
    before = first.store.get(MANIFEST)
    with pytest.raises(RepositoryError, match="already holds a repository"):
        Repository.create(FQRN, tmp_path / "other", store=dict(first.config.store))
    assert first.store.get(MANIFEST) == before


def test_of_two_creators_racing_on_one_bucket_key_the_second_manifest_is_refused(
    bucket_store: Callable[[], dict[str, object]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both pass the "no manifest there yet" check; the first stalls between its reflog and its manifest
    while the second (another process, as on another machine) creates the repository whole. The first's
    manifest (``If-None-Match: *``) is then refused instead of replacing the second's, whose whitelist
    (signed by another master key) it would not match."""
    store = bucket_store()
    failpoint = tmp_path / "failpoint"
    failpoint.write_text("after-reflog:sleep=60")  # until the file is cleared
    monkeypatch.setenv(failpoints.FILE_ENV, str(failpoint))
    outcome: list[BaseException | Repository] = []

    def create_first() -> None:
        try:
            outcome.append(Repository.create(FQRN, tmp_path / "first", store=store))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    creator = threading.Thread(target=create_first)
    creator.start()
    probe = S3Store(S3Settings.from_url(str(store["url"]), endpoint=str(store["endpoint"])))
    deadline = time.monotonic() + 30
    while not probe.exists(REFLOG):  # the first has passed its check; it stalls at its failpoint
        assert time.monotonic() < deadline and creator.is_alive()
        time.sleep(0.05)
    code = "import sys, json; from rcds.cvmfs.repository import Repository; "
    code += "Repository.create(sys.argv[1], sys.argv[2], store=json.loads(sys.argv[3]))"
    env = {k: v for k, v in os.environ.items() if k != failpoints.FILE_ENV}
    subprocess.run(
        [sys.executable, "-c", code, FQRN, str(tmp_path / "second"), json.dumps(store)], env=env, check=True
    )
    failpoint.write_text("")  # the first goes on to its manifest
    creator.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ConditionFailed), outcome
    second = Repository(tmp_path / "second")
    assert_clean(second, tmp_path / "c")
    assert second.manifest().revision == 0


def test_a_collection_on_one_machine_does_not_publish_over_a_commit_on_another(
    first: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC re-signs the manifest with its trimmed reflog as its last step; if another machine committed
    since GC read the manifest, that step is refused and the other machine's revision stays. (The other
    machine's content index is empty here; one listing an object the sweep deleted would not re-upload
    it: GC and publishing on two machines at once is not safe, README says so.)"""
    publish(first, "/old", write_tree(tmp_path / "old", {"old.txt": b"old\n" * 100}))
    with first.transaction() as txn:  # revision 2 drops /old: revision 1's objects are garbage
        txn.remove("/old")
        txn.add_directory("/kept", write_tree(tmp_path / "kept", {"kept.txt": b"kept\n"}))
        txn.commit()
    second = second_machine(first, tmp_path / "machine2")
    failpoint = tmp_path / "failpoint"
    failpoint.write_text("gc-before-reflog:sleep=60")  # until the other machine has committed
    monkeypatch.setenv(failpoints.FILE_ENV, str(failpoint))
    sweeping = threading.Event()
    outcome: list[BaseException | GcReport] = []

    def collect() -> None:
        def progress(phase: str, done: int, total: int) -> None:
            if phase in ("index", "sweep"):  # the manifest and its versions are read: commit now
                sweeping.set()

        try:
            outcome.append(collect_garbage(first, horizon=0, progress=progress))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    collector = threading.Thread(target=collect)
    collector.start()
    assert sweeping.wait(30), outcome
    assert publish(second, "/new", write_tree(tmp_path / "new", {"new.txt": b"new\n"})) == 3
    failpoint.write_text("")  # the collection goes on to its reflog and manifest
    collector.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ConditionFailed), outcome
    with first.reader(cache_dir=tmp_path / "c") as reader:
        assert reader.manifest.revision == 3
        assert reader.read("/new/new.txt") == b"new\n"
        assert reader.read("/kept/kept.txt") == b"kept\n"
    assert_clean(first, tmp_path / "c2")
