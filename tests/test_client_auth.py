"""The client finds credentials the way grid tools do, and uses them against a real HTTPS server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import client_env, rcds, rcds_json
from pki import TokenIssuer, make_ca, make_host_cert, make_proxy, make_user_cert, write_ca_dir
from rcds.client.credentials import CredentialError, find_credentials
from server import RcdsServer, free_port

ISSUER = "https://tokens.example.org"
AUDIENCE = "https://rcds.example"


class Grid:
    """A CA directory, a host certificate, a user with an RFC 3820 proxy in one file, a token issuer."""

    def __init__(self, d: Path) -> None:
        ca = make_ca()
        self.ca_dir = write_ca_dir(d / "certificates", [ca])
        self.host_cert, self.host_key = make_host_cert(ca).write(d, "host")
        alice = make_user_cert(ca, "Alice Smith", uid="alice")
        self.proxy_file = make_proxy(alice).write_proxy_file(d / "x509up_u_alice")
        self.gridmap = d / "grid-mapfile"
        self.gridmap.write_text(f'"{alice.dn}" alice\n')
        self.issuer = TokenIssuer(ISSUER, AUDIENCE, subject="carol-7")
        self.jwks = self.issuer.write_jwks(d / "jwks.json")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    return Grid(tmp_path_factory.mktemp("grid"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grid: Grid) -> Iterator[RcdsServer]:
    port = free_port()
    srv = RcdsServer(
        tmp_path_factory.mktemp("srv"),
        server_config=(
            f'https = ["127.0.0.1:{port}"]\ntls_cert = "{grid.host_cert}"\ntls_key = "{grid.host_key}"\n'
            f'ca_path = "{grid.ca_dir}"\n'
        ),
        extra_config=(
            f'[auth]\nallow_localhost = false\ngridmapfile = "{grid.gridmap}"\naudiences = ["{AUDIENCE}"]\n'
            f'[auth.issuers]\n"{ISSUER}" = "{grid.jwks}"\n'
        ),
    ).start()
    srv.https_url = f"https://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield srv
    srv.close()


def code_dir(root: Path, text: str) -> Path:
    root.mkdir(parents=True)
    (root / "job.py").write_text(text)
    return root


def test_an_x509_proxy_from_x509_user_proxy_publishes_over_https(
    server: RcdsServer, grid: Grid, tmp_path: Path
) -> None:
    env = client_env(
        tmp_path / "home",
        f'servers = ["{server.https_url}"]\ngroup = "alice"\n',  # type: ignore[attr-defined]
        X509_USER_PROXY=str(grid.proxy_file),
        X509_CERT_DIR=str(grid.ca_dir),
    )
    doc = rcds_json("publish", code_dir(tmp_path / "code", "print('x509')\n"), "--wait", env=env)
    assert doc["state"] == "published" and doc["path"].endswith(doc["cid"])


def test_a_bearer_token_file_is_sent_and_accepted(server: RcdsServer, grid: Grid, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(grid.issuer.make_token({"scope": "compute.create"}) + "\n")
    env = client_env(
        tmp_path / "home",
        f'servers = ["{server.https_url}"]\ngroup = "cms"\n',  # type: ignore[attr-defined]
        BEARER_TOKEN_FILE=str(token_file),
        X509_CERT_DIR=str(grid.ca_dir),
    )
    doc = rcds_json("publish", code_dir(tmp_path / "code", "print('token')\n"), "--wait", env=env)
    assert doc["state"] == "published"


def test_no_credentials_is_refused_with_exit_5(server: RcdsServer, grid: Grid, tmp_path: Path) -> None:
    env = client_env(
        tmp_path / "home",
        f'servers = ["{server.https_url}"]\n',  # type: ignore[attr-defined]
        X509_CERT_DIR=str(grid.ca_dir),
    )
    p = rcds("publish", code_dir(tmp_path / "code", "x\n"), env=env)
    assert p.returncode == 5, p.stderr
    assert "HTTP 403" in p.stderr and "Token or client cert required" in p.stderr


def test_an_untrusted_server_certificate_is_not_accepted(server: RcdsServer, tmp_path: Path) -> None:
    other_ca = write_ca_dir(tmp_path / "other-cas", [make_ca("Someone Else's CA")])
    env = client_env(
        tmp_path / "home",
        f'servers = ["{server.https_url}"]\nretries = 1\n',  # type: ignore[attr-defined]
        X509_CERT_DIR=str(other_ca),
    )
    p = rcds("publish", code_dir(tmp_path / "code", "x\n"), env=env)
    assert p.returncode == 4 and "CERTIFICATE_VERIFY_FAILED" in p.stderr


# --- discovery order (WLCG bearer token discovery, then X.509) ------------------------------------


def test_token_discovery_order(tmp_path: Path) -> None:
    uid = 990_000 + os.getpid() % 10_000  # a uid nobody has, so /tmp/bt_u<uid> is ours
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / f"bt_u{uid}").write_text("from-xdg\n")
    named = tmp_path / "named"
    named.write_text("from-file\n")
    base = {"XDG_RUNTIME_DIR": str(runtime)}
    assert find_credentials(
        {**base, "BEARER_TOKEN": "from-env", "BEARER_TOKEN_FILE": str(named)}, uid
    ).token == ("from-env")
    assert find_credentials({**base, "BEARER_TOKEN_FILE": str(named)}, uid).token == "from-file"
    assert find_credentials(base, uid).token == "from-xdg"
    tmp_token = Path(f"/tmp/bt_u{uid}")
    try:
        tmp_token.write_text("from-tmp\n")
        assert find_credentials({}, uid).token == "from-tmp"
    finally:
        tmp_token.unlink()
    with pytest.raises(CredentialError, match="missing or empty"):
        find_credentials({"BEARER_TOKEN_FILE": str(tmp_path / "absent")}, uid)


def test_x509_proxy_discovery_and_permissions(tmp_path: Path, grid: Grid) -> None:
    uid = 980_000 + os.getpid() % 10_000
    creds = find_credentials({"X509_USER_PROXY": str(grid.proxy_file)}, uid)
    assert creds.proxy == grid.proxy_file and creds.token is None
    creds.ssl_context()  # loads the certificate, key and chain
    loose = tmp_path / "loose"
    loose.write_bytes(grid.proxy_file.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by others"):
        find_credentials({"X509_USER_PROXY": str(loose)}, uid)
    with pytest.raises(CredentialError, match="does not exist"):
        find_credentials({"X509_USER_PROXY": str(tmp_path / "none")}, uid)
    assert find_credentials({}, uid).description == "no credentials"


def test_a_token_is_never_sent_in_clear_text_to_another_host() -> None:
    from rcds.client.credentials import Credentials

    creds = Credentials(token="secret")
    assert creds.headers_for("https://rcds.example.org/pubapi/exists") == {"Authorization": "Bearer secret"}
    assert creds.headers_for("http://127.0.0.1:8080/pubapi/exists") == {"Authorization": "Bearer secret"}
    assert creds.headers_for("http://rcds.example.org/pubapi/exists") == {}
