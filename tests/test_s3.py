"""A repository whose public files live in an S3 bucket, against a real S3 server (``juicefs gateway``,
tests/s3server.py): the CVMFS layout and cache headers, anonymous reading over the bucket's HTTP
endpoint, write-once objects, throttling (a small HTTP proxy in front of the real server answers 503/429
first), rejected credentials and a vanished bucket (a clean abort, the previous revision live, the error
naming the bucket), and what the server lacks (conditional writes, detected)."""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FQRN, S3_BUCKET, s3_store, write_tree
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import MANIFEST, Repository
from rcds.cvmfs.subscriber import parse_activity
from rcds.storage import StorageError
from rcds.storage.s3 import DATA_CACHE_CONTROL, ROOT_CACHE_CONTROL, S3Settings, S3Store
from s3server import S3Server
from server import RcdsServer, make_tarball
from test_notifications import SseClient

TREE = {"hello.txt": b"hello from a bucket\n" * 50, "big.bin": bytes(range(256)) * 2000, "d": {"x": b"x\n"}}


def publish(repo: Repository, path: str, src: Path) -> int:
    with repo.transaction() as txn:
        txn.add_directory(path, src)
        return txn.commit().revision


def bucket_url(server: S3Server, repo: Repository) -> str:
    """The repository's base URL on the bucket's plain HTTP endpoint (path-style)."""
    assert isinstance(repo.store, S3Store)
    return f"{server.endpoint}/{S3_BUCKET}/{repo.store.settings.prefix}"


@pytest.fixture
def s3_repo(make_repo: Callable[..., Repository], s3_server: S3Server) -> Repository:
    return make_repo(store=s3_store(s3_server, retries=2, timeout=5))


def test_a_bucket_repository_has_the_cvmfs_layout_and_is_read_anonymously_over_http(
    s3_repo: Repository, s3_server: S3Server, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", TREE)
    assert publish(s3_repo, "/cid1", src) == 1
    store = s3_repo.store
    assert isinstance(store, S3Store)
    alias = store.settings.prefix
    assert alias.endswith("/" + FQRN)  # <subpath>/<repository name>, as CVMFS names keys
    raw = s3_server.admin().list_objects_v2(Bucket=S3_BUCKET, Prefix=alias + "/")  # type: ignore[attr-defined]
    keys = {o["Key"][len(alias) + 1 :] for o in raw["Contents"] if not o["Key"].endswith("/")}
    assert {MANIFEST, ".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"} <= keys
    data = {k for k in keys if k.startswith("data/")}
    assert data and all(len(k.split("/")[1]) == 2 for k in data)
    assert not any(k.startswith(".rcds") for k in keys)  # private state stays local
    assert (s3_repo.storage / ".rcds" / "content-index.db").is_file()
    assert not (s3_repo.storage / MANIFEST).exists()

    # Anonymous HTTP (the bucket policy allows GET): what a stratum 1 or a client does.
    url = bucket_url(s3_server, s3_repo)
    assert httpx.get(f"{url}/{MANIFEST}").status_code == 200
    with RepositoryReader.open(url, s3_repo.public_key_path, fqrn=FQRN, cache_dir=tmp_path / "c") as reader:
        assert reader.manifest.revision == 1
        assert reader.read("/cid1/hello.txt") == TREE["hello.txt"]
        assert reader.read("/cid1/big.bin") == TREE["big.bin"]
        report = check_repository(reader)
        assert report.issues == [], [str(i) for i in report.issues]


def test_puts_carry_cvmfs_cache_headers(s3_repo: Repository, tmp_path: Path, s3_server: S3Server) -> None:
    """The gateway does not store Cache-Control, so the headers are checked on the wire (a proxy)."""
    seen: list[tuple[str, str]] = []
    with ThrottlingProxy(s3_server.endpoint, fail=0, record=seen) as proxy:
        repo = Repository(s3_repo.storage)
        assert isinstance(repo.store, S3Store)
        repo.store = S3Store(
            repo.store.settings.__class__(**{**vars(repo.store.settings), "endpoint": proxy})
        )
        publish(repo, "/cid1", write_tree(tmp_path / "src", TREE))
    puts = {path.rsplit("/", 1)[-1] if "/data/" not in path else "data": cc for path, cc in seen}
    assert puts["data"] == DATA_CACHE_CONTROL
    assert puts[MANIFEST] == ROOT_CACHE_CONTROL and puts[".cvmfsreflog"] == ROOT_CACHE_CONTROL
    assert all(cc == DATA_CACHE_CONTROL for path, cc in seen if "/data/" in path)


def test_objects_are_written_once(s3_repo: Repository, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    publish(s3_repo, "/cid1", src)
    with s3_repo.transaction() as txn:
        txn.add_directory("/cid2", src)  # the same content under another name
        txn.commit()
        assert txn.content.stats.objects_written == 0


def test_the_gateway_ignores_conditional_writes_and_the_store_detects_it(s3_repo: Repository) -> None:
    """juicefs's gateway accepts ``If-None-Match: *`` over an existing key: the store must not rely on it
    (the writer lock alone keeps two writers of one repository apart there)."""
    assert isinstance(s3_repo.store, S3Store)
    assert s3_repo.store.conditional_writes is False
    assert s3_repo.store.version(MANIFEST) is None
    assert not [k for k in s3_repo.store.iter_keys("") if ".rcds-probe" in k]  # the probe cleaned up


def test_rcds_repo_check_reads_the_bucket(s3_repo: Repository, tmp_path: Path) -> None:
    publish(s3_repo, "/cid1", write_tree(tmp_path / "src", TREE))
    out = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "repo", "check", str(s3_repo.storage)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("OK: revision 1,")


# --- throttling, credentials, a vanished bucket -------------------------------------------------


class ThrottlingProxy:
    """Forwards every request to the real server unchanged (Host kept: the signature covers it), except
    the first ``fail`` ones, answered with ``status`` and an S3 error body; over TLS with ``tls``."""

    def __init__(
        self,
        upstream: str,
        fail: int,
        status: int = 503,
        code: str = "SlowDown",
        record: list[tuple[str, str]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.remaining = fail
        self.status = status
        self.code = code
        self.record = record
        self.failed = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fail = proxy.remaining > 0
                    if fail:
                        proxy.remaining -= 1
                        proxy.failed += 1
                    else:
                        proxy.forwarded += 1
                if fail:
                    error = f"<Error><Code>{proxy.code}</Code><Message>slow down</Message></Error>".encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                if proxy.record is not None and self.command == "PUT":
                    proxy.record.append((self.path, self.headers.get("Cache-Control", "")))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    conn.putheader(name, value)
                conn.endheaders(body)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for name, value in reply.getheaders():
                    if name.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "date",
                        "server",
                    ):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:  # an https endpoint in front of the plain one
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def reopen_at(repo: Repository, **settings: object) -> Repository:
    """The same repository, its store reached with other settings (an endpoint through a proxy...)."""
    again = Repository(repo.storage)
    assert isinstance(again.store, S3Store)
    s = again.store.settings
    again.store = S3Store(s.__class__(**{**vars(s), **settings}))
    return again


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests")])
def test_a_throttled_publish_backs_off_and_succeeds(
    s3_repo: Repository, s3_server: S3Server, tmp_path: Path, status: int, code: str
) -> None:
    proxy = ThrottlingProxy(s3_server.endpoint, fail=3, status=status, code=code)
    with proxy as endpoint:
        repo = reopen_at(s3_repo, endpoint=endpoint, retries=8, parallelism=2)
        assert publish(repo, "/cid1", write_tree(tmp_path / "src", TREE)) == 1
    assert proxy.failed == 3 and proxy.forwarded > 0
    reader = s3_repo.reader(cache_dir=tmp_path / "c")
    assert reader.read("/cid1/hello.txt") == TREE["hello.txt"]
    assert check_repository(reader).issues == []


def test_throttling_that_does_not_stop_aborts_cleanly_and_names_the_bucket(
    s3_repo: Repository, s3_server: S3Server, tmp_path: Path
) -> None:
    publish(s3_repo, "/cid1", write_tree(tmp_path / "one", TREE))
    manifest = s3_repo.store.get(MANIFEST)
    with ThrottlingProxy(s3_server.endpoint, fail=10**6) as endpoint:
        repo = reopen_at(s3_repo, endpoint=endpoint, retries=2)
        with pytest.raises(StorageError, match=f"bucket {S3_BUCKET}") as err:
            publish(repo, "/cid2", write_tree(tmp_path / "two", {"new.txt": b"new\n"}))
    assert "throttled" in str(err.value)
    assert s3_repo.store.get(MANIFEST) == manifest  # revision 1 still live
    assert publish(Repository(s3_repo.storage), "/cid2", tmp_path / "two") == 2  # and the next try works


def test_rejected_credentials_abort_the_publish_and_name_the_bucket(
    s3_repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(s3_repo, "/cid1", write_tree(tmp_path / "one", TREE))
    manifest = s3_repo.store.get(MANIFEST)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "expired-or-wrong")
    with pytest.raises(StorageError, match=f"bucket {S3_BUCKET}: credentials rejected"):
        publish(Repository(s3_repo.storage), "/cid2", write_tree(tmp_path / "two", {"new.txt": b"new\n"}))
    monkeypatch.undo()
    again = Repository(s3_repo.storage)
    assert again.store.get(MANIFEST) == manifest
    assert publish(again, "/cid2", tmp_path / "two") == 2
    assert check_repository(again.reader(cache_dir=tmp_path / "c")).issues == []


def test_a_missing_bucket_is_named(s3_server: S3Server) -> None:
    store = S3Store(S3Settings("no-such-bucket", "p", endpoint=s3_server.endpoint, retries=0))
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):
        store.put("data/00/x", b"x")


def test_one_retry_layer_for_both_clients(s3_server: S3Server) -> None:
    """PUT/GET/HEAD go through obstore, deletes through boto3: each request is tried ``retries`` + 1 times
    in all (rcds's backoff; the clients' own retries are off), and the error says why."""
    proxy = ThrottlingProxy(s3_server.endpoint, fail=10**6)
    with proxy as endpoint:
        store = S3Store(S3Settings(S3_BUCKET, "retries", endpoint=endpoint, retries=2))
        for op, call in [
            ("PUT", lambda: store.put("data/00/x", b"x")),
            ("GET", lambda: store.get("data/00/x")),
            ("HEAD", lambda: store.exists("data/00/x")),
            ("DeleteObjects", lambda: store.delete_many(["data/00/x"])),
        ]:
            before = proxy.failed
            with pytest.raises(StorageError, match=f"bucket {S3_BUCKET}: {op} .*throttled"):
                call()
            assert proxy.failed - before == 3, op


def test_a_vanished_bucket_is_no_missing_object(s3_server: S3Server) -> None:
    """A GET from a bucket that does not exist is a storage failure naming it, not a missing object
    (readers would take that for a missing file)."""
    store = S3Store(S3Settings("no-such-bucket", "p", endpoint=s3_server.endpoint, retries=0))
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist") as err:
        store.get(MANIFEST)
    assert not isinstance(err.value, KeyError)


def test_credentials_of_a_profile_in_the_aws_files_sign_both_clients(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard chain (here a named profile in a credentials file, no variables) is boto3's; obstore,
    which reads no AWS files, signs with what boto3 found."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[rcds]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    prefix = f"profile-{secrets.token_hex(4)}"
    store = S3Store(S3Settings(S3_BUCKET, prefix, endpoint=s3_server.endpoint, profile="rcds", retries=0))
    store.put("data/00/x", b"from a profile")  # obstore
    assert store.get("data/00/x") == b"from a profile" and store.size("data/00/x") == 14
    assert list(store.iter_keys("data/")) == ["data/00/x"]  # boto3
    store.delete_many(["data/00/x"])
    assert not store.exists("data/00/x")
    with pytest.raises(Exception, match="nobody"):  # botocore's ProfileNotFound, at once
        S3Store(S3Settings(S3_BUCKET, prefix, endpoint=s3_server.endpoint, profile="nobody"))


def test_an_https_endpoint_with_a_private_ca_from_aws_ca_bundle(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both clients trust the CA bundle boto3's configuration names (here ``AWS_CA_BUNDLE``); without it the
    certificate is refused and the error names the bucket."""
    from pki import make_ca, make_host_cert

    ca = make_ca()
    cert, key = make_host_cert(ca).write(tmp_path, "host")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with ThrottlingProxy(s3_server.endpoint, fail=0, tls=tls) as endpoint:
        assert endpoint.startswith("https://")
        settings = S3Settings(S3_BUCKET, f"tls-{secrets.token_hex(4)}", endpoint=endpoint, retries=0)
        with pytest.raises(StorageError, match=f"bucket {S3_BUCKET}: PUT data/00/x failed"):
            S3Store(settings).put("data/00/x", b"x")  # the private CA is not trusted by default
        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))
        store = S3Store(settings)
        store.put("data/00/x", b"over https")  # obstore
        assert store.get("data/00/x") == b"over https"
        assert list(store.iter_keys("data/")) == ["data/00/x"]  # boto3
        store.delete_many(["data/00/x"])
        assert not store.exists("data/00/x")


@pytest.fixture
def batched(s3_server: S3Server) -> Iterator[S3Store]:
    store = S3Store(S3Settings(S3_BUCKET, "batch-test", endpoint=s3_server.endpoint))
    yield store
    store.delete_many(list(store.iter_keys("")))


def test_delete_many_removes_exactly_the_given_keys_in_batches_of_1000(batched: S3Store) -> None:
    keys = [f"data/{i % 256:02x}/{i:038x}" for i in range(1010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: batched.put(k, b"x"), keys))
    requests: list[int] = []
    batched._client.meta.events.register(  # count the DeleteObjects requests the server receives
        "before-send.s3.DeleteObjects", lambda request, **_: requests.append(request.body.count(b"<Key>"))
    )
    doomed = keys[:1003]
    batched.delete_many(iter(doomed))
    assert requests == [1000, 3]
    assert sorted(batched.iter_keys("data/")) == sorted(keys[1003:])


# --- the publish service on a bucket --------------------------------------------------------------

S3_REPO = "s3.rcds.test"
CODE = {"run.sh": "#!/bin/sh\necho hello\n", "lib/util.py": "X = 1\n"}


def s3_service(
    tmp_path: Path, server: S3Server, public: bool = False, endpoint: str = "", top_config: str = ""
) -> RcdsServer:
    """``rcds serve`` with one repository whose storage is a bucket (``storage = "s3://..."``)."""
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv", repos=(), top_config=top_config)
    subpath = f"srv-{secrets.token_hex(4)}"
    host = (endpoint or server.endpoint).removeprefix("http://")
    lines = [
        "[[repository]]",
        f'name = "{S3_REPO}"',
        f'storage = "s3://{S3_BUCKET}/{subpath}"',
        "[repository.s3]",
        f'endpoint = "{host}"',
        "https = false",
    ]
    if endpoint:
        lines.append("retries = 1")
    if public:
        lines.append(f'public_url = "{server.endpoint}/{S3_BUCKET}/{subpath}/{S3_REPO}"')
    with srv.config_path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    srv.bucket_prefix = f"{subpath}/{S3_REPO}"  # type: ignore[attr-defined]
    return srv


@pytest.mark.parametrize("public", [False, True], ids=["streamed", "redirected"])
def test_rcds_serve_publishes_into_a_bucket_and_serves_it(
    s3_server: S3Server, tmp_path: Path, public: bool
) -> None:
    srv = s3_service(tmp_path, s3_server, public).start()
    try:
        data = make_tarball(CODE)
        cid = f"myexp/{hashlib.sha256(data).hexdigest()}"
        assert srv.publish(cid, data).text == "OK\n"
        doc = srv.wait_state(cid)
        assert doc["state"] == "published", (doc, srv.log())
        assert srv.api("exists", cid=cid).text == f"PRESENT:/cvmfs/{S3_REPO}/sw/{cid}\n"
        key = srv.storage(S3_REPO) / ".rcds" / "keys" / f"{S3_REPO}.pub"
        assert not (srv.storage(S3_REPO) / MANIFEST).exists()  # the state directory holds no public file
        bucket = f"{s3_server.endpoint}/{S3_BUCKET}/{srv.bucket_prefix}"  # type: ignore[attr-defined]
        # rcds's reader, like a CVMFS client without CVMFS_FOLLOW_REDIRECTS, does not follow redirects.
        urls = [bucket] if public else [f"{srv.url}/cvmfs/{S3_REPO}", bucket]
        for url in urls:  # through rcds serve, and the bucket itself
            with RepositoryReader.open(url, key, cache_dir=tmp_path / f"c{len(url)}") as reader:
                assert reader.revision == doc["revision"]
                assert reader.read(f"/sw/{cid}/run.sh") == CODE["run.sh"].encode()
                assert reader.read(f"/sw/{cid}/lib/util.py") == b"X = 1\n"
                assert check_repository(reader).issues == []
        reply = httpx.get(f"{srv.url}/cvmfs/{S3_REPO}/{MANIFEST}", follow_redirects=True)
        if public:
            assert reply.history and reply.history[0].status_code == 302
            assert reply.history[0].headers["location"] == f"{bucket}/{MANIFEST}"
            assert reply.content == httpx.get(f"{bucket}/{MANIFEST}").content
        else:
            assert not reply.history and reply.headers["cache-control"] == "max-age=61"
        assert httpx.get(f"{srv.url}/cvmfs/{S3_REPO}/data/00/{'0' * 40}").status_code == 404
        # The status page reads the bucket: revision, whitelist, the store; the CID page its tree.
        (status,) = srv.client.get("/status.json").json()["repositories"]
        assert status["revision"] == doc["revision"] and status["whitelist_days_left"] > 0, status
        assert status["store"].startswith(f"s3://{S3_BUCKET}/"), status
        page = srv.client.get("/status/cid", params={"cid": cid})
        assert page.status_code == 200 and "run.sh" in page.text, page.text[:2000]
        srv.stop()
        srv.start()  # the presence index is rebuilt from the bucket's live revision
        assert srv.api("exists", cid=cid).text == f"PRESENT:/cvmfs/{S3_REPO}/sw/{cid}\n"
    finally:
        srv.close()


def test_subscribers_hear_each_new_revision_of_a_bucket_repository(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """The notification stream announces the manifest read from the bucket (there is no local copy)."""
    srv = s3_service(tmp_path, s3_server).start()
    sub = SseClient(srv.port, S3_REPO)
    try:
        assert sub.read_headers() == 200
        bucket = f"{s3_server.endpoint}/{S3_BUCKET}/{srv.bucket_prefix}"  # type: ignore[attr-defined]
        first = parse_activity(sub.next_event())
        assert first.manifest == httpx.get(f"{bucket}/{MANIFEST}").content
        data = make_tarball(CODE)
        cid = f"note/{hashlib.sha256(data).hexdigest()}"
        assert srv.publish(cid, data).text == "OK\n"
        doc = srv.wait_state(cid)
        message = parse_activity(sub.next_event(timeout=5))
        while message.revision == first.revision:  # keep-alives of the previous revision
            message = parse_activity(sub.next_event(timeout=5))
        assert message.revision == doc["revision"]
        assert message.manifest == httpx.get(f"{bucket}/{MANIFEST}").content
    finally:
        sub.close()
        srv.close()


def test_cleanup_expires_unused_cids_of_a_bucket_repository_and_gc_deletes_their_objects(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """``rcds cleanup`` on a bucket repository: the CID unused for maxdays goes, with the objects only it
    used; the CID in use and its objects stay; the result reads back clean from the bucket."""
    settings = "share_seconds = 1\nmaxdays = 30\nauto_cleanup = false\n"
    srv = s3_service(tmp_path, s3_server, top_config=settings)
    old_data = make_tarball({"unique.dat": "only in the old CID\n" * 3000})
    new_data = make_tarball({"job.py": "print('in use')\n"})
    old, new = f"old/{hashlib.sha256(old_data).hexdigest()}", f"new/{hashlib.sha256(new_data).hexdigest()}"
    try:
        srv.start(env={"RCDS_CLOCK_OFFSET": str(-40 * 86400)})  # published "40 days ago"
        assert srv.publish(old, old_data).text == "OK\n"
        assert srv.wait_state(old)["state"] == "published"
        srv.stop()
        srv.start()
        assert srv.publish(new, new_data).text == "OK\n"
        assert srv.wait_state(new)["state"] == "published"
        srv.stop()
        bucket = f"{s3_server.endpoint}/{S3_BUCKET}/{srv.bucket_prefix}"  # type: ignore[attr-defined]
        key = srv.storage(S3_REPO) / ".rcds" / "keys" / f"{S3_REPO}.pub"
        with RepositoryReader.open(bucket, key, cache_dir=tmp_path / "before") as reader:
            unique = reader.stat(f"/sw/{old}/unique.dat")
            assert unique is not None and unique.hash is not None
        unique_url = f"{bucket}/{unique.hash.object_name()}"
        assert httpx.get(unique_url).status_code == 200

        def cleanup(*args: str) -> dict[str, Any]:
            p = subprocess.run(
                [sys.executable, "-m", "rcds.cli", "cleanup", "--config", str(srv.config_path), "--json", *args],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
            (report,) = json.loads(p.stdout)
            return dict(report)

        report = cleanup()
        assert [e["cid"] for e in report["expired"]] == [old], report
        # Within the GC horizon the revisions that held it are kept (clients may still be on them).
        assert report["gc"]["objects_swept"] == 0 and httpx.get(unique_url).status_code == 200
        srv.start()  # one more revision, so that the cleanup's own is no longer trunk-previous
        later = make_tarball({"later.py": "print('later')\n"})
        later_cid = f"new/{hashlib.sha256(later).hexdigest()}"
        assert srv.publish(later_cid, later).text == "OK\n"
        assert srv.wait_state(later_cid)["state"] == "published"
        srv.stop()
        report = cleanup("--at", str(time.time() + 4 * 86400))  # the next daily run, past the horizon
        assert report["expired"] == [] and report["gc"]["objects_swept"] >= 1, report
        assert httpx.get(unique_url).status_code == 404  # deleted from the bucket
        with RepositoryReader.open(bucket, key, cache_dir=tmp_path / "after") as reader:
            assert reader.lookup(f"/sw/{old}") is None
            assert reader.read(f"/sw/{new}/job.py") == b"print('in use')\n"
            assert check_repository(reader).issues == []
    finally:
        srv.close()


def test_rcds_replicate_pulls_a_stratum_1_from_the_bucket_endpoint(
    s3_repo: Repository, s3_server: S3Server, tmp_path: Path
) -> None:
    """A stock-style stratum 1 reads the bucket anonymously over HTTP (.cvmfs_master_replica is there)."""
    publish(s3_repo, "/cid1", write_tree(tmp_path / "one", TREE))
    replica = tmp_path / "replica"

    def pull() -> None:
        out = subprocess.run(
            [sys.executable, "-m", "rcds.cli", "replicate", bucket_url(s3_server, s3_repo),
             "--storage", str(replica), "--key", str(s3_repo.public_key_path), "--fqrn", FQRN],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr

    pull()
    publish(s3_repo, "/cid2", write_tree(tmp_path / "two", {"two.txt": b"second\n"}))
    pull()
    assert (replica / MANIFEST).read_bytes() == s3_repo.store.get(MANIFEST)
    with RepositoryReader.open(
        replica, s3_repo.public_key_path, fqrn=FQRN, cache_dir=tmp_path / "c"
    ) as reader:
        assert reader.revision == 2
        assert reader.read("/cid1/big.bin") == TREE["big.bin"]
        assert reader.read("/cid2/two.txt") == b"second\n"
        assert check_repository(reader).issues == []
    # every object of the bucket's data/ is in the replica, byte for byte (of the history databases,
    # a stratum 1 takes only the current one)
    history = s3_repo.manifest().history
    assert history is not None
    current_history = history.object_name(Suffix.HISTORY)
    for key in s3_repo.store.iter_keys("data/"):
        if not key.endswith("H") or key == current_history:
            assert (replica / key).read_bytes() == s3_repo.store.get(key)


def test_a_throttled_bucket_makes_the_service_wait_and_publish_when_it_recovers(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """Throttling that outlasts the store's retries is a storage failure to the service: the acknowledged
    job waits (its reason names the bucket), its retry budget untouched, and publishes once the bucket
    answers again, without a restart."""
    proxy = ThrottlingProxy(s3_server.endpoint, fail=0)
    fast = "retry_delay = 0.05\nmax_retry_delay = 0.4\npublish_attempts = 2"
    with proxy as endpoint:
        srv = s3_service(tmp_path, s3_server, endpoint=endpoint, top_config=fast).start()
        try:
            proxy.remaining = 10**9  # the bucket throttles every request from now on
            data = make_tarball(CODE)
            cid = f"myexp/{hashlib.sha256(data).hexdigest()}"
            assert srv.publish(cid, data).text == "OK\n"
            deadline = time.monotonic() + 60
            while (doc := srv.status(cid)).get("waits", 0) < 3:
                assert doc["state"] in ("queued", "publishing"), doc
                assert time.monotonic() < deadline, (doc, srv.log()[-3000:])
                time.sleep(0.1)
            assert doc["reason"].startswith("waiting for storage: StorageError: bucket rcds-tests:"), doc
            assert "throttled" in doc["reason"] and "attempts" not in doc
            proxy.remaining = 0
            assert srv.wait_state(cid, timeout=60)["state"] == "published"
            bucket = f"{s3_server.endpoint}/{S3_BUCKET}/{srv.bucket_prefix}"  # type: ignore[attr-defined]
            key = srv.storage(S3_REPO) / ".rcds" / "keys" / f"{S3_REPO}.pub"
            with RepositoryReader.open(bucket, key, cache_dir=tmp_path / "c") as reader:
                assert reader.revision == 1
                assert reader.read(f"/sw/{cid}/run.sh") == CODE["run.sh"].encode()
        finally:
            srv.close()


def test_the_configuration_of_a_bucket_repository(tmp_path: Path) -> None:
    from rcds.publish.config import ConfigError, settings_from_dict

    def repo(**extra: object) -> dict[str, object]:
        return {"repository": [{"name": "a.example.org", **extra}]}

    rs = settings_from_dict(
        repo(storage="s3://bkt/sub", s3={"endpoint": "h:9000", "https": False, "retries": 2}), tmp_path
    ).repositories[0]
    assert rs.store == {
        "url": "s3://bkt/sub/a.example.org",
        "endpoint": "h:9000",
        "https": False,
        "retries": 2,
    }
    assert rs.storage == tmp_path / "rcds-data" / "a.example.org"  # the private state, local
    rs = settings_from_dict(repo(storage="s3://bkt/a.example.org", state="st"), tmp_path).repositories[0]
    assert (rs.store, rs.storage) == ({"url": "s3://bkt/a.example.org"}, tmp_path / "st")
    assert settings_from_dict(repo(storage="s3://bkt"), tmp_path).repositories[0].store["url"] == (
        "s3://bkt/a.example.org"
    )
    replica = repo(
        storage="s3://bkt/s1", local=False, upstream="http://x/cvmfs/a.example.org", public_key="k"
    )
    rs = settings_from_dict(replica, tmp_path).repositories[0]  # a stratum 1 in a bucket
    assert not rs.local and rs.store == {"url": "s3://bkt/s1/a.example.org"}
    assert rs.storage == tmp_path / "rcds-data" / "a.example.org"
    for bad, message in [
        (repo(storage="s3:///x"), "names no bucket"),
        (repo(storage="s3://bkt", s3={"addressing": "dns"}), "'path' or 'virtual'"),
        (repo(storage="s3://bkt", s3={"endpont": "x"}), "s3.endpont"),
    ]:
        with pytest.raises(ConfigError, match=message):
            settings_from_dict(bad, tmp_path)
