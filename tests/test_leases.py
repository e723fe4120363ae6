"""Leases on sub-paths of a repository (``rcds.publish.leases``), against a real SQLite state file.

The clock is a plain number the test moves, so expiry is exact and the tests take no wall time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rcds.publish.leases import Busy, Lease, LeasePathError, Leases, conflicts, normalize

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
