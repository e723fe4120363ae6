"""A stratum 1 in Python: ``snapshot`` makes a storage a verified copy of a repository.

What ``cvmfs_server snapshot`` / ``cvmfs_swissknife pull`` do (``cvmfs-format.md`` 7.4), for a storage
directory that ``rcds.web.repo_http`` (or any web server) then serves like a stock stratum 1, or for an
S3 bucket in the CVMFS layout that clients read over its HTTP endpoint (``store=``; the directory then
holds only the private part, see ``rcds.cvmfs.replica_store``). The public files are written only through
the replica's ``ObjectStore``::

    <storage>/.cvmfspublished .cvmfswhitelist .cvmfsreflog       public, like every stratum 1
              .cvmfs_last_snapshot .cvmfs_status.json data/00..ff data/txn
    <storage>/.rcds-replica/  private, never served: lock, reader cache (certificate), tmp/, the
                              marker ``unfinished`` while a snapshot may leave staged downloads, the
                              marker ``gc-unfinished`` while a garbage collection may have left its
                              sweep half done (``rcds.cvmfs.replica_gc``), gc/ (its scratch), and
                              ``reflog.chksum`` (for ``cvmfs_swissknife check -R``)

One snapshot:

1. ``GET .cvmfs_master_replica`` (a stratum 0 that allows replication), then the manifest ensemble through
   ``RepositoryReader``: manifest signature against the certificate, certificate fingerprint in the
   whitelist, whitelist signed by one of the master keys, not expired, repository name. The manifest and
   whitelist are fetched past proxy caches and kept byte for byte.
2. A source revision older than the replica's is refused (a stale mirror or proxy must not roll the
   replica back); the same revision with another root catalog is refused too. The same revision: nothing
   is pulled, but a re-signed whitelist (or manifest) is still copied, as ``cvmfs_server snapshot``
   does, so that the replica's whitelist never expires while the source's is kept fresh.
3. Pull, bottom-up (``rcds.cvmfs.replica_pull``): for each catalog not yet in the replica's ``data/``,
   every object it references (files, chunks) that is missing is downloaded into a staging file (beside
   its final name, ``data/ab/.<name>.<random>.tmp``, which no server serves; for a bucket in the private
   ``tmp/``), hashed while it streams and, verified, stored (renamed into place; uploaded); nested
   catalogs likewise. A catalog is stored only after all of its objects and nested catalogs are, with a
   ``syncfs`` in between, so "catalog present" means "subtree complete": a catalog already present is
   not descended (what makes incremental snapshots cheap), and an interrupted snapshot resumes where it
   stopped. Downloads (and a bucket's PUTs) run on ``jobs`` threads.
   What is pulled, as ``swissknife pull -p`` does: the current revision; on every snapshot after the
   first, also the revisions published since the replica's (the root catalogs' ``previous_revision``
   chain back to the replica's revision), so a client still on one of them can fail over to this
   replica; and every root catalog a tag of the history database names (read from the new history
   database, which is stored only after them). Missing old revisions and tags are skipped when the
   source is garbage-collectable (``G=yes``); the current revision must be complete.
   Nested catalogs' own ``previous_revision`` is not followed: the root chain already reaches every
   version of them that a published revision used, and following it into swept history would only fail.
4. The history database, certificate and meta-info objects; ``syncfs``; the replica's own
   ``.cvmfsreflog`` (every root catalog it holds, certificate, history, meta-info); then the whitelist
   and, last, the manifest, both byte-identical to the source's; each durable (fsync and rename, or an
   acknowledged PUT) before the next. Then
   ``.cvmfs_last_snapshot`` and ``last_snapshot`` in ``.cvmfs_status.json`` (``date --utc`` text).

Crash safety: until the manifest is replaced the replica serves the previous revision, completely. A
process killed mid-way leaves downloaded objects and stored catalogs (all complete subtrees) behind;
the next snapshot fetches only what is still missing, and first removes the staged files the killed
one left (only then: the ``unfinished`` marker says so). Objects are renamed into place without an
fsync of their own; the ``syncfs`` before each batch of catalogs and before the manifest orders them on
disk. After a power loss an object renamed since the last ``syncfs`` may be empty: a zero-length file
never counts as present (no stored object is empty, except an uncompressed empty file, recognised by
name). ``.cvmfs_is_snapshotting`` exists while a new revision is being pulled.

Garbage collection (``rcds.cvmfs.replica_gc``) runs under the same lock as a snapshot. It deletes a
swept tree's objects before its catalogs, so a collection killed mid-sweep leaves catalogs that are
present but no longer complete, which breaks the rule a snapshot relies on; it leaves the marker
``gc-unfinished`` too, and a snapshot that finds it first finishes that collection (which deletes those
catalogs, so they are fetched again if a revision still needs them) before it trusts any catalog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..logs import fields
from ..storage import MANIFEST, MASTER_REPLICA, REFLOG, WHITELIST
from . import failpoints, signing
from .hashes import ContentHash, Suffix
from .manifest import Manifest
from .reader import ReaderError, RepositoryReader
from .replica_store import (
    IS_SNAPSHOTTING,
    LAST_SNAPSHOT,
    PRIVATE_DIR,
    ReplicaError,
    ReplicaStorage,
    date_utc,
)
from .sources import DIRECT, HttpSettings, HttpSource, NotFound, Source, SourceError, open_source

if TYPE_CHECKING:
    import threading

    from .history import Tag
    from .replica_pull import Progress, Pull

# The pull (its thread pool, the pinning of its threads), the catalog, history and reflog modules (sqlite3
# and their own) are imported where a snapshot has work for them: a snapshot with nothing new reads only
# the manifest ensemble, and ``rcds replicate`` polling hundreds of repositories pays every module it
# imports on every call (tests/test_replicate.py keeps that list short).

log = logging.getLogger("rcds.replica")


@dataclass
class SnapshotReport:
    fqrn: str
    revision: int  # what the replica serves now
    previous_revision: int | None  # what it served before (None: a new replica)
    changed: bool  # the replica now serves another revision
    objects_fetched: int  # objects downloaded into data/ (files, chunks, catalogs, history, ...)
    bytes_fetched: int
    objects_present: int  # references (per catalog descended) to objects already in data/
    catalogs: int  # catalogs downloaded and descended
    seconds: float
    revisions_pulled: list[int] = field(default_factory=list)  # root catalogs pulled, newest first
    skipped: list[str] = field(default_factory=list)  # old revisions or tags missing on the source

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the public entry points -------------------------------------------------------------------------


def snapshot(
    source_url: str | list[str],
    storage: Path | str,
    *,
    public_keys: list[Path] | bytes,
    fqrn: str | None = None,
    proxies: list[str] | None = None,
    jobs: int = 8,
    progress: Progress | None = None,
    settings: HttpSettings | None = None,
    store: Mapping[str, Any] | None = None,
) -> SnapshotReport:
    """Bring the replica in ``storage`` up to the source's current revision (creating it if needed).

    ``source_url``: the repository's base URL(s) (``http://host/cvmfs/<fqrn>``, several for failover,
    as a list or ``;``-separated; a local directory works too). ``public_keys``: the master public key
    files (a directory stands for its ``*.pub``) or one PEM key. ``fqrn``: the expected repository name;
    default the replica's own, else the last path component of a ``/cvmfs/<fqrn>`` URL, else whatever
    the verified manifest names. ``progress(phase, done, total)`` is called from this thread.
    ``store``: the public files in a bucket (``{"url": "s3://bucket/alias", **S3 settings}``, as
    ``rcds.storage.store_from_settings`` takes them); ``storage`` is then the local state directory,
    which remembers the bucket for later snapshots (``rcds.cvmfs.replica_store``).
    Raises ``ReplicaError``; the replica then still serves what it served before.
    """
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    started = time.monotonic()
    replica = ReplicaStorage(Path(storage), store)
    try:
        with replica.locked():
            if replica.gc_unfinished.exists():  # before any catalog is trusted for being present
                _finish_interrupted_gc(replica)
            current = replica.current_manifest()
            expected = fqrn or (current.fqrn if current else None) or _fqrn_from_url(source_url)
            source = _RootFilesFresh(_open(source_url, proxies, settings))
            try:
                return _Snapshot(
                    replica, source, _load_keys(public_keys), expected, current, jobs, progress
                ).run(started)
            finally:
                source.close()
                replica.finished()  # no staged files left behind (a killed run leaves the marker)
    except OSError as exc:  # the store (a bucket that fails after its retries, a full disk)
        raise ReplicaError(f"{replica.where}: {exc}") from exc
    finally:
        replica.close()


def watch(
    source_url: str | list[str],
    storage: Path | str,
    *,
    interval: float = 15.0,
    stop: threading.Event,
    public_keys: list[Path] | bytes,
    fqrn: str | None = None,
    proxies: list[str] | None = None,
    jobs: int = 8,
    settings: HttpSettings | None = None,
    jitter: float = 0.2,
    on_report: Callable[[SnapshotReport], None] | None = None,
    wake: threading.Event | None = None,
    store: Mapping[str, Any] | None = None,
) -> None:
    """Snapshot every ``interval`` seconds (+- ``jitter``, a fraction) until ``stop`` is set, and at once
    whenever ``wake`` is set (a notification; whoever sets ``stop`` must set ``wake`` too).

    A failed snapshot (source down, bad signature, ...) is logged and retried at the next interval; the
    replica meanwhile serves what it has. ``on_report`` gets every successful report.
    """
    import random

    failures = 0
    while not stop.is_set():
        try:
            report = snapshot(
                source_url,
                storage,
                public_keys=public_keys,
                fqrn=fqrn,
                proxies=proxies,
                jobs=jobs,
                settings=settings,
                store=store,
            )
        except Exception as exc:
            failures += 1
            if failures == 1 or failures % 20 == 0:  # a source that stays down must not flood the log
                log.warning(
                    "snapshot failed",
                    extra=fields(
                        storage=str(storage), failures=failures, error=f"{type(exc).__name__}: {exc}"
                    ),
                )
        else:
            if failures:
                log.info("snapshot source back", extra=fields(storage=str(storage), after_failures=failures))
            failures = 0
            if on_report is not None:
                on_report(report)
        delay = max(0.0, interval * random.uniform(1 - jitter, 1 + jitter))
        if wake is None:
            stop.wait(delay)
        else:
            wake.wait(delay)
            wake.clear()


# --- helpers -----------------------------------------------------------------------------------------


def _finish_interrupted_gc(replica: ReplicaStorage) -> None:
    from .gc import GcError
    from .replica_gc import finish_interrupted_gc

    try:
        finish_interrupted_gc(replica)
    except (GcError, OSError) as exc:
        raise ReplicaError(
            f"{replica.where}: a garbage collection was interrupted and cannot be finished, so the"
            f" catalogs present cannot be trusted: {exc}"
        ) from exc


def _open(source_url: str | list[str], proxies: list[str] | None, settings: HttpSettings | None) -> Source:
    if isinstance(source_url, list):
        if not source_url:
            raise ReplicaError("no source URL")
        return HttpSource(source_url, proxies or [DIRECT], settings)
    return open_source(source_url, proxies, settings)


def _fqrn_from_url(source_url: str | list[str]) -> str | None:
    first = (
        (source_url[0] if isinstance(source_url, list) else source_url.split(";")[0]) if source_url else ""
    )
    parts = first.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "cvmfs" and parts[-1] else None


def _load_keys(public_keys: list[Path] | bytes) -> list[signing.PublicKey]:
    try:
        if isinstance(public_keys, bytes):
            return [signing.load_public_key(public_keys)]
        paths: list[Path] = []
        for p in map(Path, public_keys):
            paths.extend(sorted(p.glob("*.pub")) if p.is_dir() else [p])
        keys = signing.load_public_keys(paths)
    except (OSError, ValueError, signing.SignatureError) as exc:
        raise ReplicaError(f"cannot load the master public key: {exc}") from exc
    if not keys:
        raise ReplicaError("a master public key is needed to trust the source")
    return keys


class _RootFilesFresh(Source):
    """The source, with the ``.cvmfs*`` root files fetched past proxy caches and kept byte for byte.

    A proxy may hold a manifest for a minute; a snapshot wants the newest one, and must store exactly
    the bytes the reader verified.
    """

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.captured: dict[str, bytes] = {}

    def fetch(self, key: str, dest: Any, fresh: bool = False) -> None:
        if key.startswith(".cvmfs"):
            data = self.inner.get(key, fresh=True)
            self.captured[key] = data
            dest.write(data)
        else:
            self.inner.fetch(key, dest, fresh)

    def fetch_many(
        self, items: Sequence[tuple[str, BinaryIO]], fresh: bool = False
    ) -> list[SourceError | None]:
        if any(key.startswith(".cvmfs") for key, _ in items):
            return super().fetch_many(items, fresh)
        return self.inner.fetch_many(items, fresh)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def close(self) -> None:
        self.inner.close()

    @property
    def description(self) -> str:
        return self.inner.description


# --- one snapshot ------------------------------------------------------------------------------------


class _Snapshot:
    def __init__(
        self,
        replica: ReplicaStorage,
        source: _RootFilesFresh,
        keys: list[signing.PublicKey],
        fqrn: str | None,
        current: Manifest | None,
        jobs: int,
        progress: Progress | None,
    ) -> None:
        self.replica = replica
        self.source = source
        self.keys = keys
        self.fqrn = fqrn
        self.current = current
        self.jobs = jobs
        self.progress = progress
        self.aux: list[tuple[str, str]] = []  # history and meta-info: downloaded, stored by _finish

    def run(self, started: float) -> SnapshotReport:
        reader, manifest_bytes, whitelist_bytes = self._verified_ensemble()
        try:
            m, cur = reader.manifest, self.current
            self._check_succession(m)
            changed = cur is None or m.revision != cur.revision
            if not changed and self.replica.serves(manifest_bytes, whitelist_bytes):
                # Nothing new and nothing re-signed (the polling case): only the stamps, no directories,
                # no syncfs, no reflog rewrite. The ensemble was verified all the same.
                return self._up_to_date(m, started)
            return self._update(reader, m, changed, manifest_bytes, whitelist_bytes, started)
        finally:
            reader.close()

    def _update(
        self,
        reader: RepositoryReader,
        m: Manifest,
        changed: bool,
        manifest_bytes: bytes,
        whitelist_bytes: bytes,
        started: float,
    ) -> SnapshotReport:
        from ..affinity import threads_on_one_cpu
        from .replica_pull import STORED, CorruptObject, Pull

        cur = self.current
        # Into a directory the pull's threads share one CPU (rcds.affinity); a bucket's client library has
        # threads of its own that may use every CPU, and would inherit the pinning.
        with contextlib.nullcontext() if self.replica.remote else threads_on_one_cpu():
            self.replica.prepare()
            if changed:
                log.info(
                    "snapshot starts",
                    extra=fields(
                        repository=m.fqrn, revision=m.revision, previous=cur.revision if cur else None
                    ),
                )
                self.replica.write_root_file(IS_SNAPSHOTTING, (date_utc() + "\n").encode(), durable=False)
            pull = Pull(self.replica, reader.source, self.jobs, m.garbage_collectable, self.progress)
            try:
                roots = self._pull(pull, m)
                self._finish(pull, reader, m, manifest_bytes, whitelist_bytes, roots)
            except ReplicaError:
                raise
            except CorruptObject as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {exc}") from exc
            except SourceError as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {exc}") from exc
            except Exception as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {type(exc).__name__}: {exc}") from exc
            finally:
                pull.abort()  # after a complete run: only discards the catalogs of skipped revisions
                for staged, _key in self.aux:  # not stored if the snapshot failed
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staged)
                with contextlib.suppress(OSError):  # a stale one only tells monitors a pull was running
                    self.replica.remove_root_file(IS_SNAPSHOTTING)
        report = SnapshotReport(
            m.fqrn,
            m.revision,
            cur.revision if cur else None,
            changed,
            pull.objects_fetched,
            pull.bytes_fetched,
            pull.objects_present,
            pull.catalogs,
            time.monotonic() - started,
            sorted({n.revision for n in pull.roots if n.state == STORED}, reverse=True),
            pull.skipped,
        )
        for what in pull.skipped:
            log.info("snapshot: skipped, no longer on the source", extra=fields(repository=m.fqrn, what=what))
        log.info(
            "snapshot" if changed else "snapshot: up to date",
            extra=fields(
                repository=m.fqrn, revision=m.revision, previous=report.previous_revision,
                objects=report.objects_fetched, bytes=report.bytes_fetched, present=report.objects_present,
                catalogs=report.catalogs, seconds=round(report.seconds, 3),
            ),
        )  # fmt: skip
        return report

    def _up_to_date(self, m: Manifest, started: float) -> SnapshotReport:
        stamp = date_utc()
        self.replica.write_root_file(LAST_SNAPSHOT, (stamp + "\n").encode(), durable=False)
        self.replica.update_status(last_snapshot=stamp)
        report = SnapshotReport(
            m.fqrn, m.revision, m.revision, False, 0, 0, 0, 0, time.monotonic() - started, [], []
        )
        log.info(
            "snapshot: up to date",
            extra=fields(repository=m.fqrn, revision=m.revision, seconds=round(report.seconds, 3)),
        )
        return report

    def _verified_ensemble(self) -> tuple[RepositoryReader, bytes, bytes]:
        """The reader (manifest ensemble verified) and the exact manifest and whitelist bytes."""
        where = self.source.description
        try:
            self.source.get(MASTER_REPLICA)
        except NotFound as exc:
            raise ReplicaError(
                f"{where} is not a CernVM-FS server for replication (no {MASTER_REPLICA})"
            ) from exc
        except SourceError as exc:
            raise ReplicaError(f"cannot reach {where}: {exc}") from exc
        try:
            reader = RepositoryReader(self.source, self.keys, self.fqrn, self.replica.private / "cache")
        except (ReaderError, OSError) as exc:
            raise ReplicaError(f"{where}: {exc}") from exc
        manifest_bytes = self.source.captured[MANIFEST]
        whitelist_bytes = self.source.captured[WHITELIST]
        if Manifest.parse(manifest_bytes)[0] != reader.manifest:  # the reader verified these very bytes
            reader.close()
            raise ReplicaError("internal error: the verified manifest is not the one fetched")
        return reader, manifest_bytes, whitelist_bytes

    def _check_succession(self, m: Manifest) -> None:
        cur = self.current
        if not m.fqrn:
            raise ReplicaError("the source's manifest names no repository (N)")
        if cur is None:
            return
        if cur.fqrn != m.fqrn:
            raise ReplicaError(f"{self.replica.where} is a replica of {cur.fqrn}, the source serves {m.fqrn}")
        if m.revision < cur.revision:
            raise ReplicaError(
                f"the source serves revision {m.revision} of {m.fqrn}, older than the replica's {cur.revision}:"
                " refusing to roll back (a stale mirror or proxy?)"
            )
        if m.revision == cur.revision and m.root_catalog != cur.root_catalog:
            raise ReplicaError(
                f"the source's revision {m.revision} of {m.fqrn} has another root catalog than the replica's"
                " (was the repository re-created? move the replica away to start over)"
            )

    def _pull(self, pull: Pull, m: Manifest) -> list[ContentHash]:
        """Pull every tree to replicate; returns the root catalogs the replica should then hold.

        Everything is looked at first (revision chain, history, tags), then the pool starts."""
        chain = self._revision_chain(pull, m) if self.current is not None else []
        tags: list[Tag] = []
        for h, suffix in ((m.history, Suffix.HISTORY), (m.metainfo, Suffix.METAINFO)):
            if h is not None and not self.replica.present(key := h.object_name(suffix)):
                self.aux.append((pull.download(key, h, place=False), key))
                if suffix is Suffix.HISTORY:
                    tags = self._tags(self.aux[-1][0])
        pull.add_root(m.root_catalog, m.revision, f"revision {m.revision}", required=True)
        for h, revision in chain:
            pull.add_root(h, revision, f"revision {revision}", required=False)
        for tag in tags:
            pull.add_root(tag.root_hash, tag.revision, f"tag {tag.name!r} (revision {tag.revision})", False)
        pull.run()
        return [m.root_catalog, *(h for h, _r in chain), *(t.root_hash for t in tags)]

    def _revision_chain(self, pull: Pull, m: Manifest) -> list[tuple[ContentHash, int]]:
        """The root catalogs published between the replica's revision and the source's, newest first."""
        cur = self.current
        assert cur is not None
        chain: list[tuple[ContentHash, int]] = []
        if m.revision <= cur.revision:
            return chain
        info = pull.inspect(m.root_catalog)
        last = info.revision
        h = info.previous
        while h is not None and h != cur.root_catalog:
            try:
                info = pull.inspect(h)
            except NotFound as exc:
                if not m.garbage_collectable:
                    raise
                pull.skipped.append(f"revisions before {last}: {exc}")
                break
            if not cur.revision < info.revision < last:
                break
            chain.append((h, info.revision))
            last, h = info.revision, info.previous
        return chain

    def _tags(self, staged: str) -> list[Tag]:
        from .history import History
        from .replica_pull import inflate

        db = self.replica.tmp / f"history-{os.urandom(4).hex()}.db"
        try:
            inflate(staged, db)
            hist = History(db)
            try:
                return list(hist.tags())
            finally:
                hist.close()
        finally:
            db.unlink(missing_ok=True)

    def _finish(
        self,
        pull: Pull,
        reader: RepositoryReader,
        m: Manifest,
        manifest_bytes: bytes,
        whitelist_bytes: bytes,
        roots: list[ContentHash],
    ) -> None:
        """History, certificate, meta-info; syncfs; reflog; whitelist; manifest last; snapshot stamps."""
        import shutil

        r = self.replica
        for staged, key in self.aux:
            r.place(staged, key)
        if m.certificate is not None and not r.present(key := m.certificate.object_name(Suffix.CERTIFICATE)):
            tmp = r.staging_file(key)
            shutil.copyfile(reader.object_file(m.certificate, Suffix.CERTIFICATE), tmp)
            pull.objects_fetched += 1
            pull.bytes_fetched += os.stat(tmp).st_size
            r.place(tmp, key)
        failpoints.hit("replica-after-objects")
        r.store.sync()  # everything the new manifest names is on disk before it
        self._write_reflog(m, roots)
        failpoints.hit("replica-before-manifest")
        r.write_root_file(WHITELIST, whitelist_bytes)
        r.write_root_file(MANIFEST, manifest_bytes)
        stamp = date_utc()
        r.write_root_file(LAST_SNAPSHOT, (stamp + "\n").encode(), durable=False)
        r.update_status(last_snapshot=stamp)

    def _write_reflog(self, m: Manifest, roots: list[ContentHash]) -> None:
        """The replica's own reflog: every root catalog it holds, plus the current auxiliary objects."""
        from .reflog import Reflog, RefType

        r = self.replica
        path = r.tmp / "reflog.db"
        path.unlink(missing_ok=True)
        reflog: Reflog | None = None
        stored = r.read_root_file(REFLOG)
        if stored is not None:
            path.write_bytes(stored)
            try:
                reflog = Reflog(path, writable=True)
                reflog.properties()
            except Exception as exc:  # not a database: start a new one rather than fail every snapshot
                log.warning(
                    "replica reflog unreadable, re-created", extra=fields(repository=m.fqrn, error=str(exc))
                )
                if reflog is not None:
                    reflog.close()
                reflog = None
        if reflog is None:
            reflog = Reflog.create(path, m.fqrn)
        try:
            now = int(time.time())
            refs = [(h, RefType.CATALOG, Suffix.CATALOG) for h in roots]
            refs += [
                (h, kind, suffix)
                for h, kind, suffix in (
                    (m.certificate, RefType.CERTIFICATE, Suffix.CERTIFICATE),
                    (m.history, RefType.HISTORY, Suffix.HISTORY),
                    (m.metainfo, RefType.METAINFO, Suffix.METAINFO),
                )
                if h is not None
            ]
            for h, kind, suffix in refs:
                if r.present(h.object_name(suffix)) and not reflog.contains(h):
                    reflog.add(h, kind, now)
        finally:
            reflog.close()
        data = path.read_bytes()
        path.unlink()
        r.write_reflog(data)


__all__ = [
    "IS_SNAPSHOTTING",
    "LAST_SNAPSHOT",
    "PRIVATE_DIR",
    "ReplicaError",
    "SnapshotReport",
    "date_utc",
    "snapshot",
    "watch",
]
