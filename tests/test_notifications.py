"""Notifications: real ``rcds serve`` processes announce every new revision as server-sent events in the CVMFS
format, and peer servers' replicas follow them (issue 14, part 2).

The subscriber here is a raw socket speaking HTTP/1.1 as the stock ``cvmfs_swissknife notify -s`` does (a GET
with a JSON body, a chunked ``text/event-stream`` answer), so the wire format is checked byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.subscriber import make_activity, parse_activity
from server import RcdsServer, free_port, make_tarball

SOLO = ("solo.rcds.test",)
A_REPOS = ("a1.rcds.test",)
B_REPOS = ("b1.rcds.test",)
CVMFS_TIME = re.compile(r"^\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d$")


class SseClient:
    """A raw HTTP/1.1 subscriber: the CVMFS request, the chunked event stream undone by hand."""

    def __init__(self, port: int, repository: str, rcvbuf: int | None = None, query: bool = False) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # set before connect, so the TCP window stays that small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)
        if query:
            head = f"GET /api/v1/notifications/subscribe?repository={repository} HTTP/1.1\r\nHost: t\r\n\r\n"
            self.sock.sendall(head.encode())
        else:
            body = json.dumps({"version": 1, "repository": repository}).encode()
            self.sock.sendall(
                b"GET /api/v1/notifications/subscribe HTTP/1.1\r\nHost: t\r\nUser-Agent: cvmfs/2.12.0\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        self.raw = b""
        self.stream = b""  # de-chunked body
        self.status = 0
        self.headers: dict[str, str] = {}

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("stream closed")
        self.raw += data

    def read_headers(self) -> int:
        while b"\r\n\r\n" not in self.raw:
            self._recv()
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return self.status

    def _dechunk(self) -> None:
        while True:
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            self.stream += rest[:size]
            self.raw = rest[size + 2 :]

    def next_event(self, timeout: float = 10) -> str:
        """The data of the next event (one ``data:`` line, as the CVMFS frames them)."""
        deadline = time.monotonic() + timeout
        self._dechunk()  # what came with the headers
        while b"\n\n" not in self.stream:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self._recv()
            self._dechunk()
        event, self.stream = self.stream.split(b"\n\n", 1)
        assert event.startswith(b"data: ") and b"\n" not in event, event
        return event[len(b"data: ") :].decode()

    def close(self) -> None:
        self.sock.close()


def metric(srv: RcdsServer, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in srv.client.get("/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def wait_until(
    check: Callable[[], object], timeout: float, what: str, srv: RcdsServer | None = None
) -> float:
    started = time.monotonic()
    while not check():
        log = srv.log()[-3000:] if srv is not None else ""
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s\n{log}"
        time.sleep(0.02)
    return time.monotonic() - started


def publish(srv: RcdsServer, cid: str) -> dict[str, object]:
    assert srv.publish(cid, make_tarball({"run.py": f"print('{cid}')\n"})).text == "OK\n"
    doc = srv.wait_state(cid)
    assert doc["state"] == "published", doc
    return doc


def present(srv: RcdsServer, cid: str) -> bool:
    return bool(srv.api("exists", cid=cid).text.startswith("PRESENT:"))


def log_lines(srv: RcdsServer, message: str) -> list[dict[str, object]]:
    out = []
    for line in srv.log().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == message:
            out.append(doc)
    return out


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path, repos=SOLO, top_config="[notifications]\nkeepalive = 0.3\n")
    srv.start()
    yield srv
    srv.close()


def test_the_stream_is_the_cvmfs_format_and_carries_each_new_revision(solo: RcdsServer) -> None:
    repo = SOLO[0]
    manifest_file = solo.storage(repo) / ".cvmfspublished"
    sub = SseClient(solo.port, repo)
    try:
        assert sub.read_headers() == 200
        assert sub.headers["content-type"].startswith("text/event-stream")
        assert sub.headers["cache-control"] == "no-cache"
        # First the latest revision, as the CVMFS gateway sends on subscribe.
        first = json.loads(sub.next_event())
        assert set(first) >= {"version", "timestamp", "type", "repository", "manifest"}
        assert first["version"] == 1 and first["type"] == "activity" and first["repository"] == repo
        assert CVMFS_TIME.match(first["timestamp"]), first["timestamp"]
        assert base64.b64decode(first["manifest"]) == manifest_file.read_bytes()
        before = parse_activity(json.dumps(first)).revision
        # A publish: its revision arrives, with exactly the manifest now live.
        doc = publish(solo, "note/one")
        announced = time.monotonic()
        message = parse_activity(sub.next_event(timeout=2))
        # A keep-alive sent while the publish ran (0.3 s apart) may still be queued ahead of it: it carries
        # the previous revision, never another one.
        while message.revision == before:
            message = parse_activity(sub.next_event(timeout=2))
        assert time.monotonic() - announced < 1.0
        assert message.revision == doc["revision"] and message.revision > before
        assert message.manifest == manifest_file.read_bytes()
        assert abs((message.sent_at or 0) - time.time()) < 5
        # Nothing new for a while: the latest message again as the keep-alive (keepalive = 0.3 s).
        again = parse_activity(sub.next_event(timeout=2))
        assert again.manifest == message.manifest and again.sent_at == message.sent_at
    finally:
        sub.close()
    # The query form (EventSource, curl) works the same; unknown repositories and bad bodies do not.
    q = SseClient(solo.port, repo, query=True)
    try:
        assert q.read_headers() == 200
        assert parse_activity(q.next_event()).manifest == manifest_file.read_bytes()
    finally:
        q.close()
    r = solo.client.get("/api/v1/notifications/subscribe", params={"repository": "other.rcds.test"})
    assert r.status_code == 404
    r = solo.client.request("GET", "/api/v1/notifications/subscribe", content=b"{not json")
    assert r.status_code == 400
    # rcds announces what it signed itself; nobody may post announcements to it.
    forged = make_activity(repo, manifest_file.read_bytes()).to_json()
    r = solo.client.post("/api/v1/notifications/publish", content=forged)
    assert r.status_code == 403 and r.json()["status"] == "error"


def test_a_subscriber_that_does_not_read_is_dropped_and_never_holds_up_publishing(tmp_path: Path) -> None:
    repo = SOLO[0]
    srv = RcdsServer(tmp_path, repos=SOLO, top_config="[notifications]\nkeepalive = 0.05\n").start()
    stalled = SseClient(srv.port, repo, rcvbuf=4096)  # subscribes, then never reads again
    good = SseClient(srv.port, repo)
    try:
        assert good.read_headers() == 200
        good.next_event()
        wait_until(lambda: metric(srv, "rcds_notification_subscribers") == 2, 10, "two subscribers", srv)
        revisions = []
        for i in range(5):
            started = time.monotonic()
            doc = publish(srv, f"slow/{i}")
            assert time.monotonic() - started < 5  # as fast as ever
            while True:  # the reading subscriber gets every revision (between keep-alives)
                message = parse_activity(good.next_event(timeout=2))
                if message.revision == doc["revision"]:
                    break
            revisions.append(message.revision)
        assert revisions == sorted(set(revisions))
        # Keep-alives fill the stalled subscriber's buffers; then it is dropped, the other stays.
        wait_until(
            lambda: metric(srv, "rcds_notification_subscribers_dropped_total", reason="stalled") >= 1,
            30, "the stalled subscriber dropped", srv,
        )  # fmt: skip
        assert metric(srv, "rcds_notification_subscribers") == 1
        assert parse_activity(good.next_event(timeout=2)).revision == revisions[-1]
        publish(srv, "slow/after")
        # The dropped one's connection is gone: reading it ends (its backlog was discarded).
        stalled.sock.settimeout(5)
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                stalled._recv()
    finally:
        stalled.close()
        good.close()
        srv.close()


# --- two servers: B keeps a replica of A's repository ------------------------------------------------


def replica_config(owner: RcdsServer, repos: tuple[str, ...], notifications: str | None = None) -> str:
    extra = f'notifications = "{notifications}"\n' if notifications else ""
    return "".join(
        f'[[repository]]\nname = "{r}"\nlocal = false\nupstream = "{owner.url}/cvmfs/{r}"\n'
        f'public_key = "{owner.storage(r) / ".rcds" / "keys" / f"{r}.pub"}"\n{extra}'
        for r in repos
    )


def make_pair(root: Path, interval: float, notifications: str | None = None) -> tuple[RcdsServer, RcdsServer]:
    (root / "a").mkdir()
    (root / "b").mkdir()
    settings = f"replica_interval = {interval}\n"
    a = RcdsServer(root / "a", repos=A_REPOS, top_config=settings)
    b = RcdsServer(root / "b", repos=B_REPOS, top_config=settings)
    text = b.config_path.read_text()
    b.config_path.write_text(text.replace("[auth]", replica_config(a, A_REPOS, notifications) + "[auth]", 1))
    return a, b


def readable_on(srv: RcdsServer, owner: RcdsServer, repo: str, cid: str) -> bool:
    """Through ``srv``'s replica over HTTP: a fresh signed manifest, the catalogs, the file's bytes."""
    key = owner.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    try:
        with RepositoryReader.open(f"{srv.url}/cvmfs/{repo}", key, fqrn=repo) as reader:
            return reader.read(f"sw/{cid}/run.py") == f"print('{cid}')\n".encode()
    except Exception:
        return False


def replicated_and_readable(srv: RcdsServer, owner: RcdsServer, repo: str, cid: str) -> bool:
    return present(srv, cid) and readable_on(srv, owner, repo, cid)


def test_a_replica_shows_a_new_revision_within_a_second_of_its_announcement(tmp_path: Path) -> None:
    a, b = make_pair(tmp_path, interval=60)  # polling alone would take up to a minute
    repo = A_REPOS[0]
    a.start()
    b.start()
    try:
        wait_until(lambda: metric(b, "rcds_notification_stream_up", repository=repo) == 1, 15, "stream", b)
        for i in range(3):
            cid = f"fast/{i}"
            assert a.publish(cid, make_tarball({"run.py": f"print('{cid}')\n"})).text == "OK\n"
            a.wait_state(cid, timeout=30)
            seconds = wait_until(functools.partial(replicated_and_readable, b, a, repo, cid), 5, cid, b)
            assert seconds < 1.0, seconds
        replicated = [d for d in log_lines(b, "replicated") if d.get("repository") == repo]
        assert [d.get("trigger") for d in replicated][-3:] == ["notification"] * 3
        lags = [d.get("notification_lag") for d in replicated[-3:]]
        assert all(isinstance(x, (int, float)) and 0 <= x < 1 for x in lags), lags
        assert metric(b, "rcds_notification_lag_seconds_count", repository=repo) >= 3
        # B announces its replica's new revisions too (a chain of servers): the manifest is A's.
        sub = SseClient(b.port, repo)
        try:
            assert sub.read_headers() == 200
            assert (
                parse_activity(sub.next_event()).manifest
                == (a.storage(repo) / ".cvmfspublished").read_bytes()
            )
        finally:
            sub.close()
    finally:
        b.close()
        a.close()


class Proxy:
    """A TCP forwarder that can be cut (listener and every connection) and brought back on its port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def start(self) -> Proxy:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self.listener is not None
        # shutdown first: close alone leaves a listener that a blocked accept() holds open in Linux
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.conns = []


def test_with_the_stream_cut_the_replica_polls_then_resubscribes(tmp_path: Path) -> None:
    repo = A_REPOS[0]
    proxy = Proxy(0)  # only the notification stream goes through it
    a, b = make_pair(tmp_path, interval=2, notifications=f"http://127.0.0.1:{proxy.port}/api/v1")
    proxy.target = a.port
    proxy.start()
    a.start()
    b.start()
    try:

        def up() -> float:
            return metric(b, "rcds_notification_stream_up", repository=repo)

        wait_until(lambda: up() == 1, 15, "stream up", b)
        proxy.cut()
        wait_until(lambda: up() == 0, 10, "stream down", b)
        assert metric(b, "rcds_notification_streams_lost_total", repository=repo) >= 1
        publish(a, "cut/polled")
        wait_until(lambda: present(b, "cut/polled"), 10, "polled", b)  # the interval goes on
        polled = [d for d in log_lines(b, "replicated") if d.get("repository") == repo][-1]
        assert polled["trigger"] == "interval"
        assert log_lines(b, "notification stream down")
        proxy.start()  # the stream is back: B subscribes again by itself (backoff of a few seconds)
        wait_until(lambda: up() == 1, 40, "stream up again", b)
        # The stream wakes B at once; the 2 s poll may still come first now and then (a loaded machine
        # delays the message), so a fetch by the poll is retried with a new publish, a few times at most.
        triggers = []
        for attempt in range(3):
            publish(a, f"cut/notified{attempt}")
            wait_until(lambda: present(b, f"cut/notified{attempt}"), 10, "notified", b)  # noqa: B023
            triggers.append(
                [d for d in log_lines(b, "replicated") if d.get("repository") == repo][-1]["trigger"]
            )
            if triggers[-1] == "notification":
                break
        assert triggers[-1] == "notification", triggers
    finally:
        proxy.cut()
        b.close()
        a.close()


class ForgedStream:
    """A notification server that sends whatever messages it is given (what a forger would do)."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        conn.recv(65536)
        self.served += 1
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for text in self.messages:
            conn.sendall(f"data: {text}\n\n".encode())
            time.sleep(0.2)
        time.sleep(30)  # stays open, silent, as a CVMFS gateway between revisions
        conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def test_forged_and_old_messages_make_the_replica_accept_nothing(tmp_path: Path) -> None:
    repo = A_REPOS[0]
    # A forger's manifest: A's, with a far newer revision and the signature left as it was.
    forged_messages: list[str] = []
    stream = ForgedStream(forged_messages)
    a, b = make_pair(tmp_path, interval=60, notifications=f"http://127.0.0.1:{stream.port}/api/v1")
    a.start()
    try:
        publish(a, "forge/real")
        genuine = (a.storage(repo) / ".cvmfspublished").read_bytes()
        live = parse_activity(make_activity(repo, genuine).to_json()).revision
        forged = re.sub(rb"\nS\d+\n", f"\nS{live + 100}\n".encode(), genuine, count=1)
        old = re.sub(rb"\nS\d+\n", b"\nS1\n", genuine, count=1)
        forged_messages += [make_activity(repo, old).to_json(), make_activity(repo, forged).to_json()]
        b.start()
        wait_until(lambda: metric(b, "rcds_notifications_unconfirmed_total", repository=repo) >= 1, 15,
                   "the forged revision checked", b)  # fmt: skip
        # The snapshot it triggered verified A's real manifest: B serves exactly A's revision.
        assert (b.storage(repo) / ".cvmfspublished").read_bytes() == genuine
        assert present(b, "forge/real")
        warned = log_lines(b, "notification not confirmed by the snapshot")
        assert [d.get("announced") for d in warned] == [live + 100]  # the old one triggered nothing
        assert warned[0].get("revision") == live
    finally:
        stream.close()
        b.close()
        a.close()


def test_rcds_replicate_watch_follows_the_stream(solo: RcdsServer, tmp_path: Path) -> None:
    repo = SOLO[0]
    replica = tmp_path / "replica"
    key = solo.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    cmd = [sys.executable, "-m", "rcds.cli", "replicate", f"{solo.url}/cvmfs/{repo}", "--storage", str(replica),
           "--key", str(key), "--watch", "--interval", "60"]  # fmt: skip
    log = tmp_path / "replicate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        manifest = replica / ".cvmfspublished"
        wait_until(manifest.exists, 20, "the first snapshot")
        wait_until(lambda: "notification stream up" in log.read_text(), 10, "the stream")
        doc = publish(solo, "watch/one")
        live = (solo.storage(repo) / ".cvmfspublished").read_bytes()
        seconds = wait_until(lambda: manifest.read_bytes() == live, 5, f"revision {doc['revision']}")
        assert seconds < 1.0, seconds  # not the 60 s interval
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()


def test_rcds_wait_follow_looks_again_when_a_revision_is_announced(solo: RcdsServer, tmp_path: Path) -> None:
    from client import client_env

    repo = SOLO[0]
    env = client_env(
        tmp_path / "home", f'servers = ["{solo.url}"]\nkeys = ["{solo.storage(repo) / ".rcds" / "keys"}"]\n'
    )
    cid = "follow/one"
    # Looks at 0, 1 and 3 s, then the backoff would sleep 4 s more: the announcement cuts it short.
    args = [
        "wait",
        cid,
        "--mode",
        "http",
        "--timeout",
        "60",
        "--max-interval",
        "60",
        "--follow",
        "--json",
        "-v",
    ]
    waiter = subprocess.Popen([sys.executable, "-m", "rcds.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        time.sleep(3.5)
        assert waiter.poll() is None
        publish(solo, cid)
        published = time.monotonic()
        out, err = waiter.communicate(timeout=30)
        found_after = time.monotonic() - published
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, err
    assert json.loads(out)["cid"] == cid
    assert found_after < 1.5, (found_after, err)  # not the 7 s of the backoff
    assert "a new revision was announced; looking now" in err


def test_the_hub_drops_a_full_queue_without_waiting_and_keeps_the_others() -> None:
    from rcds.publish.notify import NotificationHub, TooManySubscribers

    drops: list[str] = []
    hub = NotificationHub(max_subscribers=2, queue_limit=3, on_drop=drops.append)
    manifest = "C0123\nB1\nD15\nS{}\nNhub.rcds.test\n--\nabc\n"
    hub.announce("hub.rcds.test", manifest.format(1).encode())
    woken: list[int] = []
    stuck = hub.subscribe("hub.rcds.test", lambda: None)  # never reads
    reader = hub.subscribe("hub.rcds.test", lambda: woken.append(1))
    assert len(stuck.queue) == 1  # the latest message, at once
    with pytest.raises(TooManySubscribers):
        hub.subscribe("hub.rcds.test", lambda: None)
    seen = [reader.pop()]
    started = time.monotonic()
    for revision in range(2, 7):
        assert hub.announce("hub.rcds.test", manifest.format(revision).encode())
        seen.append(reader.pop())
    assert time.monotonic() - started < 0.5
    assert stuck.closed and stuck.dropped == "slow" and drops == ["slow"]
    assert not reader.closed and hub.count() == 1 and len(woken) == 5
    assert [parse_activity(t or "").revision for t in seen] == [1, 2, 3, 4, 5, 6]
    # An old or repeated revision is not announced again.
    assert not hub.announce("hub.rcds.test", manifest.format(4).encode())
    assert reader.pop() is None
    hub.close()  # shutdown: every stream handler sees its subscription closed
    assert hub.count() == 0 and all(sub.closed for sub in (stuck, reader))


def test_the_message_reads_back_and_its_timestamp_is_the_cvmfs_format() -> None:
    from rcds.cvmfs.subscriber import api_root_of, cvmfs_time, parse_cvmfs_time

    assert cvmfs_time(1796235547.9) == "2 Dec 2026 18:19:07"  # %d without padding, as StringifyTime writes it
    assert parse_cvmfs_time("2 Dec 2026 18:19:07") == 1796235547.0
    message = make_activity("r.rcds.test", b"S12\nNr\n--\n\x00\xffsig", now=1796235547.25)
    back = parse_activity(message.to_json())
    assert back == message and back.revision == 12 and back.announced == 1796235547.25
    # What the stock publisher sends (its spacing, no rcds_time) reads too.
    stock = '{ "version" : 1, "timestamp" : "2 Dec 2026 18:19:07", "type" : "activity", "repository" : "r", "manifest" : "UzM="}'
    assert parse_activity(stock).revision == 3 and parse_activity(stock).announced == 1796235547.0
    assert api_root_of("http://h:8080/cvmfs/r.rcds.test/", "r.rcds.test") == "http://h:8080/api/v1"
    assert api_root_of("http://squid:3128/other/r.rcds.test", "r.rcds.test") is None


def test_where_a_replica_listens_is_derived_from_its_upstream_or_named(tmp_path: Path) -> None:
    from rcds.publish.config import settings_from_dict
    from rcds.tomlconfig import ConfigError

    def replica(**extra: object) -> dict[str, object]:
        return {"name": "r.rcds.test", "local": False, "public_key": "k.pub",
                "upstream": ["http://a:8080/cvmfs/r.rcds.test", "http://squid:3128/x"], **extra}  # fmt: skip

    def roots(**extra: object) -> tuple[str, ...]:
        s = settings_from_dict({"repository": [{"name": "own.rcds.test"}, replica(**extra)]}, base=tmp_path)
        return s.repositories[1].notification_roots

    assert roots() == ("http://a:8080/api/v1",)  # the squid URL names no server
    assert roots(notifications="http://gw:4929/api/v1/") == ("http://gw:4929/api/v1",)
    assert roots(notifications=False) == ()
    with pytest.raises(ConfigError, match="notifications"):
        roots(notifications=True)
    s = settings_from_dict({"repository": [{"name": "x"}], "notifications": {"keepalive": 5, "queue": 8}})
    assert (s.notifications.keepalive, s.notifications.queue, s.notifications.max_subscribers) == (5, 8, 1000)
    with pytest.raises(ConfigError, match="keepalive"):
        settings_from_dict({"repository": [{"name": "x"}], "notifications": {"keepalive": 0}})


def test_a_silent_stream_is_reopened_quietly(tmp_path: Path) -> None:
    """A CVMFS gateway sends no keep-alives: silence is not an outage (no "down", no backoff)."""
    from rcds.cvmfs.subscriber import NotificationSubscriber

    manifest = b"C0123\nS7\nNq.rcds.test\n--\nabc\n"
    stream = ForgedStream([make_activity("q.rcds.test", manifest).to_json()])
    states: list[bool] = []
    received: list[int] = []
    sub = NotificationSubscriber([f"http://127.0.0.1:{stream.port}/api/v1"], "q.rcds.test",
                                 lambda m: received.append(m.revision), on_state=states.append,
                                 idle_timeout=0.5).start()  # fmt: skip
    try:
        # A stream counts as served when its request arrives; its message comes just after.
        wait_until(lambda: stream.served >= 3 and len(received) >= 3, 10, "three streams and messages")
        assert False not in states and sub.connected
        assert received[:3] == [7, 7, 7]
    finally:
        sub.stop()
        stream.close()
    assert states.count(False) == 1 and states[-1] is False  # stopping ends the stream
