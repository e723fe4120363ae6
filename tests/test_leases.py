"""Leases on sub-paths of a repository (``rcds.publish.leases``) and concurrent ingests under them.

The unit tests run against a real SQLite file with a clock the test moves (expiry is exact and costs no
wall time); the others against a real ``rcds serve``: small publishes overtake a big one, a leased path
keeps its job queued, an ingest that outlives its lease is refused and retried, a server killed with
leases held publishes everything acknowledged after its restart and holds no lease.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcds.cvmfs.failpoints import FILE_ENV
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.publish.leases import Busy, Lease, LeasePathError, Leases, conflicts, normalize
from server import RcdsServer, make_tarball

REPO = "solo.rcds.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def leases(tmp_path: Path, clock: Clock) -> Leases:
    return Leases(tmp_path / "state.db", process="p1", clock=clock)


def held(x: Lease | Busy) -> Lease:
    assert isinstance(x, Lease), x
    return x


def test_paths_conflict_component_wise() -> None:
    assert normalize("/sw/a/") == normalize("sw//a") == "sw/a"
    assert conflicts("sw/g", "sw/g/x") and conflicts("sw/g/x", "sw/g") and conflicts("sw/a", "sw/a")
    assert not conflicts("sw/g", "sw/gx") and not conflicts("sw/g/x", "sw/g/y")
    for bad in ("", "/", "sw/../x", "sw/./x"):
        with pytest.raises(LeasePathError):
            normalize(bad)


def test_conflicting_acquire_is_busy_until_release(leases: Leases, clock: Clock) -> None:
    group = held(leases.acquire(REPO, "sw/g", "job 1", ttl=60))
    clock.now += 10
    busy = leases.acquire(REPO, "/sw/g/x/", "job 2", ttl=60)
    assert busy == Busy(50.0, "sw/g", "job 1")
    assert isinstance(leases.acquire(REPO, "sw", "job 3", ttl=60), Busy)  # an ancestor conflicts too
    # Siblings, names sharing a prefix string, and other repositories do not.
    held(leases.acquire(REPO, "sw/gx", "job 4", ttl=60))
    held(leases.acquire(REPO, "sw/h/x", "job 5", ttl=60))
    held(leases.acquire("other.rcds.test", "sw/g/x", "job 6", ttl=60))
    assert [x.path for x in leases.list(REPO)] == ["sw/g", "sw/gx", "sw/h/x"]
    assert leases.release(group.token) == group
    assert leases.release(group.token) is None  # twice: not held any more
    child = held(leases.acquire(REPO, "sw/g/x", "job 2", ttl=60))
    assert child.path == "sw/g/x" and child.process == "p1" and child.token != group.token


def test_tokens_are_unguessable_and_distinct(leases: Leases) -> None:
    tokens = {held(leases.acquire(REPO, f"sw/c{i}", "x", ttl=5)).token for i in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 32 for t in tokens)


def test_refresh_extends_and_expiry_loses_the_lease(tmp_path: Path, clock: Clock) -> None:
    expired: list[Lease] = []
    leases = Leases(tmp_path / "state.db", process="p1", clock=clock, on_expire=expired.append)
    lease = held(leases.acquire(REPO, "sw/a", "job 1", ttl=10))
    clock.now += 9
    refreshed = leases.refresh(lease.token)
    assert refreshed is not None and refreshed.expires == clock.now + 10
    clock.now += 9.5  # 18.5 s after acquiring, alive thanks to the refresh
    assert leases.check(lease.token) is not None
    clock.now += 1
    assert leases.check(lease.token) is None  # dead: its work must be refused
    assert leases.refresh(lease.token) is None  # and it cannot come back
    assert [e.token for e in expired] == [lease.token]
    assert leases.list() == []


def test_a_dead_lease_never_blocks_and_expire_due_sweeps(leases: Leases, clock: Clock) -> None:
    stale = held(leases.acquire(REPO, "sw/g", "stalled", ttl=5))
    other = held(leases.acquire(REPO, "sw/k", "stalled too", ttl=5))
    clock.now += 6
    held(leases.acquire(REPO, "sw/g/x", "job 2", ttl=60))  # the dead conflicting lease is removed
    assert leases.check(stale.token) is None
    assert [e.token for e in leases.expire_due()] == [other.token]
    assert leases.expire_due() == []
    assert [x.path for x in leases.list(REPO)] == ["sw/g/x"]


def test_restart_releases_own_leases_not_external_ones(tmp_path: Path, clock: Clock) -> None:
    first = Leases(tmp_path / "state.db", process="p1", clock=clock)
    held(first.acquire(REPO, "sw/a", "job 1", ttl=600))
    external = held(first.acquire(REPO, "sw/b", "gateway user", ttl=600, external=True))
    assert external.process is None
    first.close()
    second = Leases(tmp_path / "state.db", process="p2", clock=clock)
    mine = held(second.acquire(REPO, "sw/c", "job 3", ttl=600))
    assert [x.path for x in second.release_other_processes()] == ["sw/a"]
    assert {x.token for x in second.list(REPO)} == {external.token, mine.token}
    assert isinstance(second.acquire(REPO, "sw/b/y", "job 4", ttl=60), Busy)


def test_concurrent_acquires_of_one_path_have_one_winner(tmp_path: Path) -> None:
    """Two connections (as two threads of a server, or a server and a gateway) racing on one file."""
    stores = [Leases(tmp_path / "state.db", process=f"p{i}") for i in range(2)]
    results: list[Lease | Busy] = []
    lock = threading.Lock()

    def grab(i: int) -> None:
        path = "sw/g" if i % 2 else f"sw/g/c{i}"
        got = stores[i % 2].acquire(REPO, path, f"t{i}", ttl=60)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    paths = [w.path for w in winners]
    # Either the group won (alone) or some of its CIDs did, never both.
    assert paths == ["sw/g"] or (paths and "sw/g" not in paths), paths
    for a in paths:
        for b in paths:
            assert a == b or not conflicts(a, b)


# --- a real ``rcds serve`` ---------------------------------------------------------------------------------
#
# One repository, two ingest slots. The lease table is the server's own (``queue/state.db``); the tests read
# it, and one test plays an external writer holding a lease, through ``Leases`` on that file.

SOLO = ("solo.rcds.test",)
SLOTS = "ingest_slots = 2\nretry_delay = 0.3\nmax_retry_delay = 1.0"


def state_db(srv: RcdsServer) -> Path:
    return srv.root / "data" / "queue" / "state.db"


def no_leases_left(srv: RcdsServer, timeout: float = 10) -> None:
    """Every lease is released (a publish's lease goes right after its job is marked published)."""
    leases = Leases(state_db(srv))
    deadline = time.monotonic() + timeout
    while leases.list():
        assert time.monotonic() < deadline, (leases.list(), srv.log()[-3000:])
        time.sleep(0.05)
    leases.close()


def small(cid: str) -> bytes:
    return make_tarball({"run.sh": f"#!/bin/sh\necho {cid}\n", "lib/data.txt": cid * 50})


def present(srv: RcdsServer, cid: str) -> bool:
    return srv.api("exists", cid=cid).text.startswith("PRESENT")


def big_tarball(path: Path, megabytes: int) -> Path:
    """An uncompressed tarball of random (incompressible) files: its ingest takes seconds."""
    with tarfile.open(path, "w") as tar:
        for i in range(megabytes // 16):
            info = tarfile.TarInfo(f"blob/{i:03d}.bin")
            info.size = 16 << 20
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
    return path


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=SLOTS).start()
    yield srv
    srv.close()


def test_small_publishes_overtake_a_big_one(solo: RcdsServer, tmp_path: Path) -> None:
    big = big_tarball(tmp_path / "big.tar", 320)
    sent: list[int] = []

    def upload_big() -> None:
        with big.open("rb") as f:
            sent.append(solo.client.post("/pubapi/publish", params={"cid": "big"}, content=f).status_code)

    uploader = threading.Thread(target=upload_big)
    uploader.start()
    deadline = time.monotonic() + 60
    while solo.status("big")["state"] != "publishing":  # uploaded, its ingest is running now
        assert time.monotonic() < deadline, solo.status("big")
        time.sleep(0.02)
    uploader.join()
    assert sent == [200]
    cids = [f"small{i:02d}" for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda c: solo.publish(c, small(c)).text, cids))
    assert answers == ["OK\n"] * 20
    waiting = set(cids)
    while waiting:
        waiting = {c for c in waiting if not present(solo, c)}
        assert time.monotonic() < deadline, (waiting, solo.log()[-3000:])
        time.sleep(0.05)
    # Every small one is live and the big one is still being ingested.
    assert solo.status("big")["state"] == "publishing", solo.status("big")
    assert not present(solo, "big")
    doc = solo.wait_state("big", timeout=120)
    assert doc["state"] == "published", doc
    small_revisions = {solo.status(c)["revision"] for c in cids}
    assert max(small_revisions) < doc["revision"]
    assert len(small_revisions) < 20  # group commit: the grafts of finished ingests share revisions
    no_leases_left(solo)


def test_a_leased_path_keeps_its_job_queued(solo: RcdsServer) -> None:
    """An external writer holds the group ``g``: ``g/x`` (inside it) waits, ``h`` (outside) publishes;
    the lease released, ``g/x`` publishes. A conflicting acquire is refused with the time remaining."""
    external = Leases(state_db(solo))
    lease = held(external.acquire(SOLO[0], "sw/g", "gateway user", ttl=600, external=True))
    assert solo.publish("g/x", small("g/x")).text == "OK\n"
    assert solo.publish("h", small("h")).text == "OK\n"
    assert solo.wait_state("h")["state"] == "published"
    deadline = time.monotonic() + 10  # the worker looks at g/x, finds its path leased, leaves it queued
    while not (busy := solo.log_events("lease busy, job stays queued")):
        assert time.monotonic() < deadline, solo.log()[-3000:]
        time.sleep(0.05)
    assert solo.status("g/x")["state"] == "queued"
    assert busy and busy[0]["cid"] == "g/x" and busy[0]["path"] == "sw/g", busy
    assert 'rcds_lease_waiting_jobs{repository="solo.rcds.test"} 1.0' in solo.client.get("/metrics").text
    (repo,) = solo.client.get("/status.json").json()["repositories"]
    assert [(x["path"], "holder" in x) for x in repo["leases"]] == [("sw/g", False)], repo
    other = external.acquire(SOLO[0], "sw/g/y", "another writer", ttl=60, external=True)
    assert isinstance(other, Busy) and 590 < other.time_remaining <= 600 and other.path == "sw/g"
    assert external.release(lease.token) is not None
    assert solo.wait_state("g/x")["state"] == "published"
    no_leases_left(solo)


def test_an_ingest_that_stalls_past_its_lease_is_refused_then_retried(tmp_path: Path) -> None:
    stall = tmp_path / "failpoint"
    stall.write_text("staged-ingest:sleep=2.5")  # after reading the tarball, before the graft
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=f"{SLOTS}\nlease_seconds = 1.0")
    srv.start(env={FILE_ENV: str(stall)})
    try:
        assert srv.publish("slow", small("slow")).text == "OK\n"
        deadline = time.monotonic() + 30
        while not srv.log_events("staged ingest refused: lease expired"):
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.05)
        doc = srv.status("slow")
        assert doc["state"] in ("queued", "publishing") and "lease expired" in doc["reason"], doc
        assert not present(srv, "slow")
        stall.write_text("")
        assert srv.wait_state("slow")["state"] == "published"
        expired = srv.log_events("lease expired")
        assert expired and expired[0]["path"] == "sw/slow", srv.log()[-3000:]
        assert 'rcds_leases_expired_total{repository="solo.rcds.test"}' in srv.client.get("/metrics").text
        no_leases_left(srv)
    finally:
        srv.close()


def test_killed_with_leases_held_everything_acknowledged_publishes(tmp_path: Path) -> None:
    stall = tmp_path / "failpoint"
    stall.write_text("staged-ingest:sleep=60")  # every ingest stalls holding its lease
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=SLOTS)
    srv.start(env={FILE_ENV: str(stall)})
    cids = [f"k{i}" for i in range(6)]
    try:
        for c in cids:
            assert srv.publish(c, small(c)).text == "OK\n"  # acknowledged: durable
        observer = Leases(state_db(srv))
        deadline = time.monotonic() + 30
        while len(observer.list()) < 2:  # both slots ingest (stalled), the rest is queued
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.05)
        srv.kill()
        left_behind = observer.list()
        assert len(left_behind) >= 2, left_behind
        stall.write_text("")
        srv.start()
        for c in cids:
            assert srv.wait_state(c)["state"] == "published", c
        no_leases_left(srv)
        released = srv.log_events("lease released")
        assert {x.path for x in left_behind} <= {str(e["path"]) for e in released if e.get("reason")}
    finally:
        srv.close()


def test_one_slot_is_the_serialized_design_and_still_publishes(tmp_path: Path) -> None:
    """``ingest_slots = 1``: no slots, no leases; the worker ingests each queued tarball in its commit's own
    transaction (the design before leases), with the same tree and ``.publisher`` as a slot would make."""
    srv = RcdsServer(tmp_path, repos=SOLO, top_config="ingest_slots = 1")
    srv.start()
    try:
        for cid in ("one/a", "one/b"):
            assert srv.publish(cid, small(cid)).text == "OK\n"
        for cid in ("one/a", "one/b"):
            doc = srv.wait_state(cid)
            assert doc["state"] == "published" and doc["files"] == 6, (
                doc
            )  # run.sh lib data.txt + root, .publisher, marker
        staged = srv.log_events("staged")
        assert staged == []  # nothing went through a slot
        storage = srv.storage(SOLO[0])
        reader = RepositoryReader.open(storage, Repository(storage).public_key_path, cache_dir=tmp_path / "c")
        assert reader.read("/sw/one/b/lib/data.txt") == b"one/b" * 50
        assert reader.read("/sw/one/a/.publisher") == b"localhost\n"
    finally:
        srv.close()
