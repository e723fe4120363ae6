"""Server-side downloads for ``publish?cid=...&source=<host>/<path>``.

Fixes the original's holes: every redirect target is checked against the allowlist again (and may not
downgrade https to http), the download has an overall timeout and a size cap, and errors say what went
wrong.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin, urlsplit

import httpx

from .config import SourceSettings
from .service import SpoolFile, UploadTooLarge

MAX_REDIRECTS = 5


class DownloadError(Exception):
    pass


class SourceNotAllowed(DownloadError):
    pass


def host_allowed(host: str, allow: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allow:
        pattern = pattern.lower()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def source_url(source: str, settings: SourceSettings) -> str:
    """``host[:port]/path`` -> URL, refusing hosts not on the allowlist (the port is not part of the check)."""
    host_port = source.split("/", 1)[0]
    host = host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port
    if not host or not host_allowed(host, settings.allow):
        raise SourceNotAllowed(f"source server {host_port} not allowed")
    return f"{settings.scheme}://{source}"


async def download(url: str, settings: SourceSettings, spool: SpoolFile) -> None:
    try:
        async with asyncio.timeout(settings.timeout):
            await _download(url, settings, spool)
    except TimeoutError as exc:
        raise DownloadError(f"download took longer than {settings.timeout:.0f} s") from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"download failed: {exc}") from exc
    except UploadTooLarge as exc:
        raise DownloadError(str(exc)) from exc


async def _download(url: str, settings: SourceSettings, spool: SpoolFile) -> None:
    timeout = httpx.Timeout(30.0, read=60.0)
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            async with client.stream("GET", url) as resp:
                if resp.is_redirect:
                    target = urljoin(url, resp.headers.get("location", ""))
                    parts = urlsplit(target)
                    if parts.scheme not in ("http", "https") or (
                        settings.scheme == "https" and parts.scheme != "https"
                    ):
                        raise SourceNotAllowed(f"redirect to {parts.scheme}: not allowed")
                    if not host_allowed(parts.hostname or "", settings.allow):
                        raise SourceNotAllowed(f"redirect to server {parts.hostname} not allowed")
                    url = target
                    continue
                if resp.status_code != 200:
                    raise DownloadError(
                        f"download failed: HTTP {resp.status_code} from {urlsplit(url).hostname}"
                    )
                length = resp.headers.get("content-length")
                if length and length.isdigit() and int(length) > settings.max_size:
                    raise DownloadError(f"source larger than {settings.max_size} bytes")
                received = 0
                async for block in resp.aiter_bytes(1 << 20):
                    received += len(block)
                    if received > settings.max_size:
                        raise DownloadError(f"source larger than {settings.max_size} bytes")
                    await asyncio.to_thread(spool.write, block)
                return
        raise DownloadError(f"more than {MAX_REDIRECTS} redirects")
