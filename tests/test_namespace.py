"""The CID namespace rule on a real ``rcds serve``: a top-level name is a one-level CID or a group, never both.

A one-level CID ``G`` and the group ``G`` of ``G/x`` are the same directory (``/cvmfs/<repo>/sw/G``), so
without the rule one upload could shadow or swallow another's. Each scenario of the attack report: the
conflicting upload is refused with a reason before anything is queued (or, for a queue and repositories made
without the API, the job fails with a reason), ``exists`` names only exact CIDs, a restart changes nothing,
and the audit finds collisions already in repositories.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client import client_env
from client import rcds as rcds_client
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.publish.state import StateDB
from server import REPOS, RcdsServer, make_tarball
from test_peers import Pair, wait_present

RULE = "a name is either a one-level cid or a group, never both"
USER1, USER2 = REPOS
SOLO = ("solo.rcds.test",)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path).start()
    yield srv
    srv.close()


def published(srv: RcdsServer, cid: str, files: dict[str, bytes | str]) -> str:
    """Publish ``cid`` through the API and return its path."""
    r = srv.publish(cid, make_tarball(files))
    assert (r.status_code, r.text) == (200, "OK\n"), r.text
    doc = srv.wait_state(cid)
    assert doc["state"] == "published", doc
    return str(doc["path"])


def exists(srv: RcdsServer, cid: str) -> str:
    return srv.api("exists", cid=cid).text.strip()


def refused(srv: RcdsServer, cid: str, files: dict[str, bytes | str]) -> str:
    """Upload ``cid``, expect the namespace refusal, return its reason; nothing may be queued."""
    r = srv.publish(cid, make_tarball(files))
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.text.startswith(f"Bad request: cid {cid} conflicts with ") and r.text.endswith(f"{RULE}\n"), (
        r.text
    )
    assert srv.status(cid)["state"] == "missing"  # never "OK, then silently dropped"
    return r.text


def enqueue(srv: RcdsServer, cids: list[str]) -> None:
    """Queue jobs in the state database of a stopped server, as a queue from before the rule holds them."""
    state = StateDB(srv.root / "data" / "queue" / "state.db")
    spool = srv.root / "data" / "queue" / "spool"
    for cid in cids:
        tar = spool / f"{cid.replace('/', '_')}.tar"
        tar.write_bytes(make_tarball({"run.sh": f"echo {cid}\n"}))
        assert state.enqueue(cid, str(tar), tar.stat().st_size, 0, "old-queue") is not None
    state.close()


def reader(srv: RcdsServer, repo: str) -> RepositoryReader:
    key = srv.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    return RepositoryReader.open(
        f"{srv.url}/cvmfs/{repo}", key, cache_dir=srv.root / f"c-{time.monotonic_ns()}"
    )


def audit(srv: RcdsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", "audit", "--config", str(srv.config_path), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def seed(srv: RcdsServer, repo: str, path: str, files: dict[str, str]) -> None:
    """Publish a tree at ``/sw/<path>`` with the Transaction API, bypassing the service and its rules."""
    tree = srv.root / f"tree-{time.monotonic_ns()}"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(data)
    with Repository(srv.storage(repo)).transaction() as txn:
        if not txn.exists("/sw"):
            txn.mkdir("/sw", nested=True)
        parent = path.rpartition("/")[0]
        if parent and not txn.exists(f"/sw/{parent}"):
            txn.mkdir(f"/sw/{parent}", nested=True)
        txn.add_directory(f"/sw/{path}", tree, nested=True)
        txn.commit()


# --- uploads refused before anything is queued ------------------------------------------------------


def test_a_one_level_cid_named_like_a_group_is_refused_and_the_real_cid_keeps_its_answer(
    server: RcdsServer,
) -> None:
    real = published(server, "G/h0", {"run.sh": "echo real\n"})
    reason = refused(server, "G", {"h0/run.sh": "echo attacker\n"})
    assert f"conflicts with the group G/ in {real.split('/')[2]}" in reason
    assert exists(server, "G/h0") == f"PRESENT:{real}"
    assert exists(server, "G") == "MISSING"
    for repo in REPOS:  # the name is not a one-level CID anywhere: no .publisher at sw/G
        with reader(server, repo) as r:
            assert r.lookup("sw/G/.publisher") is None
    with reader(server, real.split("/")[2]) as r:
        assert r.read("sw/G/h0/run.sh") == b"echo real\n"


def test_a_group_cid_under_a_one_level_cid_is_refused_never_acknowledged_then_dropped(
    server: RcdsServer,
) -> None:
    # A hostile one-level CID that holds what looks like the CID G/h0, its own catalog included.
    leaf = published(server, "G", {"h0/run.sh": "echo attacker\n", "h0/.publisher": "alice\n",
                                   "h0/.cvmfscatalog": ""})  # fmt: skip
    assert exists(server, "G/h0") == "MISSING"  # a directory inside a one-level CID is never a CID
    reason = refused(server, "G/h0", {"run.sh": "echo real\n"})
    assert f"conflicts with the one-level cid G in {leaf.split('/')[2]}" in reason
    server.stop()
    server.start()
    assert exists(server, "G") == f"PRESENT:{leaf}"
    assert exists(server, "G/h0") == "MISSING"
    refused(server, "G/h0", {"run.sh": "echo real\n"})


@pytest.mark.parametrize(("first", "second"), [("abc", "abc/def"), ("abc/def", "abc")])
def test_the_second_kind_of_a_name_is_refused_and_a_restart_keeps_every_answer(
    server: RcdsServer, first: str, second: str
) -> None:
    path = published(server, first, {"run.sh": f"echo {first}\n"})
    refused(server, second, {"run.sh": f"echo {second}\n"})
    other = "abc/xyz" if first == "abc" else "abc"  # any other CID of the second kind too
    refused(server, other, {"run.sh": "echo other\n"})
    if first == "abc/def":  # the group takes more CIDs
        published(server, "abc/ghi", {"run.sh": "echo ghi\n"})
    server.stop()
    server.start()
    assert exists(server, first) == f"PRESENT:{path}"
    assert exists(server, second) == "MISSING"
    refused(server, second, {"run.sh": f"echo {second}\n"})
    assert audit(server).returncode == 0


def race(srv: RcdsServer, cids: tuple[str, str]) -> dict[str, httpx.Response]:
    """Upload both CIDs at once: each sends its headers and a first piece, waits for the other, then gives
    the server time to run the early check for both before the rest of the bodies arrive."""
    barrier = threading.Barrier(len(cids))
    answers: dict[str, httpx.Response] = {}

    def upload(cid: str) -> None:
        data = make_tarball({"run.sh": f"echo {cid}\n", "pad": "x" * 200_000})

        def body() -> Iterator[bytes]:
            yield data[:1000]
            barrier.wait(30)
            time.sleep(0.5)  # both requests are past before_upload, receiving their bodies
            yield data[1000:]

        with httpx.Client(base_url=srv.url, timeout=60) as client:
            answers[cid] = client.post("/pubapi/publish", params={"cid": cid}, content=body())

    threads = [threading.Thread(target=upload, args=(cid,)) for cid in cids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_of_two_concurrent_uploads_of_conflicting_kinds_exactly_one_is_queued(server: RcdsServer) -> None:
    """Both pass the early check (neither is queued yet) while their bodies come in; the check under the
    enqueue lock lets only one through."""
    for pair in [("C0", "C0/x"), ("C1/x", "C1"), ("C2", "C2/y")]:
        answers = race(server, pair)
        ok = [cid for cid, r in answers.items() if (r.status_code, r.text) == (200, "OK\n")]
        assert len(ok) == 1, {c: r.text for c, r in answers.items()}
        (loser,) = set(pair) - set(ok)
        assert answers[loser].status_code == 400 and RULE in answers[loser].text
        assert server.wait_state(ok[0])["state"] == "published"
        assert server.status(loser)["state"] == "missing"
        # The refusal came after the body was received: the check under the lock, not the early one.
        refusals = [json.loads(line) for line in server.log().splitlines() if f'"cid": "{loser}"' in line]
        assert any(e.get("status") == 400 and e.get("bytes", 0) > 0 for e in refusals), refusals


def test_a_peer_refuses_a_name_that_has_the_other_kind_in_its_replica(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.a.start()
    pair.b.start()
    try:
        real = published(pair.a, "P/h0", {"run.sh": "echo real\n"})
        wait_present(pair.b, "P/h0")
        reason = refused(pair.b, "P", {"h0/run.sh": "echo attacker\n"})
        assert f"conflicts with the group P/ in {real.split('/')[2]}" in reason
        assert exists(pair.b, "P/h0") == f"PRESENT:{real}"
    finally:
        pair.a.close()
        pair.b.close()


# --- a queue and repositories made without the rule ----------------------------------------------------


def test_the_worker_fails_a_conflicting_job_with_a_reason_instead_of_calling_it_published(
    tmp_path: Path,
) -> None:
    """Jobs queued before the rule (state.db written directly) and a one-level CID published with the
    Transaction API: the worker itself must find every conflict, against its open transaction."""
    srv = RcdsServer(tmp_path, repos=SOLO)  # one repository: every job meets the others
    srv.start().stop()
    # W: a one-level CID holding W/x, which looks like a CID (.publisher); the job W/x used to be taken
    # for "published meanwhile" and dropped.
    seed(srv, SOLO[0], "W", {".publisher": "bob\n", "x/.publisher": "bob\n", "x/run.sh": "echo W\n"})
    with Repository(srv.storage(SOLO[0])).transaction() as txn:  # E: a group left without CIDs
        txn.mkdir("/sw/E", nested=True)
        txn.commit()
    cids = ["W/x", "V", "V/x", "U/y", "U", "E"]
    enqueue(srv, cids)  # in this order, one batch
    srv.start()
    try:
        docs = {cid: srv.wait_state(cid) for cid in cids}
        # An empty group directory is no CID of either kind: the one-level CID E takes its place.
        assert [docs[c]["state"] for c in ["V", "U/y", "E"]] == ["published"] * 3
        assert docs["W/x"]["state"] == "failed"
        assert (
            docs["W/x"]["reason"]
            == f"conflict: cid W/x conflicts with the one-level cid W in {SOLO[0]}: {RULE}"
        )
        assert (
            docs["V/x"]["reason"]
            == f"conflict: cid V/x conflicts with the one-level cid V in {SOLO[0]}: {RULE}"
        )
        assert docs["U"]["reason"] == f"conflict: cid U conflicts with the group U/ in {SOLO[0]}: {RULE}"
        with reader(srv, SOLO[0]) as r:
            assert r.read("sw/W/x/run.sh") == b"echo W\n"  # untouched
            assert r.lookup("sw/V/x") is None and r.lookup("sw/U/.publisher") is None
            assert r.read("sw/E/run.sh") == b"echo E\n"
        metrics = srv.client.get("/metrics").text
        assert 'rcds_publish_failures_total{reason="conflict"} 3.0' in metrics
        srv.stop()
        srv.start()
        assert [srv.status(c)["state"] for c in cids] == [
            "failed", "published", "failed", "published", "failed", "published"
        ]  # fmt: skip
        assert [exists(srv, c) for c in ["W/x", "V/x", "U"]] == ["MISSING"] * 3
    finally:
        srv.close()


def test_the_worker_checks_the_other_repositories_too(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path)
    srv.start().stop()
    seed(srv, USER1, "R", {".publisher": "eve\n", "x/run.sh": "echo R\n"})
    enqueue(srv, ["R/x"])
    with Repository(srv.storage(USER1)).lock():  # only the worker of USER2, where R is free, takes jobs
        srv.start()
        try:
            doc = srv.wait_state("R/x")
            assert doc["state"] == "failed", doc
            assert doc["reason"] == f"conflict: cid R/x conflicts with the one-level cid R in {USER1}: {RULE}"
            with reader(srv, USER2) as r:
                assert r.lookup("sw/R") is None
        finally:
            srv.close()


# --- collisions already in repositories ----------------------------------------------------------------


def test_the_audit_reports_collisions_and_exists_names_only_exact_cids(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path)
    srv.start().stop()
    clean = audit(srv)
    assert clean.returncode == 0 and clean.stdout.startswith("OK: 0 CIDs in 2 repositories"), clean.stdout
    # M: a one-level CID in user1 and a group in user2; N: a one-level CID with a CID inside it.
    seed(srv, USER1, "M", {".publisher": "eve\n", "y/run.sh": "echo shadow\n"})
    seed(srv, USER2, "M/y", {".publisher": "bob\n", "run.sh": "echo real\n"})
    seed(srv, USER1, "N", {".publisher": "eve\n", "z/.publisher": "eve\n", "z/run.sh": "echo z\n"})
    found = audit(srv)
    assert found.returncode == 1, found.stdout + found.stderr
    assert found.stdout.splitlines() == [
        f"mixed: M is a one-level cid in {USER1} and a group in {USER2}",
        f"nested: N/z in {USER1} looks like a cid (it holds a .publisher) inside the one-level cid N",
        "2 COLLISIONS: 3 CIDs in 2 repositories under /sw",
    ]
    doc = json.loads(audit(srv, "--json").stdout)
    assert [(c["name"], c["problem"], c["repositories"]) for c in doc["collisions"]] == [
        ("M", "mixed", [USER1, USER2]), ("N", "nested", [USER1])
    ]  # fmt: skip
    srv.start()
    try:
        warnings = [json.loads(line) for line in srv.log().splitlines() if "namespace collision" in line]
        assert {(w["name"], w["problem"]) for w in warnings} == {("M", "mixed"), ("N", "nested")}
        # During the conflict, exists answers exact CIDs only, each with its own directory.
        assert exists(srv, "M") == f"PRESENT:/cvmfs/{USER1}/sw/M"
        assert exists(srv, "M/y") == f"PRESENT:/cvmfs/{USER2}/sw/M/y"
        assert exists(srv, "N/z") == "MISSING"
        assert srv.publish("M", make_tarball({"a": "a\n"})).text == f"PRESENT:/cvmfs/{USER1}/sw/M\n"
        refused(srv, "M/q", {"run.sh": "echo q\n"})
        refused(srv, "N/z", {"run.sh": "echo z\n"})
    finally:
        srv.close()


def test_rcds_wait_and_get_take_only_a_cids_own_directory(tmp_path: Path) -> None:
    """With such a collision, the client finds M/y where it is a CID (USER2), not inside the one-level CID
    M of the first repository (USER1), over HTTP and through a mount alike."""
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv")
    srv.start().stop()
    seed(srv, USER1, "M", {".publisher": "eve\n", "y/run.sh": "echo shadow\n"})
    seed(srv, USER2, "M/y", {".publisher": "bob\n", "run.sh": "echo real\n"})
    srv.start()
    try:
        keys = ", ".join(f'"{srv.storage(r) / ".rcds" / "keys"}"' for r in REPOS)
        env = client_env(tmp_path / "home", f'servers = ["{srv.url}"]\nkeys = [{keys}]\n')
        p = rcds_client("wait", "M/y", "--mode", "http", "--timeout", "10", "--json", env=env)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["path"] == f"/cvmfs/{USER2}/sw/M/y"
        p = rcds_client("get", "M/y", tmp_path / "code", env=env)
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "code" / "run.sh").read_text() == "echo real\n"
        # A mount shows the same trees.
        mount = tmp_path / "cvmfs"
        (mount / USER1 / "sw" / "M" / "y").mkdir(parents=True)
        (mount / USER1 / "sw" / "M" / ".publisher").write_text("eve\n")
        (mount / USER2 / "sw" / "M" / "y").mkdir(parents=True)
        env = client_env(tmp_path / "home2", f'servers = ["{srv.url}"]\nmount_root = "{mount}"\n')
        p = rcds_client("wait", "M/y", "--mode", "mount", "--timeout", "10", env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == str(mount / USER2 / "sw" / "M" / "y")
        p = rcds_client("wait", "M", "--mode", "mount", "--timeout", "10", env=env)
        assert p.stdout.strip() == str(mount / USER1 / "sw" / "M")
    finally:
        srv.close()
