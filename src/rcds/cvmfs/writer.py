"""The writer: transactions that change a repository and publish a new signed revision.

A transaction holds the repository's writer lock. It opens working copies of only the catalogs on the
paths it touches (root -> ... -> the catalog that holds the change), edits them with SQL, and on
``commit`` finalizes them bottom-up::

    data objects (written while ingesting)  -> sync
    nested catalogs, deepest first, then the root catalog
    history, reflog                          -> sync
    signed manifest (atomic rename, fsync)

so a crash at any point leaves the previous revision intact, and a stratum 1 never sees a catalog whose
objects are missing.
"""

from __future__ import annotations

import io
import itertools
import logging
import secrets
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..logs import fields
from . import failpoints
from .catalog import (
    COUNTER_KINDS,
    FLAG_DIR,
    FLAG_NESTED_MOUNTPOINT,
    FLAG_NESTED_ROOT,
    NESTED_MARKER,
    Catalog,
    Counters,
    Dirent,
    add_counts,
    file_flags,
    make_hardlinks,
)
from .content import ContentWriter, IngestStats
from .contentindex import ContentIndex
from .errors import TransactionError, TreeError
from .hashes import ContentHash, normalize_path, parent_path
from .history import TRUNK, Tag
from .manifest import Manifest
from .objects import EMPTY_HASH, EMPTY_OBJECT
from .reflog import Reflog, RefType
from .tree import EntryKind, TreeEntry
from .treenodes import DIR_SIZE, EarlyRows, Node, absolute, catalog_root, collect, dir_row, resolve

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger("rcds.writer")


@dataclass
class _OpenCatalog:
    mount: str  # "" for the root catalog
    cat: Catalog
    old_hash: ContentHash | None  # None for a catalog new in this transaction
    old_totals: dict[str, int]
    parent: str | None
    old_subtree: dict[str, int]
    old_revision: int
    dirty: bool = False
    child_delta: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KINDS, 0))
    fix_hardlinks: bool = False


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
            self._load("", self.base.root_catalog, None)
        except BaseException:
            self._release()
            raise

    def _open_work(self, workers: int | None) -> None:
        repo = self.repo
        self.work = repo.private / "txn" / secrets.token_hex(6)
        self.work.mkdir(parents=True)
        self.index = ContentIndex(repo.private / "content-index.db")
        self.content = ContentWriter(repo.store, self.index, repo.config.chunk_params, workers)
        self.open: dict[str, _OpenCatalog] = {}
        self._seq = itertools.count()
        self.clock = time.time

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
        for oc in getattr(self, "open", {}).values():
            oc.cat.close()
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

    # --- catalogs --------------------------------------------------------------------------------

    def _work_file(self) -> Path:
        return self.work / f"c{next(self._seq)}.db"

    def _load(self, mount: str, h: ContentHash, parent: str | None) -> _OpenCatalog:
        path = self._work_file()
        shutil.copyfile(self.repo.catalog_file(h), path)
        cat = Catalog(path, writable=True)
        counters = cat.counters() or Counters()
        oc = _OpenCatalog(mount, cat, h, counters.totals(), parent, dict(counters.subtree), cat.revision)
        self.open[mount] = oc
        return oc

    def _catalog_for(self, path: str) -> _OpenCatalog:
        """The catalog that holds the row of ``path`` (for a mountpoint: the nested catalog's root)."""
        oc = self.open[""]
        while True:
            child = self._child_mount_for(oc, path)
            if child is None:
                return oc
            oc = child

    def _child_mount_for(self, oc: _OpenCatalog, path: str) -> _OpenCatalog | None:
        probe = path
        while probe and probe != oc.mount:
            existing = self.open.get(probe)
            if existing is not None and existing.parent == oc.mount:
                return existing
            ref = oc.cat.nested_ref(probe)
            if ref is not None:
                return self._load(probe, ref.hash, oc.mount)
            probe = parent_path(probe)
        return None

    def _mark_dirty(self, oc: _OpenCatalog) -> None:
        while True:
            oc.dirty = True
            if oc.parent is None:
                return
            oc = self.open[oc.parent]

    def lookup(self, path: str) -> Dirent | None:
        """The entry at ``path`` as this transaction sees it."""
        self._check_open()
        path = normalize_path(path)
        return self._catalog_for(path).cat.lookup(path)

    def exists(self, path: str) -> bool:
        return self.lookup(path) is not None

    def listdir(self, path: str) -> list[Dirent]:
        self._check_open()
        path = normalize_path(path)
        return self._catalog_for(path).cat.listdir(path)

    def _now(self) -> int:
        return int(self.clock())

    def _touch_dir(self, path: str, link_delta: int) -> None:
        """Adjust a directory's link count (subdirectories) and mtime after a change below it."""
        oc = self._catalog_for(path)
        d = oc.cat.lookup(path, with_chunks=False)
        if d is None or not d.is_dir:
            raise TransactionError(f"{path or '/'} is not a directory")
        oc.cat.update(path, replace(d, hardlinks=make_hardlinks(d.linkcount + link_delta), mtime=self._now()))
        self._mark_dirty(oc)

    # --- directories -----------------------------------------------------------------------------

    def mkdir(self, path: str, nested: bool = False, mode: int = 0o755, parents: bool = True) -> None:
        """Create a directory (and missing parents). ``nested`` gives it a catalog of its own."""
        self._check_open()
        path = normalize_path(path)
        existing = self.lookup(path)
        if existing is not None:
            if not existing.is_dir:
                raise TransactionError(f"{path} exists and is not a directory")
            if nested and not existing.is_nested_root and path:
                self._make_nested(path)
            return
        parent = parent_path(path)
        if not self.exists(parent):
            if not parents:
                raise TransactionError(f"parent of {path} does not exist")
            self.mkdir(parent, parents=True)
        now = self._now()
        row = Dirent(
            name=path.rsplit("/", 1)[1],
            mode=stat.S_IFDIR | (mode & 0o7777),
            flags=FLAG_DIR,
            size=DIR_SIZE,
            mtime=now,
            hardlinks=make_hardlinks(2),
        )
        holder = self._catalog_for(parent)
        if nested:
            child = self._new_nested_catalog(path, row, holder)
            child.cat.insert(f"{path}/{NESTED_MARKER}", self._marker_row(now))
        else:
            holder.cat.insert(path, row)
        self._touch_dir(parent, +1)

    def _new_nested_catalog(
        self, path: str, row: Dirent, holder: _OpenCatalog, cat: Catalog | None = None
    ) -> _OpenCatalog:
        """Start a new catalog rooted at ``path`` (or take ``cat``, made for it before: its root row is
        rewritten as ``row``); its mountpoint row goes into ``holder``."""
        if cat is None:
            cat = Catalog.create(self._work_file(), path, row)
        else:
            cat.set_root(path, row)
        holder.cat.insert(path, replace(row, flags=(row.flags & ~FLAG_NESTED_ROOT) | FLAG_NESTED_MOUNTPOINT))
        # Placeholder until the child is finalized and its hash is known.
        holder.cat.set_nested(path, ContentHash(bytes(20)), 0)
        zero = dict.fromkeys(COUNTER_KINDS, 0)
        oc = _OpenCatalog(path, cat, None, zero, holder.mount, dict(zero), 0)
        self.open[path] = oc
        self._mark_dirty(oc)
        return oc

    def _marker_row(self, mtime: int) -> Dirent:
        self.repo.store.put_object(EMPTY_HASH.object_name(), EMPTY_OBJECT)
        return Dirent(
            name=NESTED_MARKER,
            mode=stat.S_IFREG | 0o644,
            flags=file_flags(),
            size=0,
            mtime=mtime,
            hash=EMPTY_HASH,
        )

    def _make_nested(self, path: str) -> None:
        """Turn an existing empty directory into a nested catalog root."""
        if self.listdir(path):
            raise TransactionError(f"{path} is not empty: cannot make it a nested catalog")
        holder = self._catalog_for(path)
        row = holder.cat.lookup(path)
        assert row is not None
        holder.cat.delete(path)
        child = self._new_nested_catalog(path, row, holder)
        child.cat.insert(f"{path}/{NESTED_MARKER}", self._marker_row(self._now()))

    # --- removal ---------------------------------------------------------------------------------

    def remove(self, path: str) -> bool:
        """Remove ``path`` and everything below it. Returns False if it did not exist."""
        self._check_open()
        path = normalize_path(path)
        if not path:
            raise TransactionError("cannot remove the repository root")
        holder = self._catalog_for(parent_path(path))
        d = holder.cat.lookup(path, with_chunks=False)
        if d is None:
            return False
        if holder.mount and holder.mount == parent_path(path) and d.name == NESTED_MARKER:
            raise TransactionError(
                f"{path} marks the nested catalog {holder.mount}: remove the directory instead"
            )
        if d.is_nested_mountpoint:
            holder.cat.delete(path)
            holder.cat.remove_nested(path)
            self._drop_nested(holder, path)
        elif d.is_dir:
            for mount in holder.cat.delete_subtree(path):
                self._drop_nested(holder, mount)
        else:
            holder.cat.delete(path)
            if d.hardlink_group:
                holder.fix_hardlinks = True
        if d.is_dir:
            holder.fix_hardlinks = True
        self._mark_dirty(holder)
        self._touch_dir(parent_path(path), -1 if d.is_dir else 0)
        return True

    def _drop_nested(self, holder: _OpenCatalog, mount: str) -> None:
        """Account for a direct child catalog of ``holder`` cut off at ``mount``."""
        child = self.open.get(mount)
        if child is not None and child.parent == holder.mount:
            old = child.old_totals
        else:
            ref_hash = self._nested_hash_in_base(holder, mount)
            old = self._totals_of(ref_hash) if ref_hash else dict.fromkeys(COUNTER_KINDS, 0)
        holder.child_delta = add_counts(holder.child_delta, old, -1)
        for m in [m for m in self.open if m == mount or m.startswith(mount + "/")]:
            self.open.pop(m).cat.close()

    def _nested_hash_in_base(self, holder: _OpenCatalog, mount: str) -> ContentHash | None:
        if holder.old_hash is None:
            return None
        base = self.repo.open_catalog(holder.old_hash)
        try:
            ref = base.nested_ref(mount)
            return ref.hash if ref else None
        finally:
            base.close()

    def _totals_of(self, h: ContentHash) -> dict[str, int]:
        cat = self.repo.open_catalog(h)
        try:
            counters = cat.counters() or Counters()
            return counters.totals()
        finally:
            cat.close()

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
            work_file = self._work_file()
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
                nodes[NESTED_MARKER] = Node(self._marker_row(now), EntryKind.FILE)
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
        holder = self._make_room(path)
        self._write_nodes(path, nodes, boundaries, holder, early)
        self._touch_dir(parent, +1)
        return len(nodes)

    def _make_room(self, path: str) -> _OpenCatalog:
        """Remove whatever is at ``path``, make its parent directory if missing; the catalog that will
        hold ``path``'s row."""
        if self.exists(path):
            self.remove(path)
        parent = parent_path(path)
        if not self.exists(parent):
            self.mkdir(parent)
        return self._catalog_for(parent)

    def graft(self, staged: StagedTree) -> None:
        """Put a staged subtree (``StagingTransaction.stage``) at its path, replacing whatever was there.

        Short: one mountpoint row, one nested catalog reference and the counters; the staged catalogs
        and objects are already stored.
        """
        self._check_open()
        path = staged.path
        parent = parent_path(path)
        holder = self._make_room(path)
        holder.cat.insert(path, staged.mount_row)
        holder.cat.set_nested(path, staged.root_hash, staged.root_size)
        holder.child_delta = add_counts(holder.child_delta, staged.totals)
        self._mark_dirty(holder)
        self._touch_dir(parent, +1)

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
        holder = self._catalog_for(parent)
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
        self._mark_dirty(holder)
        self._touch_dir(parent, 0)

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
        mount_row = replace(root_row, flags=(root_row.flags & ~FLAG_NESTED_ROOT) | FLAG_NESTED_MOUNTPOINT)
        self.graft(StagedTree(path, catalog_hash, size, mount_row, totals, 0, IngestStats()))

    def _write_nodes(
        self,
        path: str,
        nodes: dict[str, Node],
        boundaries: set[str],
        holder: _OpenCatalog,
        early: EarlyRows | None = None,
    ) -> None:
        """The rows into the tree's catalogs (new, or ``early``'s for the tree's own, which holds some
        already), the catalogs attached below ``holder``."""
        written = early.written if early is not None else set()
        catalogs: dict[str, Catalog] = {}
        group_ids: dict[tuple[str, str], int] = {}
        next_group: dict[str, int] = {}
        top_holder_key = "\x00holder"
        for b in sorted(boundaries, key=lambda r: r.count("/") + (1 if r else 0)):
            abs_b = absolute(path, b)
            enclosing = catalog_root(b, boundaries - {b}) if b else None
            if b == "":
                oc = self._new_nested_catalog(abs_b, nodes[""].dirent, holder, early.cat if early else None)
            else:
                parent_oc = self.open[absolute(path, enclosing)] if enclosing is not None else holder
                oc = self._new_nested_catalog(abs_b, nodes[b].dirent, parent_oc)
            catalogs[b] = oc.cat
        # One SQLite transaction per catalog: row-by-row autocommit costs a journal file per row.
        touched = [holder.cat, *catalogs.values()]
        for cat in touched:
            if not cat.db.in_transaction:  # early's has been in one since it was made
                cat.begin()
        rows: dict[int, list[tuple[str, Dirent]]] = {id(cat): [] for cat in touched}
        try:
            # Root rows were written with their catalogs; most of early's rows while the content was stored
            # (those in a hard link group are written again, with their group's id).
            left = [r for r in nodes if r not in boundaries and (r not in written or nodes[r].link_target)]
            for rel in sorted(left, key=lambda r: (r.count("/"), r)):
                node = nodes[rel]
                owner = catalog_root(rel, boundaries)
                cat = catalogs[owner] if owner is not None else holder.cat
                key = owner if owner is not None else top_holder_key
                d = node.dirent
                if rel in written:
                    cat.delete(absolute(path, rel))
                if node.link_target is not None and d.linkcount > 1:
                    gkey = (key, node.link_target)
                    if gkey not in group_ids:
                        if key not in next_group:
                            next_group[key] = cat.max_hardlink_group() + 1
                        group_ids[gkey] = next_group[key]
                        next_group[key] += 1
                    d = replace(d, hardlinks=make_hardlinks(d.linkcount, group_ids[gkey]))
                # without nesting this includes the tree's root row
                rows[id(cat)].append((absolute(path, rel), d))
            for cat in touched:
                cat.insert_many(rows[id(cat)])
        except BaseException:
            for cat in touched:
                # SQLite has rolled back already after some errors (an I/O error, a full disk); a second
                # ROLLBACK would raise "no transaction is active" and hide the real error.
                if cat.db.in_transaction:
                    cat.db.execute("ROLLBACK")
            raise
        for cat in touched:
            cat.commit()
        self._mark_dirty(holder)

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
        root_catalog = self.open[""].cat
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
        dirty = sorted((oc for oc in self.open.values() if oc.dirty), key=lambda oc: -_depth(oc.mount))
        root_hash, root_size = self.base.root_catalog, self.base.root_catalog_size
        for i, oc in enumerate(dirty):
            h, size = self._finalize(oc, timestamp, revision)
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

    def _finalize(self, oc: _OpenCatalog, timestamp: int, revision: int) -> tuple[ContentHash, int]:
        cat = oc.cat
        cat.begin()
        if oc.fix_hardlinks:
            _recount_hardlinks(cat)
        counters = Counters()
        counters.self_ = cat.compute_self_counters()
        counters.subtree = add_counts(oc.old_subtree, oc.child_delta)
        cat.write_counters(counters)
        cat.set_property("revision", revision if oc.parent is None else oc.old_revision + 1)
        cat.set_property("last_modified", timestamp)
        if oc.old_hash is not None:
            cat.set_property("previous_revision", oc.old_hash.hex)
        if oc.parent is None:
            cat.set_property("TTL", self.repo.config.ttl)
        cat.commit()
        cat.vacuum_if_needed()
        root_row = cat.lookup(oc.mount, with_chunks=False)
        cat.close()
        h, size = self.repo.store_catalog(cat.path)
        if oc.parent is not None:
            parent = self.open[oc.parent]
            parent.cat.set_nested(oc.mount, h, size)
            assert root_row is not None
            mount_row = replace(root_row, flags=(root_row.flags & ~FLAG_NESTED_ROOT) | FLAG_NESTED_MOUNTPOINT)
            parent.cat.update(oc.mount, mount_row)
            parent.child_delta = add_counts(
                parent.child_delta, add_counts(counters.totals(), oc.old_totals, -1)
            )
        return h, size


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
            root = Catalog.create(self._work_file(), "", dir_row("", 0o755, self._now()))
            zero = dict.fromkeys(COUNTER_KINDS, 0)
            self.open[""] = _OpenCatalog("", root, None, zero, None, dict(zero), 0)
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
        below = [oc for oc in self.open.values() if oc.mount == path or oc.mount.startswith(path + "/")]
        root_hash, root_size = ContentHash(bytes(20)), 0
        for oc in sorted(below, key=lambda oc: -_depth(oc.mount)):
            h, size = self._finalize(oc, timestamp, 1)
            if oc.mount == path:
                root_hash, root_size = h, size
        for oc in below:  # finalized (and closed): only the private parents stay open
            del self.open[oc.mount]
        mount_row = self._catalog_for(parent_path(path)).cat.lookup(path, with_chunks=False)
        assert mount_row is not None and mount_row.is_nested_mountpoint
        after = self.content.stats
        stats = IngestStats(
            *(getattr(after, f) - getattr(before, f) for f in IngestStats.__dataclass_fields__)
        )
        tree = StagedTree(path, root_hash, root_size, mount_row, self._totals_of(root_hash), count, stats)
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


def _recount_hardlinks(cat: Catalog) -> None:
    rows = cat.db.execute(
        "SELECT hardlinks >> 32, count(*) FROM catalog WHERE hardlinks >> 32 > 0 GROUP BY hardlinks >> 32"
    ).fetchall()
    for group, count in rows:
        cat.db.execute(
            "UPDATE catalog SET hardlinks = ? WHERE hardlinks >> 32 = ?",
            (make_hardlinks(count, group), group),
        )


def _depth(mount: str) -> int:
    return mount.count("/")
