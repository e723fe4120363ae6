"""The status page, /status.json and the per-CID page, against a real ``rcds serve`` (issue 17).

The server runs with ``allow_localhost = false``, so a plain request from the test is an anonymous viewer;
Alice publishes with a grid certificate over HTTPS and Carol with a token. ``[status] operators`` names
Alice only: she sees identities, Carol (authenticated, not an operator) and anonymous viewers do not.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pki import TokenIssuer, make_ca, make_host_cert, make_user_cert
from server import RcdsServer, free_port, make_tarball

ISSUER = "https://tokens.status.example"
AUDIENCE = "https://rcds.status.example"

GOOD = {"analysis.py": "print('hello')\n", "lib/": "", "lib/util.py": "x = 1\n" * 50, "run.sh": "#!/bin/sh\n"}
GOOD_FILES = 3  # regular files in GOOD
GOOD_BYTES = sum(len(v) for v in GOOD.values())


class World:
    """The server and everything that happened to it, for the assertions."""

    def __init__(self, d: Path) -> None:
        ca = make_ca()
        self.ca_file = d / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem())
        self.host_cert, self.host_key = make_host_cert(ca).write(d, "host")
        alice = make_user_cert(ca, "Alice Smith", uid="alice")
        self.alice_dn = alice.dn
        self.alice = alice.write(d, "alice")
        self.bob = make_user_cert(ca, "Bob Jones", uid="bob").write(d, "bob")  # not in the grid-mapfile
        gridmap = d / "grid-mapfile"
        gridmap.write_text(f'"{alice.dn}" alice\n')
        self.issuer = TokenIssuer(ISSUER, AUDIENCE, subject="carol-7")
        jwks = self.issuer.write_jwks(d / "jwks.json")
        https_port = free_port()
        (d / "srv").mkdir()
        self.srv = RcdsServer(
            d / "srv",
            server_config=(
                f'https = ["127.0.0.1:{https_port}"]\ntls_cert = "{self.host_cert}"\n'
                f'tls_key = "{self.host_key}"\nca_file = "{self.ca_file}"\n'
            ),
            extra_config=(
                f'[auth]\nallow_localhost = false\ngridmapfile = "{gridmap}"\naudiences = ["{AUDIENCE}"]\n'
                f'[auth.issuers]\n"{ISSUER}" = "{jwks}"\n'
                f'[status]\noperators = ["{alice.dn}"]\nrefresh = 7\nsample_seconds = 0.3\n'
            ),
        )
        self.https_url = f"https://127.0.0.1:{https_port}"
        self.token = self.issuer.make_token()
        self.tarballs: dict[str, bytes] = {}

    def alice_client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(*self.alice)
        return httpx.Client(base_url=self.https_url, verify=ctx, timeout=30)

    def bob_client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(*self.bob)
        return httpx.Client(base_url=self.https_url, verify=ctx, timeout=30)

    def carol_client(self) -> httpx.Client:
        # Tokens go over plain HTTP from localhost (the API allows it on the loopback interface).
        return httpx.Client(
            base_url=self.srv.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.srv.url, timeout=30)


def _wait(c: httpx.Client, cid: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc: dict[str, Any] = c.get("/pubapi/status", params={"cid": cid}).json()
        if doc["state"] in ("published", "failed"):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("status"))
    w.srv.start()
    try:
        with w.alice_client() as alice, w.carol_client() as carol:
            for cid, client in (("dune/good1", alice), ("dune/good2", alice), ("cms/good3", carol)):
                data = make_tarball(GOOD)
                w.tarballs[cid] = data
                assert client.post("/pubapi/publish", params={"cid": cid}, content=data).text == "OK\n"
                assert _wait(client, cid)["state"] == "published"
            bad = make_tarball({"ok.txt": "fine\n", "../escape.txt": "no\n"})
            w.tarballs["dune/bad1"] = bad
            assert alice.post("/pubapi/publish", params={"cid": "dune/bad1"}, content=bad).text == "OK\n"
            assert _wait(alice, "dune/bad1")["state"] == "failed"
        yield w
    finally:
        w.srv.close()


def _summary(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/status.json")
    assert r.status_code == 200, r.text
    assert r.headers["Cache-control"] == "max-age=0"
    doc: dict[str, Any] = r.json()
    return doc


def _fresh_summary(c: httpx.Client, done: int) -> dict[str, Any]:
    """The summary once it shows ``done`` finished jobs (documents are cached for a couple of seconds)."""
    deadline = time.monotonic() + 10
    while True:
        doc = _summary(c)
        if len(doc["recent"]) >= done or time.monotonic() > deadline:
            return doc
        time.sleep(0.2)


def test_the_json_numbers_match_what_happened(world: World) -> None:
    with world.anonymous() as anon:
        doc = _fresh_summary(anon, 4)
    assert doc["schema"] == 1 and doc["live"] is True and doc["sensitive"] is False
    assert doc["queue"] == {"queued": 0, "publishing": 0, "waiting": 0}
    p = doc["publishes"]
    assert (p["last_hour"], p["failed_last_hour"], p["last_day"], p["failed_last_day"]) == (3, 1, 3, 1)
    published = ["dune/good1", "dune/good2", "cms/good3"]
    assert p["bytes_last_day"] == sum(len(world.tarballs[c]) for c in published)
    recent = {j["cid"]: j for j in doc["recent"]}
    assert set(recent) == {*published, "dune/bad1"}
    with world.alice_client() as alice:
        for cid in published:
            api = alice.get("/pubapi/status", params={"cid": cid}).json()
            j = recent[cid]
            assert (j["state"], j["repository"], j["revision"]) == (
                "published",
                api["repository"],
                api["revision"],
            )
            assert j["size"] == len(world.tarballs[cid])
            assert j["files"] == api["files"]
            assert 0 < j["seconds"] < 60
    bad = recent["dune/bad1"]
    assert (
        bad["state"] == "failed" and bad["reason"].startswith("rejected: ") and "escape.txt" in bad["reason"]
    )
    assert [j["cid"] for j in doc["failed"]] == ["dune/bad1"]
    # repositories: revision, CID counts, whitelist, disk, next cleanup
    repos = {r["name"]: r for r in doc["repositories"]}
    assert set(repos) == set(world.srv.repos)
    assert sum(r["cids"] for r in repos.values()) == 3
    assert sum(r["publishes_last_hour"] for r in repos.values()) == 3
    for r in repos.values():
        # the three CIDs go to whichever worker is free: a repository that got none is still at revision 0
        assert (
            r["kind"] == "local"
            and r["revision"] >= (1 if r["cids"] else 0)
            and 0 <= r["revision_age"] < 3600
        )
        assert 29 < r["whitelist_days_left"] <= 30
        assert r["disk"]["total"] >= r["disk"]["free"] > 0
        assert doc["generated_at"] <= r["next_cleanup"]["at"] <= doc["generated_at"] + 86400
    # charts: the last hour's bucket holds the publishes; the queue was sampled
    hours = doc["charts"]["hours"]
    assert len(hours) == 24 and hours[-1]["start"] <= doc["generated_at"] < hours[-1]["start"] + 3600
    assert sum(h["published"] for h in hours[-2:]) == 3 and sum(h["failed"] for h in hours[-2:]) == 1
    busy = [h for h in hours if h["published"]]
    assert all(h["latency_max"] >= h["latency_mean"] > 0 for h in busy)
    assert doc["charts"]["days"][-1]["bytes"] == p["bytes_last_day"]
    assert doc["charts"]["queue_depth"], "the housekeeping thread samples the queue"
    assert doc["leases"] == []


def test_the_cleanup_estimate_arrives(world: World) -> None:
    with world.anonymous() as anon:
        deadline = time.monotonic() + 30
        while True:
            doc = anon.get("/status.json").json()
            counts = [r["next_cleanup"]["expiring"] for r in doc["repositories"]]
            if None not in counts:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.3)
    assert counts == [0, 0]  # everything was just published: nothing expires tonight


IDENTITY_WORDS = ("alice", "carol-7", "Alice Smith", "CN=", ISSUER)


def _no_identities(text: str, world: World) -> None:
    assert world.alice_dn not in text
    for word in IDENTITY_WORDS:
        assert word not in text, word


def test_an_anonymous_viewer_sees_no_identities(world: World) -> None:
    with world.anonymous() as anon:
        for path in ("/status", "/status.json", "/status/cid?cid=dune/good1", "/status/cid.json?cid=cms/good3",
                     "/status/cid?cid=dune/bad1"):  # fmt: skip
            r = anon.get(path)
            assert r.status_code == 200, (path, r.text)
            _no_identities(r.text, world)
        doc = _summary(anon)
    assert all("identity" not in j for j in doc["recent"] + doc["current"] + doc["failed"])


def test_a_non_operator_sees_no_identities_an_operator_does(world: World) -> None:
    with world.carol_client() as carol:
        page = carol.get("/status")
        assert page.status_code == 200
        assert "carol-7 (token), identities hidden" in page.text
        _no_identities(page.text.replace("carol-7 (token)", ""), world)  # her own name in the header only
    with world.alice_client() as alice:
        doc = _summary(alice)
        assert doc["sensitive"] is True
        who = {j["cid"]: j["identity"] for j in doc["recent"]}
        assert who == {
            "dune/good1": "alice",
            "dune/good2": "alice",
            "cms/good3": "carol-7",
            "dune/bad1": "alice",
        }
        page = alice.get("/status").text
        assert ">carol-7<" in page and ">alice<" in page
        cid = alice.get("/status/cid.json", params={"cid": "cms/good3"}).json()
        assert cid["identity"] == "carol-7"


def test_bad_credentials_are_refused_with_the_apis_reason(world: World) -> None:
    with httpx.Client(base_url=world.srv.url, headers={"Authorization": "Bearer nonsense"}) as c:
        r = c.get("/status")
    assert r.status_code == 403 and r.text.startswith("Error decoding token")
    # A certificate the grid-mapfile does not know (a browser offers what it holds): the anonymous view.
    with world.bob_client() as bob:
        r = bob.get("/status")
        doc = _summary(bob)
    assert r.status_code == 200 and "viewer: anonymous" in r.text and doc["sensitive"] is False
    _no_identities(r.text, world)


def test_the_page_is_server_rendered_and_self_contained(world: World) -> None:
    with world.anonymous() as anon:
        r = anon.get("/status")
        root = anon.get("/", follow_redirects=False)
    assert root.status_code == 302 and root.headers["Location"] == "/status"
    html = r.text
    assert r.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in r.headers["Content-Security-Policy"]
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html  # nothing fetched from elsewhere: an air-gapped site sees the same page
    assert '<meta http-equiv="refresh" content="7">' in html
    assert html.count('<svg class="chart"') >= 4
    # the publishes-per-hour bars' tooltips (the publishes may straddle the turn of an hour)
    # (a bar of publishes and failures is two rectangles with one tooltip)
    tips = {
        t: (int(p), int(f))
        for t, p, f in re.findall(r"(\d\d:\d\d): (\d+) published, (\d+) failed</title>", html)
    }
    assert (sum(p for p, _ in tips.values()), sum(f for _, f in tips.values())) == (3, 1)
    for cid in ("dune/good1", "dune/good2", "cms/good3", "dune/bad1"):
        assert f'<a href="/status/cid?cid={cid}">{cid}</a>' in html
    assert "rejected: " in html and "escape.txt" in html  # the failed publish with its reason
    m = re.search(r'<div class="v[^"]*">(\d+)</div><div class="k">failed, last 24 h', html)
    assert m and m.group(1) == "1"


def test_the_cid_page(world: World) -> None:
    with world.anonymous() as anon, world.alice_client() as alice:
        doc = anon.get("/status/cid.json", params={"cid": "dune/good1"}).json()
        api = alice.get("/pubapi/status", params={"cid": "dune/good1"}).json()
        html = anon.get("/status/cid", params={"cid": "dune/good1"}).text
        bad = anon.get("/status/cid.json", params={"cid": "dune/bad1"}).json()
        missing = anon.get("/status/cid.json", params={"cid": "dune/never"}).json()
        invalid = anon.get("/status/cid.json", params={"cid": "../etc"})
    assert (doc["state"], doc["repository"], doc["revision"], doc["path"]) == (
        "published",
        api["repository"],
        api["revision"],
        api["path"],
    )
    assert doc["files"] == GOOD_FILES + 1  # and .publisher
    assert doc["size"] == GOOD_BYTES + len("alice\n")
    assert doc["tarball_size"] == len(world.tarballs["dune/good1"])
    assert doc["published_at"] == api["published_at"]
    assert doc["expires_at"] == pytest.approx(max(doc["last_used"], doc["published_at"]) + 30 * 86400, abs=2)
    paths = [e["path"] for e in doc["tree"]]
    assert paths == [".publisher", "analysis.py", "lib", "run.sh", "lib/util.py"]
    assert doc["tree_truncated"] is False and "identity" not in doc
    assert "lib/util.py" in html and "analysis.py" in html and "published" in html
    assert (bad["state"], bad["reason"][:10]) == ("failed", "rejected: ")
    assert missing["state"] == "missing" and "tree" not in missing
    assert invalid.status_code == 400 and invalid.text.startswith("Bad request: ")


def test_anonymous_off_and_dns_rebinding(tmp_path: Path) -> None:
    """``anonymous = false``: no credentials, 403. Localhost counts as authenticated, but not for a request
    whose Host header names another site (a page on a name that resolves to 127.0.0.1)."""
    srv = RcdsServer(tmp_path, top_config="", extra_config="[status]\nanonymous = false\n").start()
    try:
        assert srv.publish("g/x", make_tarball({"a": "b"})).text == "OK\n"
        srv.wait_state("g/x")
        own = srv.client.get("/status.json").json()
        assert own["sensitive"] is True
        deadline = time.monotonic() + 10
        while not own["recent"] and time.monotonic() < deadline:
            time.sleep(0.3)
            own = srv.client.get("/status.json").json()
        assert own["recent"][0]["identity"] == "localhost"
        rebound = srv.client.get("/status.json", headers={"Host": f"evil.example:{srv.port}"})
        assert rebound.status_code == 403 and rebound.text == "Token or client cert required\n"
        foreign = srv.client.get("/status", headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
    finally:
        srv.close()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", "status", *args], capture_output=True, text=True, timeout=timeout
    )


def test_rcds_status_against_a_server(world: World) -> None:
    r = _cli("--server", world.srv.url, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["publishes"]["last_day"] == 3 and doc["sensitive"] is False
    r = _cli("--server", world.srv.url)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "published, last 24 h: 3" in out and "failed: 1" in out
    assert "dune/bad1" in out and "rejected: " in out
    for repo in world.srv.repos:
        assert repo in out
    _no_identities(out, world)


def test_rcds_status_watch(world: World) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "status", "--server", world.srv.url, "--watch", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert out.count("rcds status") >= 2, (out, err)  # redrawn


def test_rcds_status_from_a_local_configuration(world: World, tmp_path: Path) -> None:
    """With ``--config``, the same summary from the files (the server runs, but is not asked)."""
    r = _cli("--config", str(world.srv.config_path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["live"] is False
    assert doc["publishes"]["last_day"] == 3 and doc["publishes"]["failed_last_day"] == 1
    assert sum(r["cids"] for r in doc["repositories"]) == 3
    assert "identity" in doc["recent"][0]  # whoever may read the state database sees everything


def test_replicas_of_a_peer_show_revision_lag_and_last_error(tmp_path: Path) -> None:
    """B keeps a replica of A's repository: B's status shows the revision it has seen and its lag, and,
    once A is down, the replication error (without any user:password@ of the upstream URL)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = RcdsServer(tmp_path / "a", repos=("a1.rcds.test",), top_config="replica_interval = 0.3\n")
    b = RcdsServer(tmp_path / "b", repos=("b1.rcds.test",),
                   top_config="replica_interval = 0.3\n", extra_config="[status]\nsample_seconds = 0.3\n")  # fmt: skip
    key = a.storage("a1.rcds.test") / ".rcds" / "keys" / "a1.rcds.test.pub"
    upstream = a.url.replace("http://", "http://peer:secret-password@") + "/cvmfs/a1.rcds.test"
    replica = f'[[repository]]\nname = "a1.rcds.test"\nlocal = false\nupstream = "{upstream}"\npublic_key = "{key}"\n'
    b.config_path.write_text(b.config_path.read_text() + replica)
    a.start()
    try:
        assert a.publish("peer/one", make_tarball({"x": "y"})).text == "OK\n"
        revision = a.wait_state("peer/one")["revision"]
        b.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                doc = b.client.get("/status.json").json()
                rep = next(r for r in doc["repositories"] if r["name"] == "a1.rcds.test")
                if rep.get("replica", {}).get("revision") == revision:
                    break
                assert time.monotonic() < deadline, rep
                time.sleep(0.3)
            assert rep["kind"] == "replica" and "next_cleanup" not in rep
            assert rep["replica"]["lag"] < 10 and rep["replica"]["last_error"] is None
            assert rep["upstream"] == [f"{a.url}/cvmfs/a1.rcds.test"]  # the password is gone
            assert rep["cids"] == 1
            a.stop()
            while True:
                doc = b.client.get("/status.json").json()
                rep = next(r for r in doc["repositories"] if r["name"] == "a1.rcds.test")
                if rep["replica"]["last_error"]:
                    break
                assert time.monotonic() < deadline + 30, rep
                time.sleep(0.3)
            assert rep["replica"]["failures"] >= 1 and rep["replica"]["revision"] == revision
            assert doc["charts"]["replica_lag"]["a1.rcds.test"], "lag is sampled for the chart"
            page = b.client.get("/status").text
            assert 'id="replicas"' in page and "Replica lag" in page
            assert "secret-password" not in page and "secret-password" not in json.dumps(doc)
        finally:
            b.close()
    finally:
        a.close()


# The tests below publish more: they come last, after the ones that count what the fixture published.


def test_a_long_tree_is_listed_in_part_with_its_count(world: World) -> None:
    files = {f"d{i // 100}/f{i:04d}.txt": f"{i}\n" for i in range(650)}
    with world.alice_client() as alice:
        assert (
            alice.post("/pubapi/publish", params={"cid": "dune/big"}, content=make_tarball(files)).text
            == "OK\n"
        )
        assert _wait(alice, "dune/big")["state"] == "published"
    with world.anonymous() as anon:
        doc = anon.get("/status/cid.json", params={"cid": "dune/big"}).json()
        html = anon.get("/status/cid", params={"cid": "dune/big"}).text
    assert doc["files"] == 651 and doc["entries"] == 651 + 7  # the files, .publisher, d0..d6
    assert len(doc["tree"]) == 500 and doc["tree_truncated"] is True
    assert "Tree (first 500 of 658)" in html


def test_what_a_tarball_names_is_shown_as_text(world: World) -> None:
    """A member name lands in a failure's reason: the page shows it, escaped, and no script can run."""
    evil = '../<img src=x onerror="alert(1)">'
    with world.alice_client() as alice:
        r = alice.post("/pubapi/publish", params={"cid": "dune/evil"}, content=make_tarball({evil: "x"}))
        assert r.text == "OK\n"
        assert _wait(alice, "dune/evil")["state"] == "failed"
    with world.anonymous() as anon:
        deadline = time.monotonic() + 10
        while "dune/evil" not in (page := anon.get("/status").text):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        cid_page = anon.get("/status/cid", params={"cid": "dune/evil"}).text
    for html in (page, cid_page):
        assert "<img" not in html and "&lt;img src=x onerror=" in html


def test_the_next_cleanup_counts_what_it_would_expire(tmp_path: Path) -> None:
    """A CID published 40 days ago (``RCDS_CLOCK_OFFSET``) and never used since is what the next cleanup
    expires: the summary counts it, and its page says it expired 10 days ago if unused."""
    srv = RcdsServer(tmp_path, top_config="auto_cleanup = false\n")
    srv.start(env={"RCDS_CLOCK_OFFSET": str(-40 * 86400)})
    try:
        assert srv.publish("old/unused", make_tarball({"a.py": "1\n"})).text == "OK\n"
        srv.wait_state("old/unused")
        srv.stop()
        srv.start()
        assert srv.publish("new/fresh", make_tarball({"b.py": "2\n"})).text == "OK\n"
        srv.wait_state("new/fresh")
        deadline = time.monotonic() + 30
        while True:
            doc = srv.client.get("/status.json").json()
            counts = {r["name"]: r["next_cleanup"]["expiring"] for r in doc["repositories"]}
            if None not in counts.values() and sum(counts.values()) == 1:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.3)
        old = srv.client.get("/status/cid.json", params={"cid": "old/unused"}).json()
        fresh = srv.client.get("/status/cid.json", params={"cid": "new/fresh"}).json()
        page = srv.client.get("/status").text
    finally:
        srv.close()
    assert counts[old["repository"]] == 1
    assert old["expires_at"] == pytest.approx(time.time() - 10 * 86400, abs=120)
    assert fresh["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=120)
    assert "1 CID to expire" in page


def test_a_cid_without_a_catalog_of_its_own_is_counted_by_walking(tmp_path: Path) -> None:
    """A repository written by other tools may hold a CID that is no catalog of its own: its numbers come
    from walking its tree, not from the statistics of the catalog it shares with its group."""
    from rcds.cvmfs.repository import Repository

    srv = RcdsServer(tmp_path, top_config="auto_cleanup = false\n").start()
    try:
        assert srv.publish("grp/own", make_tarball({"x.txt": "12345\n"})).text == "OK\n"
        repo_name = srv.wait_state("grp/own")["repository"]
        srv.stop()
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "a.txt").write_text("hello\n")
        (tree / "sub" / "b.txt").write_text("world!!\n")
        (tree / ".publisher").write_text("someone\n")
        with Repository(srv.storage(repo_name)).transaction() as txn:
            txn.add_directory("/sw/grp/flat", tree, nested=False)
            txn.commit()
        srv.start()
        doc = srv.client.get("/status/cid.json", params={"cid": "grp/flat"}).json()
        own = srv.client.get("/status/cid.json", params={"cid": "grp/own"}).json()
    finally:
        srv.close()
    assert doc["state"] == "published" and doc["repository"] == repo_name
    assert (doc["files"], doc["size"], doc["entries"]) == (3, 6 + 8 + 8, 4)
    assert (own["files"], own["size"]) == (2, 6 + len("localhost\n"))  # its own catalog's statistics
