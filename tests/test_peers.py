"""Two real publish servers, each the stratum 0 of two repositories and a replica of the other's two.

No single point of failure: a CID published on A is PRESENT on B within the replica interval; with A
dead, B still answers for A's repositories and takes new uploads; A restarted publishes what it had
acknowledged; a client that knows both servers does not notice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import client_env, rcds_json
from rcds.cvmfs.reader import RepositoryReader
from server import RcdsServer, make_tarball

A_REPOS = ("a1.rcds.test", "a2.rcds.test")
B_REPOS = ("b1.rcds.test", "b2.rcds.test")
SETTINGS = "replica_interval = 0.5\nshare_seconds = 1\n"


def replicas_of(owner: RcdsServer, repos: tuple[str, ...]) -> str:
    return "".join(
        f'[[repository]]\nname = "{r}"\nlocal = false\nupstream = "{owner.url}/cvmfs/{r}"\n'
        f'public_key = "{owner.storage(r) / ".rcds" / "keys" / f"{r}.pub"}"\n'
        for r in repos
    )


class Pair:
    def __init__(self, root: Path) -> None:
        (root / "a").mkdir()
        (root / "b").mkdir()
        self.a = RcdsServer(root / "a", repos=A_REPOS, top_config=SETTINGS)
        self.b = RcdsServer(root / "b", repos=B_REPOS, top_config=SETTINGS)
        # Each lists the other's repositories as replicas (the ports are known before either starts).
        for srv, other, repos in ((self.a, self.b, B_REPOS), (self.b, self.a, A_REPOS)):
            text = srv.config_path.read_text()
            srv.config_path.write_text(text.replace("[auth]", replicas_of(other, repos) + "[auth]", 1))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    p.a.start()
    p.b.start()
    yield p
    p.a.close()
    p.b.close()


def present_at(srv: RcdsServer, cid: str) -> str | None:
    text = srv.api("exists", cid=cid).text.strip()
    return text.removeprefix("PRESENT:") if text.startswith("PRESENT:") else None


def wait_present(srv: RcdsServer, cid: str, timeout: float = 30) -> tuple[str, float]:
    started = time.monotonic()
    while True:
        path = present_at(srv, cid)
        if path is not None:
            return path, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{cid} not PRESENT on {srv.url}:\n{srv.log()[-3000:]}"
        time.sleep(0.1)


def publish(srv: RcdsServer, cid: str) -> str:
    assert srv.publish(cid, make_tarball({"run.py": f"print('{cid}')\n"})).text == "OK\n"
    doc = srv.wait_state(cid)
    assert doc["state"] == "published", doc
    return str(doc["path"])


def test_a_cid_published_on_one_server_is_present_on_the_other(pair: Pair) -> None:
    path = publish(pair.a, "peer/one")
    repo = path.split("/")[2]
    assert repo in A_REPOS
    seen, seconds = wait_present(pair.b, "peer/one")
    assert seen == path and seconds < 10  # within a few replica intervals
    assert set(pair.b.api("config").text.strip().removeprefix("repos:").split(",")) == {*A_REPOS, *B_REPOS}
    # B serves its replica like a stratum 1: the signed revision, byte for byte.
    key = pair.a.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    with RepositoryReader.open(f"{pair.b.url}/cvmfs/{repo}", key, fqrn=repo) as reader:
        assert reader.read("sw/peer/one/run.py") == b"print('peer/one')\n"
    assert (pair.b.storage(repo) / ".cvmfspublished").read_bytes() == (
        pair.a.storage(repo) / ".cvmfspublished"
    ).read_bytes()
    # `update` on B refreshes the CID's last use where B can write: a ts record in its own repository.
    assert pair.b.api("update", cid="peer/one").text == f"PRESENT:{path}\n"


def test_with_one_server_dead_the_other_answers_and_publishes(pair: Pair, tmp_path: Path) -> None:
    path = publish(pair.a, "peer/before")
    wait_present(pair.b, "peer/before")
    pair.a.kill()
    assert present_at(pair.b, "peer/before") == path  # from B's replica of A's repository
    assert publish(pair.b, "peer/during").split("/")[2] in B_REPOS
    # A client that knows both servers fails over without being told.
    env = client_env(tmp_path / "home", f'servers = ["{pair.a.url}", "{pair.b.url}"]\ngroup = "peer"\n'
                     "connect_timeout = 1\nretries = 2\n")  # fmt: skip
    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text("print('failover')\n")
    doc = rcds_json("publish", code, "--wait", env=env)
    assert doc["state"] == "published" and doc["server"] == pair.b.url
    # A comes back: it catches up with B's repositories and serves again.
    pair.a.start()
    wait_present(pair.a, "peer/during")
    wait_present(pair.a, doc["cid"])


def test_an_upload_acknowledged_by_a_server_that_dies_is_published_when_it_returns(pair: Pair) -> None:
    pair.a.stop()
    pair.a.start(env={"RCDS_FAILPOINT": "after-objects"})  # dies in the middle of its next publish
    assert pair.a.publish("peer/acked", make_tarball({"x": "acknowledged\n"})).text == "OK\n"
    assert pair.a.proc is not None
    assert pair.a.proc.wait(30) == 137
    pair.a.proc = None
    assert present_at(pair.b, "peer/acked") is None
    pair.a.start()
    path, _ = wait_present(pair.a, "peer/acked")
    seen, _ = wait_present(pair.b, "peer/acked")
    assert seen == path


def test_a_waiting_client_uploads_again_when_the_server_that_took_it_is_gone(
    pair: Pair, tmp_path: Path
) -> None:
    from rcds.client.pubapi import PubApiClient
    from rcds.client.publish import _upload, tarball_digest, wait_published

    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text("print('orphaned upload')\n")
    digest, _ = tarball_digest(code)
    cid = f"peer/{digest}"
    pair.a.stop()
    pair.a.start(env={"RCDS_FAILPOINT": "after-objects"})
    with PubApiClient([pair.a.url]) as to_a:
        answer, _ = _upload(to_a, code, cid, digest, [".git"], False, None)
    assert answer.body == "OK"  # acknowledged, then A dies publishing it
    assert pair.a.proc is not None and pair.a.proc.wait(30) == 137
    pair.a.proc = None
    uploads = []

    def again() -> None:
        uploads.append(_upload(to_b, code, cid, digest, [".git"], False, None)[0].server)

    with PubApiClient([pair.b.url], retries=1) as to_b:
        path = wait_published(to_b, cid, timeout=60, reupload=again, reupload_after=1.0)
    assert uploads == [pair.b.url] and path.split("/")[2] in B_REPOS
