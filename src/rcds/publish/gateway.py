"""The CVMFS-gateway service (``/api/v1``): leases, object packs and commits from outside publishers.

What a stock CVMFS publisher with a ``gw,...`` upstream does: acquire a lease on ``repo/path``, stream
ObjectPacks holding every new object (data and catalogs), then commit with the old and new root catalog
hashes of the tree it built. Here (no aiohttp; ``rcds.web.gateway`` is the HTTP face):

* leases are rcds's own (``publish.leases``), held by the key that took them; tokens come from ``secrets``;
* every object of a pack is re-hashed before it is stored (``cvmfs.objectpack``);
* a commit is checked without any lock: the new tree must differ from the old nowhere outside the lease
  (refused with the path named, where the stock gateway silently drops such changes), and the lease's
  subtree must be complete in the store and within the catalog limits. Only then is the subtree grafted,
  by catalog hash, onto the repository's *current* revision in one short writer transaction, so other
  leases' commits in between are kept.

Replies are the stock gateway's JSON documents (``{"status":"ok",...}`` or ``{"status":"error","reason":...}``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..cvmfs import objectpack
from ..cvmfs.hashes import ContentHash, Suffix
from ..cvmfs.objectpack import MAX_OBJECTS, PackEntry, PackError, parse_suffixed_hash
from ..cvmfs.repository import Repository
from ..cvmfs.treediff import (
    IncompleteTree,
    OutsideChange,
    check_catalog_object,
    check_subtree,
    confine,
    extract_subtree,
    published_catalog,
)
from ..ingest.tarstream import IngestLimits
from ..logs import fields
from .config import GatewaySettings
from .gateway_auth import GatewayKeys, GatewayRefusal, split_lease_path, within
from .leases import Busy, Lease, Leases
from .metrics import ServiceMetrics

log = logging.getLogger("rcds.gateway")

API_VERSION = 3  # the stock gateway's protocol version; publishers send 2
# Payload catalogs are inflated here to be checked: not the store's staging (``tmp``), which a
# writer's recovery empties while stagings, but not payloads, are excluded by the ingest lock.
SCRATCH_DIR = "gateway-scratch"
CATALOG_INFLATE_LIMIT = 4 << 30  # one catalog of a million entries is some 300 MB; more is a zlib bomb
Reply = dict[str, object]


def ok(**values: object) -> Reply:
    return {"status": "ok", **values}


def error(reason: str) -> Reply:
    return {"status": "error", "reason": reason}


def go_duration(seconds: float) -> str:
    """A duration as Go prints it (``1h2m3s``), the form of the stock gateway's ``time_remaining``."""
    total = max(0, int(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        repositories: dict[str, Repository],
        leases: Leases,
        limits: IngestLimits,
        announce: Callable[[str], object] = lambda name: None,
        publish_prefix: str = "sw",
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.repositories = repositories
        self.leases = leases
        self.limits = limits
        self.announce = announce
        self.publish_prefix = publish_prefix  # rcds publish's own namespace: no gateway lease there
        self.metrics = metrics
        self.keys = GatewayKeys.load(settings.key_files, settings.key_paths, settings.admin_keys)
        for repo in repositories.values():  # catalogs a killed server was checking
            shutil.rmtree(repo.private / SCRATCH_DIR, ignore_errors=True)

    # --- listings (authenticated, unlike the stock gateway's) -------------------------------------

    def info(self) -> Reply:
        return ok(data={"api_version": API_VERSION, "repositories": sorted(self.repositories)})

    def repos(self, key_id: str) -> Reply:
        return ok(data={name: self._repo_doc(name) for name in sorted(self.repositories)})

    def repo(self, key_id: str, name: str) -> Reply:
        if name not in self.repositories:
            return error("invalid_repo")
        return ok(data=self._repo_doc(name))

    def _repo_doc(self, name: str) -> dict[str, object]:
        keys = {k: [p for p in self.keys.paths(k) if p.split("/", 1)[0] == name] for k in self.keys.key_ids()}
        return {"enabled": True, "keys": {k: v for k, v in keys.items() if v}}

    def list_leases(self, key_id: str) -> Reply:
        return ok(data={self._lease_path(le): self._lease_doc(le) for le in self.leases.list()})

    def lease(self, key_id: str, token: str) -> Reply:
        lease = self.leases.check(token)
        if lease is None or lease.repository not in self.repositories:
            return error("invalid_lease")
        return ok(data=self._lease_doc(lease))

    @staticmethod
    def _lease_path(lease: Lease) -> str:
        return f"{lease.repository}/{lease.path}"

    def _lease_doc(self, lease: Lease) -> dict[str, object]:
        key_id, at, hostname = lease.holder.rpartition("@")
        who: dict[str, object] = (
            {"key_id": key_id, "hostname": hostname} if at else {"holder": lease.holder}  # rcds's own ingests
        )
        return {
            **who,
            "path": self._lease_path(lease),
            "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.expires)),
        }

    # --- leases -----------------------------------------------------------------------------------

    def acquire(
        self, key_id: str, body: dict[str, object], token_paths: tuple[str, ...] | None = None
    ) -> Reply:
        """``key_id`` leases within its configured paths; a token's caller (``token_paths`` given) within
        its ``storage.create`` paths."""
        path = body.get("path")
        if not isinstance(path, str):
            return error("invalid_path")
        repo, sub = split_lease_path(path)
        if repo not in self.repositories:
            return error("invalid_repo")
        if not sub:
            return error("invalid_path: rcds leases sub-paths of a repository, not its root")
        if within(sub, self.publish_prefix) or within(self.publish_prefix, sub):
            return error(f"invalid_path: /{self.publish_prefix} belongs to rcds publish")
        allowed = (
            self.keys.may_lease(key_id, repo, sub)
            if token_paths is None
            else any(within(sub, p) for p in token_paths)
        )
        if not allowed:
            return error("invalid_path: the key may not lease this path")
        hostname = body.get("hostname")
        host = hostname.replace("@", "") if isinstance(hostname, str) else ""
        holder = f"{key_id}@{host}"  # the key id or token identity, then the publisher's machine
        got = self.leases.acquire(repo, sub, holder, self.settings.max_lease_time, external=True)
        if isinstance(got, Busy):
            return {"status": "path_busy", "time_remaining": go_duration(got.time_remaining)}
        return ok(session_token=got.token, max_api_version=2)

    def lease_path(self, token: str) -> str | None:
        """The path (below its repository's root) of a live lease: what a token caller must be scoped for."""
        lease = self.leases.check(token)
        return lease.path if lease is not None else None

    def cancel_leases(self, key_id: str, lease_path: str) -> Reply:
        """Admin: drop every lease at or below ``repo/path`` (a stuck publisher's)."""
        if key_id not in self.keys.admin_keys:
            return error("no_admin_key")
        repo, sub = split_lease_path(lease_path)
        if repo not in self.repositories:
            return error("invalid_repo")
        cancelled = [
            lease
            for lease in self.leases.list(repo)
            if within(lease.path, sub) and self.leases.release(lease.token)
        ]
        for lease in cancelled:
            log.warning("lease cancelled",
                        extra=fields(repository=repo, path=lease.path, holder=lease.holder, by=key_id))  # fmt: skip
        return ok(cancelled=[self._lease_path(lease) for lease in cancelled])

    def _held(self, key_id: str, token: str) -> Lease:
        lease = self.leases.check(token)
        if lease is None:
            raise GatewayRefusal("invalid_lease: the lease expired or does not exist")
        if lease.holder.rpartition("@")[0] != key_id:
            raise GatewayRefusal("invalid_lease: the lease belongs to another key")
        if lease.repository not in self.repositories:
            raise GatewayRefusal("invalid_repo")
        return lease

    def drop(self, key_id: str, token: str) -> Reply:
        self._held(key_id, token)
        self.leases.release(token)
        return ok()

    # --- payloads ---------------------------------------------------------------------------------

    def receive_payload(
        self, key_id: str, token: str, pack: BinaryIO, digest: str, header_size: int
    ) -> Reply:
        lease = self._held(key_id, token)
        repo = self.repositories[lease.repository]
        store = repo.store
        lim = self.limits
        scratch = repo.private / SCRATCH_DIR
        scratch.mkdir(parents=True, exist_ok=True)

        def accept(entry: PackEntry, data: bytes) -> None:
            if entry.name is not None:
                return
            if entry.suffix is Suffix.CATALOG:  # checked as it arrives, not only at the commit
                try:
                    check_catalog_object(
                        data, scratch, lim.max_entries, lim.max_nested_catalogs, CATALOG_INFLATE_LIMIT
                    )
                except IncompleteTree as exc:
                    raise PackError(f"catalog {entry.hash.hex}: {exc}") from exc
            store.put_object(entry.object_name, data)

        started = time.monotonic()
        try:
            entries = objectpack.read(pack, header_size, digest, accept)
        except PackError as exc:
            log.warning("payload refused", extra=fields(repository=lease.repository, reason=str(exc)))
            return error(f"invalid_payload: {exc}")
        if self.metrics is not None:
            self.metrics.gateway_payload_bytes.labels(lease.repository).inc(sum(e.size for e in entries))
        log.info(
            "payload received",
            extra=fields(repository=lease.repository, path=lease.path, objects=len(entries),
                         bytes=sum(e.size for e in entries), seconds=round(time.monotonic() - started, 3)),
        )  # fmt: skip
        return ok()

    # --- commit -----------------------------------------------------------------------------------

    def commit(self, key_id: str, token: str, body: dict[str, object]) -> Reply:
        """The stock form names the publisher's old and new root catalogs; rcds push's form names the
        lease path's own catalog (``catalog_hash``, ``catalog_size``) directly."""
        lease = self._held(key_id, token)
        repo = self.repositories[lease.repository]
        path = "/" + lease.path
        started = time.monotonic()
        # Shared with other ingests, exclusive for garbage collection's sweep: an uploaded object that no
        # catalog names yet is not swept between the check that it is there and the graft's commit.
        with repo.ingest_lock(exclusive=False):
            try:
                subtree = self._subtree(repo, path, body)
            except (OutsideChange, IncompleteTree, GatewayRefusal) as exc:
                self._count_commit(lease.repository, "refused")
                log.warning("gateway commit refused",
                            extra=fields(repository=lease.repository, path=path, holder=lease.holder,
                                         reason=str(exc)))  # fmt: skip
                if isinstance(exc, GatewayRefusal):
                    raise
                return error(f"invalid_commit: {exc}")
            if self.leases.check(token) is None:
                return error("invalid_lease: the lease expired before the commit")
            with repo.transaction() as txn:
                if subtree is not None:
                    txn.graft_catalog(path, *subtree)
                else:
                    txn.remove(path)
                tag = body.get("tag_name")
                result = txn.commit(tag if isinstance(tag, str) and tag else None,
                                    str(body.get("tag_description") or ""))  # fmt: skip
        self.leases.release(token)
        self.announce(lease.repository)
        self._count_commit(lease.repository, "ok")
        if self.metrics is not None:
            self.metrics.gateway_commit_seconds.labels(lease.repository).observe(time.monotonic() - started)
        log.info(
            "gateway commit",
            extra=fields(repository=lease.repository, path=path, holder=lease.holder,
                         catalog=subtree[0].hex if subtree else None,
                         revision=result.revision, seconds=round(time.monotonic() - started, 3)),
        )  # fmt: skip
        return ok(final_revision=result.revision)

    def _subtree(
        self, repo: Repository, path: str, body: dict[str, object]
    ) -> tuple[ContentHash, int] | None:
        """The catalog (hash, size) to graft at ``path``, checked complete and within the limits; None when
        the publisher removed the path."""
        if "catalog_hash" in body:
            try:
                subtree = (_root_hash(body.get("catalog_hash")), int(str(body.get("catalog_size"))))
            except ValueError:
                raise GatewayRefusal("invalid_request: catalog_hash and catalog_size") from None
        else:
            try:
                old_root = _root_hash(body.get("old_root_hash"))
                new_root = _root_hash(body.get("new_root_hash"))
            except ValueError:
                raise GatewayRefusal("invalid_request: old_root_hash and new_root_hash") from None
            where = confine(repo, old_root, new_root, path)
            if where.nested is not None:
                subtree = (where.nested.hash, where.nested.size)
            elif self._has_rows(repo, where.holder, path):
                # The publisher kept the path in its parent's catalog: it gets a catalog of its own here,
                # so that it can be grafted (and the next lease's commit grafts it by hash).
                subtree = extract_subtree(repo, where.holder, path)
            else:
                return None  # the publisher removed the path
        lim = self.limits
        check_subtree(repo, subtree[0], path, lim.max_entries, lim.max_nested_catalogs, lim.max_catalog_depth,
                      published_catalog(repo, path))  # fmt: skip
        return subtree

    def missing(self, key_id: str, token: str, names: object) -> Reply:
        """Which of ``names`` (objects, suffixed hashes) the repository lacks: rcds push uploads only those."""
        lease = self._held(key_id, token)
        store = self.repositories[lease.repository].store
        if not isinstance(names, list) or len(names) > MAX_OBJECTS:
            return error(f"invalid_request: objects must be a list of at most {MAX_OBJECTS} names")
        lacking = []
        for name in names:
            try:
                h, suffix = parse_suffixed_hash(str(name))
            except PackError:
                return error(f"invalid_request: {str(name)[:80]!r} is not an object name")
            if not store.exists(h.object_name(suffix)):
                lacking.append(name)
        return ok(missing=lacking)

    def _count_commit(self, repository: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.gateway_commits.labels(repository, outcome).inc()

    @staticmethod
    def _has_rows(repo: Repository, holder: ContentHash, path: str) -> bool:
        cat = repo.open_catalog(holder)
        try:
            return cat.lookup(path, with_chunks=False) is not None
        finally:
            cat.close()


def _root_hash(value: object) -> ContentHash:
    if not isinstance(value, str):
        raise ValueError("not a hash")
    return ContentHash.from_hex(value.removesuffix("C"))


def state_db(queue_dir: Path) -> Path:
    return queue_dir / "state.db"
