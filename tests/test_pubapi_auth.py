"""Authentication and authorisation of a real ``rcds serve`` over HTTPS: X.509 proxies and tokens."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pki import TokenIssuer, make_ca, make_host_cert, make_proxy, make_user_cert
from server import RcdsServer, free_port, make_tarball

ISSUER = "https://tokens.example.org"
AUDIENCE = "https://rcds.example"
SECOND_ISSUER = "https://second.example.org"


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = d
        ca = make_ca()
        self.ca_file = d / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem())
        self.host_cert, self.host_key = make_host_cert(ca).write(d, "host")
        alice = make_user_cert(ca, "Alice Smith", uid="alice")
        self.alice_dn = alice.dn
        self.alice_proxy = make_proxy(make_proxy(alice)).write(d, "alice-proxy")  # a proxy of a proxy
        bob = make_user_cert(ca, "Bob Jones", uid="bob")
        self.bob = bob.write(d, "bob")
        self.gridmap = d / "grid-mapfile"
        self.gridmap.write_text(f'"{alice.dn}" alice\n# "{bob.dn}" bob is commented out\n')
        self.issuer = TokenIssuer(ISSUER, AUDIENCE, subject="carol-7")
        self.jwks = self.issuer.write_jwks(d / "jwks.json")
        self.stranger = TokenIssuer("https://other.example.org", AUDIENCE)
        # A second trusted issuer that also has a "carol-7", who is not the first issuer's carol.
        self.second = TokenIssuer(SECOND_ISSUER, AUDIENCE, subject="carol-7")
        self.second_jwks = self.second.write_jwks(d / "jwks2.json")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RcdsServer]:
    https_port = free_port()
    srv = RcdsServer(
        tmp_path_factory.mktemp("srv"),
        server_config=(
            f'https = ["127.0.0.1:{https_port}"]\ntls_cert = "{pki.host_cert}"\ntls_key = "{pki.host_key}"\n'
            f'ca_file = "{pki.ca_file}"\n'
        ),
        extra_config=(
            f'[auth]\nallow_localhost = false\ngridmapfile = "{pki.gridmap}"\naudiences = ["{AUDIENCE}"]\n'
            f'[auth.issuers]\n"{ISSUER}" = "{pki.jwks}"\n"{SECOND_ISSUER}" = "{pki.second_jwks}"\n'
            f'[auth.groups.dune]\nsubjects = ["{pki.alice_dn}"]\n'
            f'[auth.groups.minerva]\nsubjects = ["{pki.alice_dn}"]\n'
            f'[auth.groups.cms]\ntokens = [{{issuer = "{ISSUER}", sub = "carol-7"}}]\n'
        ),
    ).start()
    srv.https_url = f"https://127.0.0.1:{https_port}"  # type: ignore[attr-defined]
    yield srv
    srv.close()


def client(srv: RcdsServer, pki: Pki, cert: tuple[Path, Path] | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*cert)  # a proxy file: the proxy, then the certificates that issued it
    return httpx.Client(base_url=srv.https_url, verify=ctx, timeout=30)  # type: ignore[attr-defined]


def spool_files(srv: RcdsServer) -> list[Path]:
    return list((srv.root / "data" / "queue" / "spool").iterdir())


def test_config_and_ping_need_no_credentials_over_https(server: RcdsServer, pki: Pki) -> None:
    with client(server, pki) as c:
        assert c.get("/pubapi/ping").text == "OK\n"
        assert c.get("/pubapi/config").text.startswith("repos:")


def test_no_credentials_is_403_and_leaves_no_trace(server: RcdsServer, pki: Pki) -> None:
    with client(server, pki) as c:
        r = c.post("/pubapi/publish", params={"cid": "anon/x"}, content=make_tarball({"a": "b"}))
    assert (r.status_code, r.text) == (403, "Token or client cert required\n")
    assert r.reason_phrase == "Access denied"
    # localhost gets no free pass when allow_localhost is off
    r = server.publish("anon/x", make_tarball({"a": "b"}))
    assert r.status_code == 403
    assert spool_files(server) == []


def test_an_rfc3820_proxy_is_mapped_through_the_grid_mapfile(server: RcdsServer, pki: Pki) -> None:
    with client(server, pki, pki.alice_proxy) as c:
        assert c.get("/pubapi/exists", params={"cid": "dune/abc"}).text == "MISSING\n"
        data = make_tarball({"analysis.py": "print('dune')\n"})
        assert c.post("/pubapi/publish", params={"cid": "dune/abc"}, content=data).text == "OK\n"
        doc = _wait(c, "dune/abc")
    assert doc["state"] == "published"
    with httpx.Client() as plain:
        from rcds.cvmfs.reader import RepositoryReader

        repo = doc["repository"]
        key = server.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
        with RepositoryReader.open(f"{server.url}/cvmfs/{repo}", key, cache_dir=server.root / "c1") as reader:
            assert reader.read("/sw/dune/abc/.publisher") == b"alice\n"
        del plain


def test_an_unknown_dn_is_403(server: RcdsServer, pki: Pki) -> None:
    with client(server, pki, pki.bob) as c:
        r = c.post("/pubapi/publish", params={"cid": "bob/x"}, content=make_tarball({"a": "b"}))
    assert (r.status_code, r.text) == (403, "Unrecognized DN\n")
    assert spool_files(server) == []


def test_tokens_from_a_trusted_issuer(server: RcdsServer, pki: Pki) -> None:
    token = pki.issuer.make_token({"scope": "storage.create:/sw/cms"})
    with client(server, pki) as c:
        auth = {"Authorization": f"Bearer {token}"}
        data = make_tarball({"cms.py": "1\n"})
        assert c.post("/pubapi/publish", params={"cid": "cms/one"}, content=data, headers=auth).text == "OK\n"
        assert _wait(c, "cms/one", auth)["state"] == "published"
        # the scope covers /sw/cms only
        r = c.post("/pubapi/publish", params={"cid": "atlas/one"}, content=data, headers=auth)
        assert (r.status_code, r.text) == (403, "compute.create scope missing from token\n")
        # the group rule for dune/ admits Alice's DN only
        full = {"Authorization": f"Bearer {pki.issuer.make_token()}"}
        r = c.post("/pubapi/publish", params={"cid": "dune/two"}, content=data, headers=full)
        assert (r.status_code, r.text) == (403, "carol-7 may not publish under dune/\n")
        bad = {"Authorization": f"Bearer {pki.stranger.make_token()}"}
        r = c.get("/pubapi/exists", params={"cid": "cms/one"}, headers=bad)
        assert (r.status_code, r.text) == (403, "Untrusted token issuer\n")
        expired = {"Authorization": f"Bearer {pki.issuer.make_token({'exp': 1_000_000})}"}
        r = c.get("/pubapi/exists", params={"cid": "cms/one"}, headers=expired)
        assert r.status_code == 403 and r.text.startswith("Error decoding token: token expired")
        r = c.get("/pubapi/exists", params={"cid": "cms/one"}, headers={"Authorization": "Basic abc"})
        assert (r.status_code, r.text) == (403, "Unrecognized authorization scheme\n")
    # Over plain HTTP a token is accepted only from the loopback address (this test's address).
    r = server.client.get("/pubapi/exists", params={"cid": "cms/one"}, headers=auth)
    assert r.text.startswith("PRESENT:/cvmfs/")
    assert spool_files(server) == []


def test_group_rules_match_issuer_and_subject_and_cover_the_one_level_cid(
    server: RcdsServer, pki: Pki
) -> None:
    data = make_tarball({"g.py": "1\n"})

    def publish(c: httpx.Client, cid: str, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return c.post("/pubapi/publish", params={"cid": cid}, content=data, headers=headers)

    with client(server, pki) as c:
        # Defect 7: the cms rule names carol-7 *of the first issuer*; the second issuer's carol-7 is refused.
        assert publish(c, "cms/group-rule", pki.issuer.make_token()).text == "OK\n"
        r = publish(c, "cms/impostor", pki.second.make_token())
        assert (r.status_code, r.text) == (403, "carol-7 may not publish under cms/\n")
        # A token whose sub is Alice's DN is not Alice.
        r = publish(c, "dune/impostor", pki.issuer.make_token({"sub": pki.alice_dn}))
        assert (r.status_code, r.text) == (403, f"{pki.alice_dn} may not publish under dune/\n")
        # Defect 1: the one-level CID "minerva" belongs to the minerva rule too.
        r = publish(c, "minerva", pki.issuer.make_token())
        assert (r.status_code, r.text) == (403, "carol-7 may not publish minerva\n")
    with client(server, pki, pki.alice_proxy) as c:
        assert publish(c, "minerva").text == "OK\n"
        assert _wait(c, "minerva")["state"] == "published"
        for cid in ("cms/impostor", "dune/impostor"):
            assert _wait(c, cid)["state"] == "missing"


def _wait(c: httpx.Client, cid: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    import time

    for _ in range(3000):
        doc: dict[str, object] = json.loads(
            c.get("/pubapi/status", params={"cid": cid}, headers=headers).text
        )
        if doc["state"] in ("published", "failed", "missing"):
            return doc
        time.sleep(0.02)
    raise TimeoutError(cid)
