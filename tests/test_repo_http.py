"""Tests for serving repositories over HTTP (rcds.web.repo_http), against a real socket."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from rcds.web import repo_http
from rcds.web.repo_http import make_app

FQRN = "test.example.org"
MANIFEST = b"C0123456789abcdef0123456789abcdef01234567\nNtest.example.org\nS3\n--\nabc\n\x00\x01signature"
CATALOG_NAME = "ab/" + "cd" * 19 + "C"  # 38 hex + suffix
CATALOG = b"x\x9c" + bytes(range(256)) * 4
RMD_NAME = "0f/" + "e" * 38 + "-rmd160P"
BIG_NAME = "12/" + "3" * 38  # whole-file object, no suffix
BIG = os.urandom(5 * 1024 * 1024 + 123)
STATUS_JSON = b'{"last_snapshot": "Thu Oct 17 12:00:00 UTC 2024"}'

SERVER_HEADERS = {"date", "server", "content-length", "content-type", "cache-control", "expires"}


def _make_storage(root: Path) -> Path:
    (root / ".cvmfspublished").write_bytes(MANIFEST)
    (root / ".cvmfspublished.gz").write_bytes(b"GZIP SIBLING, NEVER SERVE")
    (root / ".cvmfswhitelist").write_bytes(b"20240101000000\nE20990101000000\n--\nsig")
    (root / ".cvmfs_master_replica").write_bytes(b"")
    (root / ".cvmfs_status.json").write_bytes(STATUS_JSON)
    os.mkfifo(root / ".cvmfs_is_snapshotting")  # allowlisted name but not a regular file
    for name, data in ((CATALOG_NAME, CATALOG), (RMD_NAME, b"chunk"), (BIG_NAME, BIG)):
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_bytes(data)
    (root / "data" / "ab" / ("CD" * 19 + "C")).write_bytes(b"uppercase name")
    (root / "data" / "ab" / ("cd" * 19 + "T")).write_bytes(b"temporary suffix")
    (root / "data" / "ab" / ("ef" * 19)).mkdir()  # a directory with an object's name
    (root / "data" / "txn").mkdir()
    (root / "data" / "txn" / "x").write_bytes(b"staging")
    os.symlink(root / "data" / CATALOG_NAME, root / (".cvmfsalt-ab" + "cd" * 19 + "C"))
    (root / ".rcds" / "keys").mkdir(parents=True)
    (root / ".rcds" / "keys" / "secret").write_bytes(b"PRIVATE KEY")
    return root


@dataclass
class Server:
    base: str
    port: int
    repos: dict[str, Path]
    storage: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    storage = _make_storage(tmp_path_factory.mktemp("storage"))
    repos = {FQRN: storage}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner_box: list[web.AppRunner] = []

    async def start() -> int:
        runner = web.AppRunner(make_app(repos))
        await runner.setup()
        runner_box.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=5)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, repos, storage)
    finally:
        if runner_box:
            asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=5) as c:
        yield c


def _raw(server: Server, method: str, target: str) -> tuple[int, bytes]:
    """Send the request target byte for byte (httpx would normalize "..")."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _assert_cache_headers(resp: httpx.Response, content_type: str, cache_control: str, ttl: int) -> None:
    assert set(resp.headers.keys()) == SERVER_HEADERS, resp.headers
    assert resp.headers["content-type"] == content_type
    assert resp.headers["cache-control"] == cache_control
    date = parsedate_to_datetime(resp.headers["date"])
    expires = parsedate_to_datetime(resp.headers["expires"])
    assert resp.headers["expires"].endswith(" GMT")
    assert (expires - date).total_seconds() == ttl
    assert "content-encoding" not in resp.headers
    assert resp.headers.get("connection", "keep-alive").lower() != "close"


# ---- allowlisted files and their headers -------------------------------------------------------------


def test_manifest_headers_and_body(client: httpx.Client) -> None:
    resp = client.get(f"/cvmfs/{FQRN}/.cvmfspublished")
    assert resp.status_code == 200
    assert resp.content == MANIFEST
    assert resp.headers["content-length"] == str(len(MANIFEST))
    _assert_cache_headers(resp, "application/x-cvmfs", "max-age=61", 61)


@pytest.mark.parametrize(
    ("name", "body"),
    [(".cvmfswhitelist", None), (".cvmfs_master_replica", b""), (".cvmfs_status.json", STATUS_JSON)],
)
def test_other_root_files(client: httpx.Client, name: str, body: bytes | None) -> None:
    resp = client.get(f"/cvmfs/{FQRN}/{name}")
    assert resp.status_code == 200
    if body is not None:
        assert resp.content == body
    # .cvmfs_status.json: Apache's ForceType for ^\.cvmfs wins over AddType .json
    _assert_cache_headers(resp, "application/x-cvmfs", "max-age=61", 61)


@pytest.mark.parametrize("name", [CATALOG_NAME, RMD_NAME])
def test_data_object_headers(client: httpx.Client, server: Server, name: str) -> None:
    resp = client.get(f"/cvmfs/{FQRN}/data/{name}")
    assert resp.status_code == 200
    assert resp.content == (server.storage / "data" / name).read_bytes()
    _assert_cache_headers(resp, "application/octet-stream", "public, max-age=259200", 259200)


def test_head(client: httpx.Client) -> None:
    resp = client.head(f"/cvmfs/{FQRN}/.cvmfs_master_replica")
    assert resp.status_code == 200
    assert resp.content == b""
    _assert_cache_headers(resp, "application/x-cvmfs", "max-age=61", 61)
    resp = client.head(f"/cvmfs/{FQRN}/data/{CATALOG_NAME}")
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["content-length"] == str(len(CATALOG))
    _assert_cache_headers(resp, "application/octet-stream", "public, max-age=259200", 259200)
    assert client.head(f"/cvmfs/{FQRN}/.cvmfs_last_snapshot").status_code == 404
    assert client.head(f"/cvmfs/{FQRN}/.rcds/keys/secret").status_code == 404


def test_conditional_and_range_requests_are_ignored(client: httpx.Client) -> None:
    for headers in (
        {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"},
        {"If-None-Match": "*"},
        {"If-Match": '"nope"'},
        {"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
        {"Range": "bytes=0-9"},
        {"Pragma": "no-cache", "Cache-Control": "no-cache"},
    ):
        resp = client.get(f"/cvmfs/{FQRN}/data/{CATALOG_NAME}", headers=headers)
        assert resp.status_code == 200, headers
        assert resp.content == CATALOG
        assert "last-modified" not in resp.headers
        assert "etag" not in resp.headers
        assert "accept-ranges" not in resp.headers
        assert "content-range" not in resp.headers


def test_accept_encoding_does_not_change_bytes(client: httpx.Client) -> None:
    for name, body in ((".cvmfspublished", MANIFEST), (f"data/{CATALOG_NAME}", CATALOG)):
        resp = client.get(f"/cvmfs/{FQRN}/{name}", headers={"Accept-Encoding": "gzip, br, deflate"})
        assert resp.status_code == 200
        assert "content-encoding" not in resp.headers
        assert "vary" not in resp.headers
        assert resp.content == body  # not the .gz sibling, not recompressed


@pytest.mark.parametrize("sendfile", [True, False])
def test_large_object_streams_intact(server: Server, monkeypatch: pytest.MonkeyPatch, sendfile: bool) -> None:
    monkeypatch.setattr(repo_http, "_USE_SENDFILE", sendfile)
    digest = hashlib.sha256()
    received = 0
    with (
        httpx.Client(base_url=server.base, timeout=5) as c,
        c.stream("GET", f"/cvmfs/{FQRN}/data/{BIG_NAME}") as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(len(BIG))
        assert resp.headers["content-type"] == "application/octet-stream"
        for chunk in resp.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    assert received == len(BIG)
    assert digest.digest() == hashlib.sha256(BIG).digest()


_REAL_OPEN = repo_http._open_regular


def _claiming_10_more_bytes(path: str) -> tuple[int, int] | None:
    """``_open_regular`` for a file that shrinks between ``fstat`` and the read."""
    opened = _REAL_OPEN(path)
    return None if opened is None else (opened[0], opened[1] + 10)


@pytest.mark.parametrize("sendfile", [True, False])
def test_large_file_shrinking_while_served_drops_connection(
    server: Server, monkeypatch: pytest.MonkeyPatch, sendfile: bool
) -> None:
    """Content-Length is already sent when a streamed body falls short: the connection must be cut, not
    padded."""
    monkeypatch.setattr(repo_http, "_USE_SENDFILE", sendfile)
    monkeypatch.setattr(repo_http, "_open_regular", _claiming_10_more_bytes)
    with httpx.Client(base_url=server.base, timeout=5) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"/cvmfs/{FQRN}/data/{BIG_NAME}")
        monkeypatch.setattr(repo_http, "_open_regular", _REAL_OPEN)
        assert c.get(f"/cvmfs/{FQRN}/data/{BIG_NAME}").content == BIG


@pytest.mark.parametrize("nowait", [True, False])
def test_small_file_shrinking_while_served_is_an_error(
    server: Server, monkeypatch: pytest.MonkeyPatch, nowait: bool
) -> None:
    """A small file is read whole before anything is sent: a short read is a 500, never a short body."""
    monkeypatch.setattr(repo_http, "_use_nowait", nowait)
    monkeypatch.setattr(repo_http, "_open_regular", _claiming_10_more_bytes)
    with httpx.Client(base_url=server.base, timeout=5) as c:
        assert c.get(f"/cvmfs/{FQRN}/data/{CATALOG_NAME}").status_code == 500
        monkeypatch.setattr(repo_http, "_open_regular", _REAL_OPEN)
        assert c.get(f"/cvmfs/{FQRN}/data/{CATALOG_NAME}").content == CATALOG


@pytest.mark.parametrize("nowait", [True, False])
def test_small_file_read_from_cache_or_thread(
    server: Server, monkeypatch: pytest.MonkeyPatch, nowait: bool
) -> None:
    """Both ways of reading a small file (page cache in the loop, else a worker thread) answer the same."""
    monkeypatch.setattr(repo_http, "_use_nowait", nowait)
    with httpx.Client(base_url=server.base, timeout=5) as c:
        for name, body in ((".cvmfspublished", MANIFEST), (f"data/{CATALOG_NAME}", CATALOG)):
            resp = c.get(f"/cvmfs/{FQRN}/{name}")
            assert resp.status_code == 200
            assert resp.content == body
            assert resp.headers["content-length"] == str(len(body))
            assert set(resp.headers) == SERVER_HEADERS


def test_not_cached_file_is_read_on_a_thread(tmp_path: Path) -> None:
    """RWF_NOWAIT refuses a file whose pages are not in memory (dropped with POSIX_FADV_DONTNEED): the
    server must then read it on a thread rather than in its event loop."""
    f = tmp_path / "obj"
    f.write_bytes(os.urandom(64 * 1024))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cached = repo_http._read_cached(fd, 64 * 1024)
        if cached is not None:
            pytest.skip("this file system keeps the pages (or ignores RWF_NOWAIT)")
        assert bytes(repo_http._read_whole(fd, 64 * 1024)) == f.read_bytes()
        assert repo_http._read_cached(fd, 64 * 1024) == f.read_bytes()  # now it is cached
    finally:
        os.close(fd)


def test_keep_alive(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", f"/cvmfs/{FQRN}/.cvmfspublished")
        assert conn.getresponse().read() == MANIFEST
        sock = conn.sock
        assert sock is not None
        conn.request("GET", f"/cvmfs/{FQRN}/data/{BIG_NAME}")
        assert conn.getresponse().read() == BIG
        conn.request("HEAD", f"/cvmfs/{FQRN}/data/{CATALOG_NAME}")
        assert conn.getresponse().read() == b""
        conn.request("GET", f"/cvmfs/{FQRN}/data/{CATALOG_NAME}")
        assert conn.getresponse().read() == CATALOG
        assert conn.sock is sock  # the same connection served all four
    finally:
        conn.close()


# ---- everything else is 404 ---------------------------------------------------------------------------

NOT_FOUND = [
    # private directory and staging
    f"/cvmfs/{FQRN}/.rcds/keys/secret",
    f"/cvmfs/{FQRN}/.rcds/keys/",
    f"/cvmfs/{FQRN}/.rcds",
    f"/cvmfs/{FQRN}/data/txn/x",
    f"/cvmfs/{FQRN}/data/txn/",
    # traversal, literal and encoded
    f"/cvmfs/{FQRN}/data/../.rcds/keys/secret",
    f"/cvmfs/{FQRN}/../{FQRN}/.rcds/keys/secret",
    f"/cvmfs/{FQRN}/data/ab/../../.cvmfspublished",
    f"/cvmfs/{FQRN}/./.cvmfspublished",
    "/cvmfs/../etc/passwd",
    f"/cvmfs/{FQRN}/%2e%2e/%2e%2e/etc/passwd",
    f"/cvmfs/{FQRN}/data/%2e%2e/.rcds/keys/secret",
    f"/cvmfs/{FQRN}/data/%2E%2E/.rcds/keys/secret",
    # encoded slashes, backslashes and other escapes of otherwise valid names
    f"/cvmfs/{FQRN}/.rcds%2fkeys%2fsecret",
    f"/cvmfs/{FQRN}/data%2F{CATALOG_NAME.replace('/', '%2F')}",
    f"/cvmfs/{FQRN}/data\\{CATALOG_NAME.replace('/', chr(92))}",
    f"/cvmfs/{FQRN}/%2ecvmfspublished",
    f"/cvmfs/{FQRN}/.cvmfspublished%00",
    f"/cvmfs/{FQRN.replace('.', '%2e')}/.cvmfspublished",
    # directories, never listed
    "/cvmfs/",
    f"/cvmfs/{FQRN}",
    f"/cvmfs/{FQRN}/",
    f"/cvmfs/{FQRN}/data",
    f"/cvmfs/{FQRN}/data/",
    f"/cvmfs/{FQRN}/data/ab",
    f"/cvmfs/{FQRN}/data/ab/",
    f"/cvmfs/{FQRN}/data/ab/{'ef' * 19}",
    f"//cvmfs/{FQRN}/.cvmfspublished",
    f"/cvmfs//{FQRN}/.cvmfspublished",
    f"/cvmfs/{FQRN}//.cvmfspublished",
    # names outside the allowlist, even though the file exists
    f"/cvmfs/{FQRN}/.cvmfspublished.gz",
    f"/cvmfs/{FQRN}/.cvmfsalt-ab{'cd' * 19}C",
    f"/cvmfs/{FQRN}/data/ab/{'CD' * 19}C",
    f"/cvmfs/{FQRN}/data/ab/{'cd' * 19}T",
    f"/cvmfs/{FQRN}/data/{CATALOG_NAME}/",
    # allowlisted names that are missing or not regular files (a FIFO must not hang the server)
    f"/cvmfs/{FQRN}/.cvmfs_last_snapshot",
    f"/cvmfs/{FQRN}/.cvmfs_is_snapshotting",
    f"/cvmfs/{FQRN}/data/ff/{'f' * 38}",
    # unknown repository
    "/cvmfs/other.example.org/.cvmfspublished",
    f"/cvmfs/other.example.org/data/{CATALOG_NAME}",
    "/cvmfs/info/v1/",
    "/cvmfs/info/v1/meta.json",
    "/",
    f"/{FQRN}/.cvmfspublished",
]


def test_not_found(server: Server) -> None:
    for target in NOT_FOUND:
        for method in ("GET", "HEAD"):
            status, body = _raw(server, method, target)
            assert status == 404, (method, target)
            assert b"PRIVATE" not in body and b"staging" not in body


def test_not_found_via_httpx(client: httpx.Client) -> None:
    private = f"/cvmfs/{FQRN}/.rcds/keys/secret"
    for path in (private, f"/cvmfs/{FQRN}/data/txn/x", "/cvmfs/nope.example.org/.cvmfspublished"):
        resp = client.get(path)
        assert resp.status_code == 404
        assert b"PRIVATE" not in resp.content
        # never negatively cached by a proxy: the name may be published a moment later
        assert resp.headers["Cache-Control"] == "no-store"


def test_other_methods_rejected(server: Server) -> None:
    for method in ("POST", "PUT", "DELETE"):
        status, _ = _raw(server, method, f"/cvmfs/{FQRN}/.cvmfspublished")
        assert status == 405


def test_absolute_form_request_target(server: Server) -> None:
    status, body = _raw(server, "GET", f"http://proxy.example/cvmfs/{FQRN}/.cvmfspublished")
    assert (status, body) == (200, MANIFEST)
    status, _ = _raw(server, "GET", f"http://proxy.example/cvmfs/{FQRN}/.rcds/keys/secret")
    assert status == 404


# ---- repositories.json and a mapping that changes at runtime ------------------------------------------


def test_repositories_json_and_runtime_changes(client: httpx.Client, server: Server, tmp_path: Path) -> None:
    resp = client.get("/cvmfs/info/v1/repositories.json")
    assert resp.status_code == 200
    _assert_cache_headers(resp, "application/json", "max-age=61", 61)
    assert resp.json() == {
        "schema": 1,
        "repositories": [{"name": FQRN, "url": f"/cvmfs/{FQRN}"}],
        "replicas": [],
    }
    assert client.head("/cvmfs/info/v1/repositories.json").status_code == 200

    new = "new.example.org"
    (tmp_path / ".cvmfspublished").write_bytes(b"new manifest")
    assert client.get(f"/cvmfs/{new}/.cvmfspublished").status_code == 404
    server.repos[new] = tmp_path
    try:
        resp = client.get(f"/cvmfs/{new}/.cvmfspublished")
        assert (resp.status_code, resp.content) == (200, b"new manifest")
        names = [r["name"] for r in client.get("/cvmfs/info/v1/repositories.json").json()["repositories"]]
        assert names == [new, FQRN]
    finally:
        del server.repos[new]
    assert client.get(f"/cvmfs/{new}/.cvmfspublished").status_code == 404


# ---- run() --------------------------------------------------------------------------------------------


def test_run_prints_urls_and_serves(server: Server) -> None:
    code = (
        "import sys; from pathlib import Path; from rcds.web.repo_http import run; "
        f"run({{{FQRN!r}: Path(sys.argv[1])}}, port=0)"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(server.storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=10), "run() printed nothing"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith(f"/cvmfs/{FQRN}"), url
        assert not url.startswith("http://127.0.0.1:0/")
        resp = httpx.get(url + "/.cvmfspublished", timeout=5)
        assert (resp.status_code, resp.content) == (200, MANIFEST)
        assert httpx.get(url + "/.rcds/keys/secret", timeout=5).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_expires_tracks_access_time(client: httpx.Client) -> None:
    first = parsedate_to_datetime(client.get(f"/cvmfs/{FQRN}/.cvmfswhitelist").headers["expires"])
    assert abs(first.timestamp() - (time.time() + 61)) <= 2
    body = json.loads(client.get(f"/cvmfs/{FQRN}/.cvmfs_status.json").content)
    assert body["last_snapshot"].startswith("Thu")
