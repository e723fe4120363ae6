"""Server-side downloads for ``publish?cid=...&source=<host>[:<port>]/<path>``.

A ``source=`` makes this server open a connection for a client, so it is a request forgery risk (issue 12,
defect 3: ``github.com:x@127.0.0.1/p`` was checked as ``github.com`` and fetched from ``127.0.0.1``). The
rules:

* The source is parsed once, by :func:`parse_url`, a strict parser of our own, into a :class:`SourceUrl`;
  that structure (never the text again) is what the allowlist checks and what the connection uses. User
  information (``user@``), percent-encoding, backslashes, non-ASCII and numeric host forms other than a
  dotted quad (``2130706433``, ``0x7f.1``, ``127.1``) are refused as malformed.
* The allowlist checks scheme, host and port: an entry without a port admits the scheme's default port only.
* The name is resolved when the connection is made, every address it resolves to is checked (loopback,
  private, link-local, shared, multicast and reserved addresses are refused unless ``allow_networks`` names
  them), and the connection goes to a checked address: there is no second lookup that DNS rebinding could
  answer differently. TLS still verifies the certificate against the host name.
* Every redirect goes through the same parser and checks; https may not be downgraded to http.
* Errors never name an address or repeat a low-level network error, so they tell nothing about which
  internal hosts exist or answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urldefrag, urljoin

import certifi
import httpcore

from .config import SourceSettings
from .service import SpoolFile, UploadTooLarge

MAX_REDIRECTS = 5
_WRITE_BLOCK = 1 << 20
DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Path and query: visible ASCII except what parsers disagree on (backslash) or what ends a URL (#).
_TARGET = re.compile(r"[!$-\[\]-~]*")
# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64, RFC 6052).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DownloadError(Exception):
    """A download that did not happen; the message is safe to send to the client."""


class SourceNotAllowed(DownloadError):
    pass


MALFORMED = "malformed source: expected HOST[:PORT]/PATH with a plain host name"


@dataclass(frozen=True)
class SourceUrl:
    scheme: str  # "http" or "https"
    host: str  # lower case, no trailing dot; an IPv6 literal without its brackets
    port: int
    target: str  # path and query, starting with "/"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def _host(text: str) -> str:
    """A host name or IP literal, normalised; :class:`SourceNotAllowed` for anything else."""
    if text.startswith("[") and text.endswith("]"):
        try:  # zone ids ("%eth0") never get here: parse_url refuses "%"
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise SourceNotAllowed(MALFORMED) from None
    host = text.lower()
    host = host[:-1] if host.endswith(".") else host
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise SourceNotAllowed(MALFORMED)
    try:
        return str(ipaddress.IPv4Address(host))  # the strict dotted quad, no leading zeros
    except ValueError:
        pass
    # Anything else the C library would read as an IPv4 address (2130706433, 0x7f000001, 127.1) is not a
    # name: refuse it rather than let getaddrinfo turn it into an address nobody checked by name.
    if labels[-1].isdigit():
        raise SourceNotAllowed(MALFORMED)
    try:
        socket.inet_aton(host)
    except OSError:
        return host
    raise SourceNotAllowed(MALFORMED)


def parse_url(url: str) -> SourceUrl:
    """Parse ``scheme://host[:port][/path][?query]`` strictly (see the module docstring)."""
    if not url.isascii() or not url.isprintable():
        raise SourceNotAllowed(MALFORMED)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise SourceNotAllowed("source must be fetched over http or https")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:end], rest[end:]
    if "@" in authority:
        raise SourceNotAllowed("user information (user@host) is not allowed in a source")
    if "\\" in authority or "%" in authority:
        raise SourceNotAllowed(MALFORMED)
    host_text, port = authority, DEFAULT_PORTS[scheme]
    bracket = authority.rfind("]")
    colon = authority.rfind(":")
    if colon > bracket:
        host_text, port_text = authority[:colon], authority[colon + 1 :]
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 65535):
            raise SourceNotAllowed(MALFORMED)
        port = int(port_text)
    if not target.startswith("/"):
        target = "/" + target
    if not _TARGET.fullmatch(target):
        raise SourceNotAllowed(MALFORMED)
    return SourceUrl(scheme, _host(host_text), port, target)


def _allow_entry(entry: str, scheme: str) -> tuple[str, int]:
    """An allowlist entry ``name``, ``*.domain`` or ``[v6]``, with an optional ``:port``."""
    name, port = entry.lower(), DEFAULT_PORTS[scheme]
    match = re.fullmatch(r"(.+):(\d{1,5})", name)
    if match and not name.endswith("]"):
        name, port = match.group(1), int(match.group(2))
    if name.startswith("[") and name.endswith("]"):
        name = str(ipaddress.IPv6Address(name[1:-1]))
    return name.rstrip("."), port


def host_allowed(url: SourceUrl, allow: Iterable[str]) -> bool:
    """Whether scheme, host and port are on the allowlist (an entry without a port means the default port)."""
    for entry in allow:
        try:
            pattern, port = _allow_entry(entry, url.scheme)
        except ValueError:
            continue
        if port != url.port:
            continue
        if pattern.startswith("*."):
            if url.host.endswith(pattern[1:]) and url.host != pattern[2:]:
                return True
        elif url.host == pattern:
            return True
    return False


def parse_source(source: str, settings: SourceSettings) -> SourceUrl:
    """The URL a ``source=host[:port]/path`` stands for, refused unless it is on the allowlist."""
    url = parse_url(f"{settings.scheme}://{source}")
    if not host_allowed(url, settings.allow):
        raise SourceNotAllowed("source server not allowed")
    return url


def address_allowed(address: IpAddress, allow_networks: Iterable[IpNetwork]) -> bool:
    """Public unicast addresses, and those in ``allow_networks``; IPv4 inside IPv6 is judged as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in allow_networks):
        return True
    return address.is_global and not address.is_multicast


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves a host, checks every address, and connects to a checked one, all in one step."""

    def __init__(self, allow_networks: tuple[IpNetwork, ...]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_networks = allow_networks

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise DownloadError("source server name does not resolve") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
        # One bad address refuses the name: a name that mixes public and internal addresses is a trick.
        if not addresses or not all(address_allowed(a, self._allow_networks) for a in addresses):
            raise SourceNotAllowed("source server address not allowed")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        raise DownloadError("cannot connect to the source server")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DownloadError("unix sockets are not a source")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _redirect_target(url: SourceUrl, location: str, settings: SourceSettings) -> SourceUrl:
    try:
        joined = urldefrag(urljoin(str(url), location)).url  # a fragment is never sent
    except ValueError:
        raise SourceNotAllowed("redirect to a malformed location") from None
    target = parse_url(joined)
    if settings.scheme == "https" and target.scheme != "https":
        raise SourceNotAllowed("redirect from https to http not allowed")
    if not host_allowed(target, settings.allow):
        raise SourceNotAllowed("redirect to a server that is not allowed")
    return target


async def download(
    url: SourceUrl,
    settings: SourceSettings,
    spool: SpoolFile,
    sized: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Fetch ``url`` into ``spool``; ``sized(n)`` is told the announced size (Content-Length), then the
    bytes received so far after each write (so a big download can be staged as it arrives)."""
    try:
        async with asyncio.timeout(settings.timeout):
            await _download(url, settings, spool, sized)
    except TimeoutError as exc:
        raise DownloadError(f"download took longer than {settings.timeout:.0f} s") from exc
    except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
        raise DownloadError("the connection to the source server failed") from exc
    except (httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise DownloadError("the source server's answer is not valid HTTP") from exc
    except UploadTooLarge as exc:
        raise DownloadError(str(exc)) from exc


async def _download(
    url: SourceUrl, settings: SourceSettings, spool: SpoolFile, sized: Callable[[int], Awaitable[None]] | None
) -> None:
    backend = _CheckedBackend(tuple(ipaddress.ip_network(n, strict=False) for n in settings.allow_networks))
    tls = ssl.create_default_context(cafile=certifi.where())
    timeouts = {"connect": 30.0, "read": 60.0, "write": 30.0, "pool": 30.0}
    async with httpcore.AsyncConnectionPool(ssl_context=tls, network_backend=backend, retries=0) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            request_url = httpcore.URL(
                scheme=url.scheme.encode(), host=url.host.encode(), port=url.port, target=url.target.encode()
            )
            headers = [(b"Host", url.authority.encode()), (b"Accept-Encoding", b"identity"),
                       (b"User-Agent", b"rcds")]  # fmt: skip
            async with pool.stream(
                "GET", request_url, headers=headers, extensions={"timeout": timeouts}
            ) as resp:
                fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.headers}
                if resp.status in _REDIRECTS and "location" in fields:
                    url = _redirect_target(url, fields["location"], settings)
                    continue
                if resp.status != 200:
                    raise DownloadError(f"download failed: the source server answered HTTP {resp.status}")
                length = fields.get("content-length", "")
                if length.isdigit() and int(length) > settings.max_size:
                    raise DownloadError(f"source larger than {settings.max_size} bytes")
                if sized is not None and length.isdigit():
                    await sized(int(length))
                received = 0
                buffered: list[bytes] = []
                async for block in resp.aiter_stream():
                    received += len(block)
                    if received > settings.max_size:
                        raise DownloadError(f"source larger than {settings.max_size} bytes")
                    buffered.append(block)
                    if sum(map(len, buffered)) >= _WRITE_BLOCK:  # ~1 MiB per write, off the event loop
                        await asyncio.to_thread(spool.write, b"".join(buffered))
                        buffered = []
                        if sized is not None:
                            await sized(spool.size)
                if buffered:
                    await asyncio.to_thread(spool.write, b"".join(buffered))
                return
        raise DownloadError(f"more than {MAX_REDIRECTS} redirects")
