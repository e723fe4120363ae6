"""Where a reader gets repository files from: a local directory, or HTTP servers through proxies.

HTTP sources keep connections alive (one ``httpx.Client`` per proxy) and fail over the way the CVMFS
client does: across the proxy list first, then across the server list, remembering what worked.
"""

from __future__ import annotations

import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

DIRECT = "DIRECT"


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


class HttpSource(Source):
    """One repository served by one or more HTTP servers (stratum 0/1 URLs), through optional proxies.

    ``urls`` are repository base URLs (``http://host/cvmfs/<fqrn>``); ``proxies`` are proxy URLs or
    ``DIRECT``. As in CVMFS, proxies are tried in order (the last good one first), then the next server.
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
                    limits=httpx.Limits(max_keepalive_connections=16, max_connections=32),
                )
                self._clients[proxy] = client
            return client

    def _order(self) -> Iterator[tuple[int, int]]:
        nu, np_ = len(self.urls), len(self.proxies)
        for i in range(nu):
            for j in range(np_):
                yield (self._good_url + i) % nu, (self._good_proxy + j) % np_

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
                try:
                    with self._client(proxy).stream("GET", url, headers=headers) as r:
                        if r.status_code == 404:
                            not_found += 1
                            attempts.append(f"{url} via {proxy}: 404")
                            break
                        if r.status_code != 200:
                            attempts.append(f"{url} via {proxy}: HTTP {r.status_code}")
                            continue
                        for block in r.iter_raw(1 << 20):
                            dest.write(block)
                    self._good_url, self._good_proxy = ui, pi
                    return
                except httpx.HTTPError as exc:
                    attempts.append(f"{url} via {proxy}: {type(exc).__name__}: {exc}")
                    if start is None:
                        break
            else:
                continue
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
