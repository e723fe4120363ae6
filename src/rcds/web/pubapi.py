"""The ``/pubapi`` web API, wire-compatible with cvmfs-user-pub (see README "Publish API").

Bodies are plain text ending in a newline: ``OK``, ``PRESENT:/cvmfs/<repo>/<prefix>/<cid>``, ``MISSING``,
``repos:a,b``, ``Bad request: <reason>`` (400), ``<reason>`` (403), ``Unrecognized api`` (404). Every
response carries ``Cache-control: max-age=0``. Any method is accepted, as in the original (clients POST
and GET interchangeably), and a doubled leading slash (``//pubapi/...``, sent by some clients) works.

Processing order, as in the original: ``config`` and ``ping`` need no credentials; everything else is
authenticated first, then the CID is validated, then the endpoint runs. An unknown identity gets its 403
before a byte of the body is read, so it leaves nothing on disk.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from ..client import bundle as job_client
from ..logs import fields
from ..publish.auth import Authenticator, AuthError, Authorizer, Identity, peer_dn_from_ssl_object
from ..publish.cid import CidError, validate_cid
from ..publish.config import UploadLimits
from ..publish.download import DownloadError, SourceNotAllowed, SourceUrl, download, parse_source
from ..publish.namespace import NamespaceConflict
from ..publish.service import PublishService, ServiceUnavailable, SpoolFile, UploadTooLarge
from .limits import LogThrottle, UploadSlots

log = logging.getLogger("rcds.api")

READ_BLOCK = 1 << 20
SERVICE_KEY = web.AppKey("rcds_service", PublishService)
_ENDPOINTS = frozenset({"publish", "exists", "update", "config", "ping", "status"})


class ApiError(Exception):
    def __init__(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.headers = headers or {}


class UploadStalled(Exception):
    """The client stopped sending the body, or sends it slower than ``[limits] upload_min_rate``."""


def bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad request: {reason}")


_REASONS = {200: "OK", 400: "Bad request", 403: "Access denied", 404: "Not found", 408: "Request timeout",
            413: "Request too large", 503: "Service unavailable", 507: "Insufficient storage"}  # fmt: skip
# What is refused because of load or a misbehaving client: logged at a bounded rate, not once per request.
_THROTTLED_STATUSES = frozenset({408, 503})


def text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        reason=_REASONS.get(status),
        text=body + "\n",
        content_type="text/plain",
        headers={"Cache-control": "max-age=0", **(headers or {})},
    )


def _identity_key(identity: Identity) -> str:
    return f"{identity.method}:{identity.issuer or ''}:{identity.subject}"


class PubApi:
    def __init__(
        self,
        service: PublishService,
        authenticator: Authenticator,
        authorizer: Authorizer,
        throttle: LogThrottle | None = None,
    ) -> None:
        self.service = service
        self.authenticator = authenticator
        self.authorizer = authorizer
        limits = service.settings.uploads
        self.upload_limits = limits
        self.slots = UploadSlots(limits.max_uploads, limits.max_uploads_per_identity)
        self.throttle = throttle or LogThrottle()

    def add_routes(self, app: web.Application) -> None:
        job_client.cached()  # built at start-up (the modules on disk may change under a running server)
        app.router.add_get("/pubapi/client", self.job_client)  # before /pubapi/{endpoint}
        app.router.add_route("*", "/pubapi/{endpoint}", self.handle)
        app.router.add_route("*", r"/{lead:/+}pubapi/{endpoint}", self.handle)
        app.router.add_get("/metrics", self.metrics)

    async def job_client(self, request: web.Request) -> web.Response:
        """The job client file (``rcds.client.bundle``): code, not data, so no credentials are needed."""
        data, etag = job_client.cached()
        headers = {"ETag": etag, "Cache-control": "max-age=0"}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        headers["Content-Disposition"] = 'attachment; filename="rcds-job"'
        return web.Response(body=data, content_type="text/x-python", charset="utf-8", headers=headers)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.service.metrics.render)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        endpoint = request.match_info["endpoint"]
        info: dict[str, object] = {}
        try:
            response = await self._dispatch(request, endpoint, info)
        except ApiError as err:
            response = text(err.status, err.body, err.headers)
            info.setdefault("error", err.body)
        except ServiceUnavailable as exc:
            response = text(400, f"Bad request: {exc}")
        except UploadStalled as exc:
            response = await _cut(request, text(408, f"Bad request: upload stalled: {exc}"))
            info.setdefault("error", str(exc))
        name = endpoint if endpoint in _ENDPOINTS else "other"
        self.service.metrics.requests.labels(name, str(response.status)).inc()
        suppressed = 0
        if response.status in _THROTTLED_STATUSES:
            allowed, suppressed = self.throttle.allow(f"request {response.status}")
            if not allowed:
                return response
            if suppressed:
                info["suppressed_similar"] = suppressed
        log.info(
            "request",
            extra=fields(
                method=request.method, endpoint=endpoint, remote=request.remote, status=response.status,
                seconds=round(time.monotonic() - started, 4), **info,
            ),
        )  # fmt: skip
        return response

    async def _dispatch(self, request: web.Request, endpoint: str, info: dict[str, object]) -> web.Response:
        svc = self.service
        if not svc.running:
            raise bad_request("Service not running")
        if endpoint == "config":
            return text(200, "repos:" + ",".join(svc.repository_names))
        if endpoint == "ping":
            if not svc.repository_names:
                raise bad_request("not configured")
            return text(200, "OK")
        raw_cid = request.query.get("cid")
        cid, cid_error = None, None
        if raw_cid is not None:
            try:
                cid = validate_cid(raw_cid)
            except CidError as exc:
                cid_error = bad_request(str(exc))
        # As in the original: credentials first, then the CID.
        identity = await self._authenticate(request, cid)
        info["identity"] = identity.name
        if cid_error is not None:
            raise cid_error
        if cid is not None:
            info["cid"] = cid
        if endpoint not in _ENDPOINTS:
            raise ApiError(404, "Unrecognized api")
        if cid is None:
            raise bad_request(f"{endpoint} with no cid")
        if endpoint == "exists":
            where = svc.exists(cid)
            return text(200, f"PRESENT:{where.path}" if where else "MISSING")
        if endpoint == "update":
            where = svc.update(cid)
            return text(200, f"PRESENT:{where.path}" if where else "MISSING")
        if endpoint == "status":
            doc = await asyncio.to_thread(svc.status, cid)
            return web.json_response(doc, headers={"Cache-control": "max-age=0"})
        return await self._publish(request, cid, identity, info)

    async def _receive(
        self, request: web.Request, spool: SpoolFile, sized: Callable[[int], Awaitable[None]]
    ) -> None:
        """The body into ``spool``; ``sized(n)`` is told the expected size (its Content-Length), then the
        bytes received so far after each write (``_EarlyStart``)."""
        await sized(request.content_length or 0)
        buffered: list[bytes] = []
        size = 0
        async for block in _body(request, self.upload_limits):
            buffered.append(block)
            size += len(block)
            if size >= READ_BLOCK:  # write in ~1 MiB pieces, off the event loop
                await asyncio.to_thread(spool.write, b"".join(buffered))
                buffered, size = [], 0
                await sized(spool.size)
        if buffered:
            await asyncio.to_thread(spool.write, b"".join(buffered))

    async def _drain(self, request: web.Request) -> None:
        async for _ in _body(request, self.upload_limits):
            pass

    async def _authenticate(self, request: web.Request, cid: str | None) -> Identity:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        authorization = request.headers.get("Authorization")
        call = functools.partial(
            self.authenticator.authenticate,
            remote_addr=request.remote or "",
            authorization=authorization,
            peer_dn=peer_dn_from_ssl_object(ssl_object) if ssl_object is not None else None,
            secure=request.secure,
            cid=cid,
        )
        try:
            # A token may need its issuer's keys fetched (seconds): keep that off the event loop.
            identity = await asyncio.to_thread(call) if authorization else call()
        except AuthError as err:
            raise ApiError(403, err.message) from err
        if identity.method != "token":
            _refuse_foreign_browser_requests(request, identity)
        return identity

    async def _publish(
        self, request: web.Request, cid: str, identity: Identity, info: dict[str, object]
    ) -> web.Response:
        svc = self.service
        try:
            self.authorizer.check(identity, cid)
        except AuthError as err:
            raise ApiError(403, err.message) from err
        striplevels_raw = request.query.get("striplevels", "0")
        if striplevels_raw not in ("0", "1", "2"):
            raise bad_request("only striplevels 0, 1, and 2 supported")
        striplevels = int(striplevels_raw)
        source = request.query.get("source")
        url: SourceUrl | None = None
        if source is not None:
            try:
                url = parse_source(source, svc.settings.source)
            except SourceNotAllowed as exc:
                raise bad_request(str(exc)) from exc
            info["source"] = str(url)
        elif request.content_length is not None and request.content_length > svc.settings.max_upload:
            raise ApiError(413, f"Bad request: upload exceeds the limit of {svc.settings.max_upload} bytes")

        try:
            early = await asyncio.to_thread(svc.before_upload, cid)
        except NamespaceConflict as exc:
            raise bad_request(str(exc)) from exc
        if early is not None:  # present, or already queued: the body is not needed
            await self._drain(request)
            info["outcome"] = "present" if early.present else "already-queued"
            return text(200, early.body)

        slot = _identity_key(identity)
        if not self.slots.acquire(slot):
            info["uploads_in_progress"] = self.slots.in_use
            raise self._busy("too many uploads in progress, retry later")
        try:
            return await self._receive_and_accept(request, cid, identity, url, striplevels, info)
        finally:
            self.slots.release(slot)

    def _busy(self, why: str) -> ApiError:
        return ApiError(503, f"Service busy: {why}", {"Retry-After": str(self.upload_limits.retry_after)})

    async def _receive_and_accept(
        self,
        request: web.Request,
        cid: str,
        identity: Identity,
        url: SourceUrl | None,
        striplevels: int,
        info: dict[str, object],
    ) -> web.Response:
        svc = self.service
        try:
            spool = svc.new_spool()
        except OSError as exc:
            if self.throttle.allow("spool open failed")[0]:
                log.warning("cannot open a spool file", extra=fields(cid=cid, error=str(exc)))
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: a moment's overload
                raise self._busy("out of file descriptors, retry later") from exc
            raise bad_request(f"error getting publish data: {exc.strerror or exc}") from exc
        accepted = False
        try:
            early = _EarlyStart(
                svc.settings.small_publish_bytes,
                functools.partial(svc.start_early, cid, spool, striplevels, identity.name),
            )
            if url is not None:
                await self._drain(request)
                await download(url, svc.settings.source, spool, early.sized)
            else:
                await self._receive(request, spool, early.sized)
            if spool.size == 0:
                raise bad_request("error getting publish data: empty upload")
            info["bytes"] = spool.size
            outcome = await asyncio.to_thread(svc.accept, cid, spool, striplevels, identity.name)
            accepted = True
            info["outcome"] = "present" if outcome.present else "queued"
            return text(200, outcome.body)
        except UploadTooLarge as exc:
            raise ApiError(413, f"Bad request: {exc}") from exc
        except NamespaceConflict as exc:  # a conflicting upload was queued while this body came in
            raise bad_request(str(exc)) from exc
        except DownloadError as exc:
            raise bad_request(f"error getting publish data: {exc}") from exc
        except OSError as exc:  # a full spool disk, a dropped connection: nothing was acknowledged
            if self.throttle.allow("upload failed")[0]:
                log.warning("upload failed", extra=fields(cid=cid, error=str(exc)))
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise self._busy("out of file descriptors, retry later") from exc
            raise bad_request(f"error getting publish data: {exc.strerror or exc}") from exc
        finally:
            if not accepted:
                await asyncio.to_thread(spool.discard)


@functools.cache
def _own_host_names() -> frozenset[str]:
    # Looked up once, on first use: getfqdn() may ask DNS, which an importing CLI command should not wait for.
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def _is_own_address(request: web.Request, host: str | None, port: int | None) -> bool:
    """Whether ``host:port`` (from a Host or Origin header) names this server as the client reached it.

    Own names are loopback addresses, ``localhost``, this machine's host names and the address the client
    connected to, each with the port it connected to. A name an attacker controls that merely resolves to
    127.0.0.1 (DNS rebinding) is not one of them.
    """
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not host or not sockname:
        return False
    local_ip, local_port = str(sockname[0]), int(sockname[1])
    if (port if port is not None else (443 if request.secure else 80)) != local_port:
        return False
    host = host.lower().rstrip(".")
    if host in _own_host_names() or host == local_ip:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_url(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port of a URL (``//host:port`` for a Host header); no host if it does not parse."""
    try:
        parts = urlsplit(url)
        return parts.scheme, parts.hostname, parts.port
    except ValueError:  # a port that is not a number, unbalanced brackets
        return "", None, None


def _refuse_foreign_browser_requests(request: web.Request, identity: Identity) -> None:
    """Refuse what a web browser does on behalf of another site (issue 12, defect 8).

    Localhost access and client certificates are ambient credentials: a browser on the server host (or one
    holding a grid certificate) would lend them to any page it shows. Browsers send ``Origin`` on
    cross-site POSTs, so a foreign or ``null`` Origin is refused; curl and the rcds client send none. A page
    served from an attacker's name that resolves to 127.0.0.1 (DNS rebinding) is same-origin to the browser
    and sends no Origin, but its Host header names the attacker's domain: for the localhost identity the
    Host must be one of this server's own names.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, host, port = _split_url(origin)
        expected_scheme = "https" if request.secure else "http"
        if scheme != expected_scheme or not _is_own_address(request, host, port):
            raise ApiError(403, "Cross-site request refused")
    if identity.method == "localhost":
        _, host, port = _split_url("//" + request.headers.get("Host", ""))
        if not _is_own_address(request, host, port):
            raise ApiError(403, "Host header does not name this server")


async def _body(request: web.Request, limits: UploadLimits) -> AsyncIterator[bytes]:
    """The request body in blocks, raising :class:`UploadStalled` when the client stops or trickles.

    Only the time spent waiting for the client counts (not our own spool writes): no byte for
    ``idle_timeout``, or fewer than ``min_rate`` bytes per second over a ``rate_window`` of waiting.
    """
    loop = asyncio.get_running_loop()
    waited, window_bytes = 0.0, 0
    while True:
        started = loop.time()
        try:
            async with asyncio.timeout(limits.idle_timeout):
                block = await request.content.read(READ_BLOCK)
        except TimeoutError:
            raise UploadStalled(f"no data for {limits.idle_timeout:g} s") from None
        if not block:
            return
        waited += loop.time() - started
        window_bytes += len(block)
        if waited >= limits.rate_window:
            if window_bytes < limits.min_rate * waited:
                raise UploadStalled(f"slower than {limits.min_rate} bytes/s")
            waited, window_bytes = 0.0, 0
        yield block


class _EarlyStart:
    """Starts the early staging of an upload or a ``source=`` download (``rcds.publish.early``) once it is
    known to be big: its announced size, or the bytes received so far, above ``small_publish_bytes``."""

    def __init__(self, threshold: int, start: Callable[[int], bool]) -> None:
        self.threshold = threshold
        self._start: Callable[[int], bool] | None = start

    async def sized(self, size: int) -> None:
        if self._start is not None and size > self.threshold:
            start, self._start = self._start, None
            await asyncio.to_thread(start, size)


async def _cut(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection now, instead of lingering for the rest of a stalled body."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # after the response is flushed
    return response
