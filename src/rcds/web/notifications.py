"""The CVMFS notification endpoints: ``/api/v1/notifications/subscribe`` streams a repository's new
revisions as server-sent events in the CVMFS format (``rcds.cvmfs.subscriber``); ``publish`` is refused,
because rcds announces its own revisions and nobody else's.

Keep-alives: every ``keepalive`` seconds without a message the latest message is sent again. An SSE comment
would be the usual choice, but the stock subscriber (``cvmfs/notify/subscriber_sse.cc``) hands every
line it receives to the JSON parser and drops the connection on anything that is not a message; a repeated
message is harmless to it (its revision is not newer) and to any other client.

A subscriber that does not read is dropped: the stream socket has a small send buffer, and once more than
``MAX_UNSENT`` bytes wait in user space for it, the hub forgets the subscriber and the stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

from aiohttp import web

from ..logs import fields
from ..publish.notify import NotificationHub, TooManySubscribers
from ..publish.service import PublishService

log = logging.getLogger("rcds.api")

ROOT = "/api/v1/notifications"
SEND_BUFFER = 32 * 1024  # kernel send buffer of a stream socket: messages are ~1 KB
MAX_UNSENT = 16 * 1024  # bytes queued in user space beyond the kernel's buffers: the subscriber is stalled
MAX_REQUEST_BODY = 4096


def _json(status: int, doc: dict[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(doc) + "\n", content_type="application/json", headers=headers
    )


class NotificationStreams:
    def __init__(self, service: PublishService) -> None:
        self.service = service
        self.hub: NotificationHub = service.notifications
        self.keepalive = service.settings.notifications.keepalive

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(f"{ROOT}/subscribe", self.subscribe)
        app.router.add_post(f"{ROOT}/publish", self.publish)

        async def close_streams(_app: web.Application) -> None:
            self.hub.close()  # open streams end now, not after the runner's shutdown timeout

        app.on_shutdown.append(close_streams)

    async def publish(self, request: web.Request) -> web.Response:
        # The gateway's reply shape; rcds makes its own announcements from what it has signed or verified.
        return _json(403, {"status": "error", "reason": "rcds announces its own repositories' revisions"})

    async def _repository(self, request: web.Request) -> str:
        """The repository: ``?repository=`` or the CVMFS request body ``{"version":1,"repository":...}``."""
        name = request.query.get("repository")
        if name:
            return name
        if request.content_length is None or request.content_length > MAX_REQUEST_BODY:
            raise web.HTTPBadRequest(text='{"status":"error","reason":"invalid request body"}\n')
        try:
            doc = json.loads(await request.read())
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("repository"), str):
            raise web.HTTPBadRequest(text='{"status":"error","reason":"invalid request body"}\n')
        return str(doc["repository"])

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        repository = await self._repository(request)
        if repository not in self.service.repository_names:
            return _json(404, {"status": "error", "reason": f"no repository {repository} here"})
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:  # called from publishing threads: must never block
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                loop.call_soon_threadsafe(ready.set)

        try:
            sub = self.hub.subscribe(repository, wake)
        except TooManySubscribers as exc:
            return _json(503, {"status": "error", "reason": str(exc)}, headers={"Retry-After": "30"})
        peer = request.remote
        self.service.metrics.notification_subscribers.set(self.hub.count())
        log.info("notification subscriber", extra=fields(repository=repository, peer=peer))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        transport = request.transport
        try:
            await resp.prepare(request)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:  # a subscriber that stops reading fills this quickly and is then dropped
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            while not sub.closed:
                text = sub.pop()
                if text is None:
                    ready.clear()
                    if sub.queue or sub.closed:
                        continue
                    try:
                        await asyncio.wait_for(ready.wait(), self.keepalive)
                        continue
                    except TimeoutError:
                        text = self.hub.latest(repository)
                        if text is None:  # nothing announced yet (a replica before its first snapshot)
                            await resp.write(b": keep-alive\n\n")
                            continue
                # One write per message: the stock subscriber reads a message only if it comes in one piece.
                await resp.write(f"data: {text}\n\n".encode())
                if transport is None or transport.is_closing():
                    break
                if transport.get_write_buffer_size() > MAX_UNSENT:
                    self.hub.drop(sub, "stalled")
                    break
        except ConnectionResetError:  # the subscriber went away
            pass
        finally:
            self.hub.unsubscribe(sub)
            self.service.metrics.notification_subscribers.set(self.hub.count())
            log.info(
                "notification subscriber gone",
                extra=fields(repository=repository, peer=peer, dropped=sub.dropped),
            )
        if sub.dropped is not None and transport is not None:
            transport.abort()  # its unread backlog is not worth delivering
        return resp


def add_notification_routes(app: web.Application, service: PublishService) -> None:
    NotificationStreams(service).add_routes(app)


__all__ = ["ROOT", "add_notification_routes"]
