"""``rcds push``: replace the content of one path of a repository with a tarball or a directory, through the
server's gateway API (``/api/v1``), uploading only the objects the server lacks.

The push builds the path's nested catalog here, in a private staging repository kept under the work
directory (``~/.cache/rcds/push/<target>``): files are compressed and hashed locally; on the next push of
a directory, a file whose ``stat`` is unchanged is not read at all (``StatCache``), and a changed file
whose content the staging repository already has costs one hash pass (its content index). Then it takes a
lease on the path, asks the server which of the subtree's objects it lacks (not those it had at the last
push's commit, listed in ``at-server``), sends those in ObjectPacks, and commits the catalog by hash; the
server checks the subtree is complete before grafting it (if an object of the last push has gone since,
the push asks about all of them and commits again).

Interrupted? Run the same command again: the lease token is kept in the work directory and reused while it
is live, and objects the server already received are not sent again.

Who may push where is the server's: a key (``plain_text <id> <secret>``, one per person) may lease only its
configured paths, a WLCG token only its ``storage.create:<path>`` scopes; a push into another person's path
is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from ..cvmfs import objectpack
from ..cvmfs.catalog import Chunk
from ..cvmfs.content import PendingContent, StoredContent
from ..cvmfs.hashes import ContentHash, Suffix
from ..cvmfs.objectpack import PackEntry
from ..cvmfs.repository import Repository
from ..cvmfs.tree import TreeEntry, entries_from_directory
from ..publish.gateway_auth import authorization, parse_key_file
from ..storage import ObjectMissing
from .errors import ClientError

PACK_BYTES = 32 * 1024 * 1024  # per ObjectPack: progress and resumption at this grain
MISSING_BATCH = 20_000  # object names per "which do you lack" question


class PushRefused(ClientError):
    """The gateway refused (not this key's path, a busy path, a bad upload): retrying cannot help."""

    exit_code = 5


class GatewayUnreachable(ClientError):
    """No usable answer from the server."""

    exit_code = 4


@dataclass(frozen=True)
class GatewayKey:
    """An HMAC key; or, with ``bearer``, a WLCG token sent instead of signatures."""

    key_id: str
    secret: str
    bearer: str | None = None

    @classmethod
    def token(cls, bearer: str) -> GatewayKey:
        return cls("", "", bearer)

    @classmethod
    def load(cls, path: Path, key_id: str | None = None) -> GatewayKey:
        try:
            keys = parse_key_file(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ClientError(f"gateway key {path}: {exc}") from exc
        if not keys:
            raise ClientError(f"gateway key {path}: no 'plain_text <id> <secret>' line")
        if key_id is None:
            key_id = next(iter(keys))
        if key_id not in keys:
            raise ClientError(f"gateway key {path}: no key {key_id!r}")
        return cls(key_id, keys[key_id])


@dataclass
class PushResult:
    repository: str
    path: str
    revision: int
    catalog: str
    files_unchanged: int  # files not read again (same stat as at the last push of this directory)
    objects: int  # objects in the pushed subtree
    objects_sent: int
    bytes_sent: int  # ObjectPack bytes (headers and objects)
    seconds: float


def parse_target(target: str) -> tuple[str, str]:
    """``REPO:/path`` -> (``REPO``, ``path`` without leading '/')."""
    repository, sep, path = target.partition(":")
    parts = [p for p in path.split("/") if p]
    if not sep or not repository or not parts or any(p in (".", "..") for p in parts):
        raise ClientError(f"target {target!r}: expected REPOSITORY:/path/below/its/root")
    return repository, "/".join(parts)


class GatewaySession:
    """The gateway calls a push makes, signed with one key."""

    def __init__(self, server: str, key: GatewayKey, timeout: float = 300) -> None:
        self.http = httpx.Client(base_url=server.rstrip("/") + "/api/v1", timeout=timeout)
        self.key = key

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, signed: bytes, **kwargs: Any) -> dict[str, Any]:
        auth = (
            f"Bearer {self.key.bearer}"
            if self.key.bearer is not None
            else authorization(self.key.key_id, self.key.secret, signed)
        )
        headers = {"Authorization": auth, **kwargs.pop("headers", {})}
        try:
            response = self.http.request(method, url, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayUnreachable(f"{self.http.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise GatewayUnreachable(f"{self.http.base_url}{url}: HTTP {response.status_code}")
        try:
            doc: dict[str, Any] = response.json()
        except ValueError as exc:
            raise GatewayUnreachable(f"{self.http.base_url}{url}: not a gateway reply") from exc
        return doc

    @staticmethod
    def _ok(doc: dict[str, Any], what: str) -> dict[str, Any]:
        if doc.get("status") != "ok":
            raise PushRefused(f"{what} refused: {doc.get('reason') or doc.get('status')}")
        return doc

    def acquire(self, repository: str, path: str) -> str:
        body = json.dumps({"path": f"{repository}/{path}", "api_version": "2",
                           "hostname": os.uname().nodename}).encode()  # fmt: skip
        doc = self._call("POST", "/leases", body, content=body)
        if doc.get("status") == "path_busy":
            raise PushRefused(
                f"{repository}:/{path} is leased by someone else for {doc.get('time_remaining')}"
            )
        return str(self._ok(doc, "lease")["session_token"])

    def live(self, token: str) -> bool:
        return self._call("GET", f"/leases/{token}", f"/api/v1/leases/{token}".encode()).get("status") == "ok"

    def missing(self, token: str, names: list[str]) -> list[str]:
        doc = self._call("POST", f"/leases/{token}/missing", token.encode(), json={"objects": names})
        return [str(n) for n in self._ok(doc, "object query")["missing"]]

    def upload(self, token: str, raw_header: bytes, body: Iterator[bytes]) -> int:
        message = json.dumps({"payload_digest": objectpack.payload_digest(raw_header),
                              "header_size": str(len(raw_header)), "api_version": "2"}).encode()  # fmt: skip
        data = b"".join([message, raw_header, *body])
        self._ok(
            self._call("POST", f"/payloads/{token}", token.encode(), content=data,
                       headers={"Message-Size": str(len(message))}),
            "upload",
        )  # fmt: skip
        return len(data) - len(message)

    def commit(self, token: str, catalog: ContentHash, size: int) -> int:
        body = {"catalog_hash": catalog.hex, "catalog_size": size}
        doc = self._ok(self._call("POST", f"/leases/{token}", token.encode(), json=body), "commit")
        return int(doc["final_revision"])


def _entries(source: Path, stack: list[BinaryIO]) -> Iterable[TreeEntry]:
    if source.is_dir():
        return entries_from_directory(source)
    from ..ingest.tarstream import IngestError, tar_entries

    stream = open(source, "rb")  # noqa: SIM115 - closed by the caller after staging
    stack.append(stream)

    def checked() -> Iterator[TreeEntry]:
        try:
            yield from tar_entries(stream)
        except IngestError as exc:
            raise ClientError(f"{source}: {exc}") from exc

    return checked()


class StatCache:
    """Files of a directory pushed before, by path and ``stat`` (size, times, inode): where their content
    went in the staging repository. An unchanged file is not read again on the next push (``FileCache``).
    Its objects are trusted to be in the staging store (nothing else deletes from it); one that is not
    fails the push with a request to run it again, and the cache is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT, content TEXT)")
        self._known = {p: (st, c) for p, st, c in self.db.execute("SELECT path, stat, content FROM files")}
        self._stats: dict[str, str] = {}
        self._ingested: list[tuple[str, str, PendingContent]] = []
        self.unchanged = 0  # files not read again

    def get(self, path: Path | str, size: int, st: os.stat_result | None = None) -> StoredContent | None:
        path = str(path)
        if st is None or not stat.S_ISREG(st.st_mode):  # the walk's lstat of a regular file is its stat
            st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
        self._stats[path] = stamp
        known = self._known.get(path)
        if known is None or known[0] != stamp or st.st_size != size:
            return None
        doc = json.loads(known[1])
        self.unchanged += 1
        if "hash" in doc:
            text = doc["hash"]  # SHA-1, 40 hex digits, parsed directly: from_hex costs 20,000 files ~0.1 s
            return StoredContent(
                size, ContentHash(bytes.fromhex(text)) if len(text) == 40 else ContentHash.from_hex(text)
            )
        return StoredContent(size, None, [Chunk(o, n, ContentHash.from_hex(h)) for o, n, h in doc["chunks"]])

    def put(self, path: Path | str, size: int, pending: PendingContent) -> None:
        self._ingested.append((str(path), self._stats.pop(str(path), ""), pending))

    def save(self) -> None:
        """Record what was ingested (after the staging is sealed: the objects are durable)."""
        rows = []
        for path, stamp, pending in self._ingested:
            stored = pending.result()
            doc = ({"hash": stored.hash.hex} if stored.hash is not None
                   else {"chunks": [[c.offset, c.size, c.hash.hex] for c in stored.chunks]})  # fmt: skip
            rows.append((path, stamp, json.dumps(doc)))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files (path, stat, content) VALUES (?, ?, ?)", rows)
        self._ingested.clear()

    def close(self) -> None:
        self.db.close()


def subtree_objects(repo: Repository, root: ContentHash) -> list[str]:
    """Every object a subtree's catalogs name, catalogs first (suffixed hashes, no duplicates)."""
    names: dict[str, None] = {}
    pending = [root]
    while pending:
        h = pending.pop()
        names[h.hex + Suffix.CATALOG.value] = None
        cat = repo.open_catalog(h)
        try:
            for digest, suffix in cat.referenced_objects():
                names[ContentHash(digest).hex + suffix] = None
            pending.extend(ref.hash for ref in cat.nested())
        finally:
            cat.close()
    return list(names)


def push(
    source: Path,
    target: str,
    server: str,
    key: GatewayKey,
    work_root: Path,
    report: Callable[[str], None] = lambda line: None,
    pack_bytes: int = PACK_BYTES,
) -> PushResult:
    started = time.monotonic()
    repository, path = parse_target(target)
    if not source.exists():
        raise ClientError(f"{source}: no such file or directory")
    work = work_root / hashlib.sha1(f"{server}|{repository}|{path}".encode()).hexdigest()[:20]
    work.mkdir(parents=True, exist_ok=True)
    staging_dir = work / "repo"
    if (staging_dir / ".rcds" / "repo.json").exists():
        repo = Repository(staging_dir)
    else:
        repo = Repository.create(repository, staging_dir)
    streams: list[BinaryIO] = []
    session = GatewaySession(server, key)
    try:
        cache = StatCache(work / "files.db") if source.is_dir() else None
        unchanged = 0
        try:
            with repo.staging() as staging:
                staging.content.file_cache = cache
                staged = staging.stage("/" + path, _entries(source, streams))
                staging.seal()  # objects durable, content index updated: then the stat cache may name them
            if cache is not None:
                cache.save()
                unchanged = cache.unchanged
        finally:
            if cache is not None:
                cache.close()
        report(f"built {staged.entries} entries in {time.monotonic() - started:.1f} s")
        names = subtree_objects(repo, staged.root_hash)
        token = _lease(session, work, repository, path, report)
        at_server = work / "at-server"
        known = _read_names(at_server)
        lacking, sent_bytes = _send_lacking(session, token, repo, work, [n for n in names if n not in known],
                                            pack_bytes, report)  # fmt: skip
        report(f"sent {len(lacking)} of {len(names)} objects ({time.monotonic() - started:.1f} s)")
        try:
            revision = session.commit(token, staged.root_hash, staged.root_size)
        except PushRefused as exc:
            if not known or "was not uploaded" not in str(exc):
                raise
            # An object the last push left there is gone (the path was replaced from elsewhere and garbage
            # collected): ask about every object this time.
            at_server.unlink(missing_ok=True)
            report("the server lacks objects of the last push: asking about all of them")
            more, more_bytes = _send_lacking(session, token, repo, work, names, pack_bytes, report)
            lacking, sent_bytes = lacking + more, sent_bytes + more_bytes
            revision = session.commit(token, staged.root_hash, staged.root_size)
        report(f"committed revision {revision} ({time.monotonic() - started:.1f} s)")
        (work / "lease").unlink(missing_ok=True)
        _write_names(at_server, names)
    finally:
        session.close()
        for s in streams:
            s.close()
    return PushResult(repository, "/" + path, revision, staged.root_hash.hex, unchanged, len(names),
                      len(lacking), sent_bytes, time.monotonic() - started)  # fmt: skip


def _read_names(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except FileNotFoundError:
        return set()


def _write_names(path: Path, names: list[str]) -> None:
    """The objects the server had at this push's commit: the next push does not ask about them again."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(names) + "\n")
    tmp.replace(path)


def _send_lacking(
    session: GatewaySession,
    token: str,
    repo: Repository,
    work: Path,
    names: list[str],
    pack_bytes: int,
    report: Callable[[str], None],
) -> tuple[list[str], int]:
    """Ask which of ``names`` the server lacks and upload those: (the names sent, ObjectPack bytes)."""
    lacking: list[str] = []
    for i in range(0, len(names), MISSING_BATCH):
        lacking += session.missing(token, names[i : i + MISSING_BATCH])
    sent_bytes = 0
    try:
        for batch in _packs(repo, lacking, pack_bytes):
            raw_header, body = objectpack.build(batch)
            sent_bytes += session.upload(token, raw_header, body)
            report(f"sent {sent_bytes} bytes")
    except ObjectMissing as exc:
        (work / "files.db").unlink(missing_ok=True)
        raise ClientError(
            f"the staging copy in {work} lost object {exc}: its file cache is cleared, run the push again"
        ) from exc
    return lacking, sent_bytes


def _lease(
    session: GatewaySession, work: Path, repository: str, path: str, report: Callable[[str], None]
) -> str:
    """The lease of an interrupted push of this target while it is live, else a new one (kept for a resume)."""
    saved = work / "lease"
    if saved.exists():
        token = saved.read_text().strip()
        if token and session.live(token):
            report(f"reusing lease {token[:8]}... of an interrupted push")
            return token
    token = session.acquire(repository, path)
    saved.write_text(token + "\n")
    return token


def _packs(repo: Repository, names: list[str], pack_bytes: int) -> Iterator[list[tuple[PackEntry, bytes]]]:
    batch: list[tuple[PackEntry, bytes]] = []
    size = 0
    for name in names:
        h, suffix = objectpack.parse_suffixed_hash(name)
        data = repo.store.get(h.object_name(suffix))
        if batch and (size + len(data) > pack_bytes or len(batch) >= objectpack.MAX_OBJECTS):
            yield batch
            batch, size = [], 0
        batch.append((PackEntry(h, len(data), suffix), data))
        size += len(data)
    if batch:
        yield batch
