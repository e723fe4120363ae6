"""A big upload is ingested while it arrives (``rcds.publish.early``), against a real ``rcds serve``.

The uploads here are sent by hand over a socket, so that a test can stop half-way through a body, look at
the server (its lease table, its repository, its API), then finish the body or hang up.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rcds.cvmfs.failpoints import FILE_ENV
from rcds.publish.early import FollowingReader, SpoolDiscarded
from rcds.publish.leases import Lease, Leases
from rcds.publish.service import SpoolFile
from rcds.publish.state import StateDB
from server import RcdsServer, make_tarball

SOLO = ("solo.rcds.test",)
REPO = SOLO[0]
SMALL_BYTES = 64 * 1024  # small_publish_bytes: above it an upload is staged as it arrives
CONFIG = f"ingest_slots = 3\nretry_delay = 0.3\nmax_retry_delay = 1.0\nsmall_publish_bytes = {SMALL_BYTES}"
EARLY_HOLDER = "staged as it arrives"


def big_tar(files: int = 12, size: int = 300_000, bad_member_at: int | None = None) -> bytes:
    """An uncompressed tarball of random files (well above ``SMALL_BYTES``); with ``bad_member_at``, a
    member named ``../escape`` at that position, which the ingest rejects when it reaches it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            if i == bad_member_at:
                info = tarfile.TarInfo("../escape")
                info.size = 4
                tar.addfile(info, io.BytesIO(b"evil"))
            info = tarfile.TarInfo(f"data/{i:03d}.bin")
            info.size = size
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


class Upload:
    """A publish request whose body is sent piece by piece on a raw socket."""

    def __init__(self, srv: RcdsServer, cid: str, length: int | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        headers = [f"POST /pubapi/publish?cid={cid} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}"]
        headers.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        self.chunked = length is None
        self.sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.sock.sendall(data)

    def answer(self) -> tuple[int, str]:
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.endswith(b"\n"):
            block = self.sock.recv(65536)
            if not block:
                break
            raw += block
        self.sock.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()

    def hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def state_db(srv: RcdsServer) -> Path:
    return srv.root / "data" / "queue" / "state.db"


def leases_of(srv: RcdsServer) -> list[Lease]:
    leases = Leases(state_db(srv))
    try:
        return leases.list()
    finally:
        leases.close()


def until(condition: Callable[[], bool], srv: RcdsServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, srv.log()[-4000:]
        time.sleep(0.02)


def early_lease(srv: RcdsServer, cid: str) -> bool:
    return any(x.path == f"sw/{cid}" and EARLY_HOLDER in x.holder for x in leases_of(srv))


def stored_objects(srv: RcdsServer) -> int:
    return sum(len(files) for _, _, files in os.walk(srv.storage(REPO) / "data"))


def metric(srv: RcdsServer, outcome: str) -> float:
    for line in srv.client.get("/metrics").text.splitlines():
        if line.startswith(f'rcds_early_staging_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def manifest(srv: RcdsServer) -> bytes:
    return (srv.storage(REPO) / ".cvmfspublished").read_bytes()


def spool_files(srv: RcdsServer) -> list[str]:
    return sorted(p.name for p in (srv.root / "data" / "queue" / "spool").iterdir())


def no_leases_left(srv: RcdsServer) -> None:
    until(lambda: not leases_of(srv), srv, timeout=10)


def test_a_following_reader_gets_the_bytes_as_they_are_written(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path, limit=1 << 20)
    reader = FollowingReader(spool.part, spool.progress, cancelled=lambda: False)
    waits: list[int] = []
    reader.keep = lambda: waits.append(1)  # called while it waits for the writer
    data = os.urandom(300_000)

    def write() -> None:
        for i in range(0, len(data), 70_000):
            time.sleep(0.6 if i == 0 else 0.05)  # one pause long enough for a keep()
            spool.write(data[i : i + 70_000])
        spool.finish()  # complete (and renamed to .tar: the open reader goes on)

    writer = threading.Thread(target=write)
    writer.start()
    got = [reader.read(100_000) for _ in range(4)]
    writer.join()
    # Full reads as from a finished file, blocking for the bytes; a short read and EOF only at the end.
    assert [len(b) for b in got] == [100_000, 100_000, 100_000, 0]
    assert b"".join(got) == data and waits
    reader.close()
    spool.discard()

    aborted = SpoolFile(tmp_path, limit=1 << 20)
    reader = FollowingReader(aborted.part, aborted.progress, cancelled=lambda: False)
    aborted.write(b"x" * 1000)
    assert reader.read(600) == b"x" * 600
    threading.Timer(0.2, aborted.discard).start()
    with pytest.raises(SpoolDiscarded):
        reader.read(600)  # 400 bytes there, then the upload is aborted: the staging stops, no short read
    reader.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=CONFIG, extra_config="[limits]\nmax_upload = 6000000")
    srv.start()
    yield srv
    srv.close()


def test_a_big_upload_is_staged_while_it_arrives_and_published_only_after_ok(solo: RcdsServer) -> None:
    assert solo.publish("first", make_tarball({"a.txt": "small"})).text == "OK\n"  # small: the queue's path
    assert solo.wait_state("first")["state"] == "published"
    before, objects_before = manifest(solo), stored_objects(solo)
    data = big_tar()
    upload = Upload(solo, "big", len(data))
    half = len(data) * 2 // 3
    upload.send(data[:half])
    until(lambda: early_lease(solo, "big"), solo)
    # The staging reads what has arrived: the first files' objects are written before the body is complete.
    until(lambda: stored_objects(solo) >= objects_before + 3, solo)
    time.sleep(0.3)
    # Nothing is queued, acknowledged or published yet.
    assert solo.status("big")["state"] == "missing"
    assert solo.api("exists", cid="big").text == "MISSING\n"
    assert manifest(solo) == before
    upload.send(data[half:])
    assert upload.answer() == (200, "OK\n")
    doc = solo.wait_state("big")
    # Counted as the queue counts them: the files, data/, the root, .publisher, .cvmfscatalog.
    assert doc["state"] == "published" and doc["files"] == 12 + 4, doc
    assert metric(solo, "staged") == 1.0
    staged = [e for e in solo.log_events("staged") if e.get("cid") == "big"]
    assert len(staged) == 1 and staged[0]["early"] is True, staged  # one ingest: no second one from the spool
    starts = solo.log_events("staging an upload as it arrives")
    assert [e["cid"] for e in starts] == ["big"]  # never the small one
    no_leases_left(solo)
    assert spool_files(solo) == []


def test_an_aborted_upload_leaves_nothing_behind(solo: RcdsServer) -> None:
    before = manifest(solo) if (solo.storage(REPO) / ".cvmfspublished").exists() else b""
    data = big_tar()
    upload = Upload(solo, "gone", len(data))
    upload.send(data[: len(data) // 2])
    until(lambda: early_lease(solo, "gone"), solo)
    upload.hang_up()  # the client disconnects half-way
    until(lambda: metric(solo, "abandoned") == 1.0, solo)
    no_leases_left(solo)
    until(lambda: spool_files(solo) == [], solo)
    # Too large, sent chunked (no Content-Length to refuse it by): staged from the first big blocks on.
    too_big = Upload(solo, "huge", None)
    for _ in range(7):
        too_big.send(os.urandom(1_000_000))
    status, body = too_big.answer()
    assert status == 413, body
    until(lambda: metric(solo, "abandoned") == 2.0, solo)
    no_leases_left(solo)
    assert spool_files(solo) == []
    assert solo.status("gone")["state"] == solo.status("huge")["state"] == "missing"
    current = manifest(solo) if (solo.storage(REPO) / ".cvmfspublished").exists() else b""
    assert current == before  # no revision
    # Nothing held on: the same CID uploads again, and is staged early again (slot and lease were freed).
    upload = Upload(solo, "gone", len(data))
    upload.send(data)
    assert upload.answer() == (200, "OK\n")
    assert solo.wait_state("gone")["state"] == "published"
    assert metric(solo, "staged") == 1.0
    no_leases_left(solo)


def test_a_tarball_rejected_mid_stream_fails_as_in_the_queue(solo: RcdsServer) -> None:
    data = big_tar(bad_member_at=6)
    upload = Upload(solo, "bad", len(data))
    upload.send(data[: len(data) * 3 // 4])  # past the bad member: the staging stops there
    until(lambda: early_lease(solo, "bad"), solo)
    upload.send(data[len(data) * 3 // 4 :])
    assert upload.answer() == (200, "OK\n")  # acknowledged as ever; the job fails with the reason
    early = solo.wait_state("bad")
    # The same member in a small tarball, which takes the queue's path.
    small_bad = big_tar(files=2, size=10, bad_member_at=1)
    assert len(small_bad) < SMALL_BYTES
    assert solo.publish("bad2", small_bad).text == "OK\n"
    queued = solo.wait_state("bad2")
    assert early["state"] == queued["state"] == "failed"
    assert early["reason"] == queued["reason"] and early["reason"].startswith("rejected: "), (early, queued)
    assert metric(solo, "staged") == 0.0
    no_leases_left(solo)
    assert spool_files(solo) == []


def test_a_leased_path_falls_back_to_the_queue(solo: RcdsServer) -> None:
    external = Leases(state_db(solo))
    lease = external.acquire(REPO, "sw/held", "gateway user", ttl=600, external=True)
    assert isinstance(lease, Lease)
    data = big_tar()
    upload = Upload(solo, "held", len(data))
    upload.send(data)
    assert upload.answer() == (200, "OK\n")
    assert metric(solo, "lease_busy") == 1.0
    until(lambda: solo.status("held")["state"] == "queued", solo)
    # A job is queued and due: the next big upload leaves the slots to it (acknowledged work first).
    upload = Upload(solo, "next", len(data))
    upload.send(data)
    assert upload.answer() == (200, "OK\n")
    assert metric(solo, "queued_work") == 1.0
    assert solo.wait_state("next")["state"] == "published"
    external.release(lease.token)
    external.close()
    assert solo.wait_state("held")["state"] == "published"
    assert solo.log_events("staging an upload as it arrives") == []
    no_leases_left(solo)


def test_killed_mid_early_staging_publishes_exactly_what_was_acknowledged(tmp_path: Path) -> None:
    stall = tmp_path / "failpoint"
    stall.write_text("before-manifest:sleep=60")  # every commit stalls before its manifest
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=CONFIG)
    srv.start(env={FILE_ENV: str(stall)})
    try:
        acked = big_tar()
        upload = Upload(srv, "acked", len(acked))
        upload.send(acked)
        assert upload.answer() == (200, "OK\n")  # staged early, its commit stalls
        until(lambda: bool(srv.log_events("staged")), srv)
        partial = big_tar()
        half = Upload(srv, "partial", len(partial))
        half.send(partial[: len(partial) // 2])
        until(lambda: early_lease(srv, "partial"), srv)
        assert srv.api("exists", cid="acked").text == "MISSING\n"  # its commit is stalled
        srv.kill()
        half.hang_up()
        stall.write_text("")
        srv.start()
        assert srv.wait_state("acked")["state"] == "published"
        assert srv.status("partial")["state"] == "missing"
        assert srv.api("exists", cid="partial").text == "MISSING\n"
        no_leases_left(srv)
        assert spool_files(srv) == []
    finally:
        srv.close()


def test_small_publishes_overtake_a_big_upload_staged_as_it_arrives(tmp_path: Path) -> None:
    """A big staging uses every core (its compression workers) yet gives way: small publishes that come
    while it runs go live within seconds, long before it."""
    blobs = [os.urandom(16 << 20) for _ in range(12)]  # random: compressing them keeps the cores busy
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"blob/{i:02d}.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=CONFIG).start()
    try:
        upload = Upload(srv, "big", len(data))
        upload.send(data[: len(data) - 4096])  # all but the end: the staging has seconds of work
        until(lambda: early_lease(srv, "big"), srv)
        smalls = [f"small{i}" for i in range(5)]
        took = []
        for cid in smalls:
            started = time.monotonic()
            assert srv.publish(cid, make_tarball({"run.sh": f"echo {cid}\n"})).text == "OK\n"
            assert srv.wait_state(cid)["state"] == "published"
            took.append(time.monotonic() - started)
        assert max(took) < 5.0, took
        upload.send(data[len(data) - 4096 :])
        assert upload.answer() == (200, "OK\n")
        doc = srv.wait_state("big", timeout=120)
        assert doc["state"] == "published"
        assert max(srv.status(c)["revision"] for c in smalls) < doc["revision"]
        assert metric(srv, "staged") == 1.0
        no_leases_left(srv)
    finally:
        srv.close()


def test_an_early_staging_that_fails_hands_the_job_to_the_queue_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    """Its lease is taken away mid-upload (as if it had expired): the staging stops with LeaseLost, the
    acknowledged job goes back to the queue with no attempt counted and is ingested from the spool."""
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=f"{CONFIG}\nlease_seconds = 1.5").start()
    try:
        data = big_tar()
        upload = Upload(srv, "lost", len(data))
        upload.send(data[: len(data) // 3])
        until(lambda: early_lease(srv, "lost"), srv)
        observer = Leases(state_db(srv))
        (lease,) = observer.list()
        assert observer.release(lease.token) is not None
        observer.close()
        time.sleep(1.0)  # the staging refreshes its lease every half second: it finds it gone
        upload.send(data[len(data) // 3 :])
        assert upload.answer() == (200, "OK\n")
        doc = srv.wait_state("lost")
        assert doc["state"] == "published" and doc["files"] == 12 + 4, doc
        state = StateDB(state_db(srv))
        job = state.latest("lost")
        state.close()
        assert job is not None and job.attempts == 0 and job.reason is None, job  # no attempt spent
        assert metric(srv, "failed") == 1.0 and metric(srv, "staged") == 0.0
        (failed,) = srv.log_events("early staging failed, the job is queued")
        assert "LeaseLost" in str(failed["reason"]), failed
        no_leases_left(srv)
        assert spool_files(srv) == []
    finally:
        srv.close()


def test_a_compressed_upload_is_staged_as_it_arrives_and_an_aborted_one_stops(solo: RcdsServer) -> None:
    """gzip is inflated in a thread of its own (``tarstream``): it follows the spool too, and an abort
    reaches it through that thread."""
    data = gzip.compress(big_tar(), compresslevel=1)
    assert len(data) > SMALL_BYTES
    upload = Upload(solo, "gz", len(data))
    upload.send(data[: len(data) // 2])
    until(lambda: early_lease(solo, "gz"), solo)
    upload.send(data[len(data) // 2 :])
    assert upload.answer() == (200, "OK\n")
    doc = solo.wait_state("gz")
    assert doc["state"] == "published" and doc["files"] == 12 + 4, doc
    assert metric(solo, "staged") == 1.0
    upload = Upload(solo, "gz2", len(data))
    upload.send(data[: len(data) // 2])
    until(lambda: early_lease(solo, "gz2"), solo)
    upload.hang_up()
    until(lambda: metric(solo, "abandoned") == 1.0, solo)
    no_leases_left(solo)
    assert spool_files(solo) == []
    assert solo.status("gz2")["state"] == "missing"


def test_a_clean_stop_during_an_early_staging_is_prompt_and_leaves_nothing(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=CONFIG).start()
    try:
        data = big_tar()
        upload = Upload(srv, "stopped", len(data))
        upload.send(data[: len(data) // 2])
        until(lambda: early_lease(srv, "stopped"), srv)
        started = time.monotonic()
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        upload.hang_up()  # else the web server grants the request its grace (shutdown_timeout, 10 s)
        assert srv.stop(timeout=30) == 0
        assert time.monotonic() - started < 5
        assert srv.log_events("early staging dropped")
        assert leases_of(srv) == []
        srv.start()
        assert srv.status("stopped")["state"] == "missing"
        assert spool_files(srv) == []
    finally:
        srv.close()


def test_the_same_cid_uploaded_twice_at_once_is_staged_once(solo: RcdsServer) -> None:
    data = big_tar()
    first = Upload(solo, "dup", len(data))
    first.send(data[: len(data) // 2])
    until(lambda: early_lease(solo, "dup"), solo)
    second = Upload(solo, "dup", len(data))  # before the first is queued: it is received too
    second.send(data)
    assert second.answer() == (200, "OK\n")  # queued first; its ingest waits for the lease
    assert metric(solo, "duplicate") == 1.0
    first.send(data[len(data) // 2 :])
    assert first.answer() == (200, "OK\n")  # the CID is queued already: this one and its staging go
    assert solo.wait_state("dup")["state"] == "published"
    assert metric(solo, "abandoned") == 1.0 and metric(solo, "staged") == 0.0
    assert len([e for e in solo.log_events("published") if e.get("cid") == "dup"]) == 1
    no_leases_left(solo)
    assert spool_files(solo) == []


def test_a_slow_upload_gives_its_slot_back_and_is_published_from_the_spool(tmp_path: Path) -> None:
    """An early staging that waits for its uploader longer than ``early_staging_max_wait`` in all drops
    its staging and frees its slot and lease at once; the upload goes on and publishes from the spool."""
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=f"{CONFIG}\nearly_staging_max_wait = 1.0",
                     extra_config="[limits]\nmax_upload = 6000000")  # fmt: skip
    srv.start()
    try:
        data = big_tar()
        upload = Upload(srv, "slow", len(data))
        upload.send(data[: len(data) // 3])
        until(lambda: early_lease(srv, "slow"), srv)
        # The uploader pauses well past a second: the staging gives up, and its lease goes with it.
        until(lambda: metric(srv, "too_slow") == 1.0, srv, timeout=15)
        no_leases_left(srv)
        dropped = [e for e in srv.log_events("early staging dropped") if e.get("cid") == "slow"]
        assert len(dropped) == 1 and "waiting for over 1 s" in dropped[0]["reason"], dropped
        # Meanwhile the freed slot publishes others.
        assert srv.publish("other", make_tarball({"b.txt": "small"})).text == "OK\n"
        assert srv.wait_state("other")["state"] == "published"
        upload.send(data[len(data) // 3 :])
        assert upload.answer() == (200, "OK\n")
        doc = srv.wait_state("slow")
        assert doc["state"] == "published" and doc["files"] == 12 + 4, doc
        staged = [e for e in srv.log_events("staged") if e.get("cid") == "slow"]
        assert [e.get("early", False) for e in staged] == [False], staged  # ingested once, from the spool
        assert metric(srv, "staged") == 0.0
        assert spool_files(srv) == []
    finally:
        srv.close()


class _HalfwaySource(BaseHTTPRequestHandler):
    """Serves ``body`` with its Content-Length: the first half at once, the rest once ``go`` is set."""

    body = b""
    go = threading.Event()

    def do_GET(self) -> None:
        half = len(self.body) // 2
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[:half])
        self.wfile.flush()
        self.go.wait(30)
        self.wfile.write(self.body[half:])

    def log_message(self, *args: object) -> None:
        pass


def test_a_big_source_download_is_staged_while_it_arrives(tmp_path: Path) -> None:
    """``source=``: the server's own download of a big tarball is ingested as it arrives, as an upload is."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _HalfwaySource)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    _HalfwaySource.body, _HalfwaySource.go = big_tar(), threading.Event()
    srv = RcdsServer(tmp_path, repos=SOLO, top_config=CONFIG,
                     extra_config=f'[limits]\nmax_upload = 6000000\n[source]\nscheme = "http"\n'
                                  f'max_size = 6000000\nallow = ["127.0.0.1:{port}"]\n'
                                  'allow_networks = ["127.0.0.1/32"]\n')  # fmt: skip
    srv.start()
    try:
        answer: list[str] = []
        publishing = threading.Thread(
            target=lambda: answer.append(srv.publish("fetched", b"", source=f"127.0.0.1:{port}/x.tar").text)
        )
        publishing.start()
        until(lambda: early_lease(srv, "fetched"), srv)  # half of it fetched: its staging runs already
        assert srv.status("fetched")["state"] == "missing"
        _HalfwaySource.go.set()
        publishing.join(30)
        assert answer == ["OK\n"]
        doc = srv.wait_state("fetched")
        assert doc["state"] == "published" and doc["files"] == 12 + 4, doc
        staged = [e for e in srv.log_events("staged") if e.get("cid") == "fetched"]
        assert [e.get("early") for e in staged] == [True], staged  # one ingest, while it arrived
        assert metric(srv, "staged") == 1.0
    finally:
        _HalfwaySource.go.set()
        srv.close()
        httpd.shutdown()
