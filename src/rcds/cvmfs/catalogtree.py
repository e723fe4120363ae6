"""The catalogs of a revision being edited: working copies opened for writing, and their finalization.

Only the catalogs on the paths a transaction touches are opened (root -> ... -> the catalog that holds
the change), each copied into the transaction's work directory; a nested catalog is loaded the first time
a path below its mountpoint is looked at. Every change marks its catalog and those above it dirty; at
commit the dirty ones are finalized deepest first (counters, properties), stored, and their new hashes
written into their parents.

This module knows nothing of content ingest or the manifest: rows come in with their content stored.
"""

from __future__ import annotations

import itertools
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import (
    COUNTER_KINDS,
    FLAG_DIR,
    NESTED_MARKER,
    Catalog,
    Counters,
    Dirent,
    add_counts,
    file_flags,
    make_hardlinks,
    mountpoint_entry,
)
from .errors import TransactionError
from .hashes import ContentHash, parent_path
from .objects import EMPTY_HASH, EMPTY_OBJECT
from .treenodes import DIR_SIZE, EarlyRows, Node, absolute, catalog_root, dir_row

if TYPE_CHECKING:
    from .repository import Repository


@dataclass
class OpenCatalog:
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


class CatalogTree:
    """The root catalog and the nested catalogs opened below it, as writable copies in ``work``.

    Paths are normalized (``hashes.normalize_path``) by the caller. ``now`` gives the mtime of changed
    directories: the transaction's clock, which its user may replace after the tree is made.
    """

    def __init__(self, repo: Repository, work: Path, now: Callable[[], int]) -> None:
        self.repo = repo
        self.work = work
        self.now = now
        self.open: dict[str, OpenCatalog] = {}
        self._seq = itertools.count()

    def load_root(self, h: ContentHash) -> None:
        """Start from the stored root catalog ``h`` (a revision's)."""
        self._load("", h, None)

    def create_root(self) -> None:
        """Start from an empty root catalog of one's own (a staging's, never published)."""
        root = Catalog.create(self.new_file(), "", dir_row("", 0o755, self.now()))
        zero = dict.fromkeys(COUNTER_KINDS, 0)
        self.open[""] = OpenCatalog("", root, None, zero, None, dict(zero), 0)

    @property
    def root(self) -> OpenCatalog:
        return self.open[""]

    def close(self) -> None:
        for oc in self.open.values():
            oc.cat.close()

    def new_file(self) -> Path:
        """A fresh path in the work directory for a catalog."""
        return self.work / f"c{next(self._seq)}.db"

    def _load(self, mount: str, h: ContentHash, parent: str | None) -> OpenCatalog:
        path = self.new_file()
        shutil.copyfile(self.repo.catalog_file(h), path)
        cat = Catalog(path, writable=True)
        counters = cat.counters() or Counters()
        oc = OpenCatalog(mount, cat, h, counters.totals(), parent, dict(counters.subtree), cat.revision)
        self.open[mount] = oc
        return oc

    # --- finding rows ----------------------------------------------------------------------------

    def catalog_for(self, path: str) -> OpenCatalog:
        """The catalog that holds the row of ``path`` (for a mountpoint: the nested catalog's root)."""
        oc = self.root
        while True:
            child = self._child_mount_for(oc, path)
            if child is None:
                return oc
            oc = child

    def _child_mount_for(self, oc: OpenCatalog, path: str) -> OpenCatalog | None:
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

    def lookup(self, path: str) -> Dirent | None:
        return self.catalog_for(path).cat.lookup(path)

    def exists(self, path: str) -> bool:
        return self.lookup(path) is not None

    def listdir(self, path: str) -> list[Dirent]:
        return self.catalog_for(path).cat.listdir(path)

    # --- changing rows ---------------------------------------------------------------------------

    def mark_dirty(self, oc: OpenCatalog) -> None:
        """``oc`` changed, so every catalog above it will name a new hash."""
        while True:
            oc.dirty = True
            if oc.parent is None:
                return
            oc = self.open[oc.parent]

    def touch_dir(self, path: str, link_delta: int) -> None:
        """Adjust a directory's link count (subdirectories) and mtime after a change below it."""
        oc = self.catalog_for(path)
        d = oc.cat.lookup(path, with_chunks=False)
        if d is None or not d.is_dir:
            raise TransactionError(f"{path or '/'} is not a directory")
        oc.cat.update(path, replace(d, hardlinks=make_hardlinks(d.linkcount + link_delta), mtime=self.now()))
        self.mark_dirty(oc)

    def mkdir(self, path: str, nested: bool = False, mode: int = 0o755, parents: bool = True) -> None:
        """``Transaction.mkdir``."""
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
        now = self.now()
        row = Dirent(
            name=path.rsplit("/", 1)[1],
            mode=stat.S_IFDIR | (mode & 0o7777),
            flags=FLAG_DIR,
            size=DIR_SIZE,
            mtime=now,
            hardlinks=make_hardlinks(2),
        )
        holder = self.catalog_for(parent)
        if nested:
            child = self._new_nested_catalog(path, row, holder)
            child.cat.insert(f"{path}/{NESTED_MARKER}", self.marker_row(now))
        else:
            holder.cat.insert(path, row)
        self.touch_dir(parent, +1)

    def remove(self, path: str) -> bool:
        """``Transaction.remove``."""
        if not path:
            raise TransactionError("cannot remove the repository root")
        holder = self.catalog_for(parent_path(path))
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
        self.mark_dirty(holder)
        self.touch_dir(parent_path(path), -1 if d.is_dir else 0)
        return True

    def make_room(self, path: str) -> OpenCatalog:
        """Remove whatever is at ``path``, make its parent directory if missing; the catalog that will
        hold ``path``'s row."""
        if self.exists(path):
            self.remove(path)
        parent = parent_path(path)
        if not self.exists(parent):
            self.mkdir(parent)
        return self.catalog_for(parent)

    def attach(self, path: str, mount_row: Dirent, h: ContentHash, size: int, totals: dict[str, int]) -> None:
        """Mount the stored catalog ``h`` (rooted at ``path``, counters ``totals``) at ``path``, replacing
        whatever was there."""
        holder = self.make_room(path)
        holder.cat.insert(path, mount_row)
        holder.cat.set_nested(path, h, size)
        holder.child_delta = add_counts(holder.child_delta, totals)
        self.mark_dirty(holder)
        self.touch_dir(parent_path(path), +1)

    # --- nested catalogs -------------------------------------------------------------------------

    def _new_nested_catalog(
        self, path: str, row: Dirent, holder: OpenCatalog, cat: Catalog | None = None
    ) -> OpenCatalog:
        """Start a new catalog rooted at ``path`` (or take ``cat``, made for it before: its root row is
        rewritten as ``row``); its mountpoint row goes into ``holder``."""
        if cat is None:
            cat = Catalog.create(self.new_file(), path, row)
        else:
            cat.set_root(path, row)
        holder.cat.insert(path, mountpoint_entry(row))
        # Placeholder until the child is finalized and its hash is known.
        holder.cat.set_nested(path, ContentHash(bytes(20)), 0)
        zero = dict.fromkeys(COUNTER_KINDS, 0)
        oc = OpenCatalog(path, cat, None, zero, holder.mount, dict(zero), 0)
        self.open[path] = oc
        self.mark_dirty(oc)
        return oc

    def marker_row(self, mtime: int) -> Dirent:
        """A ``.cvmfscatalog`` row; the empty object it names is stored."""
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
        holder = self.catalog_for(path)
        row = holder.cat.lookup(path)
        assert row is not None
        holder.cat.delete(path)
        child = self._new_nested_catalog(path, row, holder)
        child.cat.insert(f"{path}/{NESTED_MARKER}", self.marker_row(self.now()))

    def _drop_nested(self, holder: OpenCatalog, mount: str) -> None:
        """Account for a direct child catalog of ``holder`` cut off at ``mount``."""
        child = self.open.get(mount)
        if child is not None and child.parent == holder.mount:
            old = child.old_totals
        else:
            ref_hash = _stored_nested_hash(self.repo, holder.old_hash, mount) if holder.old_hash else None
            old = stored_totals(self.repo, ref_hash) if ref_hash else dict.fromkeys(COUNTER_KINDS, 0)
        holder.child_delta = add_counts(holder.child_delta, old, -1)
        for m in [m for m in self.open if m == mount or m.startswith(mount + "/")]:
            self.open.pop(m).cat.close()

    # --- a tree's rows ---------------------------------------------------------------------------

    def write_nodes(
        self,
        path: str,
        nodes: dict[str, Node],
        boundaries: set[str],
        holder: OpenCatalog,
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
        self.mark_dirty(holder)

    # --- finalizing ------------------------------------------------------------------------------

    def changed(self) -> list[OpenCatalog]:
        """The dirty catalogs, deepest first (the order to finalize them in): the root comes last."""
        return sorted((oc for oc in self.open.values() if oc.dirty), key=lambda oc: -_depth(oc.mount))

    def store_subtree(self, path: str, timestamp: int, revision: int) -> tuple[ContentHash, int]:
        """Finalize the catalogs at and below ``path`` (deepest first) and let them go; those above stay
        open. The hash and size of ``path``'s own."""
        below = [oc for oc in self.open.values() if oc.mount == path or oc.mount.startswith(path + "/")]
        root_hash, root_size = ContentHash(bytes(20)), 0
        for oc in sorted(below, key=lambda oc: -_depth(oc.mount)):
            h, size = self.finalize(oc, timestamp, revision)
            if oc.mount == path:
                root_hash, root_size = h, size
        for oc in below:  # finalized (and closed)
            del self.open[oc.mount]
        return root_hash, root_size

    def finalize(self, oc: OpenCatalog, timestamp: int, revision: int) -> tuple[ContentHash, int]:
        """Write ``oc``'s counters and properties, close and store it, and name it in its parent (which
        must be finalized after it). Its hash and size."""
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
            parent.cat.update(oc.mount, mountpoint_entry(root_row))
            parent.child_delta = add_counts(
                parent.child_delta, add_counts(counters.totals(), oc.old_totals, -1)
            )
        return h, size


def stored_totals(repo: Repository, h: ContentHash) -> dict[str, int]:
    """The counters of the stored catalog ``h``, itself and below."""
    cat = repo.open_catalog(h)
    try:
        counters = cat.counters() or Counters()
        return counters.totals()
    finally:
        cat.close()


def _stored_nested_hash(repo: Repository, h: ContentHash, mount: str) -> ContentHash | None:
    """The catalog the stored catalog ``h`` mounts at ``mount``, if any."""
    cat = repo.open_catalog(h)
    try:
        ref = cat.nested_ref(mount)
        return ref.hash if ref else None
    finally:
        cat.close()


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
