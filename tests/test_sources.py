"""The plain-HTTP client of ``HttpSource``: keep-alive, pipelining with ``fetch_many``, and what it does
when a server misbehaves. Against a scripted HTTP server on a real socket (each answer written by hand,
so that the odd cases are exact) and against ``repo_http`` itself.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from rcds.cvmfs.sources import HttpSettings, HttpSource, NotFound, SourceError
from rcds.web.repo_http import add_repository_routes

FQRN = "test.example.org"
BASE = f"/cvmfs/{FQRN}"

Answer = Callable[[str, int], bytes | None]  # (key, how many times it was asked before) -> raw answer


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def status(code: int) -> bytes:
    return f"HTTP/1.1 {code} X\r\nContent-Length: 5\r\n\r\nerror".encode()


CLOSE = b""  # an answer of no bytes: close the connection instead


class ThenClose(bytes):
    """An answer after which the server closes the connection."""


class ScriptedServer:
    """Answers each GET with ``answer(key, times_asked)``: raw bytes to send, or CLOSE. Records, per
    connection, the keys asked and how many requests one ``recv`` brought (pipelining)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.asked: dict[str, int] = {}
        self.connections: list[list[str]] = []
        self.requests_per_read: list[int] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}{BASE}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        keys: list[str] = []
        with self.lock:
            self.connections.append(keys)
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                requests = []
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    requests.append(head.split(b" ")[1].decode())
                self.requests_per_read.append(len(requests))
                for target in requests:
                    key = target.split(BASE + "/", 1)[1]
                    with self.lock:
                        times = self.asked.get(key, 0)
                        self.asked[key] = times + 1
                        keys.append(key)
                    raw = self.answer(key, times)
                    if not raw:
                        return
                    try:
                        conn.sendall(raw)
                    except OSError:  # the client gave up on this connection
                        return
                    if isinstance(raw, ThenClose):
                        return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Answer], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(answer: Answer) -> ScriptedServer:
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


KEYS = [f"data/{i:02x}/{'ab' * 19}" for i in range(20)]


def body(key: str) -> bytes:
    return (key * 50).encode()


def fetch_many(source: HttpSource, keys: list[str]) -> tuple[list[bytes], list[SourceError | None]]:
    dests = [io.BytesIO() for _ in keys]
    errors = source.fetch_many(list(zip(keys, dests, strict=True)))
    return [d.getvalue() for d in dests], errors


@pytest.fixture
def source_for() -> Iterator[Callable[..., HttpSource]]:
    made: list[HttpSource] = []

    def make(*urls: str, proxies: list[str] | None = None) -> HttpSource:
        made.append(HttpSource(list(urls), proxies, HttpSettings(connect_timeout=2, read_timeout=2)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_fetch_many_pipelines_the_requests_on_one_connection(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    server = scripted(lambda key, _: ok(body(key)))
    source = source_for(server.url)
    got, errors = fetch_many(source, KEYS)
    assert errors == [None] * len(KEYS)
    assert got == [body(k) for k in KEYS]
    assert server.connections == [KEYS]  # one connection, in order
    assert max(server.requests_per_read) > 1  # several requests arrived together: pipelined
    got, errors = fetch_many(source, KEYS[:3])  # the connection is kept alive
    assert got == [body(k) for k in KEYS[:3]] and len(server.connections) == 1


def test_a_connection_closed_mid_pipeline_loses_nothing(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    """The server answers 5 and closes ("Connection: close" on the 5th, then silence; or a cut body): the
    requests it never answered are fetched again, each from its start."""

    def answer(key: str, times: int) -> bytes | None:
        i = KEYS.index(key)
        if times == 0 and i == 4:
            return ThenClose(ok(body(key), "Connection: close"))
        if times == 0 and i == 9:
            return ok(body(key))[:-100]  # half a body, then the connection closes
        return ok(body(key))

    server = scripted(answer)
    got, errors = fetch_many(source_for(server.url), KEYS)
    assert errors == [None] * len(KEYS)
    assert got == [body(k) for k in KEYS]  # the cut one rewound: no bytes twice
    assert server.asked[KEYS[4]] == 1 and server.asked[KEYS[9]] == 2


def test_errors_are_per_key(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    """A 404 and a 500 in the middle of a pipeline: their error bodies are dropped, the others arrive."""

    def answer(key: str, times: int) -> bytes | None:
        i = KEYS.index(key)
        return status(404) if i == 3 else status(500) if i == 7 else ok(body(key))

    server = scripted(answer)
    got, errors = fetch_many(source_for(server.url), KEYS[:10])
    assert isinstance(errors[3], NotFound)
    assert isinstance(errors[7], SourceError) and not isinstance(errors[7], NotFound)
    assert "HTTP 500" in str(errors[7])
    assert [e for i, e in enumerate(errors) if i not in (3, 7)] == [None] * 8
    assert [g for i, g in enumerate(got) if i not in (3, 7)] == [
        body(k) for k in KEYS[:10] if k not in (KEYS[3], KEYS[7])
    ]
    assert got[3] == got[7] == b""  # the error pages never reach the destination
    assert len(server.connections) == 1  # a 404 or 500 with a body does not cost the connection


def test_chunked_bodies_and_a_body_delimited_by_close(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    def answer(key: str, times: int) -> bytes | None:
        data = body(key)
        if key == KEYS[0]:
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(data[i : i + 100]), data[i : i + 100])
                for i in range(0, len(data), 100)
            )
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        if key == KEYS[1]:
            return ThenClose(b"HTTP/1.0 200 OK\r\n\r\n" + data)  # no length: the close ends the body
        return ok(data)

    server = scripted(answer)
    source = source_for(server.url)
    got, errors = fetch_many(source, KEYS[:1] + KEYS[2:4])
    assert errors == [None] * 3 and got == [body(KEYS[0]), body(KEYS[2]), body(KEYS[3])]
    buf = io.BytesIO()
    source.fetch(KEYS[1], buf)  # an HTTP/1.0 answer without Content-Length: its end is the close
    assert buf.getvalue() == body(KEYS[1])


def test_an_idle_connection_closed_by_the_server_is_reopened_once(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    """Keep-alive connections die while idle (server timeouts): the next request notices before any byte
    came back and goes again on a new connection, silently, without costing a retry."""
    server = scripted(lambda key, _: ok(body(key)))
    source = source_for(server.url)
    assert fetch_many(source, KEYS[:2])[0] == [body(k) for k in KEYS[:2]]
    server.answer = lambda key, times: CLOSE if times == 0 and key == KEYS[2] else ok(body(key))
    got, errors = fetch_many(source, KEYS[2:5])
    assert errors == [None] * 3 and got == [body(k) for k in KEYS[2:5]]
    assert len(server.connections) == 2


def test_a_destination_error_is_not_a_network_error(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    """A full disk while writing must stop the fetch (and not be retried against other servers as if the
    server had failed)."""
    server = scripted(lambda key, _: ok(body(key)))

    class Full(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(28, "No space left on device")

    source = source_for(server.url)
    with pytest.raises(OSError, match="No space left"):
        source.fetch_many([(KEYS[0], io.BytesIO()), (KEYS[1], Full())])
    assert server.asked == {KEYS[0]: 1, KEYS[1]: 1}
    assert fetch_many(source, KEYS[2:4])[0] == [body(k) for k in KEYS[2:4]]  # and the source still works


def test_an_answer_to_no_request_costs_the_connection(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    """A server that answers one request twice is out of step: the surplus answer must never be taken for
    the answer to the next request on that connection."""
    server = scripted(lambda key, times: ok(body(key)) * (2 if key == KEYS[0] else 1))
    source = source_for(server.url)
    got, errors = fetch_many(source, KEYS[:1])
    assert errors == [None] and got == [body(KEYS[0])]
    got, errors = fetch_many(source, KEYS[1:3])
    assert errors == [None, None] and got == [body(k) for k in KEYS[1:3]]
    assert len(server.connections) == 2


def test_fetch_many_fails_over_to_the_next_server(
    scripted: Callable[[Answer], ScriptedServer], source_for: Callable[..., HttpSource]
) -> None:
    broken = scripted(lambda key, _: status(503))
    good = scripted(lambda key, _: ok(body(key)))
    source = source_for(broken.url, good.url)
    got, errors = fetch_many(source, KEYS[:4])
    assert errors == [None] * 4 and got == [body(k) for k in KEYS[:4]]
    got, errors = fetch_many(source, KEYS[4:8])  # remembered: the broken one is not asked again
    assert errors == [None] * 4 and set(broken.asked) == set(KEYS[:4])


def test_fetch_many_against_repo_http(tmp_path: Path, source_for: Callable[..., HttpSource]) -> None:
    """The real server answers pipelined requests in order, small (read whole) and large (sendfile)."""
    sizes = [0, 1, 5000, 300 * 1024, 3 * 1024 * 1024, 70]
    keys = [f"data/{i:02x}/{'cd' * 19}" for i in range(len(sizes))]
    for key, size in zip(keys, sizes, strict=True):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(bytes([len(key) % 251]) * size)
    app = web.Application()
    add_repository_routes(app, {FQRN: tmp_path})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=5)
    try:
        source = source_for(f"http://127.0.0.1:{port}{BASE}")
        missing = "data/ff/" + "ef" * 19
        got, errors = fetch_many(source, [*keys, missing, *keys])
        assert got[: len(keys)] == got[len(keys) + 1 :] == [(tmp_path / k).read_bytes() for k in keys]
        assert isinstance(errors[len(keys)], NotFound)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def test_only_the_answer_that_failed_counts_as_an_attempt(
    scripted: Callable[[Answer], ScriptedServer],
) -> None:
    """With no retries on a pair: requests that the first server never answered (it closed the connection
    between two answers) are asked of it again, not failed over; an answer cut mid-body fails over."""

    def answer(key: str, times: int) -> bytes | None:
        if times == 0 and key == KEYS[2]:
            return ThenClose(ok(body(key)))  # whole, then the connection closes
        if times == 0 and key == KEYS[8]:
            return ThenClose(ok(body(key))[:-50])  # cut
        return ok(body(key))

    first, second = scripted(answer), scripted(lambda key, _: ok(body(key)))
    source = HttpSource([first.url, second.url], settings=HttpSettings(retries=0, read_timeout=2))
    try:
        got, errors = fetch_many(source, KEYS[:6])
        assert errors == [None] * 6 and got == [body(k) for k in KEYS[:6]]
        assert second.asked == {} and len(first.connections) == 2
        got, errors = fetch_many(source, KEYS[6:10])
        assert errors == [None] * 4 and got == [body(k) for k in KEYS[6:10]]
        assert second.asked == {KEYS[8]: 1, KEYS[9]: 1}  # failed over, and remembered
    finally:
        source.close()
