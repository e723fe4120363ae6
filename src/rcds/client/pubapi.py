"""Talking to the publish servers' ``/pubapi``: failover, timeouts, bounded retries.

The servers are equivalent (each replicates the others), so a client takes them in a random order, to
spread the load, and fails over on anything that says "this server, now" (refused connection, timeout,
5xx, a server that is starting or stopping). An answer that would be the same from every server (bad
request, forbidden, too large) ends the call at once. After a full round of failures the client backs
off (exponentially, with jitter, so that a thousand clients do not come back in step) and tries again,
a bounded number of rounds. The final error lists what each server answered.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .. import __version__
from ..cvmfs.stdhttp import StdlibHttp, describe, describe_as_httpx
from .credentials import Credentials
from .errors import ClientError, RequestRefused, ServersUnavailable
from .progress import Progress

try:
    import httpx
except ImportError:  # a bare python3 (the job client): http.client (stdhttp)
    HAVE_HTTPX = False
else:
    HAVE_HTTPX = True

log = logging.getLogger("rcds.client")

_UPLOAD_BLOCK = 1 << 20
# 400 answers that describe the server's state, not the request: another server may do better.
_TRANSIENT_400 = ("Service not running", "not configured")


@dataclass(frozen=True)
class Answer:
    server: str
    body: str


class PubApiClient:
    def __init__(
        self,
        servers: list[str] | tuple[str, ...],
        credentials: Credentials | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.servers = list(servers)
        random.shuffle(self.servers)
        self.credentials = credentials or Credentials()
        self.retries = max(1, retries)
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self._good = 0  # index of the server that answered last: keep using it
        https = any(s.startswith("https://") for s in self.servers)
        self._http: httpx.Client | None = None
        self._std: StdlibHttp | None = None
        # Either way, never through a site's http_proxy: it must not carry uploads; servers are reached
        # directly.
        if HAVE_HTTPX:
            self._http = httpx.Client(
                timeout=httpx.Timeout(read_timeout, connect=connect_timeout, write=read_timeout),
                verify=self.credentials.ssl_context() if https else True,
                headers={"User-Agent": f"rcds/{__version__}"},
                trust_env=False,
            )
        else:
            self._std = StdlibHttp(
                connect_timeout,
                read_timeout,
                f"rcds/{__version__}",
                self.credentials.ssl_context() if https else None,
            )

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._std is not None:
            self._std.close()

    def __enter__(self) -> PubApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_server(self) -> str:
        """The server that answered last (the one calls go to first)."""
        return self.servers[self._good]

    # --- the API ---------------------------------------------------------------------------------

    def ping(self) -> str:
        return self.call("ping").server

    def repositories(self) -> list[str]:
        body = self.call("config").body
        if not body.startswith("repos:"):
            raise ClientError(f"unexpected answer to config: {body!r}")
        return [r for r in body[len("repos:") :].split(",") if r]

    def exists(self, cid: str) -> str | None:
        """The CID's path if it is published, else None."""
        return _present(self.call("exists", cid).body)

    def update(self, cid: str) -> str | None:
        """As ``exists``, and refreshes the CID's last-use time so cleanup keeps it."""
        return _present(self.call("update", cid).body)

    def publish(self, cid: str, tarball: Path, progress: bool = True) -> Answer:
        """Upload ``tarball`` under ``cid``: the answer body is ``OK`` (queued) or ``PRESENT:<path>``."""
        size = tarball.stat().st_size
        with Progress(size, "upload", enabled=progress) as bar:

            def body() -> Iterator[bytes]:
                bar.reset()
                with open(tarball, "rb") as f:
                    while block := f.read(_UPLOAD_BLOCK):
                        bar.update(len(block))
                        yield block

            return self.call("publish", cid, body=body, size=size)

    def status(self, cid: str) -> dict[str, Any] | None:
        """The server's JSON status of ``cid``, or None from a server without the status endpoint."""
        try:
            answer = self.call("status", cid)
        except RequestRefused as exc:
            if exc.status == 404:
                return None
            raise
        doc = json.loads(answer.body)
        if not isinstance(doc, dict):
            raise ClientError(f"unexpected status answer: {answer.body[:200]!r}")
        return doc

    # --- transport -------------------------------------------------------------------------------

    def call(
        self,
        endpoint: str,
        cid: str | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        size: int = 0,
    ) -> Answer:
        what = f"{endpoint} {cid}" if cid else endpoint
        attempts: list[str] = []
        n = len(self.servers)
        for round_ in range(self.retries):
            if round_:
                delay = min(self.backoff_cap, self.backoff * 2 ** (round_ - 1)) * random.uniform(0.5, 1.5)
                log.info("all servers failed for %s; retrying in %.1f s", what, delay)
                time.sleep(delay)
            for i in range(n):
                index = (self._good + i) % n
                server = self.servers[index]
                outcome = self._request(server, endpoint, cid, body, size)
                if isinstance(outcome, Answer):
                    self._good = index
                    return outcome
                attempts.append(f"{server}: {outcome}")
                log.info("%s on %s: %s", what, server, outcome)
        raise ServersUnavailable(what, attempts)

    def _request(
        self,
        server: str,
        endpoint: str,
        cid: str | None,
        body: Callable[[], Iterator[bytes]] | None,
        size: int,
    ) -> Answer | str:
        """The answer, or a one-line reason to try another server; raises if no server can help."""
        url = f"{server}/pubapi/{endpoint}"
        headers = self.credentials.headers_for(url)
        if body is not None:
            headers["Content-Length"] = str(size)
        method = "POST" if body is not None else "GET"
        if self._std is not None:
            try:
                with self._std.request(
                    method, url + (f"?{urlencode({'cid': cid})}" if cid else ""), headers, body=body
                ) as response:
                    status, text = response.status, response.read().decode("utf-8", "replace").strip()
            except (OSError, http.client.HTTPException) as exc:
                return self._transport_reason(server, exc, describe_as_httpx(exc))
            return _outcome(server, endpoint, status, text)
        assert self._http is not None
        try:
            r = self._http.request(
                method,
                url,
                params={"cid": cid} if cid else None,
                headers=headers,
                content=body() if body is not None else None,
            )
        except httpx.TimeoutException as exc:
            return f"timed out ({type(exc).__name__})"
        except httpx.TransportError as exc:
            return self._transport_reason(server, exc, describe(exc))
        return _outcome(server, endpoint, r.status_code, r.text.strip())

    def _transport_reason(self, server: str, exc: BaseException, plain: str) -> str:
        """A failed connection in one line (``plain``), with the fix for the TLS mistakes users make most."""
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip()
            return (
                f"TLS: cannot verify the server's certificate (CERTIFICATE_VERIFY_FAILED: {detail});"
                f" CAs were looked for in"
                f" {self.credentials.trust_description}: set X509_CERT_DIR to a CA directory"
                " (or RCDS_CA_FILE to a PEM bundle)"
            )
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            http_url = "http://" + server.split("://", 1)[-1]
            return f"TLS handshake failed: the server does not speak HTTPS here (plain HTTP? use {http_url})"
        return plain


def _outcome(server: str, endpoint: str, status: int, text: str) -> Answer | str:
    """A server's answer, or a one-line reason to try another server; raises if no server can help."""
    if status == 200:
        return Answer(server, text)
    if status >= 500 or status == 429:
        return f"HTTP {status}: {text[:200]}"
    if status == 400 and any(t in text for t in _TRANSIENT_400):
        return f"HTTP 400: {text[:200]}"
    if status == 404 and endpoint != "status":  # every publish API answers the others
        text = f"{text[:200]} (is {server} the server's base URL, scheme://host:port with no path?)"
    raise RequestRefused(server, status, text[:500])


def _present(body: str) -> str | None:
    if body.startswith("PRESENT:"):
        return body[len("PRESENT:") :]
    if body == "MISSING":
        return None
    raise ClientError(f"unexpected answer: {body[:200]!r}")


__all__ = ["Answer", "PubApiClient"]
