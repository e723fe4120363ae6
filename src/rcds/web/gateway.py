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

import jwt
from aiohttp import web

from ..cvmfs.objectpack import MAX_HEADER_LINE, MAX_OBJECTS, MAX_PACK_BYTES
from ..publish.auth import MSG_SCOPE_MISSING, AuthError, TokenVerifier
from ..publish.gateway import Gateway, Reply, error
from ..publish.gateway_auth import GatewayRefusal, split_lease_path, storage_create_paths, within

ROOT = "/api/v1"
NO_SCOPE = "invalid_path: the token has no storage.create scope for this path"
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
    def __init__(self, gateway: Gateway, spool_dir: str, tokens: TokenVerifier | None = None) -> None:
        self.gateway = gateway
        self.keys = gateway.keys
        self.spool_dir = spool_dir
        self.tokens = tokens  # WLCG tokens (issuers of [auth.issuers]), scoped to paths: "" prefix

    async def _caller(
        self, request: web.Request, signed: bytes, path: str | None
    ) -> tuple[str, tuple[str, ...] | None]:
        """Who signed: (key id, None), or for a bearer token scoped for ``path`` (the lease path below the
        repository root): (``<issuer>#<sub>``, its storage.create paths)."""
        header = request.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            return self.keys.verify(header, signed), None
        if self.tokens is None:
            raise GatewayRefusal("invalid_token: this server trusts no token issuer")
        if path is None:
            raise GatewayRefusal("invalid_lease")
        return await asyncio.to_thread(self._token_caller, header[len("Bearer ") :].strip(), path)

    def _token_caller(self, token: str, path: str) -> tuple[str, tuple[str, ...]]:
        assert self.tokens is not None
        try:
            identity = self.tokens.verify(token, path)
        except AuthError as exc:
            if str(exc) == MSG_SCOPE_MISSING:
                raise GatewayRefusal(NO_SCOPE) from None
            raise GatewayRefusal(f"invalid_token: {exc}") from None
        # The signature and claims were checked by verify; only the scope is read again here, because
        # compute.create (which verify also accepts) names no path.
        claims = json.loads(
            jwt.PyJWS().decode_complete(token, options={"verify_signature": False})["payload"]
        )
        paths = storage_create_paths(claims.get("scope"))
        if not any(within(path, p) for p in paths):
            raise GatewayRefusal(NO_SCOPE)
        return f"{identity.issuer}#{identity.subject}", paths

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
        r.add_delete(ROOT + "/leases-by-path/{path:.+}", _cvmfs_style(self.cancel))  # admin keys
        r.add_post(ROOT + "/payloads", _cvmfs_style(self.payload))
        r.add_post(ROOT + "/payloads/{token}", _cvmfs_style(self.payload))

    async def _signed_path(self, request: web.Request) -> str:
        """A listing's caller: a key signing the request path, or a token scoped for the whole tree."""
        return (await self._caller(request, request.path.encode(), ""))[0]

    async def _body(self, request: web.Request, limit: int = MAX_MESSAGE) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise GatewayRefusal("invalid_request: body too large")
        data = bytearray()
        while chunk := await request.content.read(limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise GatewayRefusal("invalid_request: body too large")
        return bytes(data)

    async def _token_bound(self, request: web.Request, token: str) -> str:
        """The caller of a request on a lease: a key signs the token; a bearer token must be scoped for
        the lease's path."""
        path = await asyncio.to_thread(self.gateway.lease_path, token)
        return (await self._caller(request, token.encode(), path))[0]

    # --- listings -----------------------------------------------------------------------------------

    async def info(self, request: web.Request) -> Reply:
        return self.gateway.info()

    async def repos(self, request: web.Request) -> Reply:
        return self.gateway.repos(await self._signed_path(request))

    async def repo(self, request: web.Request) -> Reply:
        return self.gateway.repo(await self._signed_path(request), request.match_info["name"])

    async def leases(self, request: web.Request) -> Reply:
        key_id = await self._signed_path(request)
        return await asyncio.to_thread(self.gateway.list_leases, key_id)

    async def lease(self, request: web.Request) -> Reply:
        key_id = await self._signed_path(request)
        return await asyncio.to_thread(self.gateway.lease, key_id, request.match_info["token"])

    # --- leases and commits -------------------------------------------------------------------------

    async def acquire(self, request: web.Request) -> Reply:
        body = await self._body(request)
        doc = _json_object(body)
        path = doc.get("path")
        sub = split_lease_path(path)[1] if isinstance(path, str) else None
        caller, token_paths = await self._caller(request, body, sub)
        return await asyncio.to_thread(self.gateway.acquire, caller, doc, token_paths)

    async def commit(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = await self._token_bound(request, token)
        body = _json_object(await self._body(request))
        return await asyncio.to_thread(self.gateway.commit, key_id, token, body)

    async def drop(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = await self._token_bound(request, token)
        return await asyncio.to_thread(self.gateway.drop, key_id, token)

    async def missing(self, request: web.Request) -> Reply:
        token = request.match_info["token"]
        key_id = await self._token_bound(request, token)
        body = _json_object(await self._body(request, MAX_OBJECT_LIST))
        return await asyncio.to_thread(self.gateway.missing, key_id, token, body.get("objects"))

    async def cancel(self, request: web.Request) -> Reply:
        # As the stock gateway's admin DELETE: the key signs the request path.
        key_id = self.keys.verify(request.headers.get("Authorization"), request.path.encode())
        return await asyncio.to_thread(self.gateway.cancel_leases, key_id, request.match_info["path"])

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
        doc = _json_object(message)
        # Legacy (2.12's) form: the HMAC covers the JSON message, which names the token.
        signed = token.encode() if token else message
        if not token:
            token = str(doc.get("session_token") or "")
        path = await asyncio.to_thread(self.gateway.lease_path, token)
        key_id = (await self._caller(request, signed, path))[0]
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
