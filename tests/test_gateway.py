"""The CVMFS-gateway API (``/api/v1``) of a real ``rcds serve``, driven by a client written here from the
protocol description (lease, ObjectPack V2 payloads signed with HMAC-SHA1, commit).

The publisher's side builds its catalogs as a stock publisher does, on a scratch copy of the repository:
here with rcds's own writer. Only objects the server lacks are shipped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pki import TokenIssuer
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.storage.local import LocalStore
from server import RcdsServer

REPO = "gw.rcds.test"
ISSUER = "https://tokens.rcds.test"
AUDIENCE = "https://gw.rcds.test"
KEYS = {"alice": "alice-secret", "bob": "bob-secret", "ops": "ops-secret"}
MAX_LEASE = 3.0


# --- a gateway client, from the protocol description -------------------------------------------------


def sign(secret: str, message: bytes) -> str:
    """``Authorization`` value: key id, then base64 of the *hex* HMAC-SHA1 of the message."""
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha1).hexdigest().encode()).decode()


def object_pack(objects: list[tuple[str, bytes]]) -> tuple[bytes, bytes]:
    """(header, header + objects) of an ObjectPack V2 of ``(name with suffix, stored bytes)``."""
    lines = [f"C {name} {len(data)}\n" for name, data in objects]
    total = sum(len(d) for _, d in objects)
    header = f"V2\nS{total}\nN{len(objects)}\n--\n{''.join(lines)}".encode()
    return header, header + b"".join(d for _, d in objects)


class GatewayClient:
    """Signs with an HMAC key, or (``bearer``) sends a WLCG token instead."""

    def __init__(self, url: str, key_id: str, secret: str, bearer: str | None = None) -> None:
        self.http = httpx.Client(base_url=url + "/api/v1", timeout=60)
        self.key_id, self.secret, self.bearer = key_id, secret, bearer

    def auth(self, message: bytes) -> dict[str, str]:
        if self.bearer is not None:
            return {"Authorization": f"Bearer {self.bearer}"}
        return {"Authorization": f"{self.key_id} {sign(self.secret, message)}"}

    def acquire(self, path: str) -> dict[str, Any]:
        body = json.dumps({"path": path, "api_version": "2", "hostname": "test-host"}).encode()
        return self._json(self.http.post("/leases", content=body, headers=self.auth(body)))

    def upload(
        self, token: str, objects: list[tuple[str, bytes]], sign_over: bytes | None = None
    ) -> dict[str, Any]:
        """The legacy payload 2.12 sends: JSON message (``Message-Size`` bytes, signed), then the pack."""
        header, pack = object_pack(objects)
        message = json.dumps({
            "session_token": token, "payload_digest": hashlib.sha1(header).hexdigest(),
            "header_size": str(len(header)), "api_version": "2",
        }).encode()  # fmt: skip
        headers = {
            **self.auth(message if sign_over is None else sign_over),
            "Message-Size": str(len(message)),
        }
        return self._json(self.http.post("/payloads", content=message + pack, headers=headers))

    def commit(self, token: str, old_root: str, new_root: str) -> dict[str, Any]:
        body = {"old_root_hash": old_root, "new_root_hash": new_root, "tag_name": "", "tag_channel": 0,
                "tag_description": ""}  # fmt: skip
        return self._json(self.http.post(f"/leases/{token}", json=body, headers=self.auth(token.encode())))

    def drop(self, token: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/leases/{token}", headers=self.auth(token.encode())))

    def get(self, path: str) -> dict[str, Any]:
        return self._json(self.http.get(path, headers=self.auth(f"/api/v1{path}".encode())))

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        return doc


class Publisher:
    """A publisher's working copy: a scratch copy of the repository, changed with rcds's writer."""

    def __init__(self, server: RcdsServer, scratch: Path) -> None:
        self.live = server.storage(REPO)
        shutil.copytree(self.live, scratch)
        self.repo = Repository(scratch)
        self.old_root = self.repo.manifest().root_catalog.hex

    def publish(
        self, path: str, files: dict[str, bytes], outside: dict[str, bytes] | None = None, nested: bool = True
    ) -> str:
        """Put ``files`` at ``path`` (its own nested catalog unless not ``nested``), and ``outside``
        anywhere; the new root."""
        with self.repo.transaction() as txn:
            src = self.repo.private / "src"
            for name, data in files.items():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                (src / name).write_bytes(data)
            txn.add_directory(path, src, nested=nested)
            for where, data in (outside or {}).items():
                txn.write_file(where, data, mtime=1_700_000_000)
            txn.commit()
            shutil.rmtree(src)
        return self.repo.manifest().root_catalog.hex

    def new_objects(self) -> list[tuple[str, bytes]]:
        """Objects the live repository lacks, by their suffixed names."""
        have = set(LocalStore(self.live).iter_keys())
        mine = self.repo.store
        return [(k[5:7] + k[8:], mine.get(k)) for k in sorted(set(mine.iter_keys()) - have)]


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ISSUER, audience=AUDIENCE, subject="carol-7")


@pytest.fixture
def server(tmp_path: Path, issuer: TokenIssuer) -> Iterator[RcdsServer]:
    keyfile = tmp_path / "gw.keys"
    keyfile.write_text("".join(f"plain_text {k} {s}\n" for k, s in KEYS.items()))
    jwks = issuer.write_jwks(tmp_path / "issuer.jwks")
    config = f"""
[auth]
gridmapfile = ""
audiences = ["{AUDIENCE}"]
[auth.issuers]
"{ISSUER}" = "{jwks}"
[gateway]
key_files = ["{keyfile}"]
max_lease_time = {MAX_LEASE}
admin_keys = ["ops"]
[gateway.key_paths]
alice = ["{REPO}/users/alice", "{REPO}/shared"]
bob = ["{REPO}/users/bob"]
"""
    srv = RcdsServer(tmp_path, extra_config=config, repos=(REPO,)).start()
    try:
        yield srv
    finally:
        srv.close()


def read_back(server: RcdsServer, path: str) -> bytes:
    key = Repository(server.storage(REPO)).public_key_path
    with RepositoryReader.open(f"{server.url}/cvmfs/{REPO}", key) as reader:
        return reader.read(path)


def repo_check(server: RcdsServer) -> str:
    proc = subprocess.run([sys.executable, "-m", "rcds.cli", "repo", "check", str(server.storage(REPO))],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_publish_through_the_gateway(server: RcdsServer, tmp_path: Path) -> None:
    alice = GatewayClient(server.url, "alice", KEYS["alice"])
    assert alice.get("/")["status"] == "ok"
    lease = alice.acquire(f"{REPO}/users/alice")
    assert lease["status"] == "ok" and len(lease["session_token"]) >= 32
    token = lease["session_token"]
    assert alice.acquire(f"{REPO}/users/alice/sub")["status"] == "path_busy"
    listed = alice.get("/leases")["data"]
    assert listed[f"{REPO}/users/alice"]["key_id"] == "alice"

    pub = Publisher(server, tmp_path / "pub")
    new_root = pub.publish("/users/alice", {"hello.txt": b"hello gateway\n", "bin/run.sh": b"#!/bin/sh\n"})
    objects = pub.new_objects()
    assert any(name.endswith("C") for name, _ in objects)
    assert alice.upload(token, objects[: len(objects) // 2]) == {"status": "ok"}
    assert alice.upload(token, objects[len(objects) // 2 :]) == {"status": "ok"}
    first = Repository(server.storage(REPO)).manifest().revision
    reply = alice.commit(token, pub.old_root, new_root)
    assert reply == {"status": "ok", "final_revision": first + 1}, reply

    assert read_back(server, "/users/alice/hello.txt") == b"hello gateway\n"
    assert f"OK: revision {first + 1}" in repo_check(server)
    metrics = server.client.get("/metrics").text
    assert f'rcds_gateway_commits_total{{outcome="ok",repository="{REPO}"}} 1.0' in metrics
    # The lease is gone with the commit: the path can be leased again.
    assert alice.acquire(f"{REPO}/users/alice")["status"] == "ok"


def test_refusals_are_cvmfs_style_replies(server: RcdsServer, tmp_path: Path) -> None:
    alice = GatewayClient(server.url, "alice", KEYS["alice"])
    mallory = GatewayClient(server.url, "alice", "not-the-secret")
    assert mallory.acquire(f"{REPO}/users/alice") == {"status": "error", "reason": "invalid_hmac"}
    assert mallory.get("/leases") == {"status": "error", "reason": "invalid_hmac"}
    bob_path = alice.acquire(f"{REPO}/users/bob")
    assert bob_path["status"] == "error" and "may not lease" in bob_path["reason"]
    publish_space = alice.acquire(f"{REPO}/sw/mine")
    assert publish_space["status"] == "error" and "belongs to rcds publish" in publish_space["reason"]

    token = alice.acquire(f"{REPO}/users/alice")["session_token"]
    first = Repository(server.storage(REPO)).manifest().revision
    pub = Publisher(server, tmp_path / "pub")
    new_root = pub.publish("/users/alice", {"a.txt": b"a\n"}, outside={"/users/bob.txt": b"sneaky\n"})
    objects = pub.new_objects()

    # An HMAC over the wrong message (the token rather than the payload's JSON message).
    assert alice.upload(token, objects, sign_over=token.encode()) == {
        "status": "error",
        "reason": "invalid_hmac",
    }
    # A pack whose object does not hash to its name.
    name, data = objects[0]
    bad = alice.upload(token, [(name, data[:-1] + bytes([data[-1] ^ 1]))])
    assert bad["status"] == "error" and "does not hash to its name" in bad["reason"]
    assert not (server.storage(REPO) / "data" / name[:2] / name[2:]).exists()

    # A change outside the lease: refused, naming the path.
    assert alice.upload(token, objects)["status"] == "ok"
    outside = alice.commit(token, pub.old_root, new_root)
    assert outside["status"] == "error" and "/users/bob.txt" in outside["reason"], outside
    metrics = server.client.get("/metrics").text
    assert f'rcds_gateway_commits_total{{outcome="refused",repository="{REPO}"}} 1.0' in metrics
    assert Repository(server.storage(REPO)).manifest().revision == first

    # An expired lease.
    time.sleep(MAX_LEASE + 0.5)
    expired = alice.commit(token, pub.old_root, new_root)
    assert expired["status"] == "error" and "invalid_lease" in expired["reason"]
    assert Repository(server.storage(REPO)).manifest().revision == first


def test_disjoint_leases_commit_concurrently(server: RcdsServer, tmp_path: Path) -> None:
    writers = {
        "alice": (GatewayClient(server.url, "alice", KEYS["alice"]), "/users/alice"),
        "bob": (GatewayClient(server.url, "bob", KEYS["bob"]), "/users/bob"),
    }
    prepared = {}
    for who, (client, path) in writers.items():
        token = client.acquire(REPO + path)["session_token"]
        pub = Publisher(server, tmp_path / who)  # both start from revision 1
        new_root = pub.publish(path, {f"{who}.txt": f"{who}'s file\n".encode()})
        assert client.upload(token, pub.new_objects())["status"] == "ok"
        prepared[who] = (client, token, pub.old_root, new_root)
    first = Repository(server.storage(REPO)).manifest().revision
    replies: dict[str, dict[str, Any]] = {}
    barrier = threading.Barrier(2)

    def commit(who: str) -> None:
        client, token, old, new = prepared[who]
        barrier.wait()
        replies[who] = client.commit(token, old, new)

    threads = [threading.Thread(target=commit, args=(w,)) for w in prepared]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r["status"] for r in replies.values()} == {"ok"}, replies
    assert sorted(r["final_revision"] for r in replies.values()) == [first + 1, first + 2]
    assert read_back(server, "/users/alice/alice.txt") == b"alice's file\n"
    assert read_back(server, "/users/bob/bob.txt") == b"bob's file\n"
    assert f"OK: revision {first + 2}" in repo_check(server)


def test_a_lease_path_kept_in_its_parents_catalog_gets_its_own(server: RcdsServer, tmp_path: Path) -> None:
    """A stock publisher without a .cvmfscatalog at the lease path leaves its rows in the parent's catalog:
    the commit takes those rows (no content re-ingested) into a nested catalog of the path."""
    alice = GatewayClient(server.url, "alice", KEYS["alice"])
    token = alice.acquire(f"{REPO}/shared")["session_token"]
    pub = Publisher(server, tmp_path / "pub")
    new_root = pub.publish("/shared", {"x/y.txt": b"shared rows\n", "z.txt": b"z\n"}, nested=False)
    assert alice.upload(token, pub.new_objects())["status"] == "ok"
    assert alice.commit(token, pub.old_root, new_root)["status"] == "ok"
    assert read_back(server, "/shared/x/y.txt") == b"shared rows\n"
    repo = Repository(server.storage(REPO))
    root = repo.open_catalog(repo.manifest().root_catalog)
    try:
        assert root.nested_ref("/shared") is not None
    finally:
        root.close()
    repo_check(server)


def test_wlcg_tokens_lease_their_storage_create_paths(
    server: RcdsServer, tmp_path: Path, issuer: TokenIssuer
) -> None:
    token = issuer.make_token({"scope": "storage.create:/users/carol"})
    carol = GatewayClient(server.url, "", "", bearer=token)
    other = carol.acquire(f"{REPO}/users/alice")
    assert other["status"] == "error" and "invalid_path" in other["reason"], other
    compute_only = GatewayClient(server.url, "", "", bearer=issuer.make_token({"scope": "compute.create"}))
    assert "invalid_path" in compute_only.acquire(f"{REPO}/users/carol")["reason"]
    forged = GatewayClient(
        server.url, "", "", bearer=token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
    )
    assert "invalid_token" in forged.acquire(f"{REPO}/users/carol")["reason"]

    lease = carol.acquire(f"{REPO}/users/carol/project")["session_token"]
    pub = Publisher(server, tmp_path / "pub")
    new_root = pub.publish("/users/carol/project", {"p.txt": b"by token\n"})
    assert carol.upload(lease, pub.new_objects())["status"] == "ok"
    # A key cannot commit a token holder's lease.
    alice = GatewayClient(server.url, "alice", KEYS["alice"])
    assert "another key" in alice.commit(lease, pub.old_root, new_root)["reason"]
    assert carol.commit(lease, pub.old_root, new_root)["status"] == "ok"
    assert read_back(server, "/users/carol/project/p.txt") == b"by token\n"


def test_an_admin_key_cancels_leases_by_path(server: RcdsServer) -> None:
    alice = GatewayClient(server.url, "alice", KEYS["alice"])
    assert alice.acquire(f"{REPO}/users/alice/a")["status"] == "ok"
    assert alice.acquire(f"{REPO}/users/alice/b")["status"] == "ok"
    path = f"/api/v1/leases-by-path/{REPO}/users/alice"

    def cancel(client: GatewayClient) -> dict[str, Any]:
        return client._json(client.http.delete(path[len("/api/v1") :], headers=client.auth(path.encode())))

    assert cancel(alice) == {"status": "error", "reason": "no_admin_key"}
    ops = GatewayClient(server.url, "ops", KEYS["ops"])
    done = cancel(ops)
    assert sorted(done["cancelled"]) == [f"{REPO}/users/alice/a", f"{REPO}/users/alice/b"], done
    assert alice.acquire(f"{REPO}/users/alice")["status"] == "ok"


def test_a_catalog_over_the_limits_is_refused_when_it_arrives(tmp_path: Path) -> None:
    """Beyond the stock gateway: a catalog over ``[limits]`` is refused in its payload, before it is
    stored, not only at the commit; the lease stays usable for a tree within the limits."""
    keyfile = tmp_path / "gw.keys"
    keyfile.write_text(f"plain_text alice {KEYS['alice']}\n")
    config = f"""
[limits]
max_entries = 40
[gateway]
key_files = ["{keyfile}"]
[gateway.key_paths]
alice = ["{REPO}/users/alice"]
"""
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", extra_config=config, repos=(REPO,)).start()
    try:
        alice = GatewayClient(srv.url, "alice", KEYS["alice"])
        token = alice.acquire(f"{REPO}/users/alice")["session_token"]
        pub = Publisher(srv, tmp_path / "pub")
        pub.publish("/users/alice", {f"f{i:03d}.txt": b"%d\n" % i for i in range(60)})
        objects = pub.new_objects()
        catalogs = [(n, d) for n, d in objects if n.endswith("C")]
        big = [(n, d) for n, d in catalogs if b"f059.txt" in zlib.decompress(d)]
        assert len(big) == 1
        refused = alice.upload(token, big)
        assert refused["status"] == "error" and "limits.max_entries" in refused["reason"], refused
        name = big[0][0]
        assert not (srv.storage(REPO) / "data" / name[:2] / name[2:]).exists()
        # A payload that is not a zlib stream at all, named as a catalog: refused the same way.
        junk = b"not a catalog"
        junk_name = hashlib.sha1(junk).hexdigest() + "C"
        bad = alice.upload(token, [(junk_name, junk)])
        assert bad["status"] == "error" and "catalog" in bad["reason"], bad
        # Within the limits, the same lease goes through.
        small = Publisher(srv, tmp_path / "pub2")
        new_root = small.publish("/users/alice", {"a.txt": b"a\n"})
        assert alice.upload(token, small.new_objects())["status"] == "ok"
        assert alice.commit(token, small.old_root, new_root)["status"] == "ok"
        assert read_back(srv, "/users/alice/a.txt") == b"a\n"
    finally:
        srv.close()
