"""Expiry of unused CIDs and garbage collection, against real servers with a shifted clock.

``RCDS_CLOCK_OFFSET`` shifts a server's clock (publish and last-use times), so a CID can be published
"40 days ago"; ``rcds cleanup --at`` runs cleanup as of any time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.publish.lastuse import write_records
from server import REPOS, RcdsServer, make_tarball

DAY = 86400
SETTINGS = "share_seconds = 1\nmaxdays = 30\nauto_cleanup = false\n"


def cleanup(srv: RcdsServer, *args: object) -> list[dict[str, Any]]:
    p = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "cleanup", "--config", srv.config_path, "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    doc: list[dict[str, Any]] = json.loads(p.stdout)
    return doc


def publish(srv: RcdsServer, cid: str, files: dict[str, bytes | str]) -> str:
    assert srv.publish(cid, make_tarball(files)).text == "OK\n"
    doc = srv.wait_state(cid)
    assert doc["state"] == "published", doc
    return str(doc["repository"])


def present(srv: RcdsServer, cid: str) -> bool:
    return srv.api("exists", cid=cid).text.startswith("PRESENT")


def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def expired_cids(reports: list[dict[str, Any]]) -> set[str]:
    return {e["cid"] for r in reports for e in r["expired"]}


def storage_listing(srv: RcdsServer) -> dict[str, int]:
    return {
        str(p.relative_to(srv.root)): p.stat().st_size
        for r in REPOS
        for p in srv.storage(r).rglob("*")
        if p.is_file() and ".rcds" not in p.parts
    }


@pytest.fixture
def aged(tmp_path: Path) -> Iterator[RcdsServer]:
    """A server whose first CIDs were published 40 days ago (it then runs on the real clock)."""
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", top_config=SETTINGS)
    srv.start(env={"RCDS_CLOCK_OFFSET": str(-40 * DAY)})
    shared = b"a library both the old and the new CID ship\n" * 2000
    srv.old_repos = {  # type: ignore[attr-defined]
        "old/unused": publish(
            srv, "old/unused", {"unique.dat": b"only in the unused CID\n" * 3000, "lib.so": shared}
        ),
        "old/touched": publish(srv, "old/touched", {"job.py": "print('still in use')\n"}),
        "old/waited": publish(srv, "old/waited", {"job.py": "print('waited for')\n"}),
    }
    srv.stop()
    srv.start()
    srv.shared = shared  # type: ignore[attr-defined]
    yield srv
    srv.close()


def test_only_cids_unused_for_maxdays_go_and_a_dry_run_changes_nothing(aged: RcdsServer) -> None:
    publish(aged, "new/fresh", {"lib.so": aged.shared})  # type: ignore[attr-defined]
    assert aged.api("update", cid="old/touched").text.startswith("PRESENT")
    assert aged.api("publish", method="POST", cid="old/waited").text.startswith("PRESENT")  # publish = touch
    time.sleep(1.5)  # the touches reach the state database (and ts records) in well under that

    before = storage_listing(aged)
    dry = cleanup(aged, "--dry-run")
    assert expired_cids(dry) == {"old/unused"}
    assert storage_listing(aged) == before
    assert present(aged, "old/unused")

    reports = cleanup(aged)
    assert expired_cids(reports) == {"old/unused"}
    gone = next(r for r in reports if r["expired"])
    assert gone["expired"][0]["source"] in ("published", "state")
    wait_until(lambda: not present(aged, "old/unused"))  # the running server picks up the new revision
    for cid in ("old/touched", "old/waited", "new/fresh"):
        assert present(aged, cid)
    assert aged.status("old/unused")["state"] == "missing"
    for repo in REPOS:
        storage = aged.storage(repo)
        key = storage / ".rcds" / "keys" / f"{repo}.pub"
        with RepositoryReader.open(storage, key) as reader:
            report = check_repository(reader)
            assert report.ok, report.issues
            if reader.lookup("sw/new/fresh"):
                assert reader.read("sw/new/fresh/lib.so") == aged.shared  # type: ignore[attr-defined]
    assert cleanup(aged) and expired_cids(cleanup(aged)) == set()  # nothing left to do


def test_garbage_collection_frees_what_only_expired_cids_used(aged: RcdsServer) -> None:
    fresh_repo = publish(aged, "new/fresh", {"lib.so": aged.shared})  # type: ignore[attr-defined]
    repo_name = aged.old_repos["old/unused"]  # type: ignore[attr-defined]
    repo = Repository(aged.storage(repo_name))

    def stored(h: Any) -> bool:
        return (repo.storage / h.object_name()).exists()

    with RepositoryReader.open(repo.storage, repo.public_key_path) as reader:
        unique_hash = reader.stat("sw/old/unused/unique.dat").hash
        lib_hash = reader.stat("sw/old/unused/lib.so").hash
    assert stored(unique_hash) and stored(lib_hash)
    reports = cleanup(aged, "--repo", repo_name)
    old_here = {c for c, r in aged.old_repos.items() if r == repo_name}  # type: ignore[attr-defined]
    assert expired_cids(reports) == old_here  # none of them was touched in this test
    # Within the 3-day horizon the revisions that held them are kept, for clients still on them.
    assert reports[0]["gc"]["objects_swept"] == 0 and stored(unique_hash)
    # The tags keep trunk-previous (as CVMFS's do): one more revision, and the cleanup's is the previous.
    with repo.transaction() as txn:
        txn.mkdir("/scratch")
        txn.commit()
    # The next daily run, four days on: the revisions that held the expired CIDs are past the horizon.
    reports = cleanup(aged, "--at", time.time() + 4 * DAY, "--repo", repo_name)
    assert expired_cids(reports) == set()
    gc = reports[0]["gc"]
    assert gc["objects_swept"] > 0 and gc["bytes_freed"] > 0
    assert not stored(unique_hash)  # used by the expired CID alone
    assert stored(lib_hash) == (fresh_repo == repo_name)  # kept where a kept CID shares it (dedup)
    with RepositoryReader.open(repo.storage, repo.public_key_path) as reader:
        assert check_repository(reader).ok
        if fresh_repo == repo_name:
            assert reader.read("sw/new/fresh/lib.so") == aged.shared  # type: ignore[attr-defined]


def test_orphan_ts_records_are_removed(aged: RcdsServer) -> None:
    repo_name = REPOS[0]
    aged.stop()
    repo = Repository(aged.storage(repo_name))
    with repo.transaction() as txn:
        write_records(txn, {"ghost/never-here": time.time()}, "elsewhere.example.org")
        txn.commit()
    aged.start()
    reports = cleanup(aged, "--repo", repo_name, "--no-gc")
    assert reports[0]["orphans"] == ["ghost/never-here"]
    assert expired_cids(reports) == {c for c, r in aged.old_repos.items() if r == repo_name}  # type: ignore[attr-defined]
    with RepositoryReader.open(repo.storage, repo.public_key_path) as reader:
        assert reader.lookup("ts/ghost/never-here") is None


def test_a_cid_touched_on_another_server_is_kept(tmp_path: Path) -> None:
    """Server B reads server A's repository as its replica and A reads B's: B's touch keeps A's CID."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_repo, b_repo = "a1.rcds.test", "b1.rcds.test"
    a_storage, b_storage = a_dir / "data" / a_repo, b_dir / "data" / b_repo
    a_dir.mkdir()
    b_dir.mkdir()
    a = RcdsServer(
        a_dir,
        repos=(a_repo,),
        top_config=SETTINGS,
        extra_config=f'[[repository]]\nname = "{b_repo}"\nlocal = false\nstorage = "{b_storage}"\n',
    )
    b = RcdsServer(
        b_dir,
        repos=(b_repo,),
        top_config=SETTINGS,
        extra_config=f'[[repository]]\nname = "{a_repo}"\nlocal = false\nstorage = "{a_storage}"\n',
    )
    try:
        a.start(env={"RCDS_CLOCK_OFFSET": str(-40 * DAY)})
        publish(a, "exp/used-elsewhere", {"job.py": "1\n"})
        publish(a, "exp/unused", {"job.py": "2\n"})
        a.stop()
        a.start()
        b.start()
        wait_until(lambda: present(b, "exp/used-elsewhere"))  # B sees A's repository
        assert (
            b.api("update", cid="exp/used-elsewhere").text
            == f"PRESENT:/cvmfs/{a_repo}/sw/exp/used-elsewhere\n"
        )

        def b_wrote_the_record() -> bool:
            with RepositoryReader.open(b_storage, b_storage / ".rcds" / "keys" / f"{b_repo}.pub") as r:
                return r.lookup("ts/exp/used-elsewhere") is not None

        wait_until(b_wrote_the_record)
        reports = cleanup(a, "--no-gc")
        assert expired_cids(reports) == {"exp/unused"}
        assert reports[0]["kept"] == 1
        wait_until(lambda: not present(b, "exp/unused"))  # and B sees the removal in A's repository
        assert present(b, "exp/used-elsewhere")
    finally:
        a.close()
        b.close()


def test_publishing_goes_on_into_the_other_repository_while_one_is_held(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", top_config=SETTINGS).start()
    try:
        held = Repository(srv.storage(REPOS[0]))
        with held.lock():  # what `rcds cleanup` or `rcds gc` holds while it changes the repository
            time.sleep(1.5)  # the worker of REPOS[0] notices and stops taking jobs
            revision = held.manifest().revision
            for i in range(5):
                assert publish(srv, f"busy/{i}", {"n": str(i)}) == REPOS[1]
            assert held.manifest().revision == revision
    finally:
        srv.close()


def test_the_daily_schedule_cleans_one_repository_per_hour(tmp_path: Path) -> None:
    from rcds.publish.config import load_settings
    from rcds.publish.service import PublishService

    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", top_config=SETTINGS + "gcstarthour = 3\n")
    svc = PublishService(load_settings(srv.config_path))
    svc.open()
    try:
        day = time.mktime((2026, 12, 1, 0, 30, 0, 0, 0, -1))
        assert svc.cleanup_due(day + 3 * 3600) == [REPOS[0]]  # 03:30: the first repository
        assert svc.cleanup_due(day + 4 * 3600) == [REPOS[1]]  # 04:30: the second
        assert svc.cleanup_due(day + 5 * 3600) == []
        assert svc.state is not None
        svc.state.record_cleanup_day(REPOS[0], "2026-12-01")
        assert svc.cleanup_due(day + 3 * 3600) == []  # done today (survives a restart: it is in SQLite)
        assert svc.cleanup_due(day + 27 * 3600) == [REPOS[0]]  # and due again tomorrow
    finally:
        svc.close()


def test_the_service_pauses_only_the_repository_it_cleans(tmp_path: Path) -> None:
    """In the server: while cleanup owns repository A, uploads are accepted and published into B."""
    from rcds.publish.config import load_settings
    from rcds.publish.service import PublishService

    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", top_config=SETTINGS)
    svc = PublishService(load_settings(srv.config_path))
    svc.start()
    try:
        a = next(w for w in svc.workers if w.repo_name == REPOS[0])
        with svc.paused(REPOS[0]):  # what cleanup() holds while it plans, removes and collects
            for i in range(5):
                spool = svc.new_spool()
                spool.write(make_tarball({"n": str(i)}))
                assert svc.accept(f"paused/{i}", spool, 0, "test").body == "OK"
            wait_until(lambda: all(svc.exists(f"paused/{i}") for i in range(5)))
            assert {svc.exists(f"paused/{i}").repository for i in range(5)} == {REPOS[1]}  # type: ignore[union-attr]
        report = svc.cleanup(REPOS[0], dry_run=True)
        assert report.plan.repository == REPOS[0] and a.accepting.is_set()
    finally:
        svc.stop()
