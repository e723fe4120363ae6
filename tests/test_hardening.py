"""Issue 12 (outside attack report): cross-site requests, server-side download tricks, stalled uploads.

Every test runs a real ``rcds serve`` and talks to it over real sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server import RcdsServer, make_tarball


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()  # allow_localhost, as by default
    yield srv
    srv.close()


def spool_files(srv: RcdsServer) -> list[Path]:
    return list((srv.root / "data" / "queue" / "spool").iterdir())


# --- defect 8: cross-site requests under allow_localhost ---------------------------------------------


def test_a_browser_cannot_publish_through_allow_localhost(server: RcdsServer) -> None:
    data = make_tarball({"x.sh": "echo pwned\n"})

    def post(cid: str, headers: dict[str, str]) -> tuple[int, str]:
        r = server.client.post("/pubapi/publish", params={"cid": cid}, content=data, headers=headers)
        return r.status_code, r.text

    # What a page on another site makes the browser send: a "simple" text/plain POST with its Origin.
    form = {"Content-Type": "text/plain"}
    refused = (403, "Cross-site request refused\n")
    assert post("csrf/one", {**form, "Origin": "https://evil.example"}) == refused
    assert post("csrf/two", {**form, "Origin": "null"}) == refused  # sandboxed frames, file: pages
    assert post("csrf/three", {**form, "Origin": f"http://127.0.0.1:{server.port + 1}"}) == refused
    assert post("csrf/four", {**form, "Origin": f"https://127.0.0.1:{server.port}"}) == refused
    # DNS rebinding: the attacker's name resolves to 127.0.0.1, so the page is same-origin and sends no
    # Origin, but the Host header still names the attacker's domain.
    rebound = (403, "Host header does not name this server\n")
    assert post("csrf/five", {"Host": f"rebind.evil.example:{server.port}"}) == rebound
    assert post("csrf/six", {"Host": "127.0.0.1"}) == rebound  # port 80 is not this server
    r = server.client.get("/pubapi/exists", params={"cid": "csrf/one"}, headers={"Host": "evil.example"})
    assert (r.status_code, r.text) == (403, "Host header does not name this server\n")
    for n in ("one", "two", "three", "four", "five", "six"):
        assert server.status(f"csrf/{n}")["state"] == "missing"
    assert spool_files(server) == []

    # curl and the rcds client send no Origin; the server's own origin and names are fine.
    assert post("csrf/curl", {}) == (200, "OK\n")
    assert post("csrf/same-origin", {"Origin": f"http://127.0.0.1:{server.port}"}) == (200, "OK\n")
    assert post("csrf/localhost", {"Host": f"localhost:{server.port}"}) == (200, "OK\n")
    assert post("csrf/ipv6-name", {"Host": f"[::1]:{server.port}"}) == (200, "OK\n")
    # ping and config need no credentials, so nothing is lent: they stay open to anyone.
    assert server.client.get("/pubapi/ping", headers={"Origin": "https://evil.example"}).text == "OK\n"
