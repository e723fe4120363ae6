"""Where a reader gets repository files from: a local directory, or HTTP servers through proxies.

HTTP sources keep connections alive (one ``httpx.Client`` per proxy) and fail over the way the CVMFS
client does: across the proxy list first, then across the server list, remembering what worked.
"""

from __future__ import annotations

import http.client
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx

DIRECT = "DIRECT"
_READ_BLOCK = 1 << 20


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
                shutil.copyfileobj(f, dest, 1 << 20)
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


class _PlainHttp:
    """GETs over keep-alive ``http.client`` connections, one set per thread.

    Why not httpx for these: httpx spends ~290 us of CPU per request, ``http.client`` ~60 us, and a tree
    of user code is mostly small files, one request each (a cold ``rcds get`` of bench/get.py's 9,322-file
    tree: 6.3-7.0 s through httpx, 3.2-3.5 s this way on 2 cores). Used for plain ``http://`` servers,
    direct or through ``http://`` proxies without credentials: the CVMFS case of stratum 1s behind squids.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

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
            conns, self._all = self._all, []
        for c in conns:
            c.close()

    def _conns(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        conns: dict[tuple[str, int], http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _conn(self, hostport: tuple[str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``hostport``, and whether it has been used before."""
        conns = self._conns()
        conn = conns.get(hostport)
        if conn is not None:
            return conn, True
        conn = http.client.HTTPConnection(hostport[0], hostport[1], timeout=self.settings.connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.settings.read_timeout)
        conns[hostport] = conn
        with self._lock:
            self._all.append(conn)
        return conn, False

    def _drop(self, hostport: tuple[str, int]) -> None:
        conn = self._conns().pop(hostport, None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._all.remove(conn)

    def get(self, url: str, proxy: str, headers: dict[str, str], dest: BinaryIO) -> int | str:
        """One GET of ``url`` into ``dest``: the HTTP status, or a one-line network error."""
        u = urlsplit(url)
        target = u.path
        via = u
        if proxy != DIRECT:  # absolute-form request line, as HTTP proxies expect
            via, target = urlsplit(proxy), url
        hostport = (via.hostname or "", via.port or 80)
        for retry_stale in (True, False):
            reused = False
            try:
                conn, reused = self._conn(hostport)
                conn.request("GET", target, headers=headers)
                r = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                self._drop(hostport)
                if reused and retry_stale:
                    continue  # the server closed an idle keep-alive connection: once more, on a new one
                return f"{type(exc).__name__}: {exc}"
        if r.status != 200:
            try:
                r.read()  # drain the error body, so the connection stays usable
            except (OSError, http.client.HTTPException):
                self._drop(hostport)
            return r.status
        expected, received = r.length, 0  # Content-Length (None if chunked)
        try:
            while True:
                try:
                    block = r.read(_READ_BLOCK)
                except (OSError, http.client.HTTPException) as exc:
                    self._drop(hostport)
                    return f"{type(exc).__name__}: {exc}"
                if not block:
                    break
                received += len(block)
                dest.write(block)
        except BaseException:
            self._drop(hostport)  # the destination gave up (corrupt, cancelled, disk): body not drained
            raise
        if expected is not None and received != expected:  # read(n) returns b"" on an early EOF
            self._drop(hostport)
            return f"connection closed after {received} of {expected} bytes"
        if r.will_close:
            self._drop(hostport)
        return 200


class HttpSource(Source):
    """One repository served by one or more HTTP servers (stratum 0/1 URLs), through optional proxies.

    ``urls`` are repository base URLs (``http://host/cvmfs/<fqrn>``); ``proxies`` are proxy URLs or
    ``DIRECT``. As in CVMFS, proxies are tried in order (the last good one first), then the next server.
    Plain HTTP goes over ``http.client`` (see ``_PlainHttp``), HTTPS and authenticated proxies over httpx.
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
        self._lock = threading.Lock()
        self._good_url = 0
        self._good_proxy = 0

    def _client(self, proxy: str) -> httpx.Client:
        with self._lock:
            client = self._clients.get(proxy)
            if client is None:
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

    def _get(self, url: str, proxy: str, headers: dict[str, str], dest: BinaryIO) -> int | str:
        if _PlainHttp.usable(url) and (proxy == DIRECT or _PlainHttp.usable(proxy)):
            return self._plain.get(
                url,
                proxy,
                {"User-Agent": self.settings.user_agent, "Accept-Encoding": "identity", **headers},
                dest,
            )
        try:
            with self._client(proxy).stream("GET", url, headers=headers) as r:
                if r.status_code != 200:
                    return r.status_code
                for block in r.iter_raw(_READ_BLOCK):
                    dest.write(block)
            return 200
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    def fetch(self, key: str, dest: BinaryIO, fresh: bool = False) -> None:
        attempts: list[str] = []
        not_found = 0
        start = dest.tell() if dest.seekable() else None
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if fresh else {}
        for ui, pi in self._order():
            url, proxy = f"{self.urls[ui]}/{key}", self.proxies[pi]
            for _ in range(1 + self.settings.retries):
                if start is not None:
                    dest.seek(start)
                    dest.truncate()
                outcome = self._get(url, proxy, headers, dest)
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

    def exists(self, key: str) -> bool:
        for ui, pi in self._order():
            try:
                r = self._client(self.proxies[pi]).head(f"{self.urls[ui]}/{key}")
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return True
            if r.status_code == 404:
                return False
        raise SourceError(key, ["no server answered HEAD"])

    def close(self) -> None:
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
