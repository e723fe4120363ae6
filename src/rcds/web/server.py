"""``rcds serve``: one process serving the publish API, metrics and the repositories' HTTP tree."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

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
from ..publish.service import PublishService
from .limits import (
    ConnectionCap,
    LogThrottle,
    connection_budget,
    raise_open_file_limit,
    throttle_library_logs,
)
from .pubapi import PubApi
from .repo_http import add_repository_routes

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
    add_repository_routes(app, {r.name: r.storage for r in service.settings.repositories})
    return app


def make_ssl_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    t = settings.tls
    if t is None:
        return None
    return server_ssl_context(
        t.cert, t.key, ca_file=t.ca_file, ca_path=t.ca_path, require_client_cert=t.require_client_cert
    )


def banner(settings: ServiceSettings) -> str:
    li = settings.listeners[0]
    base = f"{'https' if li.tls else 'http'}://{li.host}:{li.port}"
    repos = ", ".join(r.name for r in settings.repositories)
    lines = [
        f"rcds publish server on {base} (repositories: {repos}; data in {settings.data_dir})",
        "",
        "Publish a tarball with curl:",
        f'  curl --data-binary @code.tar.gz "{base}/pubapi/publish?cid=myexp/$(sha256sum code.tar.gz | cut -c1-64)"',
        f"  curl '{base}/pubapi/exists?cid=myexp/<hash>'     # PRESENT:/cvmfs/<repo>/{settings.prefix}/myexp/<hash>",
        "",
        f"Repositories are served at {base}/cvmfs/<repo>/ (keys in <storage>/.rcds/keys/); metrics at {base}/metrics",
    ]
    return "\n".join(lines)


async def serve(settings: ServiceSettings, announce: bool = True) -> None:
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
            listening.append(
                await loop.create_server(cap, li.host, li.port, ssl=ctx if li.tls else None, backlog=1024)
            )
        log.info(
            "listening",
            extra=fields(
                addresses=[f"{li.host}:{li.port}" for li in settings.listeners],
                max_connections=max_connections,
                open_file_limit=open_files,
            ),
        )
        if announce:
            print(banner(settings), flush=True)
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


__all__ = ["banner", "make_app", "run", "serve"]
