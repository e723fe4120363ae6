"""The writer: transactions that change a repository and publish a new signed revision.

A transaction holds the repository's writer lock. It edits working copies of only the catalogs on the
paths it touches (``catalogtree``: root -> ... -> the catalog that holds the change) and on ``commit``
finalizes them bottom-up::

    data objects (written while ingesting)  -> sync
    nested catalogs, deepest first, then the root catalog
    history, reflog                          -> sync
    signed manifest (atomic rename, fsync)

so a crash at any point leaves the previous revision intact, and a stratum 1 never sees a catalog whose
objects are missing.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..logs import fields
from . import failpoints
from .catalog import (
    NESTED_MARKER,
    Catalog,
    Counters,
    Dirent,
    file_flags,
    make_hardlinks,
    mountpoint_entry,
)
from .catalogtree import CatalogTree, stored_totals
from .content import ContentWriter, IngestStats
from .contentindex import ContentIndex
from .errors import TransactionError, TreeError
from .hashes import ContentHash, normalize_path, parent_path
from .history import TRUNK, Tag
from .manifest import Manifest
from .reflog import Reflog, RefType
from .tree import EntryKind, TreeEntry
from .treenodes import EarlyRows, Node, collect, dir_row, resolve

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger("rcds.writer")


@dataclass
class CommitResult:
    revision: int
    root_hash: ContentHash
    manifest: Manifest
    catalogs_written: int
    stats: IngestStats
    seconds: float


class Transaction:
    """Use as a context manager: ``with repo.transaction() as txn: ...; txn.commit()``.

    Leaving the block without ``commit`` aborts: nothing is published.
    """

    def __init__(self, repo: Repository, workers: int | None = None) -> None:
        self.repo = repo
        self._lock = repo.lock()
        self._lock.__enter__()
        self._closed = False
        try:
            repo.recover()
            self.base, self.base_versions = repo.manifest_and_versions()
            self._open_work(workers)
            self.catalogs.load_root(self.base.root_catalog)
        except BaseException:
            self._release()
            raise

    def _open_work(self, workers: int | None) -> None:
        repo = self.repo
        self.work = repo.private / "txn" / secrets.token_hex(6)
        self.work.mkdir(parents=True)
        self.index = ContentIndex(repo.private / "content-index.db")
        self.content = ContentWriter(repo.store, self.index, repo.config.chunk_params, workers)
        self.clock = time.time
        # ``_now`` reads ``clock`` at each call: callers replace it after the transaction is made.
        self.catalogs = CatalogTree(repo, self.work, self._now)

    # --- context management ----------------------------------------------------------------------

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def abort(self) -> None:
        """Drop every change not yet committed. Objects already written stay (they are harmless)."""
        if not self._closed:
            self.index.discard_pending()
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._close_work()
        self._lock.__exit__(None, None, None)

    def _close_work(self) -> None:
        if getattr(self, "_work_closed", False):
            return
        self._work_closed = True
        if hasattr(self, "catalogs"):
            self.catalogs.close()
        if hasattr(self, "content"):
            self.content.close()
        if hasattr(self, "index"):
            # What a commit keeps it flushed after the sync; entries the content writer recorded since
            # (work still running when the transaction was aborted) name objects nothing synced.
            self.index.discard_pending()
            self.index.close()
        if hasattr(self, "work"):
            shutil.rmtree(self.work, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise TransactionError("transaction is closed")

    def _now(self) -> int:
        return int(self.clock())

    # --- reading and changing the namespace ------------------------------------------------------

    def lookup(self, path: str) -> Dirent | None:
        """The entry at ``path`` as this transaction sees it."""
        self._check_open()
        return self.catalogs.lookup(normalize_path(path))

    def exists(self, path: str) -> bool:
        return self.lookup(path) is not None

    def listdir(self, path: str) -> list[Dirent]:
        self._check_open()
        return self.catalogs.listdir(normalize_path(path))

    def mkdir(self, path: str, nested: bool = False, mode: int = 0o755, parents: bool = True) -> None:
        """Create a directory (and missing parents). ``nested`` gives it a catalog of its own."""
        self._check_open()
        self.catalogs.mkdir(normalize_path(path), nested, mode, parents)

    def remove(self, path: str) -> bool:
        """Remove ``path`` and everything below it. Returns False if it did not exist."""
        self._check_open()
        return self.catalogs.remove(normalize_path(path))

    # --- adding trees ----------------------------------------------------------------------------

    def add_tree(self, path: str, entries: Iterable[TreeEntry], nested: bool = True) -> int:
        """Publish ``entries`` as the tree at ``path``, replacing whatever was there.

        With ``nested`` (the default) the tree gets its own nested catalog with a ``.cvmfscatalog``
        marker. Directories in the tree that contain a ``.cvmfscatalog`` file become nested catalogs too.
        Returns the number of entries added.
        """
        self._check_open()
        path = normalize_path(path)
        if not path:
            raise TransactionError("cannot replace the repository root; add trees below it")
        now = self._now()
        early: EarlyRows | None = None
        if nested:
            work_file = self.catalogs.new_file()
            placeholder = dir_row(path.rsplit("/", 1)[1], 0o755, now)  # its link count comes at the end
            early = EarlyRows(path, Catalog.create(work_file, path, placeholder), work_file)
        try:
            nodes = collect(entries, now, self.content, early)
            root_node = nodes[""]
            if not root_node.dirent.is_dir:
                raise TreeError("the root of a tree must be a directory")
            root_node.dirent.name = path.rsplit("/", 1)[1]
            if nested and NESTED_MARKER not in {
                r.rsplit("/", 1)[-1] for r in nodes if r.count("/") == 0 and r
            }:
                nodes[NESTED_MARKER] = Node(self.catalogs.marker_row(now), EntryKind.FILE)
            boundaries = {
                r
                for r in nodes
                if nodes[r].kind is EntryKind.DIRECTORY and r and f"{r}/{NESTED_MARKER}" in nodes
            }
            if nested or NESTED_MARKER in nodes:  # a marker at the tree's top nests the tree like any other
                boundaries.add("")
            if early is not None and boundaries != {""}:  # rows below an inner marker belong elsewhere
                early.discard()
                early = None
            # Content first (small files are read and stored in the background): a file that cannot be
            # read fails the call before the old tree at ``path`` is touched.
            resolve(nodes)
        except BaseException:
            if early is not None:
                early.discard()
            raise
        parent = parent_path(path)
        holder = self.catalogs.make_room(path)
        self.catalogs.write_nodes(path, nodes, boundaries, holder, early)
        self.catalogs.touch_dir(parent, +1)
        return len(nodes)

    def graft(self, staged: StagedTree) -> None:
        """Put a staged subtree (``StagingTransaction.stage``) at its path, replacing whatever was there.

        Short: one mountpoint row, one nested catalog reference and the counters; the staged catalogs
        and objects are already stored.
        """
        self._check_open()
        self.catalogs.attach(staged.path, staged.mount_row, staged.root_hash, staged.root_size, staged.totals)

    def write_file(self, path: str, data: bytes, mtime: int, mode: int = 0o644) -> None:
        """Create or replace the regular file ``path`` (its parent directory must exist).

        Only a regular file may be replaced: anything else at ``path`` (a directory, a symlink) is a
        ``TransactionError``, so a caller can never remove more than the one file it names.
        """
        self._check_open()
        path = normalize_path(path)
        if not path:
            raise TransactionError("the repository root is a directory")
        parent = parent_path(path)
        p = self.lookup(parent)
        if p is None or not p.is_dir:
            raise TransactionError(f"parent of {path} is not a directory")
        holder = self.catalogs.catalog_for(parent)
        old = holder.cat.lookup(path, with_chunks=False)
        if old is not None and not old.is_regular:
            raise TransactionError(f"{path} exists and is not a regular file")
        stored = self.content.add_stream(io.BytesIO(data), len(data)).result()
        row = Dirent(
            name=path.rsplit("/", 1)[1],
            mode=stat.S_IFREG | (mode & 0o7777),
            flags=file_flags(chunked=stored.hash is None),
            size=stored.size,
            mtime=int(mtime),
            hash=stored.hash,
            chunks=stored.chunks,
            hardlinks=make_hardlinks(1),
        )
        if old is not None:
            holder.cat.delete(path)
            if old.hardlink_group:
                holder.fix_hardlinks = True
        holder.cat.insert(path, row)
        self.catalogs.mark_dirty(holder)
        self.catalogs.touch_dir(parent, 0)

    def add_directory(self, path: str, source: Path, nested: bool = True) -> int:
        """Publish a local directory tree at ``path``."""
        from .tree import entries_from_directory

        return self.add_tree(path, entries_from_directory(source), nested)

    def graft_catalog(self, path: str, catalog_hash: ContentHash, size: int) -> None:
        """``graft`` for a subtree built elsewhere (a gateway publisher's): its catalog ``catalog_hash``,
        rooted at ``path``, and everything below it are already in the store."""
        path = normalize_path(path)
        cat = self.repo.open_catalog(catalog_hash)
        try:
            root_row = cat.lookup(path, with_chunks=False) if path else None
            totals = (cat.counters() or Counters()).totals()
            prefix = cat.root_prefix
        finally:
            cat.close()
        if prefix != path or root_row is None or not root_row.is_dir:
            raise TransactionError(f"catalog {catalog_hash.hex} is not rooted at {path or '/'}")
        self.graft(StagedTree(path, catalog_hash, size, mountpoint_entry(root_row), totals, 0, IngestStats()))

    # --- commit ----------------------------------------------------------------------------------

    def commit(self, tag: str | None = None, description: str = "") -> CommitResult:
        """Publish everything changed as a new revision; the transaction is closed afterwards."""
        self._check_open()
        started = time.monotonic()
        try:
            result = self._commit(tag, description, started)
        finally:
            self.abort()
        return result

    def _commit(self, tag: str | None, description: str, started: float) -> CommitResult:
        repo = self.repo
        root_catalog = self.catalogs.root.cat
        timestamp = max(self._now(), self.base.timestamp, root_catalog.last_modified)
        revision = self.base.revision + 1
        repo.store.sync()  # every data object is durable before any catalog names it
        failpoints.hit("after-objects")
        # Durable now: the content index may name them (tens of ms for 20,000 files), beside the catalogs.
        indexing = threading.Thread(target=self._flush_index, name="rcds-index-flush")
        indexing.start()
        try:
            return self._publish(tag, description, started, timestamp, revision)
        finally:
            indexing.join()

    def _flush_index(self) -> None:
        """The content index names this transaction's objects (durable now); if it cannot, later ingests
        only compress that content again: the revision is not failed for it."""
        try:
            failpoints.hit("index-flush")
            self.index.flush()
        except (sqlite3.Error, OSError) as exc:
            log.warning("content index not updated", extra=fields(repository=self.repo.fqrn, error=str(exc)))

    def _publish(
        self, tag: str | None, description: str, started: float, timestamp: int, revision: int
    ) -> CommitResult:
        """Catalogs (deepest first), history, reflog, manifest: the new revision."""
        repo = self.repo
        dirty = self.catalogs.changed()
        root_hash, root_size = self.base.root_catalog, self.base.root_catalog_size
        for i, oc in enumerate(dirty):
            h, size = self.catalogs.finalize(oc, timestamp, revision)
            if i == 0:
                failpoints.hit("after-first-catalog")
            if oc.parent is None:
                root_hash, root_size = h, size
        failpoints.hit("after-catalogs")
        if not dirty:
            return CommitResult(
                self.base.revision,
                self.base.root_catalog,
                self.base,
                0,
                self.content.stats,
                time.monotonic() - started,
            )
        history = repo.update_history(
            self.base.history, Tag(TRUNK, root_hash, revision, timestamp, root_size, "current HEAD")
        )
        if tag:
            history = self._add_named_tag(
                history, Tag(tag, root_hash, revision, timestamp, root_size, description)
            )
        cert_hash = repo.store_certificate()
        reflog_path = repo.reflog_copy()
        reflog = Reflog(reflog_path, writable=True)
        reflog.add(root_hash, RefType.CATALOG, timestamp)
        reflog.add(history, RefType.HISTORY, timestamp)
        reflog.add(cert_hash, RefType.CERTIFICATE, timestamp)
        reflog.close()
        failpoints.hit("before-manifest")
        manifest = Manifest(
            root_hash,
            revision,
            repo.config.ttl,
            repo.fqrn,
            root_size,
            cert_hash,
            history,
            None,
            None,
            timestamp,
        )
        manifest = repo.publish_manifest(manifest, reflog_path, based_on=self.base_versions)
        failpoints.hit("after-manifest")
        reflog_path.unlink(missing_ok=True)
        return CommitResult(
            revision, root_hash, manifest, len(dirty), self.content.stats, time.monotonic() - started
        )

    def _add_named_tag(self, history: ContentHash, tag: Tag) -> ContentHash:
        with self.repo.history_for_update(history) as (path, hist):
            hist.put(tag)
        return self.repo.store_history(path)


@dataclass(frozen=True)
class StagedTree:
    """A subtree built by ``StagingTransaction.stage``: its catalogs and objects are stored, nothing
    references them yet. ``Transaction.graft`` puts it in a revision."""

    path: str  # normalized, absolute in the repository ("/sw/cid")
    root_hash: ContentHash  # the subtree's nested catalog
    root_size: int
    mount_row: Dirent  # the row for the parent catalog (flagged as a nested mountpoint)
    totals: dict[str, int]  # the nested catalog's counters, itself and below
    entries: int
    stats: IngestStats


class StagingTransaction(Transaction):
    """Builds subtrees for a later ``Transaction.graft``, without the repository's writer lock.

    It starts from an empty private root catalog, ingests each tree as ``add_tree`` does (a nested
    catalog at its path, more at ``.cvmfscatalog`` markers), and ``stage`` finalizes only the catalogs at
    and below that path; several trees (at paths that do not contain each other) share one staging, its
    content writer and index. ``seal`` makes the objects durable, records them in the content index and
    frees the working state. It holds the repository's ingest lock (shared) until it is closed, so
    garbage collection cannot sweep an object it reused before the graft is committed: close it
    (``abort``, or leave the ``with`` block) only after that commit, or when the staged trees are given up.
    """

    def __init__(self, repo: Repository, workers: int | None = None) -> None:
        self.repo = repo
        self._lock = repo.ingest_lock(exclusive=False)
        self._lock.__enter__()
        self._closed = False
        self.staged: list[StagedTree] = []
        try:
            self._open_work(workers)
            self.catalogs.create_root()
        except BaseException:
            self._release()
            raise

    def __enter__(self) -> StagingTransaction:
        return self

    def stage(self, path: str, entries: Iterable[TreeEntry]) -> StagedTree:
        """Ingest ``entries`` as the tree at ``path`` and store its catalogs.

        A tarball's fault (``TreeError``, or the entries' own error) is raised before the tree's catalogs
        are written (at most a parent directory was added to the private root): the staging can go on with
        the next tree. Another error may leave it half-changed: ``abort`` it.
        """
        self._check_open()
        if getattr(self, "_work_closed", False):
            raise TransactionError("the staging is sealed")
        path = normalize_path(path)
        if any(path == t.path or path.startswith(t.path + "/") or t.path.startswith(path + "/")
               for t in self.staged):  # fmt: skip
            raise TransactionError(f"{path} overlaps a tree staged before")
        before = replace(self.content.stats)
        count = self.add_tree(path, entries, nested=True)
        failpoints.hit("staged-ingest")
        # No sync here: the staged catalogs are named by nothing until the graft's commit, which syncs
        # the store (objects and these catalogs alike) before it writes the catalog that names them.
        timestamp = self._now()
        root_hash, root_size = self.catalogs.store_subtree(path, timestamp, 1)
        mount_row = self.catalogs.catalog_for(parent_path(path)).cat.lookup(path, with_chunks=False)
        assert mount_row is not None and mount_row.is_nested_mountpoint
        after = self.content.stats
        stats = IngestStats(
            *(getattr(after, f) - getattr(before, f) for f in IngestStats.__dataclass_fields__)
        )
        tree = StagedTree(
            path, root_hash, root_size, mount_row, stored_totals(self.repo, root_hash), count, stats
        )
        self.staged.append(tree)
        return tree

    def seal(self) -> None:
        """After the last ``stage``: objects durable, then the content index updated (so that no later
        ingest dedups against an object a crash lost); memory and threads go. The ingest lock stays."""
        self._check_open()
        if getattr(self, "_work_closed", False):
            return
        self.repo.store.sync()
        self.index.flush()
        self._close_work()

    def commit(self, tag: str | None = None, description: str = "") -> CommitResult:
        raise TransactionError("a staged tree is published by Transaction.graft, not committed")
