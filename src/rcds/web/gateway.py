"""The HTTP face of the CVMFS-gateway API (``/api/v1``): authentication and the stock reply shapes.

Every answer is HTTP 200 with a JSON document, as the stock gateway's (publishers read ``status``).
What is signed (``rcds.publish.gateway_auth``): a lease request's body, a token for a commit, drop or
new-style payload, the first ``Message-Size`` bytes of a legacy payload, and the request path of a listing.
A payload is spooled to a file as it arrives, then unpacked in a thread: memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable
from typing import IO

from aiohttp import web

from ..cvmfs.objectpack import MAX_HEADER_LINE, MAX_OBJECTS, MAX_PACK_BYTES
from ..publish.gateway import Gateway, Reply, error
from ..publish.gateway_auth import GatewayRefusal

ROOT = "/api/v1"
MAX_MESSAGE = 64 * 1024  # a lease request or a payload's JSON message
MAX_OBJECT_LIST = MAX_OBJECTS * 64  # rcds push's "which of these do you lack": names and JSON quoting
MAX_PAYLOAD = MAX_PACK_BYTES + MAX_OBJECTS * MAX_HEADER_LINE + MAX_MESSAGE


def _reply(doc: Reply) -> web.Response:
    return web.json_response(doc)


Handler = Callable[[web.Request], Awaitable[Reply]]


def _cvmfs_style(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return _reply(await handler(request))
        except GatewayRefusal as exc:
            return _reply(error(exc.reason))

    return wrapped


def _json_object(raw: bytes) -> dict[str, object]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise GatewayRefusal("invalid_request: the body is not a JSON object")
    return doc


class GatewayApi:
    def __init__(self, gateway: Gateway, spool_dir: str) -> None:
        self.gateway = gateway
        self.keys = gateway.keys
        self.spool_dir = spool_dir

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(ROOT, _cvmfs_style(self.info))
        r.add_get(ROOT + "/", _cvmfs_style(self.info))
        r.add_get(ROOT + "/repos", _cvmfs_style(self.repos))
        r.add_get(ROOT + "/repos/{name}", _cvmfs_style(self.repo))
        r.add_get(ROOT + "/leases", _cvmfs_style(self.leases))
        r.add_get(ROOT + "/leases/{token}", _cvmfs_style(self.lease))
        r.add_post(ROOT + "/leases", _cvmfs_style(self.acquire))
        r.add_post(ROOT + "/leases/{token}", _cvmfs_style(self.commit))
        r.add_delete(ROOT + "/leases/{token}", _cvmfs_style(self.drop))
        r.add_post(ROOT + "/leases/{token}/missing", _cvmfs_style(self.missing))  # rcds push's
        r.add_post(ROOT + "/payloads", _cvmfs_style(self.payload))
        r.add_post(ROOT + "/payloads/{token}", _cvmfs_style(self.payload))

    def _signed_path(self, request: web.Request) -> str:
        return self.keys.verify(request.headers.get("Authorization"), request.path.encode())

    async def _body(self, request: web.Request, limit: int = MAX_MESSAGE) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise GatewayRefusal("invalid_request: body too large")
        data = bytearray()
        while chunk := await request.content.read(limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise GatewayRefusal("invalid_request: body too large")
        return bytes(data)

    # --- listings -----------------------------------------------------------------------------------

    async def info(self, request: web.Request) -> Reply:
        return self.gateway.info()

    async def repos(self, request: web.Request) -> Reply:
        return self.gateway.repos(self._signed_path(request))

    async def repo(self, request: web.Request) -> Reply:
        return self.gateway.repo(self._signed_path(request), request.match_info["name"])

    async def leases(self, request: web.Request) -> Reply:
        key_id = self._signed_path(request)
        return await asyncio.to_thread(self.gateway.list_leases, key_id)

    async def lease(self, request: web.Request) -> Reply:
        key_id = self._signed_path(request)
        return await asyncio.to_thread(self.gateway.lease, key_id, request.match_info["token"])

    # --- leases and commits -------------------------------------------------------------------------

    async def acquire(self, request: web.Request) -> Reply:
        body = await self._body(request)
        key_id = self.keys.verify(request.headers.get("Authorization"), body)
        return await asyncio.to_thread(self.gateway.acquire, key_id, _json_object(body))

    async def commit(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = self.keys.verify(request.headers.get("Authorization"), token.encode())
        body = _json_object(await self._body(request))
        return await asyncio.to_thread(self.gateway.commit, key_id, token, body)

    async def drop(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = self.keys.verify(request.headers.get("Authorization"), token.encode())
        return await asyncio.to_thread(self.gateway.drop, key_id, token)

    async def missing(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = self.keys.verify(request.headers.get("Authorization"), token.encode())
        body = _json_object(await self._body(request, MAX_OBJECT_LIST))
        return await asyncio.to_thread(self.gateway.missing, key_id, token, body.get("objects"))

    # --- payloads ------------------------------------------------------------------------------------

    async def payload(self, request: web.Request) -> Reply:
        token = request.match_info.get("token", "")
        try:
            message_size = int(request.headers.get("Message-Size", ""))
        except ValueError:
            raise GatewayRefusal("invalid_request: missing Message-Size header") from None
        if not 0 < message_size <= MAX_MESSAGE:
            raise GatewayRefusal("invalid_request: bad Message-Size")
        if request.content_length is not None and request.content_length > MAX_PAYLOAD:
            raise GatewayRefusal("invalid_payload: larger than an ObjectPack may be")
        message = await request.content.readexactly(message_size)
        # Legacy (2.12's) form: the HMAC covers the JSON message, which names the token.
        signed = token.encode() if token else message
        key_id = self.keys.verify(request.headers.get("Authorization"), signed)
        doc = _json_object(message)
        if not token:
            token = str(doc.get("session_token") or "")
        try:
            header_size = int(str(doc.get("header_size")))
        except ValueError:
            raise GatewayRefusal("invalid_request: bad header_size") from None
        digest = str(doc.get("payload_digest") or "")
        with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
            await self._spool(request, spool)
            spool.seek(0)
            return await asyncio.to_thread(
                self.gateway.receive_payload, key_id, token, spool, digest, header_size
            )

    async def _spool(self, request: web.Request, spool: IO[bytes]) -> None:
        received = 0
        while chunk := await request.content.read(1 << 20):
            received += len(chunk)
            if received > MAX_PAYLOAD:
                raise GatewayRefusal("invalid_payload: larger than an ObjectPack may be")
            spool.write(chunk)
