"""Last-use (ts) records: cvmfs-user-pub's format (a file ``ts/<cid>``), older rcds directory records,
and a record never touching another's (issue 12 defect 2, issue 18).

Everything is written into real repositories and read back through the signed revision: with the
reader (as a client or the original's ``find`` over ``/cvmfs2`` sees it), with ``StorageView`` (as
cleanup reads), and through a real ``rcds serve``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Unpacked
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry
from rcds.cvmfs.writer import Transaction
from rcds.publish.cleanup import plan_cleanup
from rcds.publish.lastuse import find_record, read_records, remove_records, write_records
from rcds.publish.presence import StorageView
from server import REPOS, RcdsServer

DAY = 86400
T0 = 1_790_000_000  # a fixed "last use" (2026-09-21)


def legacy_record(txn: Transaction, cid: str, when: int, by: str = "old.example.org") -> None:
    """A record as rcds wrote them before: the directory ``ts/<cid>`` with a file ``by`` (code of then)."""
    if not txn.exists("/ts"):
        txn.mkdir("/ts", nested=True)
    if "/" in cid and not txn.exists(f"/ts/{cid.split('/')[0]}"):
        txn.mkdir(f"/ts/{cid.split('/')[0]}", nested=True)
    data = f"{by}\n".encode()
    txn.add_tree(
        f"/ts/{cid}",
        [
            TreeEntry("", EntryKind.DIRECTORY, mode=0o755, mtime=when),
            TreeEntry("by", EntryKind.FILE, mode=0o644, mtime=when, size=len(data), stream=io.BytesIO(data)),
        ],
        nested=False,
    )


def records(repo: Repository) -> dict[str, tuple[int, bool]]:
    with StorageView(repo.storage) as view:
        return {c: (r.mtime, r.legacy) for c, r in read_records(view).items()}


def test_records_are_files_the_original_reads(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader]
) -> None:
    """What cvmfs-user-pub reads: the file ts/<cid>, mtime = last use, the writer's name inside; ts and
    each group a nested catalog (its dirtab ``/ts/*``)."""
    repo = make_repo()
    with repo.transaction() as txn:
        report = write_records(txn, {"abc123": T0, "dune/def456": T0 + 60}, "rcds01.example.org")
        txn.commit()
    assert (report.written, report.skipped) == (2, [])
    reader = open_reader(repo)
    for path, when in (("/ts/abc123", T0), ("/ts/dune/def456", T0 + 60)):
        d = reader.stat(path)
        assert d.is_regular and d.mtime == when
        assert reader.read(path) == b"rcds01.example.org\n"
    assert reader.stat("/ts").is_nested_root and reader.stat("/ts/dune").is_nested_root
    assert records(repo) == {"abc123": (T0, False), "dune/def456": (T0 + 60, False)}
    with repo.transaction() as txn:  # a refresh replaces the file in place
        write_records(txn, {"dune/def456": T0 + 7200}, "rcds02.example.org")
        txn.commit()
    reader = open_reader(repo)
    assert reader.stat("/ts/dune/def456").mtime == T0 + 7200
    assert reader.read("/ts/dune/def456") == b"rcds02.example.org\n"
    assert [d.name for d in reader.listdir("/ts/dune") if d.name != ".cvmfscatalog"] == ["def456"]


@pytest.mark.parametrize("order", ["group-first", "leaf-first"])
def test_a_one_level_record_and_a_group_of_records_never_replace_each_other(
    make_repo: Callable[..., Repository], order: str
) -> None:
    """Issue 12 defect 2: writing ``tg`` deleted every ``tg/...`` record. Now whichever comes second is
    skipped (and reported), and nothing already there is touched."""
    repo = make_repo()
    first = {"tg/x": T0, "tg/y": T0} if order == "group-first" else {"tg": T0}
    second = {"tg": T0 + 99} if order == "group-first" else {"tg/x": T0 + 99}
    with repo.transaction() as txn:
        write_records(txn, first, "a.example.org")
        txn.commit()
    before = records(repo)
    with repo.transaction() as txn:
        report = write_records(txn, {**second, "other": T0 + 99}, "b.example.org")
        txn.commit()
    assert report.skipped == list(second)
    assert records(repo) == {**before, "other": (T0 + 99, False)}


def test_older_rcds_directory_records_are_read_refreshed_as_files_and_removed_exactly(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader]
) -> None:
    repo = make_repo()
    with repo.transaction() as txn:
        legacy_record(txn, "old1", T0)
        legacy_record(txn, "grp/h", T0 + 1)
        # The state the defect left: ``tg/x`` written after ``tg``, inside ``tg``'s record directory.
        legacy_record(txn, "tg", T0 + 2)
        legacy_record(txn, "tg/x", T0 + 3)
        txn.commit()
    assert records(repo) == {
        "old1": (T0, True),
        "grp/h": (T0 + 1, True),
        "tg": (T0 + 2, True),
        "tg/x": (T0 + 3, True),
    }
    with repo.transaction() as txn:
        report = write_records(txn, {"old1": T0 + 10, "grp/h": T0 + 11, "tg": T0 + 12}, "new.example.org")
        txn.commit()
    assert (report.written, report.migrated, report.skipped) == (3, 2, [])
    assert records(repo) == {
        "old1": (T0 + 10, False),  # migrated to the original's file format
        "grp/h": (T0 + 11, False),
        "tg": (T0 + 12, True),  # refreshed in place: its directory also holds tg/x's record
        "tg/x": (T0 + 3, True),
    }
    reader = open_reader(repo)
    assert reader.stat("/ts/old1").is_regular and reader.read("/ts/old1") == b"new.example.org\n"
    with repo.transaction() as txn:
        write_records(txn, {"tg/x": T0 + 13}, "new.example.org")
        txn.commit()
    assert records(repo)["tg/x"] == (T0 + 13, False)
    # Cleanup of ``tg`` takes its ``by`` only; ``tg/x`` stays, and goes alone after.
    with repo.transaction() as txn:
        assert remove_records(txn, ["tg", "nothing/here"]) == 1
        txn.commit()
    assert set(records(repo)) == {"old1", "grp/h", "tg/x"}
    with repo.transaction() as txn:
        assert remove_records(txn, ["tg/x", "grp/h"]) == 2
        txn.commit()
    assert set(records(repo)) == {"old1"}
    reader = open_reader(repo)
    assert reader.lookup("/ts/tg") is None and reader.lookup("/ts/grp") is None
    checked = check_repository(reader)  # catalogs, counters and mountpoint rows after all these edits
    assert checked.ok, [str(i) for i in checked.issues]


def test_a_cid_named_by_is_told_from_a_legacy_marker(make_repo: Callable[..., Repository]) -> None:
    """``ts/g/by`` in a group (a nested catalog) is the record of ``g/by``; in a legacy record directory
    it is the record of ``g``. Neither is written or removed for the other."""
    repo = make_repo()
    with repo.transaction() as txn:
        write_records(txn, {"grp/by": T0}, "a.example.org")
        legacy_record(txn, "tg", T0 + 1)
        txn.commit()
    assert records(repo) == {"grp/by": (T0, False), "tg": (T0 + 1, True)}
    with repo.transaction() as txn:
        assert write_records(txn, {"tg/by": T0 + 2}, "a.example.org").skipped == ["tg/by"]
        assert find_record(txn, "tg/by") is None and find_record(txn, "grp") is None
        assert remove_records(txn, ["tg/by", "grp"]) == 0
        txn.commit()
    assert records(repo) == {"grp/by": (T0, False), "tg": (T0 + 1, True)}


def test_the_originals_records_are_read(unpacked: Unpacked) -> None:
    """The ts files cvmfs-user-pub left in its repository: one per CID, the file's mtime the last use."""
    storage = unpacked.root / "cvmfs-user-pub-2.12" / "storage" / "fifeuser1.opensciencegrid.org"
    content = unpacked.root / "cvmfs-user-pub-2.12" / "content" / "ts"
    expected = {
        str(p.relative_to(content)): int(p.stat().st_mtime)
        for p in content.rglob("*")
        if p.is_file() and p.name != ".cvmfscatalog"
    }
    assert len(expected) == 4
    with StorageView(storage) as view:
        found = read_records(view)
    assert {c: r.mtime for c, r in found.items()} == expected
    assert not any(r.legacy for r in found.values())


def test_cleanup_counts_legacy_and_file_records(make_repo: Callable[..., Repository]) -> None:
    """CIDs published 40 days ago survive through a recent record in either format."""
    repo = make_repo()
    now = time.time()
    with repo.transaction() as txn:
        txn.clock = lambda: now - 40 * DAY
        txn.mkdir("/sw", nested=True)
        for cid in ("kept-new", "kept-old", "g/kept", "gone"):
            txn.add_tree(
                f"/sw/{cid}",
                [
                    TreeEntry("", EntryKind.DIRECTORY, mode=0o755, mtime=int(now - 40 * DAY)),
                    TreeEntry(".publisher", EntryKind.FILE, size=2, stream=io.BytesIO(b"x\n")),
                ],
            )
        txn.commit()
    with repo.transaction() as txn:
        write_records(txn, {"kept-new": now - DAY, "gone": now - 35 * DAY}, "a.example.org")
        legacy_record(txn, "kept-old", int(now - DAY))
        legacy_record(txn, "g/kept", int(now - DAY))
        write_records(txn, {"ghost/x": now}, "a.example.org")
        txn.commit()
    plan = plan_cleanup("r", {"r": repo.storage}, {}, "sw", 30, now)
    assert [e.cid for e in plan.expired] == ["gone"]
    assert plan.orphans == ["ghost/x"]


# --- through a real server ------------------------------------------------------------------------


def _cid_tree(txn: Transaction, cid: str) -> None:
    """A CID as the service lays it out: its own catalog and a ``.publisher``."""
    if not txn.exists("/sw"):
        txn.mkdir("/sw", nested=True)
    if "/" in cid:
        txn.mkdir(f"/sw/{cid.split('/')[0]}", nested=True)
    txn.add_tree(
        f"/sw/{cid}",
        [
            TreeEntry("", EntryKind.DIRECTORY, mode=0o755, mtime=T0),
            TreeEntry(".publisher", EntryKind.FILE, size=6, stream=io.BytesIO(b"alice\n")),
            TreeEntry("job.py", EntryKind.FILE, size=2, stream=io.BytesIO(b"1\n")),
        ],
    )


def _wait(predicate: Callable[[], bool], srv: RcdsServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, srv.log()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("first", ["tg/x", "tg"])
def test_touches_of_tg_and_tg_x_through_a_server_lose_no_record(tmp_path: Path, first: str) -> None:
    """A conflicting old state (``tg`` in one repository, ``tg/x`` in another, as two servers could make
    them before the CID namespace rule): the server touches both and writes both records into its own
    repository; the second one is skipped and counted, and the first survives."""
    local, old = REPOS[0], "old.rcds.test"
    (tmp_path / "srv").mkdir()
    old_storage = tmp_path / "old"
    srv = RcdsServer(
        tmp_path / "srv",
        repos=(local,),
        top_config="share_seconds = 1\nauto_cleanup = false\n",
        extra_config=f'[[repository]]\nname = "{old}"\nlocal = false\nstorage = "{old_storage}"\n',
    )
    mine = Repository.create(local, srv.storage(local))
    theirs = Repository.create(old, old_storage)
    with mine.transaction() as txn:
        _cid_tree(txn, "tg/x")
        txn.commit()
    with theirs.transaction() as txn:
        _cid_tree(txn, "tg")
        txn.commit()
    second = "tg" if first == "tg/x" else "tg/x"
    try:
        srv.start()
        for cid in (first, second):
            assert srv.api("update", cid=cid).text.startswith("PRESENT:")

            def written(cid: str = cid) -> bool:
                skipped = f'rcds_ts_records_skipped_total{{repository="{local}"}} 1.0'
                return cid in records(mine) or skipped in srv.client.get("/metrics").text

            _wait(written, srv)
        recs = records(mine)
        assert set(recs) == {first}, recs
        with RepositoryReader.open(mine.storage, mine.public_key_path) as reader:
            d = reader.stat(f"/ts/{first}")
            assert d.is_regular and abs(d.mtime - time.time()) < 60
        assert "ts record not written" in srv.log()
    finally:
        srv.close()
