"""Issue 12 (outside attack report): cross-site requests, server-side download tricks, stalled uploads.

Every test runs a real ``rcds serve`` and talks to it over real sockets.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pki import TokenIssuer
from rcds.publish.config import settings_from_dict
from rcds.publish.download import address_allowed
from rcds.tomlconfig import ConfigError
from server import RcdsServer, make_tarball

TARBALL = make_tarball({"code.py": "print('fetched')\n"})


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


# --- defect 3: request forgery through publish?source= ------------------------------------------------


class RecordingServer:
    """A real HTTP server on a loopback address that serves ``/p.tar.gz``, redirects as told, and records
    every request line it receives."""

    def __init__(self, address: str, redirects: dict[str, str] | None = None) -> None:
        self.requests: list[str] = []
        self.redirects = redirects or {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(TARBALL)))
                self.end_headers()
                self.wfile.write(TARBALL)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_source_tricks_never_reach_an_internal_host(tmp_path: Path) -> None:
    victim = RecordingServer("127.0.0.1")  # an internal service: must never see a request
    vport = victim.port
    # The one source server the test may use lives on 127.0.0.2, admitted by allow_networks; it redirects
    # the way an attacker-controlled page on an allowed host could.
    origin = RecordingServer(
        "127.0.0.2",
        {
            "/to-localhost": f"http://localhost:{vport}/p.tar.gz",
            "/to-loopback-ip": f"http://127.0.0.1:{vport}/p.tar.gz",
            "/to-userinfo": f"http://127.0.0.2:{{origin}}@127.0.0.1:{vport}/p.tar.gz",
            "/to-ipv6": f"http://[::ffff:127.0.0.1]:{vport}/p.tar.gz",
            "/to-decimal": f"http://2130706433:{vport}/p.tar.gz",
        },
    )
    origin.redirects = {k: v.replace("{origin}", str(origin.port)) for k, v in origin.redirects.items()}
    oport = origin.port
    allow = [f"127.0.0.2:{oport}", "github.com", f"localhost:{vport}", f"127.0.0.1:{vport}", f"[::1]:{vport}"]
    srv = RcdsServer(
        tmp_path,
        f'[source]\nscheme = "http"\nallow = {allow!r}\nallow_networks = ["127.0.0.2/32"]\n'.replace(
            "'", '"'
        ),
    ).start()
    tricks = [
        f"github.com:x@127.0.0.1:{vport}/p.tar.gz",  # userinfo: checked as github.com, fetched from 127.0.0.1
        f"github.com@127.0.0.1:{vport}/p.tar.gz",
        f"github.com\\@127.0.0.1:{vport}/p.tar.gz",  # parsers disagree on backslashes
        f"github.com%40127.0.0.1:{vport}/p.tar.gz",  # percent-encoding in the host
        f"127.0.0.%31:{vport}/p.tar.gz",
        f"2130706433:{vport}/p.tar.gz",  # 127.0.0.1 as a decimal number
        f"0x7f000001:{vport}/p.tar.gz",
        f"127.1:{vport}/p.tar.gz",
        f"0177.0.0.1:{vport}/p.tar.gz",  # octal
        f"[::ffff:127.0.0.1]:{vport}/p.tar.gz",  # IPv6 forms of loopback
        f"[::1]:{vport}/p.tar.gz",
        f"localhost:{vport}/p.tar.gz",  # an allowed name that resolves to loopback
        f"127.0.0.1:{vport}/p.tar.gz",  # allowed by name, but the address is not in allow_networks
        f"github.com:{vport}/p.tar.gz",  # the allowed name on another port
        f"127.0.0.2:{oport}/to-localhost",  # redirects from an allowed server, to internal hosts
        f"127.0.0.2:{oport}/to-loopback-ip",
        f"127.0.0.2:{oport}/to-userinfo",
        f"127.0.0.2:{oport}/to-ipv6",
        f"127.0.0.2:{oport}/to-decimal",
        # malformed sources that used to raise an unhandled invalid-URL error (a 500)
        "127.0.0.2:99999/p.tar.gz",
        f"127.0.0.2:{oport}x/p.tar.gz",
        "[::1/p.tar.gz",
        ":80/p.tar.gz",
        "/p.tar.gz",
        "",
        "exa mple.com/p",
        "bücher.example/p",
        f"127.0.0.2:{oport}/p.tar.gz#frag",
    ]
    try:
        for i, source in enumerate(tricks):
            r = srv.publish(f"ssrf/t{i}", b"", source=source)
            assert r.status_code == 400, (source, r.status_code, r.text)
            for internal in ("127.0.0.1", "localhost", "::1", "2130706433", str(vport)):
                assert internal not in r.text, (source, r.text)
            assert srv.status(f"ssrf/t{i}")["state"] == "missing"
        assert victim.requests == []
        assert list((tmp_path / "data" / "queue" / "spool").iterdir()) == []
        # The same server, reached the allowed way, works: the refusals above are not a broken setup.
        assert srv.publish("ssrf/fine", b"", source=f"127.0.0.2:{oport}/p.tar.gz").text == "OK\n"
        assert srv.wait_state("ssrf/fine")["state"] == "published"
        assert origin.requests[-1] == "/p.tar.gz"
        assert "Traceback" not in srv.log()
    finally:
        srv.close()
        victim.close()
        origin.close()


# --- defect 6: stalled uploads ---------------------------------------------------------------------------

ISSUER = "https://tokens.example.org"
AUDIENCE = "https://rcds.example"
UPLOAD_LIMITS = (
    "[limits]\nupload_idle_timeout = 1.5\nupload_min_rate = 1000\nupload_rate_window = 1.0\n"
    "max_uploads = 100\nmax_uploads_per_identity = 20\nretry_after = 7\n"
)


def open_upload(
    port: int, cid: str, first: bytes = b"x" * 100, length: int = 100_000, token: str | None = None
) -> socket.socket:
    """A raw POST that announces ``length`` bytes of body and sends only ``first``."""
    sock = socket.create_connection(("127.0.0.1", port))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /pubapi/publish?cid={cid} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + first)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """One response (headers and a Content-Length body), without waiting for the connection to close."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def request_log_lines(srv: RcdsServer, status: int) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    return [d for d in lines if d.get("event") == "request" and d.get("status") == status]


def test_stalled_uploads_are_cut_and_cannot_crowd_out_others(tmp_path: Path) -> None:
    issuer = TokenIssuer(ISSUER, AUDIENCE, subject="carol")
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    srv = RcdsServer(
        tmp_path,
        server_config="idle_timeout = 2.0\n",
        extra_config=(
            f'{UPLOAD_LIMITS}[auth]\ngridmapfile = ""\naudiences = ["{AUDIENCE}"]\n'
            f'[auth.issuers]\n"{ISSUER}" = "{jwks}"\n'
        ),
    ).start()
    sockets: list[socket.socket] = []
    try:
        # localhost (one identity) starts 20 uploads and stalls: its whole share.
        started = time.monotonic()
        stalled = [open_upload(srv.port, f"stall/s{i}") for i in range(20)]
        sockets += stalled
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not list((tmp_path / "data" / "queue" / "spool").iterdir()):
            time.sleep(0.01)
        time.sleep(0.3)  # every stalled upload has its slot and spool file
        # 40 more from the same identity are refused at once, with Retry-After, not queued behind the stalls.
        refused = [open_upload(srv.port, f"stall/r{i}") for i in range(40)]
        sockets += refused
        for sock in refused:
            answer = read_response(sock, 1.0)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"\r\nRetry-After: 7\r\n" in answer
            assert answer.endswith(b"Service busy: too many uploads in progress, retry later\n")
        assert time.monotonic() - started < 1.5  # answered before the stalls time out
        # Another identity publishes normally meanwhile; its trickle (50 bytes/s, never idle for long) is
        # cut by the minimum rate.
        token = issuer.make_token({"scope": "compute.create"})
        data = make_tarball({"ok.txt": "fine\n"})
        r = srv.client.post(
            "/pubapi/publish", params={"cid": "stall/normal"}, content=data,
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        assert r.text == "OK\n"
        assert srv.wait_state("stall/normal")["state"] == "published"
        trickle = open_upload(srv.port, "stall/trickle", first=b"", token=token)
        sockets.append(trickle)
        trickle_started = time.monotonic()
        try:
            for _ in range(15):
                trickle.sendall(b"y" * 10)
                time.sleep(0.2)
        except OSError:  # cut while trickling: what should happen
            pass
        # A connection that never finishes its headers is closed after server.idle_timeout.
        header_stall = socket.create_connection(("127.0.0.1", srv.port))
        sockets.append(header_stall)
        header_stall.sendall(b"POST /pubapi/publish?cid=stall/h HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        header_started = time.monotonic()

        # The stalled uploads are cut after the idle timeout (1.5 s), with a 408, and the socket closed.
        for sock in stalled:
            answer = read_until_closed(sock, 5.0)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert answer.endswith(b"Bad request: upload stalled: no data for 1.5 s\n")
        assert 1.5 <= time.monotonic() - started < 6
        answer = read_until_closed(trickle, 5.0)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"slower than 1000 bytes/s" in answer
        assert time.monotonic() - trickle_started < 3.0  # never idle for 1.5 s, cut by the rate
        assert read_until_closed(header_stall, 5.0) == b""  # closed, nothing to answer
        assert 1.5 <= time.monotonic() - header_started < 5

        # Nothing is left behind, and the identity's slots are free again.
        assert spool_files(srv) == []
        for cid in ("stall/s0", "stall/s19", "stall/r0", "stall/trickle"):
            assert srv.status(cid)["state"] == "missing"
        assert srv.publish("stall/after", make_tarball({"a": "b"})).text == "OK\n"
        # The log stays bounded: 40 refusals and 21 cuts give at most 10 lines each per 10 s.
        assert 1 <= len(request_log_lines(srv, 503)) <= 10
        assert 1 <= len(request_log_lines(srv, 408)) <= 10
        assert "Traceback" not in srv.log()
    finally:
        for sock in sockets:
            sock.close()
        srv.close()


def test_connections_over_the_cap_get_a_503_and_idle_ones_are_closed(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path, server_config="idle_timeout = 1.5\nmax_connections = 30\n").start()
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(40)]
        time.sleep(0.3)
        answered, _, _ = select.select(idle, [], [], 0.1)  # the ones over the cap, answered at once
        assert 10 <= len(answered) <= 11  # 30 at most, counting the test client's keep-alive connection
        for sock in answered:
            answer = read_until_closed(sock, 1.0)
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\n"), answer
            assert answer.endswith(b"Service busy: too many connections, retry later\n")
        # Connections that never send a request are closed after server.idle_timeout, freeing their slots.
        started = time.monotonic()
        for sock in idle:
            if sock not in answered:
                assert read_until_closed(sock, 3.0) == b""
        assert time.monotonic() - started < 2.5
        # 10 + 1 refusals, but the warning is logged at a bounded rate.
        assert 1 <= srv.log().count("connection refused:") <= 10
        assert srv.publish("cap/after", make_tarball({"a": "b"})).text == "OK\n"
        assert "Traceback" not in srv.log()
    finally:
        for sock in idle:
            sock.close()
        srv.close()


def test_running_out_of_file_descriptors_gives_503_not_500(tmp_path: Path) -> None:
    # A deliberately wrong configuration: more connections and uploads than 160 descriptors can hold.
    limits = UPLOAD_LIMITS.replace("max_uploads = 100", "max_uploads = 400").replace(
        "max_uploads_per_identity = 20", "max_uploads_per_identity = 400"
    )
    srv = RcdsServer(tmp_path, server_config="max_connections = 400\n", extra_config=limits)
    srv.start(max_open_files=160)
    sockets: list[socket.socket] = []
    try:
        sockets = [open_upload(srv.port, f"fd/s{i}") for i in range(120)]
        answers = [read_response(sock, 1.0) if _readable(sock) else b"" for sock in sockets]
        statuses = {a.split(b" ", 2)[1] for a in answers if a}
        assert b"500" not in statuses
        assert b"503" in statuses, statuses
        assert any(a.endswith(b"Service busy: out of file descriptors, retry later\n") for a in answers)
        for sock in sockets:
            sock.close()
        time.sleep(2.0)  # the stalled ones are cut after 1.5 s
        assert srv.publish("fd/after", make_tarball({"a": "b"})).text == "OK\n"
        assert srv.wait_state("fd/after")["state"] == "published"
        assert spool_files(srv) == []
        assert len(request_log_lines(srv, 503)) <= 10
        assert "Traceback" not in srv.log()  # nothing died: the publish workers survived EMFILE too
    finally:
        for sock in sockets:
            sock.close()
        srv.close()


def _readable(sock: socket.socket, timeout: float = 0.5) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("0.0.0.0", False),  # connects to the local host on Linux
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata service
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("2002:a01:203::", False),  # 6to4 around 10.1.2.3
        ("64:ff9b::7f00:1", False),  # NAT64 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 around 169.254.169.254
    ],
)
def test_only_public_addresses_are_reachable_by_default(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), ()) is allowed


def test_allow_networks_admits_exactly_the_listed_networks(tmp_path: Path) -> None:
    nets = (ipaddress.ip_network("10.1.2.0/24"),)
    assert address_allowed(ipaddress.ip_address("10.1.2.200"), nets)
    assert address_allowed(ipaddress.ip_address("::ffff:10.1.2.3"), nets)
    assert not address_allowed(ipaddress.ip_address("10.1.3.1"), nets)
    base: dict[str, object] = {"repository": [{"name": "r.example"}]}
    with pytest.raises(ConfigError, match="allow_networks"):
        settings_from_dict({**base, "source": {"allow_networks": ["10.1.2.0/33"]}}, tmp_path)
    with pytest.raises(ConfigError, match="max_uploads"):
        settings_from_dict({**base, "limits": {"max_uploads_per_identity": 0}}, tmp_path)
    defaults = settings_from_dict(base, tmp_path)
    # A 3 GB upload over 1 Mbit/s (125 kB/s) is far above the minimum rate and never idle for a minute.
    assert defaults.uploads.min_rate * 100 < 125_000 and defaults.uploads.idle_timeout >= 60
    assert defaults.source.allow_networks == ()
