"""HTTP with ``http.client`` alone, for a python3 without httpx and httptools (the job client).

``sources.HttpSource`` and ``client.pubapi.PubApiClient`` keep their failover, retry and timeout logic
and hand single requests to this when the fast clients are not installed. Connections are kept alive,
one per thread, server and proxy; a kept-alive connection the server closed while it sat idle is opened
again once before the request counts as failed (as ``sources._PlainHttp`` does). Proxies: plain HTTP
goes through them with absolute-form request lines, HTTPS through a ``CONNECT`` tunnel; credentials in
a proxy URL become ``Proxy-Authorization``. The connect timeout covers the TCP (and TLS) handshake,
the read timeout each wait for a byte afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import unquote, urlsplit

DIRECT = "DIRECT"
# How a kept-alive connection that the server closed while idle fails its next request.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)

Body = Callable[[], Iterable[bytes]]  # a new iterator for each try


class StdlibHttp:
    """Keep-alive requests over ``http.client``; safe to use from many threads at once."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.user_agent = user_agent
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, set()
        for conn in conns:
            conn.close()

    @contextlib.contextmanager
    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        proxy: str = DIRECT,
        body: Body | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """The response to one request, its body to be read inside the ``with``. Raises ``OSError``
        (``ConnectFailed`` when no connection could be made) or ``http.client.HTTPException``."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise http.client.InvalidURL(f"cannot request {url}")
        if proxy != DIRECT and u.scheme == "http":
            target = url  # absolute-form, as HTTP proxies expect
        else:
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sent = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **(headers or {})}
        if proxy != DIRECT and u.scheme == "http":
            sent.update(_proxy_authorization(proxy))
        key = (u.scheme, u.hostname, u.port, proxy)
        for stale_retry in (True, False):
            try:
                conn, reused = self._connection(key)
            except OSError as exc:
                raise ConnectFailed(str(exc)) from exc
            try:
                conn.request(method, target, body=body() if body is not None else None, headers=sent)
                response = conn.getresponse()
            except _STALE:
                self._drop(key, conn)
                if stale_retry and reused:
                    continue
                raise
            except BaseException:
                self._drop(key, conn)
                raise
            try:
                yield response
                response.read()  # the rest, if any, so that the connection can be used again
            except BaseException:
                self._drop(key, conn)
                raise
            if response.will_close:
                self._drop(key, conn)
            return

    def _connection(self, key: tuple[str, str, int | None, str]) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection for ``key`` (scheme, host, port, proxy), and whether it was used."""
        conns: dict[tuple[str, str, int | None, str], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(key)
        if conn is not None:
            return conn, True
        scheme, host, port, proxy = key
        conn = self._open(scheme, host, port, proxy)
        conns[key] = conn
        with self._lock:
            self._all.add(conn)
        return conn, False

    def _open(self, scheme: str, host: str, port: int | None, proxy: str) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        timeouts = (self.connect_timeout, self.read_timeout)
        if proxy != DIRECT:  # CONNECT through it for HTTPS; for HTTP, absolute-form requests to it
            p = urlsplit(proxy)
            if scheme == "https":
                conn = _Https(p.hostname or "", p.port or 80, *timeouts, self.ssl_context)
                conn.set_tunnel(host, port, headers=_proxy_authorization(proxy))
            else:
                conn = _Http(p.hostname or "", p.port or 80, *timeouts)
        elif scheme == "https":
            conn = _Https(host, port, *timeouts, self.ssl_context)
        else:
            conn = _Http(host, port, *timeouts)
        conn.connect()
        return conn

    def _drop(self, key: tuple[str, str, int | None, str], conn: http.client.HTTPConnection) -> None:
        conn.close()
        conns = getattr(self._local, "conns", {})
        if conns.get(key) is conn:
            del conns[key]
        with self._lock:
            self._all.discard(conn)


class _Http(http.client.HTTPConnection):
    """The connect timeout for the handshake, then the read timeout for each wait for a byte."""

    def __init__(self, host: str, port: int | None, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        _connected(self.sock, self.read_timeout)


class _Https(http.client.HTTPSConnection):
    """As ``_Http``; the TLS handshake (and a proxy's CONNECT) within the connect timeout."""

    def __init__(
        self,
        host: str,
        port: int | None,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout, context=context)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        _connected(self.sock, self.read_timeout)


def _connected(sock: socket.socket | None, read_timeout: float) -> None:
    if sock is not None:
        sock.settimeout(read_timeout)
        with contextlib.suppress(OSError):  # not a TCP socket: nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _proxy_authorization(proxy: str) -> dict[str, str]:
    p = urlsplit(proxy)
    if not (p.username or p.password):
        return {}
    pair = f"{unquote(p.username or '')}:{unquote(p.password or '')}".encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


class ConnectFailed(OSError):
    """The connection (TCP, TLS, a proxy's CONNECT) could not be made; ``__cause__`` is why."""


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError))  # socket.timeout before 3.10


def describe(exc: BaseException) -> str:
    """A failed request in one line, named as the socket layer names it (as ``sources._PlainHttp``)."""
    if isinstance(exc, ConnectFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_as_httpx(exc: BaseException) -> str:
    """A failed request in one line as ``client.pubapi`` words httpx's errors (``timed out (ReadTimeout)``,
    ``ConnectError: [Errno 111] Connection refused``), so that both clients report the same."""
    connecting = isinstance(exc, ConnectFailed)
    cause = exc.__cause__ if connecting and exc.__cause__ is not None else exc
    if _timed_out(cause):
        return f"timed out ({'ConnectTimeout' if connecting else 'ReadTimeout'})"
    if connecting:
        return f"ConnectError: {cause}"
    return describe(cause)


__all__ = ["DIRECT", "ConnectFailed", "StdlibHttp", "describe", "describe_as_httpx"]
