"""Where a reader gets repository files from: a local directory, or HTTP servers through proxies.

HTTP sources keep connections alive and fail over the way the CVMFS client does: across the proxy list
first, then across the server list, remembering what worked. Plain HTTP (the CVMFS case: stratum 1s behind
squids) goes over our own small pipelining client on ``httptools``; HTTPS and proxies with credentials over
``httpx``. Without those two (the job client on a bare python3), everything goes over ``http.client``
(``stdhttp``), one request at a time, with the same failover.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

try:
    import httptools
except ImportError:  # a bare python3 (the job client): http.client does all of HTTP (stdhttp)
    FAST_HTTP = False
else:
    # httpx is imported when first needed (HTTPS, proxies with credentials): importing it costs ~25 ms,
    # a tenth of a command that polls (``rcds replicate`` with nothing new, ``rcds wait``) over plain HTTP.
    FAST_HTTP = importlib.util.find_spec("httpx") is not None

if TYPE_CHECKING:
    import httpx

    from .stdhttp import StdlibHttp

# ``http.client`` (with the email parser under it, ~15 ms) and ``stdhttp`` are imported only where they
# are used: without httptools, or on an error of theirs. A plain-HTTP poll goes over ``_PlainHttp``.


def _stdlib_http_errors() -> tuple[type[Exception], ...]:
    """What a failed ``StdlibHttp`` request raises (only evaluated when something was raised)."""
    import http.client

    return (OSError, http.client.HTTPException)


def _httpx_error() -> type[Exception]:
    """``httpx.HTTPError`` (only evaluated when something was raised, after httpx was used)."""
    try:
        import httpx
    except ImportError:  # found by find_spec but broken: _client raised OSError
        return OSError
    return httpx.HTTPError


DIRECT = "DIRECT"
_READ_BLOCK = 1 << 20
_RECV_BLOCK = 1 << 18


class SourceError(Exception):
    """A file could not be fetched from any server or proxy."""

    def __init__(self, key: str, attempts: list[str]) -> None:
        self.key = key
        self.attempts = attempts
        super().__init__(f"cannot fetch {key}: " + "; ".join(attempts))


class NotFound(SourceError):
    """Every server answered that the file does not exist."""


class Source(ABC):
    """Read access to the public files of one repository, by relative key."""

    @abstractmethod
    def fetch(self, key: str, dest: BinaryIO, fresh: bool = False) -> None:
        """Copy the file's bytes, as served, into ``dest``."""

    def get(self, key: str, fresh: bool = False) -> bytes:
        import io

        buf = io.BytesIO()
        self.fetch(key, buf, fresh)
        return buf.getvalue()

    def fetch_many(
        self, items: Sequence[tuple[str, BinaryIO]], fresh: bool = False
    ) -> list[SourceError | None]:
        """``fetch`` each (key, destination); one result per item: None, or the ``SourceError`` (or
        ``NotFound``) of that key. Destinations must be seekable: a key is fetched again from its start
        when a faster path failed. Other exceptions (a destination's) propagate."""
        results: list[SourceError | None] = []
        for key, dest in items:
            try:
                self.fetch(key, dest, fresh)
            except SourceError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except NotFound:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    @abstractmethod
    def description(self) -> str: ...


class LocalSource(Source):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / key

    def fetch(self, key: str, dest: BinaryIO, fresh: bool = False) -> None:
        try:
            with open(self._path(key), "rb") as f:
                while block := f.read(1 << 20):
                    dest.write(block)
        except FileNotFoundError as exc:
            raise NotFound(key, [f"{self.root}: no such file"]) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    @property
    def description(self) -> str:
        return str(self.root)


@dataclass
class HttpSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 1  # extra attempts per server/proxy pair on transient errors
    user_agent: str = "rcds"
    # Per proxy; all kept alive, so that a pool of download threads never waits for or reopens connections.
    max_connections: int = 32


class _Connection:
    """One keep-alive HTTP/1.1 connection whose responses ``httptools`` (the C parser uvicorn uses) parses.

    Requests may be pipelined: ``exchange`` writes all of its GETs at once, then reads the answers in order.
    A replica pulling thousands of small objects then pays one round trip per batch instead of one per
    object, and the server reads the requests back to back.
    """

    def __init__(self, hostport: tuple[str, int], settings: HttpSettings) -> None:
        host, port = hostport
        # A name as bytes: given a str, getaddrinfo loads the IDNA codec (with unicodedata: ~2 ms of a
        # no-op snapshot command).
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
        self.sock = socket.create_connection((name, port), timeout=settings.connect_timeout)  # type: ignore[arg-type]
        self.sock.settimeout(settings.read_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = httptools.HttpResponseParser(self)
        self.used = False  # has answered before: the server may have closed it while it sat idle
        self.closed = False
        self.answered = False  # the last exchange received at least one byte
        # per exchange
        self._dests: list[BinaryIO] = []
        self._outcomes: list[int] = []  # statuses of the answers read so far
        self._status = 0
        self._body_to: BinaryIO | None = None
        self._length_known = False
        self._in_message = False
        self._keep_alive = True

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._length_known = False

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._length_known = True

    def on_headers_complete(self) -> None:
        if len(self._outcomes) == len(self._dests):
            raise _ProtocolViolation("an answer to no request")
        self._status = self.parser.get_status_code()
        self._keep_alive = self.parser.should_keep_alive()  # only valid while its message is parsed
        dest = self._dests[len(self._outcomes)]
        self._body_to = dest if self._status == 200 else None  # an error page is read and dropped

    def on_body(self, body: bytes) -> None:
        if self._body_to is not None:
            self._body_to.write(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._outcomes.append(self._status)

    def exchange(self, requests: bytes, dests: list[BinaryIO]) -> list[int | str | None]:
        """Send ``requests`` (one GET per destination, already encoded), then read the responses into
        ``dests``. One outcome per destination: the HTTP status; a one-line error for the one being
        answered when the connection failed (it is closed then); None for those never answered. An
        exception of a destination's write closes the connection and propagates."""
        self._dests, self._outcomes = dests, []
        self.answered = self._in_message = False
        try:
            self.sock.sendall(requests)
            while len(self._outcomes) < len(dests):
                data = self.sock.recv(_RECV_BLOCK)
                self.answered = self.answered or bool(data)
                if not data:
                    if self._in_message and not self._length_known:  # a body delimited by the close
                        self.on_message_complete()
                        continue
                    raise ConnectionError("connection closed by the server")
                self.parser.feed_data(data)
                if not self._keep_alive and not self._in_message:
                    break  # "Connection: close": what is not answered yet never will be
        except httptools.HttpParserCallbackError as exc:
            self.close()
            cause = exc.__context__  # what a callback raised: a destination's error is not a network error
            if cause is None or isinstance(cause, _ProtocolViolation):
                return self._failed(dests, f"HTTP protocol error: {cause or exc}")
            raise cause from None
        except (OSError, httptools.HttpParserError) as exc:
            self.close()
            return self._failed(dests, f"{type(exc).__name__}: {exc}")
        except BaseException:
            self.close()
            raise
        finally:
            self._dests, self._body_to = [], None
        outcomes: list[int | str | None] = list(self._outcomes)
        if len(outcomes) < len(dests):  # "Connection: close" before the end
            self.close()
            outcomes += [None] * (len(dests) - len(outcomes))
        elif not self._keep_alive:
            self.close()
        self.used = True
        return outcomes

    def _failed(self, dests: list[BinaryIO], error: str) -> list[int | str | None]:
        """The outcomes when the connection failed: ``error`` for the answer it was reading and None for
        the requests after it; ``error`` for all of them if it never answered at all (a server that
        times out or refuses is a failed attempt for each, so that they fail over)."""
        outcomes: list[int | str | None] = list(self._outcomes)
        if not self.answered:
            return [error] * len(dests)
        if self._in_message:
            outcomes.append(error)
        return outcomes + [None] * (len(dests) - len(outcomes))


class _ProtocolViolation(Exception):
    pass


class _DestinationFailed(Exception):
    """Writing a body to its destination failed (its ``__cause__``), which is not a network error."""


class _PlainHttp:
    """GETs over keep-alive, pipelined connections (``_Connection``), one per thread and host.

    Why not httpx for these: httpx spends ~290 us of CPU per request, ``http.client`` ~60-110 us (it
    parses headers with the ``email`` package), a ``_Connection`` ~25 us; and a tree of user code is mostly
    small files, one request each. Used for plain ``http://`` servers, direct or through ``http://``
    proxies without credentials: the CVMFS case of stratum 1s behind squids.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._all: set[_Connection] = set()
        self._lock = threading.Lock()
        self._fixed_headers = f"User-Agent: {settings.user_agent}\r\nAccept-Encoding: identity\r\n"

    @staticmethod
    def usable(url: str) -> bool:
        u = urlsplit(url)
        return (
            u.scheme == "http"
            and bool(u.hostname)
            and not (u.username or u.password or u.query or u.fragment)
        )

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, set()
        for c in conns:
            c.close()

    def _conn(self, hostport: tuple[str, int]) -> _Connection:
        conns: dict[tuple[str, int], _Connection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(hostport)
        if conn is not None and not conn.closed:
            return conn
        if conn is not None:
            with self._lock:
                self._all.discard(conn)
        conn = conns[hostport] = _Connection(hostport, self.settings)
        with self._lock:
            self._all.add(conn)
        return conn

    def get_many(
        self, base: str, keys: list[str], dests: list[BinaryIO], proxy: str, fresh: bool = False
    ) -> list[int | str | None]:
        """GET ``<base>/<key>`` for each key into its destination, pipelined on this thread's connection
        to the server (or proxy): one outcome each (see ``_Connection.exchange``)."""
        u = urlsplit(base)
        absolute = proxy != DIRECT  # absolute-form request lines, as HTTP proxies expect
        via = urlsplit(proxy) if absolute else u
        hostport = (via.hostname or "", via.port or 80)
        prefix = f"GET {base if absolute else u.path}/"
        suffix = f" HTTP/1.1\r\nHost: {u.netloc}\r\n{self._fixed_headers}{_NO_CACHE if fresh else ''}\r\n"
        requests = "".join([f"{prefix}{key}{suffix}" for key in keys]).encode("latin-1")
        for retry_stale in (True, False):
            try:
                conn = self._conn(hostport)
            except OSError as exc:
                return [f"{type(exc).__name__}: {exc}"] * len(keys)
            reused = conn.used
            outcomes = conn.exchange(requests, dests)
            if retry_stale and reused and not conn.answered:
                # The server closed an idle keep-alive connection before answering anything: once more
                # on a new one (nothing was written to any destination).
                continue
            return outcomes
        raise AssertionError("unreachable")


_NO_CACHE = "Cache-Control: no-cache\r\nPragma: no-cache\r\n"


class HttpSource(Source):
    """One repository served by one or more HTTP servers (stratum 0/1 URLs), through optional proxies.

    ``urls`` are repository base URLs (``http://host/cvmfs/<fqrn>``); ``proxies`` are proxy URLs or
    ``DIRECT``. As in CVMFS, proxies are tried in order (the last good one first), then the next server.
    Plain HTTP goes over ``_PlainHttp`` (pipelined with ``fetch_many``), HTTPS and authenticated proxies
    over httpx.
    Safe to use from many threads at once.
    """

    def __init__(
        self, urls: list[str], proxies: list[str] | None = None, settings: HttpSettings | None = None
    ) -> None:
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.proxies = proxies or [DIRECT]
        self.settings = settings or HttpSettings()
        self._clients: dict[str, httpx.Client] = {}
        self._plain = _PlainHttp(self.settings)
        s = self.settings
        self._std: StdlibHttp | None = None
        if not FAST_HTTP:
            from .stdhttp import StdlibHttp

            self._std = StdlibHttp(s.connect_timeout, s.read_timeout, s.user_agent)
        self._lock = threading.Lock()
        self._good_url = 0
        self._good_proxy = 0

    def _client(self, proxy: str) -> httpx.Client:
        with self._lock:
            client = self._clients.get(proxy)
            if client is None:
                try:
                    import httpx
                except ImportError as exc:  # found by find_spec but broken: a failed request
                    raise OSError(f"httpx cannot be imported: {exc}") from exc
                s = self.settings
                timeout = httpx.Timeout(s.read_timeout, connect=s.connect_timeout)
                client = httpx.Client(
                    timeout=timeout,
                    proxy=None if proxy == DIRECT else proxy,
                    trust_env=False,
                    headers={"User-Agent": s.user_agent, "Accept-Encoding": "identity"},
                    limits=httpx.Limits(
                        max_keepalive_connections=s.max_connections, max_connections=s.max_connections
                    ),
                )
                self._clients[proxy] = client
            return client

    def _order(self) -> Iterator[tuple[int, int]]:
        nu, np_ = len(self.urls), len(self.proxies)
        for i in range(nu):
            for j in range(np_):
                yield (self._good_url + i) % nu, (self._good_proxy + j) % np_

    def _get(self, base: str, key: str, proxy: str, fresh: bool, dest: BinaryIO) -> int | str:
        if self._std is not None:
            return self._std_get(self._std, f"{base}/{key}", proxy, fresh, dest)
        if self._plain_path(base, proxy):
            outcome = self._plain.get_many(base, [key], [dest], proxy, fresh)[0]
            return "connection closed by the server" if outcome is None else outcome
        url = f"{base}/{key}"
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if fresh else {}
        try:
            with self._client(proxy).stream("GET", url, headers=headers) as r:
                if r.status_code != 200:
                    return r.status_code
                for block in r.iter_raw(_READ_BLOCK):
                    dest.write(block)
            return 200
        except _httpx_error() as exc:
            return f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _std_get(std: StdlibHttp, url: str, proxy: str, fresh: bool, dest: BinaryIO) -> int | str:
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if fresh else {}
        try:
            with std.request("GET", url, headers, proxy) as r:
                if r.status != 200:
                    return r.status
                while True:
                    block = r.read(_READ_BLOCK)
                    if not block:
                        return 200
                    try:
                        dest.write(block)
                    except BaseException as exc:
                        raise _DestinationFailed from exc
        except _DestinationFailed as exc:  # a full disk here is not the server's fault: no failover
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        except _stdlib_http_errors() as exc:
            from .stdhttp import describe

            return describe(exc)

    @staticmethod
    def _plain_path(url: str, proxy: str) -> bool:
        return _PlainHttp.usable(url) and (proxy == DIRECT or _PlainHttp.usable(proxy))

    def fetch(self, key: str, dest: BinaryIO, fresh: bool = False) -> None:
        self._fetch(key, dest, fresh)

    def _fetch(
        self, key: str, dest: BinaryIO, fresh: bool, tried: tuple[int, int, int | str] | None = None
    ) -> None:
        """``fetch``; ``tried`` = (server, proxy, outcome) of an attempt already made (in a pipeline),
        counted as the first attempt on that pair."""
        attempts: list[str] = []
        not_found = 0
        start = dest.tell() if dest.seekable() else None
        for ui, pi in self._order():
            base, proxy = self.urls[ui], self.proxies[pi]
            url = f"{base}/{key}"
            for attempt in range(1 + self.settings.retries):
                if tried is not None and attempt == 0 and tried[:2] == (ui, pi):
                    outcome = tried[2]
                else:
                    if start is not None:
                        dest.seek(start)
                        dest.truncate()
                    outcome = self._get(base, key, proxy, fresh, dest)
                if outcome == 200:
                    self._good_url, self._good_proxy = ui, pi
                    return
                if outcome == 404:
                    not_found += 1
                    attempts.append(f"{url} via {proxy}: 404")
                    break
                attempts.append(
                    f"{url} via {proxy}: " + (f"HTTP {outcome}" if isinstance(outcome, int) else outcome)
                )
                if start is None and isinstance(outcome, str):
                    break  # bytes may have reached a destination that cannot rewind: next server
        if not_found and not_found == len(self.urls) * len(self.proxies):
            raise NotFound(key, attempts)
        raise SourceError(key, attempts)

    def fetch_many(
        self, items: Sequence[tuple[str, BinaryIO]], fresh: bool = False
    ) -> list[SourceError | None]:
        """Pipelined on one connection to the server and proxy that worked last (plain HTTP only); what
        that does not deliver is fetched again one by one, with the whole failover of ``fetch``. An
        answer that failed counts as the first attempt on that server and proxy; a request the connection
        never answered (the server closed it earlier) is not an attempt."""
        if len(items) < 2:
            return super().fetch_many(items, fresh)
        ui, pi = self._good_url, self._good_proxy
        base, proxy = self.urls[ui], self.proxies[pi]
        if self._std is not None or not self._plain_path(base, proxy):
            return super().fetch_many(items, fresh)
        dests = [dest for _, dest in items]
        starts = [dest.tell() for dest in dests]
        outcomes = self._plain.get_many(base, [key for key, _ in items], dests, proxy, fresh)
        results: list[SourceError | None] = []
        for (key, dest), start, outcome in zip(items, starts, outcomes):  # one outcome per item
            if outcome == 200:
                results.append(None)
                continue
            dest.seek(start)
            dest.truncate()
            try:
                self._fetch(key, dest, fresh, None if outcome is None else (ui, pi, outcome))
            except SourceError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    def exists(self, key: str) -> bool:
        for ui, pi in self._order():
            status = self._head(f"{self.urls[ui]}/{key}", self.proxies[pi])
            if status == 200:
                return True
            if status == 404:
                return False
        raise SourceError(key, ["no server answered HEAD"])

    def _head(self, url: str, proxy: str) -> int | None:
        """The status of a HEAD request, None if it failed."""
        if self._std is not None:
            try:
                with self._std.request("HEAD", url, proxy=proxy) as r:
                    return r.status
            except _stdlib_http_errors():
                return None
        try:
            return self._client(proxy).head(url).status_code
        except _httpx_error():
            return None

    def close(self) -> None:
        if self._std is not None:
            self._std.close()
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._plain.close()

    @property
    def description(self) -> str:
        return ", ".join(self.urls) + (
            f" (proxies {', '.join(self.proxies)})" if self.proxies != [DIRECT] else ""
        )


def open_source(
    location: str | Path, proxies: list[str] | None = None, settings: HttpSettings | None = None
) -> Source:
    """``http(s)://...`` (several separated by ``;`` or ``,``) -> HttpSource, else a local directory."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        urls = [u for u in text.replace(",", ";").split(";") if u]
        return HttpSource(urls, proxies, settings)
    return LocalSource(Path(text))
