"""Serve repository storage directories over HTTP exactly like a stock CVMFS stratum 0 Apache.

URL layout: ``/cvmfs/<fqrn>/<relative path>`` maps to ``<storage>/<relative path>``, plus the server-wide
``/cvmfs/info/v1/repositories.json``. Only an allowlist is served: the ``.cvmfs*`` root files of the public
tree and ``data/XX/<object name>`` (``cvmfs-format.md`` 1.1, 1.2). Everything else answers 404, in
particular the private ``.rcds/`` directory (keys, state), ``data/txn/`` staging files, directories,
``..`` and any percent-encoded request path (no valid name needs an escape).

Why the response headers are what they are (``cvmfs-format.md`` 7.1, 7.2; ``cvmfs_server_apache.sh``):

* ``.cvmfs*`` files (manifest, whitelist, reflog, ...) change with every publish. They are served as
  ``application/x-cvmfs`` and expire 61 s after access: Squid in its default configuration does not cache
  at all what expires within 60 s, so 61 s keeps them cacheable for one minute. A site proxy then absorbs
  the clients' periodic manifest polls while a new publish still shows up within about a minute.
  ``.cvmfs_status.json`` starts with ``.cvmfs`` too and, as with Apache's ``ForceType``, gets
  ``application/x-cvmfs``; other ``.json`` (the repositories list) is ``application/json``, also 61 s.
* Data objects are content-addressed (name = hash of the stored bytes), so a name never changes its
  content: ``application/octet-stream``, cacheable for 3 days.
* No ``Last-Modified`` and no ``ETag``; ``If-Modified-Since``/``If-None-Match`` are ignored and every hit
  is a plain 200 with the full body. Stock CVMFS removes them "because of squid bugs" with revalidation,
  and nothing needs revalidating: a new manifest is a new body and an object never changes.
* Bytes are served exactly as stored, never with transparent compression: objects are already zlib
  streams and the client hashes the raw body it receives (``cvmfs-format.md`` 1.5), so a
  ``Content-Encoding`` would break verification. Ranges are not used by clients and not honoured.
* HEAD works (stratum 1s probe ``.cvmfs_master_replica`` with HEAD); keep-alive is on (aiohttp default).

How a body is sent: a file up to 256 KiB (most objects of user code) is read whole and answered in one
write. The event loop opens it itself and reads it with ``RWF_NOWAIT``, which succeeds only from the page
cache; a file not cached is read on a worker thread. A thread hop per request would cost ~50 us of CPU,
more than the rest of the request: with it a replica pulling 20,000 small objects kept this server busy
for 1.6 CPU seconds, without it 0.6 (``bench/replicate.py``). Opening in the loop can wait for the disk
only for metadata not in the dentry cache, which is what nginx accepts too. Larger files are streamed with
``sendfile`` (chunked reads as a fallback), so objects of hundreds of MB never sit in memory.
``aiohttp.web.FileResponse`` is deliberately not used: it adds ``Last-Modified``/``ETag``, answers
304/206/412 and would even serve a ``.gz`` sibling file to a client sending ``Accept-Encoding``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO, Final

from aiohttp import hdrs, web

from ..storage import ObjectMissing, ObjectStore, StorageError

__all__ = [
    "INFO_PATH",
    "ROOT_FILES",
    "add_repository_routes",
    "make_app",
    "run",
]

INFO_PATH: Final = "/cvmfs/info/v1/repositories.json"

# Root files of a stratum 0/1 public tree (cvmfs-format.md 1.1). All of them start with ".cvmfs".
ROOT_FILES: Final = frozenset(
    {
        ".cvmfspublished",
        ".cvmfswhitelist",
        ".cvmfswhitelist.pkcs7",
        ".cvmfsreflog",
        ".cvmfs_master_replica",
        ".cvmfs_status.json",
        ".cvmfs_last_snapshot",
        ".cvmfs_is_snapshotting",
    }
)

# data/ + 2 hex + 38 hex (every content digest is 20 bytes, cvmfs-format.md 1.3) + optional algorithm id
# + optional suffix letter (the set swissknife_scrub accepts). Lowercase only, as the tools write them.
_DATA_RE: Final = re.compile(r"data/[0-9a-f]{2}/[0-9a-f]{38}(?:-rmd160|-shake128)?[CHXMPL]?")
# DNS-like repository name; it is only ever used as a key of the mapping, never as a path component.
_FQRN_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")

_SHORT_TTL: Final = 61  # seconds; > 60 or Squid's defaults do not cache at all
_OBJECT_TTL: Final = 3 * 24 * 3600  # "access plus 3 days"
_CHUNK: Final = 256 * 1024  # read size of the non-sendfile fallback
_INLINE_MAX: Final = 256 * 1024  # files up to this size are read whole and sent in one write

# Tests (and odd transports) may turn sendfile off; same switch as aiohttp's FileResponse.
_USE_SENDFILE: bool = not os.environ.get("AIOHTTP_NOSENDFILE")
# Cleared for good the first time the kernel or file system refuses RWF_NOWAIT; tests clear it too.
_use_nowait: bool = hasattr(os, "RWF_NOWAIT")


@dataclass(frozen=True)
class _Policy:
    content_type: str
    cache_control: str
    max_age: int

    def headers(self) -> dict[str, str]:
        # Date and Expires from the same clock reading: Expires = access time + max_age, like mod_expires.
        # Formatted once a second (HTTP dates have one-second resolution): ~15 us saved per request.
        now = int(time.time())
        cached = _HEADERS.get(self)
        if cached is None or cached[0] != now:
            cached = _HEADERS[self] = (
                now,
                {
                    hdrs.CONTENT_TYPE: self.content_type,
                    hdrs.CACHE_CONTROL: self.cache_control,
                    hdrs.DATE: formatdate(now, usegmt=True),
                    hdrs.EXPIRES: formatdate(now + self.max_age, usegmt=True),
                },
            )
        return cached[1]


_HEADERS: dict[_Policy, tuple[int, dict[str, str]]] = {}


_CVMFS: Final = _Policy("application/x-cvmfs", f"max-age={_SHORT_TTL}", _SHORT_TTL)
_JSON: Final = _Policy("application/json", f"max-age={_SHORT_TTL}", _SHORT_TTL)
_OBJECT: Final = _Policy("application/octet-stream", f"public, max-age={_OBJECT_TTL}", _OBJECT_TTL)


def _policy_for(relpath: str) -> _Policy | None:
    """The serving policy of an allowlisted repository-relative name, or None (-> 404)."""
    if relpath in ROOT_FILES:
        return _CVMFS
    if _DATA_RE.fullmatch(relpath):
        return _OBJECT
    return None


def _open_regular(path: str) -> tuple[int, int] | None:
    """A descriptor and the size of ``path`` if it is a regular file; None otherwise (missing, directory,
    fifo...)."""
    try:
        # O_NONBLOCK: opening a FIFO planted under an allowlisted name must not hang the server.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st.st_size


def _read_cached(fd: int, size: int) -> bytearray | None:
    """The whole file if the page cache holds all of it, without ever waiting for the disk; else None."""
    global _use_nowait
    if not _use_nowait:
        return None
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        _use_nowait = False  # a file system or kernel without RWF_NOWAIT: always read on a thread
        return None
    return buf if n == size else None


def _read_whole(fd: int, size: int) -> bytearray:
    """Read exactly ``size`` bytes (blocking: run on a worker thread)."""
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise OSError(f"file shrank to {done} of {size} bytes while being served")
        done += n
    return buf


async def _copy_chunks(resp: web.StreamResponse, fobj: BinaryIO, count: int) -> None:
    loop = asyncio.get_running_loop()
    while count > 0:
        chunk = await loop.run_in_executor(None, fobj.read, min(_CHUNK, count))
        if not chunk:
            raise OSError(f"{fobj.name!r} shrank while being served")
        await resp.write(chunk)
        count -= len(chunk)


async def _send_body(request: web.Request, resp: web.StreamResponse, fobj: BinaryIO, size: int) -> None:
    if _USE_SENDFILE:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        try:
            sent = await asyncio.get_running_loop().sendfile(transport, fobj, 0, size)
        except NotImplementedError:  # e.g. uvloop with TLS: fall through to plain reads
            fobj.seek(0)
        else:
            if sent != size:
                # Content-Length is already on the wire: the only honest thing left is to drop the connection.
                raise OSError(f"sent {sent} of {size} bytes of {fobj.name!r}")
            return
    await _copy_chunks(resp, fobj, size)


def _not_found() -> web.HTTPNotFound:
    # Explicitly uncacheable: a proxy with negative caching (squid's negative_ttl) must not go on
    # answering 404 for a repository or object once it has been published.
    return web.HTTPNotFound(headers={"Cache-Control": "no-store"})


async def _serve_file(request: web.Request, path: str, policy: _Policy) -> web.StreamResponse:
    opened = _open_regular(path)  # in the loop: see the module docstring
    if opened is None:
        raise _not_found()
    fd, size = opened
    if request.method != hdrs.METH_HEAD and size <= _INLINE_MAX:
        try:
            body = _read_cached(fd, size)
            if body is None:
                body = await asyncio.get_running_loop().run_in_executor(None, _read_whole, fd, size)
        finally:
            os.close(fd)
        return web.Response(body=body, headers=policy.headers())
    with open(fd, "rb", buffering=0, closefd=True) as fobj:
        # A bare StreamResponse: no Last-Modified, no ETag, no conditional or range handling, no compression.
        resp = web.StreamResponse(status=200, headers=policy.headers())
        resp.content_length = size
        await resp.prepare(request)
        if request.method != hdrs.METH_HEAD and size > 0:
            await _send_body(request, resp, fobj, size)
        await resp.write_eof()
        return resp


async def _serve_object(
    request: web.Request, store: ObjectStore, key: str, policy: _Policy
) -> web.StreamResponse:
    """A repository in a bucket: a redirect to the bucket's public URL when configured (clients and
    proxies then fetch from the bucket), else the object fetched and passed on."""
    if store.public_url:
        raise web.HTTPFound(f"{store.public_url}/{key}", headers={hdrs.CACHE_CONTROL: policy.cache_control})
    loop = asyncio.get_running_loop()
    try:
        if request.method == hdrs.METH_HEAD:
            size = await loop.run_in_executor(None, store.size, key)
            resp = web.StreamResponse(status=200, headers=policy.headers())
            resp.content_length = size
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        body = await loop.run_in_executor(None, store.get, key)
    except ObjectMissing:
        raise _not_found() from None
    except StorageError as exc:
        raise web.HTTPBadGateway(text=f"{exc}\n", headers={hdrs.CACHE_CONTROL: "no-store"}) from exc
    return web.Response(body=body, headers=policy.headers())


def _split_raw_path(raw_path: str) -> tuple[str, str] | None:
    """``/cvmfs/<fqrn>/<rest>`` of the still percent-encoded request path -> (fqrn, rest)."""
    if not raw_path.startswith("/cvmfs/"):
        return None
    fqrn, sep, rest = raw_path[len("/cvmfs/") :].partition("/")
    if not sep or not _FQRN_RE.fullmatch(fqrn):
        return None
    return fqrn, rest


def add_repository_routes(app: web.Application, repos: Mapping[str, Path | ObjectStore]) -> None:
    """Serve each fqrn -> storage directory (or object store: a bucket) under /cvmfs/<fqrn>/.

    ``repos`` is consulted on every request (not copied), so repositories added to or removed from it while
    the server runs are served or dropped at once. Call once per application, after any more specific
    routes under ``/cvmfs/`` (the route here catches every ``/cvmfs/<name>/<path>``).
    """

    async def repositories_json(request: web.Request) -> web.Response:
        doc = {
            "schema": 1,
            "repositories": [{"name": fqrn, "url": f"/cvmfs/{fqrn}"} for fqrn in sorted(repos)],
            "replicas": [],
        }
        return web.Response(body=json.dumps(doc).encode(), headers=_JSON.headers())

    async def repository_file(request: web.Request) -> web.StreamResponse:
        # Decide on the raw (still percent-encoded, never normalized) path: allowlisted names consist of
        # [0-9a-zA-Z._-] only, so "..", "%2e%2e", "%2f", "\\" and friends can never match.
        split = _split_raw_path(request.rel_url.raw_path)
        if split is None:
            raise _not_found()
        fqrn, relpath = split
        policy = _policy_for(relpath)
        storage = repos.get(fqrn)
        if policy is None or storage is None:
            raise _not_found()
        if isinstance(storage, ObjectStore):
            return await _serve_object(request, storage, relpath, policy)
        return await _serve_file(request, f"{storage}/{relpath}", policy)  # a str: pathlib costs ~10 us

    app.router.add_get(INFO_PATH, repositories_json)  # GET + HEAD
    app.router.add_get("/cvmfs/{fqrn}/{path:.*}", repository_file)


def make_app(repos: Mapping[str, Path]) -> web.Application:
    """An application serving only the repositories in ``repos`` (looked up per request)."""
    app = web.Application()
    add_repository_routes(app, repos)
    return app


def run(
    repos: Mapping[str, Path],
    host: str = "127.0.0.1",
    port: int = 8080,
    print_fn: Callable[[str], object] = print,
) -> None:
    """Blocking server (web.run_app) that prints the URL of each repository.

    The socket is bound before the server starts so that ``port=0`` prints the real port; the URLs are
    printed once the server accepts connections. Stops on SIGINT/SIGTERM.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    try:
        bound_port = sock.getsockname()[1]
        url_host = f"[{host}]" if ":" in host else (host or "0.0.0.0")
        base = f"http://{url_host}:{bound_port}"

        def announce(*_args: object, **_kwargs: object) -> None:
            names = list(repos)
            for fqrn in names:
                print_fn(f"{base}/cvmfs/{fqrn}")
            if not names:
                print_fn(f"{base}{INFO_PATH} (no repositories yet)")

        web.run_app(make_app(repos), sock=sock, print=announce)
    finally:
        sock.close()
