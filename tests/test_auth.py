"""rcds.publish.auth with real crypto: DNs, grid-mapfile, tokens and their keys, the request order, group
rules, and TLS handshakes with client certificates and RFC 3820 proxies (``tests/pki.py`` builds them)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pki import (
    Credential,
    TokenIssuer,
    make_ca,
    make_host_cert,
    make_legacy_proxy,
    make_proxy,
    make_user_cert,
    write_ca_dir,
)
from rcds.publish.auth import (
    WLCG_ANY_AUDIENCE,
    Authenticator,
    AuthError,
    Authorizer,
    GridMapfile,
    GroupRule,
    Identity,
    JwksCache,
    TokenVerifier,
    dn_from_peercert,
    identity_name_from_dn,
    is_loopback,
    peer_dn_from_ssl_object,
    server_ssl_context,
    strip_proxy_cns,
)
from rcds.publish.config import GroupSettings, settings_from_dict
from rcds.tomlconfig import ConfigError

NOW = 1_750_000_000
AUD = "https://rcds.example"
ISSUER = "https://issuer.example/fnal"
ALICE = "/DC=org/DC=example/OU=People/CN=Alice Smith/CN=UID:alice"


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- DNs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dn", "stripped"),
    [
        (ALICE, ALICE),
        (ALICE + "/CN=1234567890", ALICE),
        (ALICE + "/CN=1234567890/CN=987", ALICE),
        (ALICE + "/CN=proxy", ALICE + "/CN=proxy"),
        (ALICE + "/CN=limited proxy", ALICE + "/CN=limited proxy"),
        (ALICE + "/CN=123/CN=proxy", ALICE + "/CN=123/CN=proxy"),
        ("/DC=org/CN=123/CN=Bob", "/DC=org/CN=123/CN=Bob"),
        ("/DC=org/CN=12a", "/DC=org/CN=12a"),
        ("/DC=org/CN=", "/DC=org/CN="),
        ("/DC=org/CN=42", "/DC=org"),
        ("/DC=org/O=Example", "/DC=org/O=Example"),
        ("", ""),
    ],
)
def test_strip_proxy_cns(dn: str, stripped: str) -> None:
    assert strip_proxy_cns(dn) == stripped


@pytest.mark.parametrize(
    ("dn", "name"),
    [
        (ALICE, "alice"),
        ("/DC=org/DC=example/O=Test/CN=Alice Smith/CN=123456", "123456"),
        ("/DC=org/O=Test/CN=Bob Jones", "Bob Jones"),
        ("/DC=ch/DC=cern/OU=computers/CN=host/lxplus.cern.ch", "host"),
        ("/DC=org/CN=UID:carol/CN=Carol", "carol"),
    ],
)
def test_identity_name_from_dn(dn: str, name: str) -> None:
    assert identity_name_from_dn(dn) == name


def test_dn_from_peercert() -> None:
    cert = {
        "subject": (
            (("domainComponent", "org"),),
            (("domainComponent", "example"),),
            (("organizationName", "Test"), ("organizationalUnitName", "Unit")),
            (("1.2.3.4", "x"),),
            (("commonName", "Alice Smith"),),
            (("commonName", "123456"),),
        )
    }
    assert dn_from_peercert(cert) == "/DC=org/DC=example/O=Test/OU=Unit/1.2.3.4=x/CN=Alice Smith/CN=123456"
    assert dn_from_peercert({"subject": ((("commonName", "a\nb"),),)}) == "/CN=a\\x0Ab"
    assert dn_from_peercert({}) == ""


@pytest.mark.parametrize(
    ("addr", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False), ("localhost", False), ("", False)],
)  # fmt: skip
def test_is_loopback(addr: str, loopback: bool) -> None:
    assert is_loopback(addr) is loopback


# --- grid-mapfile ---------------------------------------------------------------------------------------

GRIDMAP = f"""\
# a comment "/DC=org/CN=commented"
   # indented comment "/DC=org/CN=also commented"

"{ALICE}" alice
"/DC=org/DC=example/OU=People/CN=Bob Jones" bob,fnalpro
/DC=org/CN=unquoted user
"/DC=org/CN=no closing quote
  "/DC=org/CN=Indented"  carol
"""


def test_gridmap_parse(tmp_path: Path) -> None:
    path = tmp_path / "grid-mapfile"
    path.write_text(GRIDMAP)
    gm = GridMapfile(path)
    assert gm.dns == {ALICE, "/DC=org/DC=example/OU=People/CN=Bob Jones", "/DC=org/CN=Indented"}
    assert gm.contains(ALICE)
    assert ALICE in gm
    assert not gm.contains(ALICE + "/CN=123")
    assert not gm.contains("/DC=org/CN=commented")


def test_gridmap_reload_on_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "grid-mapfile"
    clock = FakeClock(1000.0)
    gm = GridMapfile(path, check_interval=30, clock=clock)
    with caplog.at_level(logging.WARNING, logger="rcds.publish.auth"):
        assert not gm.contains(ALICE)  # missing file: empty, warned
        clock.t += 31
        assert not gm.contains(ALICE)  # still missing: no second warning
    assert sum("grid-mapfile" in r.message for r in caplog.records) == 1

    path.write_text(f'"{ALICE}" alice\n')
    assert not gm.contains(ALICE)  # not checked again before the interval has passed
    clock.t += 31
    assert gm.contains(ALICE)

    path.write_text('"/DC=org/CN=Bob" bob\n')
    os.utime(path, ns=(1, 2_000_000_000))
    clock.t += 10
    assert gm.contains(ALICE) and not gm.contains("/DC=org/CN=Bob")
    clock.t += 25
    assert gm.contains("/DC=org/CN=Bob") and not gm.contains(ALICE)

    path.unlink()
    gm.reload()  # forced check
    assert gm.dns == frozenset()


# --- a local HTTP server for issuer metadata and key sets -----------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def serve_json(self, path: str, doc: object, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(doc).encode())

    def total_hits(self, prefix: str) -> int:
        with self.lock:
            return sum(n for p, n in self.hits.items() if p.startswith(prefix))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits[self.path] += 1
        status, body = self.server.routes.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --- tokens ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ISSUER, audience=AUD)


@pytest.fixture(scope="module")
def jwks_file(issuer: TokenIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issuer.write_jwks(tmp_path_factory.mktemp("jwks") / "fnal.jwks")


@pytest.fixture
def verifier(jwks_file: Path) -> TokenVerifier:
    return TokenVerifier({ISSUER: str(jwks_file)}, [AUD], clock=lambda: NOW)


def reason(exc: pytest.ExceptionInfo[AuthError]) -> str:
    assert exc.value.status == 403
    return exc.value.message


def test_good_tokens(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    ident = verifier.verify(issuer.make_token(now=NOW), "dune/abc")
    assert ident == Identity("token", "alice-0001", ISSUER, "alice-0001")
    ec_token = issuer.make_token({"sub": "bob"}, kid="ec1", signing_kid="ec1", now=NOW)
    assert verifier.verify(ec_token, "abc").name == "bob"
    assert verifier.verify(issuer.make_token(now=NOW), None).method == "token"


def test_untrusted_issuer_fetches_nothing(http: _Server, issuer: TokenIssuer, jwks_file: Path) -> None:
    # The untrusted issuer publishes real metadata and keys, and its token is validly signed: the original
    # (scitokens) would have fetched them before looking at the issuer.
    evil = f"{http.base}/evil"
    http.serve_json("/evil/.well-known/openid-configuration", {"issuer": evil, "jwks_uri": f"{evil}/jwks"})
    http.serve_json("/evil/jwks", issuer.jwks())
    cache = JwksCache()
    v = TokenVerifier(
        {ISSUER: str(jwks_file), f"{http.base}/trusted": None}, [AUD], clock=lambda: NOW, jwks=cache
    )
    for iss in (evil, evil + "/", ISSUER + "/", ISSUER.upper(), None, 42):
        token = issuer.make_token({"iss": iss}, now=NOW)
        with pytest.raises(AuthError) as exc:
            v.verify(token, "dune/abc")
        assert reason(exc) == "Untrusted token issuer"
    # Not even with alg none or a bogus kid does anything get fetched.
    with pytest.raises(AuthError, match=r"^Untrusted token issuer$"):
        v.verify(issuer.hs256_token(b"x", {"iss": evil}), "a")
    assert http.total_hits("/evil") == 0
    assert http.total_hits("/trusted") == 0
    assert cache.fetch_count == 0


@pytest.mark.parametrize(
    ("overrides", "remove", "message"),
    [
        ({"exp": NOW - 61}, (), "token expired"),
        ({"exp": NOW - 60}, (), "token expired"),
        ({"exp": "soon"}, (), "invalid exp claim"),
        ({"exp": float("nan")}, (), "invalid exp claim"),
        ({"exp": float("inf")}, (), "invalid exp claim"),
        ({"exp": True}, (), "invalid exp claim"),
        ({"nbf": float("nan")}, (), "invalid nbf claim"),
        ({}, ("exp",), "missing exp claim"),
        ({"nbf": NOW + 61}, (), "token not yet valid"),
        ({"iat": NOW + 3600}, (), "token issued in the future"),
        ({"aud": "https://other.example"}, (), "audience not accepted"),
        ({"aud": ["https://a.example", "https://b.example"]}, (), "audience not accepted"),
        ({"aud": 7}, (), "invalid aud claim"),
        ({}, ("aud",), "missing aud claim"),
        ({}, ("sub",), "invalid sub claim"),
        ({"sub": "x\ny"}, (), "invalid sub claim"),
    ],
)
def test_claim_checks(
    verifier: TokenVerifier,
    issuer: TokenIssuer,
    overrides: dict[str, Any],
    remove: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(AuthError) as exc:
        verifier.verify(issuer.make_token(overrides, remove=remove, now=NOW), "dune/abc")
    assert reason(exc) == f"Error decoding token: {message}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": NOW - 59},  # within the leeway
        {"nbf": NOW + 59, "iat": NOW + 59},
        {"aud": ["https://a.example", AUD]},
        {"aud": WLCG_ANY_AUDIENCE},
        {"aud": [WLCG_ANY_AUDIENCE]},
    ],
)
def test_claims_accepted(verifier: TokenVerifier, issuer: TokenIssuer, overrides: dict[str, Any]) -> None:
    assert verifier.verify(issuer.make_token(overrides, now=NOW), "dune/abc").subject == "alice-0001"


def test_nbf_iat_optional(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    assert verifier.verify(issuer.make_token(remove=("nbf", "iat", "jti", "wlcg.ver"), now=NOW), "a")


def test_any_audience_only_without_configured(jwks_file: Path, issuer: TokenIssuer) -> None:
    v = TokenVerifier({ISSUER: str(jwks_file)}, [], clock=lambda: NOW)
    assert v.verify(issuer.make_token({"aud": WLCG_ANY_AUDIENCE}, now=NOW), "a")
    with pytest.raises(AuthError, match="audience not accepted"):
        v.verify(issuer.make_token(now=NOW), "a")


@pytest.mark.parametrize(
    ("scope", "cid", "allowed"),
    [
        ("compute.create", "dune/abc", True),
        ("compute.create", None, True),
        ("openid offline_access compute.create", "x", True),
        ("storage.create:/", "dune/abc", True),
        ("storage.create:/", None, True),
        ("storage.create:/sw", "dune/abc", True),
        ("storage.create:/sw/", None, True),
        ("storage.create:/sw", None, True),
        ("storage.create:/sw/dune", "dune/abc", True),
        ("storage.create:/sw/dune/", "dune/abc", True),
        ("storage.create:/sw//dune", "dune/abc", True),
        ("storage.create:/sw/dune/abc", "dune/abc", True),
        ("storage.read:/ storage.create:/sw/dune", "dune/abc", True),
        ("storage.create:/sw/dune", "dunex/abc", False),
        ("storage.create:/sw/dune", "dune", True),
        ("storage.create:/sw/dune/abc", "dune/abcd", False),
        ("storage.create:/sw/dune", None, False),
        ("storage.create:/sw/dune", "dune/../cms/x", False),
        ("storage.create:/sw/dune/../cms", "cms/x", True),
        ("storage.create:/swx", "dune/abc", False),
        ("storage.create:/other/dune", "dune/abc", False),
        ("storage.create:sw/dune", "dune/abc", False),
        ("storage.create", "dune/abc", False),
        ("storage.create:", "dune/abc", False),
        ("storage.read:/ storage.modify:/", "dune/abc", False),
        ("compute.read compute.modify", "dune/abc", False),
        ("", "dune/abc", False),
        (None, "dune/abc", False),
        (["compute.create"], "dune/abc", False),
    ],
)
def test_scope_rules(verifier: TokenVerifier, scope: object, cid: str | None, allowed: bool) -> None:
    assert verifier.scope_allows(scope, cid) is allowed


def test_scope_enforced(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    ok = issuer.make_token({"scope": "storage.create:/sw/dune"}, now=NOW)
    assert verifier.verify(ok, "dune/abc").subject == "alice-0001"
    for token, cid in [(ok, "dunex/abc"), (issuer.make_token(remove=("scope",), now=NOW), "dune/abc")]:
        with pytest.raises(AuthError) as exc:
            verifier.verify(token, cid)
        assert reason(exc) == "compute.create scope missing from token"


def test_other_prefix(jwks_file: Path, issuer: TokenIssuer) -> None:
    v = TokenVerifier({ISSUER: str(jwks_file)}, [AUD], required_prefix="code", clock=lambda: NOW)
    assert v.scope_allows("storage.create:/code/dune", "dune/x")
    assert not v.scope_allows("storage.create:/sw/dune", "dune/x")


def test_algorithm_attacks(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    cases = {
        issuer.unsigned_token(): "algorithm 'none' not allowed",
        issuer.hs256_token(issuer.public_pem("rsa1")): "algorithm 'HS256' not allowed",
        issuer.hs256_token(json.dumps(issuer.jwk("rsa1")).encode()): "algorithm 'HS256' not allowed",
        # Signed with the EC key but naming the RSA key: the key decides the algorithm, not the header.
        issuer.make_token(kid="rsa1", signing_kid="ec1", now=NOW): "algorithm ES256 does not match the key",
        issuer.make_token(kid="ec1", signing_kid="rsa1", now=NOW): "algorithm RS256 does not match the key",
    }
    for token, message in cases.items():
        with pytest.raises(AuthError) as exc:
            verifier.verify(token, "dune/abc")
        assert reason(exc) == f"Error decoding token: {message}"


def test_bad_signatures(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    impostor = TokenIssuer(ISSUER, audience=AUD)  # same issuer name and kids, other keys
    good = issuer.make_token(now=NOW)
    head, payload, sig = good.split(".")
    forged_payload = impostor.make_token({"sub": "root"}, now=NOW).split(".")[1]
    for token in (
        impostor.make_token(now=NOW),
        f"{head}.{forged_payload}.{sig}",
        f"{head}.{payload}.{sig[:-4]}AAAA",
    ):
        with pytest.raises(AuthError) as exc:
            verifier.verify(token, "dune/abc")
        assert reason(exc) == "Error decoding token: signature verification failed"
    for token in ("", "abc", "a.b.c", good + ".x", "é.é.é"):
        with pytest.raises(AuthError) as exc:
            verifier.verify(token, "dune/abc")
        assert reason(exc) == "Error decoding token: malformed token"


def test_kid_lookup(issuer: TokenIssuer, tmp_path: Path) -> None:
    both = issuer.write_jwks(tmp_path / "both.jwks")
    v = TokenVerifier({ISSUER: str(both)}, [AUD], clock=lambda: NOW)
    for kid, message in [("nope", "unknown key id 'nope'"), (None, "no kid in token header")]:
        with pytest.raises(AuthError) as exc:
            v.verify(issuer.make_token(kid=kid, now=NOW), "a")
        assert reason(exc) == f"Error decoding token: {message}"
    # With a single key a token without kid uses it.
    single = issuer.write_jwks(tmp_path / "single.jwks", kids=["ec1"])
    v = TokenVerifier({ISSUER: str(single)}, [AUD], clock=lambda: NOW)
    assert v.verify(issuer.make_token(kid=None, signing_kid="ec1", now=NOW), "a")


def test_jwks_ignores_symmetric_and_weak_keys(issuer: TokenIssuer, tmp_path: Path) -> None:
    doc = issuer.jwks(["rsa1"])
    doc["keys"].append({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"})
    doc["keys"].append({**issuer.jwk("ec1"), "use": "enc"})
    path = tmp_path / "mixed.jwks"
    path.write_text(json.dumps(doc))
    v = TokenVerifier({ISSUER: str(path)}, [AUD], clock=lambda: NOW)
    assert v.verify(issuer.make_token(now=NOW), "a")
    for token in (
        issuer.hs256_token(b"secret", kid="hmac"),
        issuer.make_token(kid="ec1", signing_kid="ec1", now=NOW),
    ):
        with pytest.raises(AuthError, match=r"^Error decoding token: "):
            v.verify(token, "a")


def test_jwks_unavailable(issuer: TokenIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = issuer.make_token(now=NOW)
    for location in (str(tmp_path / "missing.jwks"), "http://192.0.2.1/jwks", "ftp://example.org/jwks"):
        v = TokenVerifier({ISSUER: location}, [AUD], clock=lambda: NOW)
        with caplog.at_level(logging.WARNING, logger="rcds.publish.auth"), pytest.raises(AuthError) as exc:
            v.verify(token, "a")
        assert reason(exc) == "Error decoding token: cannot fetch keys for issuer"
    assert any("HTTPS required" in r.message for r in caplog.records)


def test_jwks_discovery_and_cache(http: _Server, issuer: TokenIssuer) -> None:
    iss = f"{http.base}/disc"
    meta = "/disc/.well-known/openid-configuration"
    http.serve_json(meta, {"issuer": iss, "jwks_uri": f"{http.base}/disc/keys"})
    http.serve_json("/disc/keys", issuer.jwks(["ec1"]))
    tokens = TokenIssuer(iss, audience=AUD)
    tokens.keys = issuer.keys
    clock = FakeClock(0.0)
    cache = JwksCache(clock=clock)
    v = TokenVerifier({iss: None}, [AUD], clock=lambda: NOW, jwks=cache)

    def hits() -> tuple[int, int]:
        return http.hits[meta], http.hits["/disc/keys"]

    ec_token = tokens.make_token(kid="ec1", signing_kid="ec1", now=NOW)
    assert v.verify(ec_token, "a").issuer == iss
    assert hits() == (1, 1)
    clock.t = 5
    assert v.verify(ec_token, "b")
    assert hits() == (1, 1)  # cached

    rsa_token = tokens.make_token(kid="rsa1", now=NOW)  # the issuer has not published rsa1 yet
    clock.t = 30
    with pytest.raises(AuthError, match="unknown key id 'rsa1'"):
        v.verify(rsa_token, "a")
    assert hits() == (1, 1)  # last fetch less than a minute ago
    clock.t = 61
    with pytest.raises(AuthError, match="unknown key id 'rsa1'"):
        v.verify(rsa_token, "a")
    assert hits() == (2, 2)  # unknown kid: refetched once
    clock.t = 100
    with pytest.raises(AuthError, match="unknown key id 'rsa1'"):
        v.verify(rsa_token, "a")
    assert hits() == (2, 2)

    http.serve_json("/disc/keys", issuer.jwks())  # key rotation: rsa1 published
    clock.t = 130
    assert v.verify(rsa_token, "a")
    assert hits() == (3, 3)
    assert v.verify(ec_token, "a")
    assert hits() == (3, 3)

    # After the TTL the keys are fetched again; if that fails the old keys stay in use.
    http.serve_json("/disc/keys", {"error": "down"}, status=503)
    clock.t = 130 + 3600
    assert v.verify(ec_token, "a")
    assert hits() == (4, 4)
    clock.t += 10
    assert v.verify(rsa_token, "a")
    assert hits() == (4, 4)  # failed attempts also count towards the once-a-minute limit
    assert cache.fetch_count == 4


def test_jwks_url_and_fetch_failure_backoff(http: _Server, issuer: TokenIssuer) -> None:
    iss = "https://direct.example"
    http.serve_json("/direct/keys", issuer.jwks(), status=500)
    clock = FakeClock(0.0)
    v = TokenVerifier(
        {iss: f"{http.base}/direct/keys"}, [AUD], clock=lambda: NOW, jwks=JwksCache(clock=clock)
    )
    tokens = TokenIssuer(iss, audience=AUD)
    tokens.keys = issuer.keys
    token = tokens.make_token(now=NOW)
    for t in (0, 20, 40):
        clock.t = t
        with pytest.raises(AuthError, match="cannot fetch keys for issuer"):
            v.verify(token, "a")
    assert http.hits["/direct/keys"] == 1
    http.serve_json("/direct/keys", issuer.jwks())
    clock.t = 61
    assert v.verify(token, "a").issuer == iss
    assert http.hits["/direct/keys"] == 2


def test_empty_location_means_discovery(http: _Server, issuer: TokenIssuer) -> None:
    iss = f"{http.base}/empty"
    http.serve_json("/empty/.well-known/openid-configuration", {"jwks_uri": f"{http.base}/empty/jwks"})
    http.serve_json("/empty/jwks", issuer.jwks())
    tokens = TokenIssuer(iss, audience=AUD)
    tokens.keys = issuer.keys
    v = TokenVerifier({iss: ""}, [AUD], clock=lambda: NOW)
    assert v.verify(tokens.make_token(now=NOW), "a").subject == "alice-0001"


# --- Authenticator ----------------------------------------------------------------------------------------


@pytest.fixture
def authenticator(tmp_path: Path, verifier: TokenVerifier) -> Authenticator:
    path = tmp_path / "grid-mapfile"
    path.write_text(f'"{ALICE}" alice\n')
    return Authenticator(GridMapfile(path), verifier)


def run_auth(
    a: Authenticator,
    *,
    remote_addr: str = "192.0.2.10",
    authorization: str | None = None,
    peer_dn: str | None = None,
    secure: bool = True,
    cid: str | None = "dune/abc",
) -> Identity:
    return a.authenticate(
        remote_addr=remote_addr, authorization=authorization, peer_dn=peer_dn, secure=secure, cid=cid
    )


def auth_error(a: Authenticator, **kwargs: Any) -> str:
    with pytest.raises(AuthError) as exc:
        run_auth(a, **kwargs)
    return reason(exc)


def test_authenticator_tokens(authenticator: Authenticator, issuer: TokenIssuer) -> None:
    token = issuer.make_token(now=NOW)
    for header in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token} "):
        assert run_auth(authenticator, authorization=header).method == "token"
    # The header wins over a valid client certificate, and its errors do not fall back to the certificate.
    assert run_auth(authenticator, authorization=f"Bearer {token}", peer_dn=ALICE).method == "token"
    assert (
        auth_error(authenticator, authorization="Basic dXNlcjpwdw==", peer_dn=ALICE)
        == "Unrecognized authorization scheme"
    )
    for header in ("", "   ", "Bearer", "Bearer   "):
        assert (
            auth_error(authenticator, authorization=header, peer_dn=ALICE) == "Failure to parse Authorization"
        )
    assert auth_error(authenticator, authorization="Bearer abc") == "Error decoding token: malformed token"
    assert (
        auth_error(authenticator, authorization=f"Bearer {issuer.make_token({'scope': 'x'}, now=NOW)}")
        == "compute.create scope missing from token"
    )


def test_authenticator_tokens_need_https(authenticator: Authenticator, issuer: TokenIssuer) -> None:
    header = f"Bearer {issuer.make_token(now=NOW)}"
    assert auth_error(authenticator, authorization=header, secure=False) == "Tokens require HTTPS"
    for addr in ("127.0.0.1", "::1"):
        assert run_auth(authenticator, authorization=header, secure=False, remote_addr=addr).method == "token"


def test_authenticator_no_verifier(tmp_path: Path, issuer: TokenIssuer) -> None:
    a = Authenticator(None, None)
    assert auth_error(a, authorization=f"Bearer {issuer.make_token(now=NOW)}") == "Untrusted token issuer"
    assert auth_error(a, peer_dn=ALICE) == "Unrecognized DN"


def test_authenticator_certificates(authenticator: Authenticator) -> None:
    for dn in (ALICE, ALICE + "/CN=1234", ALICE + "/CN=1234/CN=5678"):
        assert run_auth(authenticator, peer_dn=dn) == Identity("x509", ALICE, None, "alice")
    assert auth_error(authenticator, peer_dn=ALICE + "/CN=proxy") == "Unrecognized DN"
    assert auth_error(authenticator, peer_dn="/DC=org/CN=Mallory") == "Unrecognized DN"
    assert auth_error(authenticator, peer_dn="/DC=org/O=Example") == "Malformed DN"
    assert auth_error(authenticator, peer_dn="/DC=org/CN=123456") == "Malformed DN"
    # A certificate from localhost is judged as a certificate.
    assert (
        auth_error(authenticator, peer_dn="/DC=org/CN=Mallory", remote_addr="127.0.0.1") == "Unrecognized DN"
    )


def test_authenticator_localhost(authenticator: Authenticator, verifier: TokenVerifier) -> None:
    for addr in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert run_auth(authenticator, remote_addr=addr, secure=False) == Identity(
            "localhost", "localhost", None, "localhost"
        )
    assert auth_error(authenticator) == "Token or client cert required"
    strict = Authenticator(authenticator.gridmap, verifier, allow_localhost=False)
    assert auth_error(strict, remote_addr="127.0.0.1") == "Token or client cert required"


# --- Authorizer -----------------------------------------------------------------------------------------

BOB = "/DC=org/DC=example/OU=People/CN=Bob Jones"


def test_authorizer() -> None:
    alice = Identity("x509", ALICE, None, "alice")
    bob = Identity("x509", BOB, None, "Bob Jones")
    fnal = Identity("token", "u-123", ISSUER, "u-123")
    other = Identity("token", "u-456", "https://other.example", "u-456")
    local = Identity("localhost", "localhost", None, "localhost")
    rules = [
        GroupRule("dune", dns=frozenset({ALICE})),
        GroupRule("dune", issuers=frozenset({ISSUER})),
        GroupRule("cms", tokens=frozenset({("https://other.example", "u-456")})),
    ]
    az = Authorizer(rules)
    for ident in (alice, fnal, local):
        az.check(ident, "dune/abc")
    for ident, name in ((bob, "Bob Jones"), (other, "u-456")):
        with pytest.raises(AuthError) as exc:
            az.check(ident, "dune/abc")
        assert reason(exc) == f"{name} may not publish under dune/"
    az.check(other, "cms/x")
    with pytest.raises(AuthError, match=r"^u-123 may not publish under cms/$"):
        az.check(fnal, "cms/x")
    # No rule for the group: default_allow decides.
    for ident in (alice, bob, fnal, other):
        az.check(ident, "nova/abc")
        az.check(ident, "nova")

    closed = Authorizer(rules, default_allow=False)
    closed.check(alice, "dune/abc")
    closed.check(local, "nova/abc")
    with pytest.raises(AuthError, match=r"^alice may not publish under nova/$"):
        closed.check(alice, "nova/abc")
    with pytest.raises(AuthError, match=r"^alice may not publish abc$"):
        closed.check(alice, "abc")


def test_a_group_rule_also_governs_the_one_level_cid_of_its_name() -> None:
    # Issue 12, defect 1: "dune" was nobody's group, so anyone could publish the CID "dune" itself.
    az = Authorizer([GroupRule("dune", dns=frozenset({ALICE}))])
    az.check(Identity("x509", ALICE, None, "alice"), "dune")
    with pytest.raises(AuthError, match=r"^Bob Jones may not publish dune$"):
        az.check(Identity("x509", BOB, None, "Bob Jones"), "dune")
    az.check(Identity("x509", BOB, None, "Bob Jones"), "dunex")  # another group, no rule


def test_group_rules_match_the_full_identity_not_the_subject_alone() -> None:
    # Issue 12, defect 7: a rule used to match the bare subject, whoever vouched for it.
    rules = [GroupRule("dune", dns=frozenset({ALICE}), tokens=frozenset({(ISSUER, "u-123")}))]
    az = Authorizer(rules, default_allow=False)
    az.check(Identity("x509", ALICE, None, "alice"), "dune/a")
    az.check(Identity("token", "u-123", ISSUER, "u-123"), "dune/a")
    impostors = [
        Identity("token", "u-123", "https://other.example", "u-123"),  # same sub, second trusted issuer
        Identity("token", ALICE, ISSUER, ALICE),  # a token whose sub is Alice's DN
        Identity("token", ALICE, "https://other.example", ALICE),
        Identity("x509", "u-123", None, "u-123"),  # a certificate cannot pose as a token identity either
    ]
    for ident in impostors:
        with pytest.raises(AuthError, match="may not publish under dune/"):
            az.check(ident, "dune/a")


def test_group_settings_keep_dns_and_token_identities_apart(tmp_path: Path) -> None:
    base = {"repository": [{"name": "r.example"}]}

    def groups(spec: dict[str, Any]) -> tuple[GroupSettings, ...]:
        return settings_from_dict({**base, "auth": {"groups": {"dune": spec}}}, tmp_path).auth.groups

    (g,) = groups(
        {
            "subjects": [ALICE, f"{ISSUER}#u-123"],
            "tokens": [{"issuer": "https://other.example", "sub": "u-456"}],
            "issuers": [ISSUER],
        }
    )
    assert g == GroupSettings(
        "dune", (ALICE,), ((ISSUER, "u-123"), ("https://other.example", "u-456")), (ISSUER,)
    )
    # A bare sub used to match from any issuer: refused instead of silently meaning something else.
    with pytest.raises(ConfigError, match="neither a DN"):
        groups({"subjects": ["u-123"]})
    with pytest.raises(ConfigError, match="unknown setting"):
        groups({"tokens": [{"issuer": ISSUER, "sub": "u-1", "subject": "x"}]})


# --- real TLS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    ca_dir: Path
    host_cert: Path
    host_key: Path
    user: Credential
    creds: dict[str, Path]  # name -> client credential file (cert, key, chain)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    rogue_ca = make_ca("Rogue CA")
    host_cert, host_key = make_host_cert(ca).write(d, "host")
    (d / "ca.pem").write_bytes(ca.cert_pem())
    user = make_user_cert(ca)
    proxy = make_proxy(user)
    proxy2 = make_proxy(proxy)
    creds = {
        "user": user,
        "proxy": proxy,
        "proxy2": proxy2,
        "proxy3": make_proxy(proxy2),
        "legacy": make_legacy_proxy(user),
        "rogue": make_user_cert(rogue_ca, cn="Alice Smith", uid="alice"),
        "limited_path": make_proxy(make_proxy(user, path_len=0)),
    }
    files = {name: cred.write_proxy_file(d / f"x509up_{name}") for name, cred in creds.items()}
    return Pki(d / "ca.pem", write_ca_dir(d / "certificates", [ca]), host_cert, host_key, user, files)


def tls_exchange(
    server_ctx: ssl.SSLContext, client_cert: Path | None, ca_file: Path
) -> tuple[str | None, int]:
    """Connect once; return what the server saw as the stripped peer DN ("" for no certificate), or None
    when the connection was refused, and how many connections reached the request handler."""
    handled = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handled
        handled += 1
        dn = peer_dn_from_ssl_object(writer.get_extra_info("ssl_object"))
        writer.write(f"{strip_proxy_cns(dn) if dn else ''}\n".encode())
        await writer.drain()
        writer.close()

    async def main() -> str | None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)  # refused handshakes
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=ca_file)
        if client_cert is not None:
            client.load_cert_chain(client_cert)
        try:
            async with server:
                try:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=client, server_hostname="localhost"
                    )
                    line = await asyncio.wait_for(reader.readline(), 5)
                    writer.close()
                except (ssl.SSLError, ConnectionError):
                    return None
                return line.decode().removesuffix("\n") if line else None
        finally:
            server.close()

    result = asyncio.run(main())
    return result, handled


def server_handshake_error(server_ctx: ssl.SSLContext, client_cert: Path | None, ca_file: Path) -> str:
    """The server side's verification error for a refused client (plain sockets, to see the reason)."""
    result: list[BaseException | None] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    result.append(None)
            except (ssl.SSLError, OSError) as exc:
                result.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        client = ssl.create_default_context(cafile=ca_file)
        if client_cert is not None:
            client.load_cert_chain(client_cert)
        try:
            with client.wrap_socket(
                socket.create_connection(listener.getsockname()), server_hostname="localhost"
            ) as c:
                c.recv(1)
        except (ssl.SSLError, OSError):
            pass
        thread.join(5)
    assert result and result[0] is not None, "the handshake succeeded"
    return str(result[0])


@pytest.mark.parametrize("ca", ["file", "dir"])
@pytest.mark.parametrize("cred", ["user", "proxy", "proxy2", "proxy3"])
def test_tls_client_certificates(pki: Pki, ca: str, cred: str) -> None:
    if ca == "file":
        ctx = server_ssl_context(pki.host_cert, pki.host_key, ca_file=pki.ca_file)
    else:
        ctx = server_ssl_context(pki.host_cert, pki.host_key, ca_path=pki.ca_dir)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.verify_flags & ssl.VERIFY_ALLOW_PROXY_CERTS
    assert tls_exchange(ctx, pki.creds[cred], pki.ca_file) == (pki.user.dn, 1)


def test_tls_refused_and_anonymous(pki: Pki) -> None:
    ctx = server_ssl_context(pki.host_cert, pki.host_key, ca_path=pki.ca_dir)
    assert tls_exchange(ctx, None, pki.ca_file) == ("", 1)  # optional: no certificate, no DN
    for name, why in [
        ("legacy", "invalid CA certificate"),  # a user certificate cannot sign a non-proxy certificate
        ("rogue", "unable to get local issuer certificate"),
        ("limited_path", "proxy path length constraint exceeded"),
    ]:
        assert tls_exchange(ctx, pki.creds[name], pki.ca_file) == (None, 0), name
        assert why in server_handshake_error(ctx, pki.creds[name], pki.ca_file)

    required = server_ssl_context(pki.host_cert, pki.host_key, ca_file=pki.ca_file, require_client_cert=True)
    assert tls_exchange(required, None, pki.ca_file) == (None, 0)
    assert tls_exchange(required, pki.creds["proxy"], pki.ca_file) == (pki.user.dn, 1)

    # Without VERIFY_ALLOW_PROXY_CERTS OpenSSL refuses the same proxy: the flag is what makes proxies work.
    no_proxies = server_ssl_context(pki.host_cert, pki.host_key, ca_file=pki.ca_file)
    no_proxies.verify_flags &= ~ssl.VERIFY_ALLOW_PROXY_CERTS
    assert tls_exchange(no_proxies, pki.creds["proxy"], pki.ca_file) == (None, 0)
    assert "proxy certificates not allowed" in server_handshake_error(
        no_proxies, pki.creds["proxy"], pki.ca_file
    )
    assert tls_exchange(no_proxies, pki.creds["user"], pki.ca_file) == (pki.user.dn, 1)

    # Without trust anchors no client certificate is asked for.
    plain = server_ssl_context(pki.host_cert, pki.host_key)
    assert plain.verify_mode == ssl.CERT_NONE
    assert tls_exchange(plain, pki.creds["user"], pki.ca_file) == ("", 1)
    with pytest.raises(ValueError):
        server_ssl_context(pki.host_cert, pki.host_key, require_client_cert=True)


def test_tls_proxy_end_to_end(pki: Pki, tmp_path: Path) -> None:
    """A proxy-of-a-proxy handshake, the raw DN from the server side, then the Authenticator."""
    seen: list[str | None] = []
    ctx = server_ssl_context(pki.host_cert, pki.host_key, ca_path=pki.ca_dir)

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(peer_dn_from_ssl_object(writer.get_extra_info("ssl_object")))
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        client = ssl.create_default_context(cafile=pki.ca_file)
        client.load_cert_chain(pki.creds["proxy2"])
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.sockets[0].getsockname()[1], ssl=client, server_hostname="localhost"
            )
            await reader.read()
            writer.close()

    asyncio.run(main())
    raw = seen[0]
    assert raw is not None and raw.startswith(pki.user.dn + "/CN=") and raw.count("/CN=") == 4
    gridmap = tmp_path / "grid-mapfile"
    gridmap.write_text(f'"{pki.user.dn}" alice\n')
    ident = Authenticator(GridMapfile(gridmap), None).authenticate(
        remote_addr="192.0.2.7", authorization=None, peer_dn=raw, secure=True, cid="dune/x"
    )
    assert ident == Identity("x509", ALICE, None, "alice")


def test_peer_dn_without_connection() -> None:
    assert peer_dn_from_ssl_object(None) is None
