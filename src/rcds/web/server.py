"""``rcds serve``: one process serving the publish API, metrics and the repositories' HTTP tree."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import socket
import ssl
from pathlib import Path

from aiohttp import web

from ..logs import fields
from ..publish.auth import (
    Authenticator,
    Authorizer,
    GridMapfile,
    GroupRule,
    TokenVerifier,
    server_ssl_context,
)
from ..publish.config import ServiceSettings
from ..publish.gateway import Gateway, state_db
from ..publish.leases import Leases
from ..publish.service import PublishService
from ..storage import store_from_settings
from .gateway import GatewayApi
from .limits import (
    ConnectionCap,
    LogThrottle,
    connection_budget,
    raise_open_file_limit,
    throttle_library_logs,
)
from .notifications import add_notification_routes
from .pubapi import PubApi
from .repo_http import add_repository_routes
from .status_page import StatusPages

log = logging.getLogger("rcds.server")


def make_auth(settings: ServiceSettings) -> tuple[Authenticator, Authorizer]:
    a = settings.auth
    gridmap = GridMapfile(a.gridmapfile) if a.gridmapfile is not None else None
    tokens = None
    if a.issuers:
        tokens = TokenVerifier(
            {iss: (loc or None) for iss, loc in a.issuers.items()}, list(a.audiences), settings.prefix
        )
    authenticator = Authenticator(gridmap, tokens, allow_localhost=a.allow_localhost)
    rules = [
        GroupRule(g.group, frozenset(g.dns), frozenset(g.tokens), frozenset(g.issuers)) for g in a.groups
    ]
    return authenticator, Authorizer(rules, default_allow=a.groups_default_allow)


def make_app(service: PublishService, throttle: LogThrottle | None = None) -> web.Application:
    authenticator, authorizer = make_auth(service.settings)
    app = web.Application(client_max_size=1 << 20)  # bodies are streamed, never read whole
    PubApi(service, authenticator, authorizer, throttle).add_routes(app)
    StatusPages(service, authenticator).add_routes(app)  # /status, /status.json, /status/cid
    add_repository_routes(
        app,
        {
            r.name: store_from_settings(r.store) if r.store else r.storage
            for r in service.settings.repositories
        },
    )
    add_notification_routes(app, service)
    if service.settings.gateway.enabled:
        a = service.settings.auth
        tokens = (
            TokenVerifier({iss: (loc or None) for iss, loc in a.issuers.items()}, list(a.audiences), "")
            if a.issuers
            else None
        )
        GatewayApi(make_gateway(service), str(service.spool_dir), tokens).add_routes(app)
    return app


def make_gateway(service: PublishService) -> Gateway:
    """The CVMFS-gateway service over the local repositories (leases in the service's state file)."""
    s = service.settings
    leases = service.leases if service.leases is not None else Leases(state_db(s.queue_dir))
    return Gateway(
        s.gateway, service.repositories, leases, s.limits, service.announce, s.prefix, service.metrics
    )


def make_ssl_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    t = settings.tls
    if t is None:
        return None
    return server_ssl_context(
        t.cert, t.key, ca_file=t.ca_file, ca_path=t.ca_path, require_client_cert=t.require_client_cert
    )


class ListenError(Exception):
    """A listener cannot be opened (port in use, no permission): one line for the operator."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


def banner(settings: ServiceSettings, key_places: list[Path] | None = None) -> str:
    """What ``rcds serve`` prints: complete commands that work against this server as printed.

    ``key_places`` are where the client finds the repositories' public keys (``--keys``): the data
    directory when every repository keeps its keys there (the embedded default), else each key
    directory. The client trusts them because they are this machine's files, written by this server.
    """
    li = settings.listeners[0]
    base = f"{'https' if li.tls else 'http'}://{li.host}:{li.port}"
    repos = ", ".join(r.name for r in settings.repositories)
    keys = " ".join(f"--keys {shlex.quote(str(p))}" for p in key_places or [settings.data_dir.resolve()])
    lines = [
        f"rcds publish server on {base} (repositories: {repos}; data in {settings.data_dir})",
        "",
        "Publish a tarball with curl:",
        f'  curl --data-binary @code.tar.gz "{base}/pubapi/publish?cid=myexp/$(sha256sum code.tar.gz | cut -c1-64)"',
        f"  curl '{base}/pubapi/exists?cid=myexp/<hash>'     # PRESENT:/cvmfs/<repo>/{settings.prefix}/myexp/<hash>",
        "",
        "Or a directory with the rcds client; wait and get check the repositories' signatures with the keys",
        "that --keys points to (this server's own files):",
        f"  CID=$(rcds publish ./mycode --server {base} --group myexp --wait | sed -n 1p)",
        f'  rcds wait "$CID" --server {base} {keys}',
        f'  rcds get "$CID" ./mycode-copy --server {base} {keys}',
        "",
        f"Repositories are served at {base}/cvmfs/<repo>/; metrics at {base}/metrics",
    ]
    return "\n".join(lines)


def _key_places(service: PublishService) -> list[Path]:
    """The --keys that cover every local repository: the data directory if it does, else each key dir."""
    data_dir = service.settings.data_dir.resolve()
    places = {name: r.public_key_path.parent.resolve() for name, r in service.repositories.items()}
    if all(p == data_dir / name / ".rcds" / "keys" for name, p in places.items()):
        return [data_dir]
    return sorted(set(places.values()))


def check_listeners(settings: ServiceSettings) -> None:
    """Fail before creating or recovering anything when a listening address cannot be bound.

    The real listeners open after the service has started (which may create repositories); a port in
    use should stop ``rcds serve`` at once, with one line, not after that work.
    """
    for li in settings.listeners:
        family = socket.AF_INET6 if ":" in li.host else socket.AF_INET
        try:
            socket.create_server((li.host, li.port), family=family).close()
        except OSError as exc:
            raise ListenError(li.host, li.port, exc) from exc


async def serve(settings: ServiceSettings, announce: bool = True) -> None:
    check_listeners(settings)
    open_files = raise_open_file_limit()
    max_connections = settings.max_connections or connection_budget(open_files, settings.uploads.max_uploads)
    throttle = LogThrottle()
    throttle_library_logs(throttle)
    service = PublishService(settings)
    await asyncio.to_thread(service.start)
    app = make_app(service, throttle)
    # keepalive_timeout also bounds how long a new connection may take to send its request headers.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=10,
        keepalive_timeout=settings.idle_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    handlers = runner.server
    cap = ConnectionCap(handlers, max_connections, settings.uploads.retry_after, throttle)
    ctx = make_ssl_context(settings)
    loop = asyncio.get_running_loop()
    listening: list[asyncio.Server] = []
    try:
        for li in settings.listeners:
            try:
                listening.append(
                    await loop.create_server(cap, li.host, li.port, ssl=ctx if li.tls else None, backlog=1024)
                )
            except OSError as exc:
                raise ListenError(li.host, li.port, exc) from exc
        log.info(
            "listening",
            extra=fields(
                addresses=[f"{li.host}:{li.port}" for li in settings.listeners],
                max_connections=max_connections,
                open_file_limit=open_files,
            ),
        )
        if announce:
            print(banner(settings, _key_places(service)), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: finishing in-flight publishes")
    finally:
        service.running = False  # new requests get "Service not running" while workers finish
        for server in listening:
            server.close()  # no new connections; the runner then shuts the open ones down
        await runner.cleanup()
        await asyncio.to_thread(service.stop)
        log.info("stopped")


def run(settings: ServiceSettings) -> None:
    asyncio.run(serve(settings))


__all__ = ["ListenError", "banner", "make_app", "run", "serve"]
