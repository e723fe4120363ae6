"""The publish API of a real ``rcds serve`` process: wire format, publishing, queue durability, limits."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from server import REPOS, RcdsServer, make_tarball

CODE = {"run.sh": "#!/bin/sh\necho hello\n", "lib/": b"", "lib/util.py": "X = 1\n", "README": "readme\n"}


def cid_of(data: bytes, group: str = "myexp") -> str:
    return f"{group}/{hashlib.sha256(data).hexdigest()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path)
    yield srv
    srv.close()


def reader_for(srv: RcdsServer, repo: str) -> RepositoryReader:
    key = srv.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    return RepositoryReader.open(
        f"{srv.url}/cvmfs/{repo}", key, cache_dir=srv.root / f"cache-{time.monotonic_ns()}"
    )


# --- wire format -----------------------------------------------------------------------------------


def test_ping_and_config_need_no_credentials(server: RcdsServer) -> None:
    r = server.api("ping")
    assert (r.status_code, r.text) == (200, "OK\n")
    assert r.headers["cache-control"] == "max-age=0"
    assert r.headers["content-type"].startswith("text/plain")
    assert server.api("config").text == f"repos:{','.join(REPOS)}\n"


def test_any_method_and_a_doubled_slash_are_accepted(server: RcdsServer) -> None:
    assert server.api("ping", method="POST").text == "OK\n"
    # justIN's client sends https://host//pubapi/... (httpx would read "//pubapi" as a host name)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET //pubapi/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nrepos:user1.rcds.test,user2.rcds.test\n")


def test_unknown_endpoint_is_404(server: RcdsServer) -> None:
    r = server.api("delete", cid="a/b")
    assert (r.status_code, r.text) == (404, "Unrecognized api\n")
    assert r.reason_phrase == "Not found"


@pytest.mark.parametrize("endpoint", ["exists", "update", "publish"])
def test_endpoints_without_cid_are_400(server: RcdsServer, endpoint: str) -> None:
    r = server.api(endpoint, method="POST" if endpoint == "publish" else "GET")
    assert (r.status_code, r.text) == (400, f"Bad request: {endpoint} with no cid\n")
    assert r.reason_phrase == "Bad request"


@pytest.mark.parametrize(
    ("cid", "reason"),
    [
        ("../etc", 'cid may not start with "."'),
        (".hidden", 'cid may not start with "."'),
        ("/abs/olute", 'cid may not start with "/"'),
        ("a/b/c", "at most one slash allowed in cid"),
        ("a//b", "at most one slash allowed in cid"),
        ("a/", "empty component in cid"),
        ("grp/..", 'cid components may not start with "."'),
        ("it's", "disallowed character in cid"),
        ("a b", "disallowed character in cid"),
        ("a,b", "disallowed character in cid"),
        ("$(reboot)", "disallowed character in cid"),
        ("back\\slash", "disallowed character in cid"),
        ("-rf", "disallowed character in cid"),
        ("x" * 201, "cid longer than 200 characters"),
        ("", "empty cid"),
    ],
)
def test_bad_cids_are_400_with_the_reason(server: RcdsServer, cid: str, reason: str) -> None:
    r = server.publish(cid, make_tarball(CODE))
    assert r.status_code == 400
    assert r.text.startswith(f"Bad request: {reason}")
    assert r.text.endswith("\n")
    assert server.api("exists", cid=cid).status_code == 400


def test_query_values_are_decoded_once(server: RcdsServer) -> None:
    # %252F is a literal "%2F" after one decoding: not a slash, and not an allowed character.
    r = server.client.get("/pubapi/exists?cid=grp%252Fabc")
    assert r.text.startswith("Bad request: disallowed character")
    assert server.client.get("/pubapi/exists?cid=grp%2Fabc").text == "MISSING\n"


def test_bad_striplevels_is_400(server: RcdsServer) -> None:
    r = server.publish("myexp/strip", make_tarball(CODE), striplevels="3")
    assert (r.status_code, r.text) == (400, "Bad request: only striplevels 0, 1, and 2 supported\n")
    assert server.status("myexp/strip")["state"] == "missing"


# --- publishing ------------------------------------------------------------------------------------


def test_publish_then_exists_then_read_back_over_http(server: RcdsServer) -> None:
    data = make_tarball(CODE)
    cid = cid_of(data)
    assert server.api("exists", cid=cid).text == "MISSING\n"
    r = server.publish(cid, data)
    assert (r.status_code, r.text) == (200, "OK\n")
    doc = server.wait_state(cid)
    assert doc["state"] == "published", doc
    repo = doc["repository"]
    path = f"/cvmfs/{repo}/sw/{cid}"
    assert doc["path"] == path
    assert server.api("exists", cid=cid).text == f"PRESENT:{path}\n"
    with reader_for(server, repo) as reader:
        assert reader.read(f"/sw/{cid}/run.sh") == b"#!/bin/sh\necho hello\n"
        assert reader.stat(f"/sw/{cid}/run.sh").mode & 0o777 == 0o755
        assert reader.read(f"/sw/{cid}/lib/util.py") == b"X = 1\n"
        assert reader.read(f"/sw/{cid}/.publisher") == b"localhost\n"
        assert reader.lookup(f"/sw/{cid}/.cvmfscatalog") is not None
        assert reader.revision == doc["revision"]


def test_a_tarball_of_many_small_files_is_stored_by_the_servers_worker_processes(server: RcdsServer) -> None:
    """Past 1,000 small files the server hands them to worker processes (rcds.cvmfs.smallfiles): the
    tarball publishes whole and reads back, and the workers are the server's children."""
    files = {f"pkg/m{i // 100}/f{i}.py": f"VALUE = {i}\n" * (1 + i % 50) for i in range(1500)}
    data = make_tarball(files)
    cid = cid_of(data)
    assert server.publish(cid, data).text == "OK\n"
    doc = server.wait_state(cid)
    assert doc["state"] == "published", doc
    workers = [
        pid for pid in os.listdir("/proc")
        if pid.isdigit() and server.proc is not None and _parent_of(int(pid)) == server.proc.pid
        and b"worker_main" in _cmdline(int(pid))
    ]  # fmt: skip
    assert len(workers) == (os.cpu_count() or 2)
    started = server.log_events("small-file worker started")
    assert sorted(e["pid"] for e in started) == sorted(map(int, workers))  # the operator's log names them
    with reader_for(server, doc["repository"]) as reader:
        for i in (0, 777, 1499):
            assert (
                reader.read(f"/sw/{cid}/pkg/m{i // 100}/f{i}.py")
                == files[f"pkg/m{i // 100}/f{i}.py"].encode()
            )
        assert len(reader.listdir(f"/sw/{cid}/pkg/m7")) == 100


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_publishing_a_present_cid_answers_present_and_refreshes_its_last_use(server: RcdsServer) -> None:
    data = make_tarball({**CODE, "v": "2"})
    cid = cid_of(data)
    server.publish(cid, data)
    doc = server.wait_state(cid)
    first_use = doc["last_used"]
    time.sleep(0.05)
    r = server.publish(cid, data)
    assert r.text == f"PRESENT:{doc['path']}\n"
    time.sleep(0.5)  # touches are flushed in batches (every 0.2 s in this configuration)
    assert server.status(cid)["last_used"] > first_use
    second_use = server.status(cid)["last_used"]
    time.sleep(0.05)
    assert server.api("update", cid=cid).text == f"PRESENT:{doc['path']}\n"
    time.sleep(0.5)
    assert server.status(cid)["last_used"] > second_use
    assert server.api("update", cid="myexp/never-published").text == "MISSING\n"


def test_one_level_cids_and_striplevels(server: RcdsServer) -> None:
    data = make_tarball({"top/": b"", "top/inner/": b"", "top/inner/file.txt": "deep\n"})
    cid = "onelevel" + hashlib.sha1(data).hexdigest()
    assert server.publish(cid, data, striplevels="2").text == "OK\n"
    doc = server.wait_state(cid)
    assert doc["state"] == "published"
    assert doc["path"].endswith(f"/sw/{cid}")
    with reader_for(server, doc["repository"]) as reader:
        assert reader.read(f"/sw/{cid}/file.txt") == b"deep\n"


def test_a_rejected_tarball_is_failed_with_its_reason_and_changes_nothing(server: RcdsServer) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    revisions = {r: Repository(server.storage(r)).manifest().revision for r in REPOS}
    assert server.publish("myexp/hostile", buf.getvalue()).text == "OK\n"
    doc = server.wait_state("myexp/hostile")
    assert doc["state"] == "failed"
    assert "rejected" in doc["reason"] and ".." in doc["reason"]
    assert server.api("exists", cid="myexp/hostile").text == "MISSING\n"
    time.sleep(0.3)
    for r in REPOS:
        repo = Repository(server.storage(r))
        assert repo.manifest().revision == revisions[r] or not _has(server, r, "/sw/myexp/hostile")
        assert_repository_ok(repo)
    # Not stuck: a good tarball under the same CID publishes.
    assert server.publish("myexp/hostile", make_tarball(CODE)).text == "OK\n"
    assert server.wait_state("myexp/hostile")["state"] == "published"


def assert_repository_ok(repo: Repository) -> None:
    with RepositoryReader.open(
        repo.storage, repo.public_key_path, cache_dir=repo.storage.parent / "check-cache"
    ) as r:
        report = check_repository(r)
    assert report.ok, report.errors


def _has(srv: RcdsServer, repo: str, path: str) -> bool:
    with reader_for(srv, repo) as reader:
        return reader.lookup(path) is not None


def test_not_a_tarball_and_an_empty_body(server: RcdsServer) -> None:
    assert server.publish("myexp/notatar", b"hello, I am not a tarball" * 40).text == "OK\n"
    doc = server.wait_state("myexp/notatar")
    assert doc["state"] == "failed" and "tar" in doc["reason"]
    r = server.publish("myexp/empty", b"")
    assert r.status_code == 400 and "empty upload" in r.text
    assert server.status("myexp/empty")["state"] == "missing"


def test_fifty_concurrent_uploads_with_duplicates_publish_each_cid_once(server: RcdsServer) -> None:
    tarballs = [make_tarball({"f.txt": f"content {i}\n", "g/h.txt": f"{i}" * 100}) for i in range(25)]
    uploads = [(cid_of(t, "burst"), t) for t in tarballs] * 2  # every CID twice, at the same time
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda u: server.publish(*u), uploads))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    assert all(a.text == "OK\n" or a.text.startswith("PRESENT:/cvmfs/") for a in answers)
    docs = {cid: server.wait_state(cid) for cid, _ in uploads}
    assert all(d["state"] == "published" for d in docs.values()), docs
    # Each CID lives in exactly one repository.
    for cid, doc in docs.items():
        homes = [r for r in REPOS if _has(server, r, f"/sw/{cid}")]
        assert homes == [doc["repository"]]
    # Group commit: 25 CIDs took fewer revisions than CIDs.
    revisions = {(d["repository"], d["revision"]) for d in docs.values()}
    assert len(revisions) < 25


def test_status_metrics_and_the_repository_tree(server: RcdsServer) -> None:
    assert server.status("myexp/unknown") == {"cid": "myexp/unknown", "state": "missing"}
    metrics = server.client.get("/metrics").text
    assert "rcds_published_cids_total" in metrics
    assert "rcds_queue_depth" in metrics
    assert 'rcds_requests_total{code="200",endpoint="ping"}' in metrics
    r = server.client.get(f"/cvmfs/{REPOS[0]}/.cvmfspublished")
    assert r.status_code == 200 and r.headers["cache-control"] == "max-age=61"


# --- limits and server-side downloads ---------------------------------------------------------------


class _Source(BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    redirects: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
        elif self.path in self.files:
            body = self.files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_upload_limit_and_server_side_downloads(tmp_path: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Source)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    data = make_tarball({"proj-main/": b"", "proj-main/code.py": "print(1)\n"})
    _Source.files = {"/org/proj/archive.tar.gz": data, "/big.tar.gz": os.urandom(300_000)}
    _Source.redirects = {
        "/moved": f"http://127.0.0.1:{port}/org/proj/archive.tar.gz",
        "/away": "http://elsewhere.example/x.tar.gz",
    }
    srv = RcdsServer(
        tmp_path,
        '[limits]\nmax_upload = 200000\n[source]\nscheme = "http"\nmax_size = 200000\n'
        f'allow = ["127.0.0.1:{port}"]\nallow_networks = ["127.0.0.1/32"]\n',
    ).start()
    try:
        r = srv.publish("big/upload", os.urandom(250_000))
        assert r.status_code == 413 and "limit of 200000 bytes" in r.text
        src = f"127.0.0.1:{port}/org/proj/archive.tar.gz"
        assert srv.publish("gh/one", b"", source=src, striplevels="1").text == "OK\n"
        doc = srv.wait_state("gh/one")
        assert doc["state"] == "published"
        with reader_for(srv, doc["repository"]) as reader:
            assert reader.read("/sw/gh/one/code.py") == b"print(1)\n"
        assert srv.publish("gh/two", b"", source=f"127.0.0.1:{port}/moved").text == "OK\n"
        assert srv.wait_state("gh/two")["state"] == "published"
        r = srv.publish("gh/three", b"", source="evil.example/x.tar.gz")
        assert (r.status_code, r.text) == (400, "Bad request: source server not allowed\n")
        r = srv.publish("gh/four", b"", source=f"127.0.0.1:{port}/away")
        assert r.status_code == 400 and "redirect to a server that is not allowed" in r.text
        r = srv.publish("gh/five", b"", source=f"127.0.0.1:{port}/big.tar.gz")
        assert r.status_code == 400 and "larger than 200000 bytes" in r.text
        r = srv.publish("gh/six", b"", source=f"127.0.0.1:{port}/missing")
        assert r.status_code == 400 and "HTTP 404" in r.text
        # None of the refused requests left a CID stuck or a spool file behind.
        for cid in ("gh/three", "gh/four", "gh/five", "gh/six", "big/upload"):
            assert srv.status(cid)["state"] == "missing"
        assert list((tmp_path / "data" / "queue" / "spool").iterdir()) == []
    finally:
        srv.close()
        httpd.shutdown()


# --- durability --------------------------------------------------------------------------------------


def test_kill_9_with_acknowledged_uploads_queued_then_restart_publishes_them_all(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path, repos=("solo.rcds.test",)).start()
    try:
        # 48 MiB that do not compress: still ingesting when the kill comes (below the early-staging size)
        big = make_tarball({f"blob{i}.bin": os.urandom(4 << 20) for i in range(12)}, mode="w")
        small = [make_tarball({"n.txt": f"{i}\n"}) for i in range(10)]
        assert srv.publish("durable/big", big).text == "OK\n"
        cids = [cid_of(t, "durable") for t in small]
        for cid, t in zip(cids, small, strict=True):
            assert srv.publish(cid, t).text == "OK\n"
        states = [srv.status(c)["state"] for c in ["durable/big", *cids]]
        srv.kill()
        # the kill really left acknowledged work unpublished (queued, or in the middle of its ingest)
        assert any(state != "published" for state in states), states
        srv.start()
        for cid in ["durable/big", *cids]:
            assert srv.wait_state(cid)["state"] == "published"
        repo = Repository(srv.storage("solo.rcds.test"))
        assert_repository_ok(repo)
        assert list((tmp_path / "data" / "queue" / "spool").iterdir()) == []
    finally:
        srv.close()


def test_a_crash_in_the_middle_of_a_commit_is_recovered(fresh_server: RcdsServer) -> None:
    srv = fresh_server
    srv.start(env={"RCDS_FAILPOINT": "before-manifest"})
    data = make_tarball(CODE)
    assert srv.publish("crash/one", data).text == "OK\n"
    assert srv.proc is not None
    assert srv.proc.wait(30) == 137  # the failpoint killed the server between reflog and manifest
    srv.proc = None
    srv.start()
    doc = srv.wait_state("crash/one")
    assert doc["state"] == "published"
    for r in REPOS:
        repo = Repository(srv.storage(r))
        assert_repository_ok(repo)


def test_sigterm_finishes_or_keeps_in_flight_work(fresh_server: RcdsServer) -> None:
    srv = fresh_server.start()
    tarballs = [make_tarball({"x": f"{i}" * 1000}) for i in range(5)]
    cids = [cid_of(t, "term") for t in tarballs]
    for cid, t in zip(cids, tarballs, strict=True):
        assert srv.publish(cid, t).text == "OK\n"
    assert srv.stop(signal.SIGTERM) == 0
    srv.start()
    for cid in cids:
        assert srv.wait_state(cid)["state"] == "published"


def test_a_full_disk_during_publish_is_waited_out_and_nothing_is_half_published(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path, top_config="retry_delay = 0.1\nmax_retry_delay = 0.2\npublish_attempts = 3")
    try:
        srv.start(env={"RCDS_FAILPOINT": "after-objects:enospc"})
        assert srv.publish("full/disk", make_tarball(CODE)).text == "OK\n"
        deadline = time.monotonic() + 60
        while (doc := srv.status("full/disk")).get("waits", 0) < 4:  # more tries than publish_attempts
            assert doc["state"] in ("queued", "publishing"), doc  # never failed: the upload is kept
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)
        assert doc["reason"] == "waiting for disk space: OSError: [Errno 28] No space left on device"
        for r in REPOS:
            repo = Repository(srv.storage(r))
            assert repo.manifest().revision == 0  # every attempt aborted before any catalog
            assert_repository_ok(repo)
        assert 'rcds_publish_failures_total{reason="error"}' not in srv.client.get("/metrics").text
        srv.stop()
        srv.start()  # the disk has space again: the upload acknowledged before publishes, no new upload
        assert srv.wait_state("full/disk")["state"] == "published"
    finally:
        srv.close()


def test_a_full_spool_disk_refuses_the_upload_cleanly(fresh_server: RcdsServer) -> None:
    srv = fresh_server.start(max_file_size=2_000_000)  # writes beyond 2 MB fail (EFBIG), like a full disk
    r = srv.publish("spool/full", make_tarball({"big.bin": os.urandom(3_000_000)}))
    assert (r.status_code, r.text) == (400, "Bad request: error getting publish data: File too large\n")
    assert list((srv.root / "data" / "queue" / "spool").iterdir()) == []
    assert srv.status("spool/full")["state"] == "missing"
    assert srv.publish("spool/fine", make_tarball(CODE)).text == "OK\n"
    assert srv.wait_state("spool/fine")["state"] == "published"


def test_the_embedded_default_needs_no_configuration(tmp_path: Path) -> None:
    import subprocess
    import sys

    from server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = "".join(proc.stdout.readline() for _ in range(5))
        assert f"rcds publish server on http://127.0.0.1:{port}" in banner
        assert "curl --data-binary @code.tar.gz" in banner
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/pubapi/config").text == "repos:user1.rcds.local,user2.rcds.local\n"
            assert (
                c.post("/pubapi/publish", params={"cid": "demo/one"}, content=make_tarball(CODE)).text
                == "OK\n"
            )
            for _ in range(500):
                if c.get("/pubapi/exists", params={"cid": "demo/one"}).text.startswith("PRESENT:/cvmfs/user"):
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("demo/one was not published")
        assert (tmp_path / "d" / "user1.rcds.local" / ".cvmfspublished").exists()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
