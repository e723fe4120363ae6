"""Garbage collection (``rcds repo gc``) of a stratum 0, and of a replica (``rcds.cvmfs.replica_gc``).

What is kept (as ``cvmfs_swissknife gc -z`` does, see the format notes, section 8):

* the current root catalog and, walking back through ``previous_revision``, every revision whose
  timestamp (reflog insert time, else the catalog's ``last_modified``) is not older than
  ``now - horizon``, plus the first one that is older (the revision that was current at the horizon);
* every root catalog named by a tag of the history database (``trunk``, ``trunk-previous`` and named
  tags);
* with each of them, all nested catalogs and everything they reference: catalog objects, the content of
  non-external files, all chunks. That is the *preserved* set.

What is deleted: for every root catalog listed in the reflog that is not preserved, the catalogs of its
tree and the objects they reference that are not preserved; then the root leaves the reflog. Objects that
no reflog root ever referenced (an aborted publish) are never looked at. Certificates, history databases
and meta-info objects listed in the reflog with a timestamp older than the oldest preserved trunk revision
go too, except the ones the current manifest names. A repository whose manifest says ``G=no`` is refused.

Targets
-------
The collector sees the storage through ``GcTarget``, a small interface: the object store, the manifest,
a private directory for scratch, the lock that excludes writers, ``recover``, ``sweeping`` (entered before
the first deletion), ``write_reflog`` and ``write_status``. ``Stratum0`` adapts a ``Repository`` (what
``collect_garbage(repo)`` uses): writer lock, content index and catalog cache updated, reflog then a
re-signed manifest. ``rcds.cvmfs.replica_gc.ReplicaGcTarget`` adapts a replica's storage (stratum 1): the
snapshot lock for the whole run, a ``gc-unfinished`` marker around the sweep, the replica's own reflog
and checksum, never the manifest (it is the source's, signed), and, because a snapshot trusts a catalog
for being present, every present catalog no reflog root reaches is preserved. The algorithm is the same.

Design
------
*Mark* (no lock held; publishing goes on): snapshot the reflog's root catalogs, read the manifest (after
the snapshot, so that the snapshot never lists a root newer than the manifest's chain), select the
preserved revisions and walk their catalog trees. Catalogs are content-addressed, so a catalog already
marked is skipped with its whole subtree: a new revision costs only the catalogs it changed.

*Plan* (still no lock): walk the trees of the unpreserved roots of the snapshot (again skipping marked
catalogs, and catalogs already planned through another root) and list the candidates in post-order: a
catalog's objects, then its nested catalogs' subtrees, then the catalog itself.

*Sweep* (under the repository's ingest lock, exclusive, then its writer lock, ``Repository.lock``): the
writer deduplicates by skipping an object that exists, so an object planned for deletion may have been
reused by a revision published since the mark began. Every transaction holds the writer lock from start to
commit, and every staged ingest (built outside the writer lock, grafted later) holds the ingest lock shared
from its start until its graft is committed or dropped, so once GC holds both no publish is in flight. Under the lock, GC first repairs what a crashed publish may have left (``Repository.recover``),
then marks *incrementally*: every root catalog now in the reflog that was not in the snapshot (publishes
since the mark began), and the preserved revisions recomputed from the manifest as it is now. The planned
candidates are re-checked against the preserved set as they are deleted, so nothing that a newly
published revision references is deleted. It then drops the swept objects from the content index
(``ContentIndex.remove_objects_listed``: one SQL statement against the GC database, so that a later publish
never dedups against them; the writer also checks that an index hit still exists),
deletes the candidates and the old auxiliary objects, ``syncfs``, and writes the reflog without the swept
roots and auxiliary objects, then a re-signed manifest for the same root catalog and revision whose ``Y``
matches it. The lock is released only after that, so a publish waiting for it sees the final state. A
stratum 1 snapshot running meanwhile only needs the current revision (and the tags), which are kept.

Crash safety: the order is objects, then reflog, then manifest. A crash while deleting leaves the reflog
listing half-swept roots; clients and ``rcds repo check`` only require the current revision and the tags,
so the repository stays valid, and the next run walks those roots again and tolerates what is already
missing. Deleting in post-order means a catalog disappears only after everything below it is gone, so a
re-run can still find every remaining object of a half-swept tree. A crash between reflog and manifest
leaves a reflog newer than ``Y`` (a warning for the checker); the next publish or GC re-signs the
manifest (``Repository.recover``). Removing a root from the reflog before deleting its objects would leak
them forever, hence this order.

Bounded memory: the preserved set, the catalogs marked and planned, and the sweep plan are tables of 20-byte
digests in a temporary SQLite database under ``.rcds/gc/``; catalog rows are streamed. Python holds only
batches, the stack of catalogs still to visit and the list of preserved root revisions.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..logs import fields
from ..storage import ObjectMissing, ObjectStore
from . import failpoints
from .catalog import Catalog, CatalogError
from .contentindex import ContentIndex
from .hashes import ContentHash, Suffix
from .history import History
from .manifest import Manifest
from .objects import ObjectCorrupt, decompress, verify
from .reflog import Reflog, RefType
from .repository import REFLOG, Repository, RepositoryError, RootVersions

log = logging.getLogger("rcds.gc")

DAY = 86400
DEFAULT_HORIZON = 3 * DAY
GC_DIR = "gc"  # under .rcds: one scratch directory per run
GC_LOCK = "gc.lock"  # under .rcds: one collector at a time
BATCH = 10_000
PROGRESS_EVERY = 1000
SWEEP_BATCH = 1000  # objects deleted together (one DeleteObjects request on S3, its limit)

ProgressFn = Callable[[str, int, int], None]

_AUX_SUFFIX = {
    RefType.CERTIFICATE: Suffix.CERTIFICATE,
    RefType.HISTORY: Suffix.HISTORY,
    RefType.METAINFO: Suffix.METAINFO,
}


class GcError(RepositoryError):
    """Garbage collection is not possible (not garbage-collectable, no reflog, broken current revision)."""


@dataclass
class GcReport:
    """What a run kept and deleted (for a dry run: would delete).

    ``objects_swept`` counts file contents and chunks, ``catalogs_swept`` catalog objects, ``aux_swept``
    certificates, history databases and meta-info objects; ``bytes_freed`` is the stored size of all of
    them. ``objects_examined`` counts the object references read from catalogs, marking and sweeping.
    """

    revisions_kept: list[int] = field(default_factory=list)
    roots_swept: int = 0
    objects_swept: int = 0
    bytes_freed: int = 0
    catalogs_swept: int = 0
    aux_swept: int = 0
    objects_examined: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)


class GcTarget(Protocol):
    """What garbage collection needs of the storage it collects: a stratum 0 (``Stratum0``, made from a
    ``Repository``) or a stratum 1 made by ``rcds.cvmfs.replica`` (``rcds.cvmfs.replica_gc``)."""

    @property
    def fqrn(self) -> str: ...

    @property
    def store(self) -> ObjectStore:
        """The public tree: ``data/``, the manifest, the reflog."""

    @property
    def private(self) -> Path:
        """A private directory on the same file system: scratch (``gc/``) and ``gc.lock``."""

    @property
    def catalog_cache(self) -> Path | None:
        """Uncompressed catalogs by hash (read instead of inflating; swept entries are removed), or None."""

    @property
    def content_index(self) -> Path | None:
        """A ``ContentIndex`` database that must forget swept objects, or None."""

    @property
    def keeps_present_catalogs_complete(self) -> bool:
        """Whether a catalog object present in ``data/`` is taken to mean "its subtree is complete" (a
        replica's snapshot does not descend into it). Then every catalog present that no reflog root
        reaches (stored by an interrupted snapshot) is preserved with everything it references."""

    def manifest(self) -> Manifest: ...

    def lock(self) -> AbstractContextManager[None]:
        """Excludes writers (publishes, snapshots) for the sweep."""

    def recover(self) -> list[str]:
        """Under ``lock``: repair what an interrupted writer left; what was done."""

    def sweeping(self) -> AbstractContextManager[None]:
        """Entered (under ``lock``) before anything is deleted, left normally after ``write_reflog``;
        not left normally (an exception, a crash) means the sweep is unfinished."""

    def write_reflog(self, manifest: Manifest, reflog: Path) -> None:
        """Make ``reflog`` (the current one without the swept roots and auxiliary objects) the one served."""

    def write_status(self, **fields: str) -> None:
        """Update ``.cvmfs_status.json``."""


class Stratum0:
    """A ``Repository`` as a ``GcTarget``: publishes are excluded by its writer lock, the swept objects
    leave its content index and catalog cache, and the reflog is published with a re-signed manifest."""

    keeps_present_catalogs_complete = False  # the writer never trusts a catalog for being present

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.fqrn = repo.fqrn
        self.store = repo.store
        self.private = repo.private
        self.catalog_cache = repo.catalog_cache
        self.content_index = repo.private / "content-index.db"
        self.versions: RootVersions | None = None  # until manifest(): the repository's last read

    def manifest(self) -> Manifest:
        # The versions the collection replaces the reflog and manifest on (its own: a service thread's
        # ``repo.manifest()`` meanwhile must not move them past another machine's commit).
        manifest, self.versions = self.repo.manifest_and_versions()
        return manifest

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        # Staged ingests first (they hold it shared until their graft is committed, which needs the
        # writer lock: taking the writer lock first could deadlock with a committer).
        with self.repo.ingest_lock(exclusive=True), self.repo.lock():
            yield

    def recover(self) -> list[str]:
        return self.repo.recover()

    def sweeping(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def write_reflog(self, manifest: Manifest, reflog: Path) -> None:
        """The reflog, then the manifest re-signed for the same root catalog and revision with its ``Y``."""
        self.repo.publish_manifest(
            manifest, reflog, after_reflog="gc-before-manifest", based_on=self.versions
        )

    def write_status(self, **fields: str) -> None:
        self.repo.write_status(**fields)


def collect_garbage(
    target: Repository | GcTarget,
    *,
    horizon: float = DEFAULT_HORIZON,
    now: float | None = None,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> GcReport:
    """Delete the objects only revisions older than ``horizon`` seconds (before ``now``) reference.

    ``target``: a stratum 0 ``Repository`` (or any ``GcTarget``; replicas: ``rcds.cvmfs.replica_gc``).
    ``progress(phase, done, total)`` is called as work proceeds (``total`` 0 when not known in advance);
    phases: ``mark``, ``plan``, ``unreached`` (replicas), ``lock`` (0 of 1 before waiting for the writer
    lock, 1 of 1 once held), ``remark``, ``index``, ``sweep``, ``aux``, ``publish``. Raises ``GcError`` if
    the repository cannot be collected and ``RepositoryError`` if another collector runs.
    """
    if isinstance(target, Repository):
        target = Stratum0(target)
    collector = _Collector(target, horizon, time.time() if now is None else now, dry_run, progress)
    return collector.run()


class _Collector:
    def __init__(
        self, target: GcTarget, horizon: float, now: float, dry_run: bool, progress: ProgressFn | None
    ) -> None:
        self.target = target
        self.store = target.store
        self.threshold = now - horizon
        self.dry_run = dry_run
        self.progress: ProgressFn = progress or (lambda _phase, _done, _total: None)
        self.report = GcReport(dry_run=dry_run)
        self.kept: dict[ContentHash, int] = {}  # preserved root -> revision
        self.oldest_trunk: int | None = None
        self.work = target.private / GC_DIR / f"run-{os.getpid()}-{secrets.token_hex(4)}"
        self.db: sqlite3.Connection
        self._marked_catalogs = 0
        self._pool: ThreadPoolExecutor | None = None  # parallel HEADs on a remote store

    # --- driver ----------------------------------------------------------------------------------

    def run(self) -> GcReport:
        started = time.monotonic()
        with self._exclusive():
            self.work.mkdir(parents=True)
            try:
                self.db = _scratch_db(self.work / "gc.db")
                try:
                    self._collect()
                finally:
                    self.db.close()
                    if self._pool is not None:
                        self._pool.shutdown()
            finally:
                shutil.rmtree(self.work, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.work.parent.rmdir()  # only if no other run uses it
        r = self.report
        r.revisions_kept = sorted(set(self.kept.values()))
        r.seconds = round(time.monotonic() - started, 3)
        log.info(
            "gc dry run" if self.dry_run else "gc",
            extra=fields(
                repository=self.target.fqrn,
                dry_run=r.dry_run,
                revisions_kept=len(r.revisions_kept),
                oldest_kept=r.revisions_kept[0] if r.revisions_kept else None,
                roots_swept=r.roots_swept,
                objects_swept=r.objects_swept,
                catalogs_swept=r.catalogs_swept,
                aux_swept=r.aux_swept,
                bytes_freed=r.bytes_freed,
                objects_examined=r.objects_examined,
                warnings=len(r.warnings),
                seconds=r.seconds,
            ),
        )
        return r

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One collector per repository (a dry run changes nothing and needs no exclusion)."""
        if self.dry_run:
            yield
            return
        fd = os.open(self.target.private / GC_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RepositoryError(f"{self.target.fqrn}: another garbage collection is running") from exc
            stale = self.target.private / GC_DIR
            if stale.is_dir():  # scratch of a run that crashed
                for d in stale.iterdir():
                    shutil.rmtree(d, ignore_errors=True)
            yield
        finally:
            os.close(fd)

    def _collect(self) -> None:
        if not self.store.exists(REFLOG):
            raise GcError(f"{self.target.fqrn} has no reflog: garbage collection is impossible")
        snapshot = self._reflog_rows(self.store.get(REFLOG))
        self.db.executemany(
            "INSERT OR IGNORE INTO roots (digest, ts) VALUES (?, ?)",
            [(h.digest, ts) for h, kind, ts in snapshot if kind is RefType.CATALOG],
        )
        manifest = self._manifest()  # read after the reflog: every root in it is the manifest's or older
        self._preserve_revisions(manifest, "mark")
        failpoints.hit("gc-after-mark")
        condemned = [
            (h, ts) for h, kind, ts in snapshot if kind is RefType.CATALOG and not self._is_marked(h)
        ]
        condemned.sort(key=lambda item: item[1])
        self._plan([h for h, _ts in condemned])
        if self.target.keeps_present_catalogs_complete:
            self._preserve_unreached_catalogs()
        if self.dry_run:
            self.report.roots_swept = len(condemned)
            self._sweep_planned()
            self._sweep_aux(self._aux_candidates(snapshot, manifest))
            return
        self.progress("lock", 0, 1)
        with self.target.lock():
            self.progress("lock", 1, 1)
            for done in self.target.recover():
                self._warn(f"recovered: {done}")
            manifest = self._manifest()
            current = self._reflog_rows(self.store.get(REFLOG))
            self._remark(manifest, current)
            roots = [h for h, _ts in condemned if not self._is_marked(h)]
            aux = self._aux_candidates(current, manifest)
            self.report.roots_swept = len(roots)
            with self.target.sweeping():
                if roots or aux:
                    self._forget_in_content_index()
                    self._sweep_planned()
                    self._sweep_aux(aux)
                    failpoints.hit("gc-before-reflog")
                    self._publish(manifest, [*roots, *(h for h, _suffix in aux)])
                    failpoints.hit("gc-after-manifest")
            self.target.write_status(last_gc=time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()))

    def _warn(self, message: str) -> None:
        if message not in self.report.warnings:
            self.report.warnings.append(message)
            log.warning(message, extra=fields(repository=self.target.fqrn))

    def _manifest(self) -> Manifest:
        manifest = self.target.manifest()
        if not manifest.garbage_collectable:
            raise GcError(f"{self.target.fqrn} is not garbage-collectable (manifest G=no)")
        return manifest

    def _reflog_rows(self, data: bytes) -> list[tuple[ContentHash, RefType, int]]:
        path = self.work / f"reflog-{secrets.token_hex(4)}.db"
        path.write_bytes(data)
        reflog = Reflog(path)
        try:
            return reflog.list()
        finally:
            reflog.close()
            path.unlink()

    # --- mark ------------------------------------------------------------------------------------

    def _preserve_revisions(self, manifest: Manifest, phase: str) -> None:
        """Mark the trunk revisions within the horizon (+ the one current at it) and the tagged ones."""
        h: ContentHash | None = manifest.root_catalog
        seen: set[ContentHash] = set()
        while h is not None and h not in seen:
            seen.add(h)
            with self._open(h, marking=True) as cat:
                if cat is None:
                    if h == manifest.root_catalog:
                        raise GcError(f"the current root catalog {h.hex} is missing")
                    # Normal after a run with a shorter horizon (older revisions were collected then),
                    # and for a replica, which holds only the revisions published since its first snapshot.
                    self._warn(
                        f"revision chain ends at root catalog {h.hex}, collected earlier or never held"
                    )
                    break
                revision, previous = cat.revision, cat.previous_revision
                ts = self._root_timestamp(h, cat.last_modified)
            self._mark_tree(h, revision, phase, required=h == manifest.root_catalog)
            if self.oldest_trunk is None or ts < self.oldest_trunk:
                self.oldest_trunk = ts
            if ts < self.threshold:
                break  # this one was current at the horizon: kept, its predecessors not
            h = previous
        for tag_root in self._tagged_roots(manifest):
            if tag_root not in self.kept:
                with self._open(tag_root, marking=True) as cat:
                    if cat is None:
                        self._warn(f"tagged root catalog {tag_root.hex} is missing")
                        continue
                    revision = cat.revision
                self._mark_tree(tag_root, revision, phase)

    def _tagged_roots(self, manifest: Manifest) -> list[ContentHash]:
        if manifest.history is None:
            return []
        try:
            stored = self.store.get(manifest.history.object_name(Suffix.HISTORY))
            verify(stored, manifest.history)
            path = self.work / f"history-{secrets.token_hex(4)}.db"
            path.write_bytes(decompress(stored))
        except (ObjectMissing, ObjectCorrupt) as exc:
            # Without the tag list, named snapshots cannot be told apart: refuse rather than sweep them.
            raise GcError(f"history database {manifest.history.hex} unreadable: {exc}") from exc
        hist = History(path)
        try:
            return sorted({t.root_hash for t in hist.tags()})
        finally:
            hist.close()
            path.unlink()

    def _root_timestamp(self, h: ContentHash, last_modified: int) -> int:
        row = self.db.execute("SELECT ts FROM roots WHERE digest = ?", (h.digest,)).fetchone()
        return int(row[0]) if row else last_modified

    def _remark(self, manifest: Manifest, current: list[tuple[ContentHash, RefType, int]]) -> None:
        """Under the lock: preserve what was published since the mark began."""
        new = [(h, ts) for h, kind, ts in current if kind is RefType.CATALOG and not self._known_root(h)]
        self.db.executemany(
            "INSERT OR IGNORE INTO roots (digest, ts) VALUES (?, ?)", [(h.digest, ts) for h, ts in new]
        )
        for i, (h, _ts) in enumerate(new):
            self.progress("remark", i, len(new))
            with self._open(h, marking=True) as cat:
                if cat is None:
                    self._warn(f"new reflog root {h.hex} is missing")
                    continue
                revision = cat.revision
            self._mark_tree(h, revision, "remark")
        self._preserve_revisions(manifest, "remark")

    def _known_root(self, h: ContentHash) -> bool:
        return self.db.execute("SELECT 1 FROM roots WHERE digest = ?", (h.digest,)).fetchone() is not None

    def _is_marked(self, h: ContentHash) -> bool:
        return self.db.execute("SELECT 1 FROM marked WHERE digest = ?", (h.digest,)).fetchone() is not None

    def _mark_tree(self, root: ContentHash, revision: int | None, phase: str, required: bool = False) -> None:
        """Add a revision's catalogs and everything they reference to the preserved set (``revision``
        None: a tree that is no revision of the reflog, not reported as kept)."""
        if revision is not None:
            self.kept[root] = revision
        stack = [root]
        batch: list[tuple[bytes]] = []
        while stack:
            h = stack.pop()
            if self._is_marked(h):
                continue  # content-addressed: its whole subtree is marked already
            with self._open(h, marking=True) as cat:
                if cat is None:
                    if required:
                        raise GcError(f"catalog {h.hex} of the current revision is missing")
                    self._warn(f"catalog {h.hex} of a preserved revision is missing")
                    continue
                batch.append((h.digest,))
                for digest, _suffix in cat.referenced_objects():
                    batch.append((digest,))
                    self.report.objects_examined += 1
                    if len(batch) >= BATCH:
                        self._insert_preserved(batch)
                stack.extend(ref.hash for ref in cat.nested())
            self._insert_preserved(batch)
            self.db.execute("INSERT OR IGNORE INTO marked (digest) VALUES (?)", (h.digest,))
            self._marked_catalogs += 1
            self.progress(phase, self._marked_catalogs, 0)
        self._insert_preserved(batch)

    def _insert_preserved(self, batch: list[tuple[bytes]]) -> None:
        if batch:
            self.db.executemany("INSERT OR IGNORE INTO preserved (digest) VALUES (?)", batch)
            batch.clear()

    def _preserve_unreached_catalogs(self) -> None:
        """Preserve every catalog present in ``data/`` that neither the mark nor the plan reached.

        On a replica such a catalog was stored by a snapshot that did not finish (or a root it could not
        complete): its subtree is complete, and the next snapshot will not descend into it. Deleting an
        object it shares with a swept revision would make it a present but incomplete catalog, trusted by
        that snapshot. (Catalogs of the swept trees are all reached by the plan, so the catalogs a crashed
        run left half-swept are never preserved here.)"""
        found = 0
        for key in self.store.iter_keys("data/"):
            parts = key.split("/")
            if len(parts) != 3 or len(parts[1]) != 2 or parts[2].startswith(".") or not key.endswith("C"):
                continue
            try:
                h = ContentHash.from_hex(parts[1] + parts[2][:-1])
                if self.store.size(key) == 0:  # never complete (a rename not yet durable at a power cut)
                    continue
            except (ValueError, ObjectMissing):
                continue
            if self._is_marked(h) or self._visited(h):
                continue
            found += 1
            try:
                self._mark_tree(h, None, "unreached")
            except GcError as exc:  # unreadable: nobody can use it, and what it references is unknown
                self._warn(f"catalog {h.hex} present but unreadable, left alone: {exc}")
        if found:
            log.info(
                "gc: catalogs outside every reflog root preserved",
                extra=fields(repository=self.target.fqrn, catalogs=found),
            )

    # --- plan ------------------------------------------------------------------------------------

    def _plan(self, roots: Iterable[ContentHash]) -> None:
        """List the objects and catalogs of unpreserved trees that are not preserved, in post-order."""
        scanned = 0
        batch: list[tuple[bytes, str, bytes]] = []
        for root in roots:
            stack: list[tuple[ContentHash, bool]] = [(root, False)]
            while stack:
                h, expanded = stack.pop()
                if expanded:  # everything below it is planned before it
                    batch.append((h.digest, h.algorithm.value + Suffix.CATALOG.value, h.digest))
                    continue
                if self._is_marked(h) or self._visited(h):
                    continue
                self.db.execute("INSERT INTO visited (digest) VALUES (?)", (h.digest,))
                try:
                    with self._open(h) as cat:
                        stack.append((h, True))
                        if cat is not None:  # None: swept by an interrupted run, with all below it
                            for digest, suffix in cat.referenced_objects():
                                batch.append((digest, suffix, digest))
                                self.report.objects_examined += 1
                                if len(batch) >= BATCH:
                                    self._insert_plan(batch)
                            stack.extend((ref.hash, False) for ref in cat.nested())
                except ObjectCorrupt as exc:
                    self._warn(f"catalog {h.hex} is corrupt, left alone: {exc}")
                    continue
                scanned += 1
                self.progress("plan", scanned, 0)
                if len(batch) >= BATCH:
                    self._insert_plan(batch)
        self._insert_plan(batch)

    def _visited(self, h: ContentHash) -> bool:
        return self.db.execute("SELECT 1 FROM visited WHERE digest = ?", (h.digest,)).fetchone() is not None

    def _insert_plan(self, batch: list[tuple[bytes, str, bytes]]) -> None:
        if batch:
            self.db.executemany(
                "INSERT OR IGNORE INTO plan (digest, kind) SELECT ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM preserved WHERE digest = ?)",
                batch,
            )
            batch.clear()

    # --- sweep -----------------------------------------------------------------------------------

    _DOOMED = "FROM plan WHERE NOT EXISTS (SELECT 1 FROM preserved WHERE preserved.digest = plan.digest)"

    def _forget_in_content_index(self) -> None:
        path = self.target.content_index
        if path is None or not path.exists():
            return
        self.progress("index", 0, 1)
        self.db.execute(f"INSERT OR IGNORE INTO swept (digest) SELECT digest {self._DOOMED}")
        index = ContentIndex(path)
        try:
            index.remove_objects_listed(self.work / "gc.db", "swept")
        finally:
            index.close()
        self.progress("index", 1, 1)

    def _sweep_planned(self) -> None:
        """Delete the planned objects that are still not preserved, in plan order (post-order)."""
        (total,) = self.db.execute(f"SELECT count(*) {self._DOOMED}").fetchone()
        batch: list[tuple[str, str, bool]] = []  # (key, hex, is_catalog)
        for done, (digest, kind) in enumerate(
            self.db.execute(f"SELECT digest, kind {self._DOOMED} ORDER BY seq")
        ):
            if done % PROGRESS_EVERY == 0:
                self.progress("sweep", done, total)
            if done == total // 2:
                self._delete_batch(batch)
                batch = []
                failpoints.hit("gc-mid-sweep")
            hex_ = bytes(digest).hex()
            is_catalog = kind.endswith(Suffix.CATALOG.value)
            if is_catalog:
                # Alone and in plan order: a catalog goes only after everything before it is gone, so a
                # crash never leaves a present catalog over a deleted subtree (a batch is deleted in no
                # particular order).
                self._delete_batch(batch)
                batch = []
                self._delete_batch([(f"data/{hex_[:2]}/{hex_[2:]}{kind}", hex_ + kind[:-1], True)])
                continue
            batch.append((f"data/{hex_[:2]}/{hex_[2:]}{kind}", hex_, False))
            if len(batch) >= SWEEP_BATCH:
                self._delete_batch(batch)
                batch = []
        self._delete_batch(batch)
        self.progress("sweep", total, total)

    def _delete_batch(self, batch: list[tuple[str, str, bool]]) -> None:
        """Delete the objects of ``batch`` that exist (one request per batch on S3); an object already
        gone (deleted by an interrupted run) is neither deleted again nor counted."""
        if not batch:
            return
        sizes = self._sizes([key for key, _, _ in batch])
        present = [(item, size) for item, size in zip(batch, sizes, strict=True) if size >= 0]
        if not self.dry_run and present:
            self.store.delete_many(key for (key, _, _), _ in present)
            cache = self.target.catalog_cache
            if cache is not None:
                for (_, name, is_catalog), _ in present:
                    if is_catalog:
                        with contextlib.suppress(FileNotFoundError):
                            (cache / name).unlink()
        r = self.report
        for (_, _, is_catalog), size in present:
            r.bytes_freed += size
            if is_catalog:
                r.catalogs_swept += 1
            else:
                r.objects_swept += 1

    def _sizes(self, keys: list[str]) -> list[int]:
        """Each object's size, -1 if it is missing; a remote store is asked in parallel."""

        def size(key: str) -> int:
            try:
                return self.store.size(key)
            except ObjectMissing:
                return -1

        if not self.store.parallelism or len(keys) == 1:
            return [size(k) for k in keys]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.store.parallelism, thread_name_prefix="rcds-gc")
        return list(self._pool.map(size, keys))

    def _aux_candidates(
        self, rows: list[tuple[ContentHash, RefType, int]], manifest: Manifest
    ) -> list[tuple[ContentHash, Suffix]]:
        """Certificates, histories and meta-infos older than the oldest preserved trunk revision."""
        if self.oldest_trunk is None:
            return []
        keep = {manifest.certificate, manifest.history, manifest.metainfo}
        return [
            (h, _AUX_SUFFIX[kind])
            for h, kind, ts in rows
            if kind in _AUX_SUFFIX and ts < self.oldest_trunk and h not in keep
        ]

    def _sweep_aux(self, aux: list[tuple[ContentHash, Suffix]]) -> None:
        for i, (h, suffix) in enumerate(aux):
            self.progress("aux", i, len(aux))
            key = h.object_name(suffix)
            try:
                size = self.store.size(key)
            except ObjectMissing:
                continue
            if not self.dry_run:
                self.store.delete(key)
            self.report.aux_swept += 1
            self.report.bytes_freed += size
        self.progress("aux", len(aux), len(aux))

    def _publish(self, manifest: Manifest, forget: list[ContentHash]) -> None:
        """The reflog without the swept roots and aux objects (a stratum 0 re-signs its manifest for it)."""
        self.progress("publish", 0, 1)
        path = self.work / "reflog.db"
        path.write_bytes(self.store.get(REFLOG))
        reflog = Reflog(path, writable=True)
        try:
            reflog.db.execute("BEGIN")
            for h in forget:
                reflog.remove(h)
            reflog.db.execute("COMMIT")
            reflog.db.execute("VACUUM")
        finally:
            reflog.close()
        self.store.sync()  # the deletions are durable before the reflog forgets what they belonged to
        self.target.write_reflog(manifest, path)
        self.progress("publish", 1, 1)

    # --- catalogs --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, h: ContentHash, marking: bool = False) -> Iterator[Catalog | None]:
        """A catalog from the private cache, else inflated from the store into scratch (the cache is not
        filled: swept catalogs would only be deleted again); None if it exists in neither.

        A corrupt catalog raises ``ObjectCorrupt``, or ``GcError`` when ``marking``: what an unreadable
        catalog of a kept revision references is unknown, so nothing may be swept."""
        cat: Catalog | None = None
        temp: Path | None = None
        try:
            cached = None if self.target.catalog_cache is None else self.target.catalog_cache / h.hex
            if cached is not None and cached.exists():
                with contextlib.suppress(CatalogError):  # a damaged cache entry: use the object instead
                    cat = Catalog(cached)
            if cat is None:
                try:
                    stored = self.store.get(h.object_name(Suffix.CATALOG))
                except ObjectMissing:
                    yield None
                    return
                verify(stored, h)
                temp = self.work / f"catalog-{secrets.token_hex(6)}.db"
                temp.write_bytes(decompress(stored))
                try:
                    cat = Catalog(temp)
                except CatalogError as exc:
                    raise ObjectCorrupt(f"catalog {h.hex}: {exc}") from exc
        except ObjectCorrupt as exc:
            if temp is not None:
                temp.unlink(missing_ok=True)
            if marking:
                raise GcError(f"catalog {h.hex} of a preserved revision is unreadable: {exc}") from exc
            raise
        try:
            yield cat
        finally:
            cat.close()
            if temp is not None:
                temp.unlink(missing_ok=True)


def _scratch_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None)
    for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -65536", "temp_store = FILE"):
        db.execute(f"PRAGMA {pragma}")
    for table in ("preserved", "marked", "visited", "swept"):
        db.execute(f"CREATE TABLE {table} (digest BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("CREATE TABLE roots (digest BLOB PRIMARY KEY, ts INTEGER NOT NULL) WITHOUT ROWID")
    db.execute(
        "CREATE TABLE plan (seq INTEGER PRIMARY KEY, digest BLOB NOT NULL, kind TEXT NOT NULL,"
        " UNIQUE (digest, kind))"
    )
    return db


__all__ = ["DAY", "DEFAULT_HORIZON", "GcError", "GcReport", "GcTarget", "Stratum0", "collect_garbage"]
