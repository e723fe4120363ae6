"""Comparing two revisions' catalog trees around one path: what a gateway commit must check.

A publisher working under a lease on a path builds a whole new catalog tree from the revision it started
from. Before its work under that path is taken, ``confine`` checks that the new tree differs from the old
one nowhere else (the stock gateway silently drops such changes; we refuse them and name the path), and
says where the path's subtree lives in the new tree. ``check_subtree`` then checks that subtree is complete
in the store (every catalog and every data object present) and within the catalog limits.

Only the catalogs on the way from the root to the path are compared, row by row; a catalog off that way
must keep its hash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..storage import ObjectMissing
from .catalog import (
    NESTED_MARKER,
    Catalog,
    Counters,
    Dirent,
    NestedRef,
    add_counts,
    file_flags,
)
from .hashes import ContentHash, Suffix, md5_pair
from .objects import EMPTY_HASH, EMPTY_OBJECT, ZlibError, inflater
from .repository import Repository


class OutsideChange(Exception):
    """The new tree differs from the old one at ``path``, outside the leased path."""

    def __init__(self, path: str, what: str = "changed") -> None:
        super().__init__(f"{path or '/'} {what} outside the lease")
        self.path = path


class IncompleteTree(Exception):
    """A catalog or data object the new tree names is not in the store, or a limit is exceeded."""


@dataclass(frozen=True)
class Location:
    """Where the leased path is in the new tree: the catalog holding its row, and its own catalog if any."""

    holder: ContentHash
    nested: NestedRef | None  # the path is the root of this nested catalog

    @property
    def present(self) -> bool:
        return self.nested is not None


def _inside_or_above(path: str, lease: str) -> bool:
    """At or below the leased path, or one of its ancestors (whose metadata the change may touch)."""
    return path == lease or path.startswith(lease + "/") or lease.startswith(path + "/") or path == ""


def confine(repo: Repository, old_root: ContentHash, new_root: ContentHash, lease: str) -> Location:
    """Raise OutsideChange for a difference outside ``lease`` (``/a/b``); return where ``lease`` lives."""
    old_h, new_h = old_root, new_root
    while True:
        old_c, new_c = _open(repo, old_h), _open(repo, new_h)
        try:
            if old_h != new_h:
                _compare(old_c, new_c, lease)
            new_ref = new_c.find_nested_for(lease)
            old_ref = old_c.find_nested_for(lease)
            if new_ref is None or new_ref.path == lease:
                if new_ref is None and new_c.lookup(lease, with_chunks=False) is not None:
                    return Location(new_h, None)
                return Location(new_h, new_ref)
            if old_ref is None or old_ref.path != new_ref.path:
                raise OutsideChange(new_ref.path, "became a nested catalog")
            old_h, new_h = old_ref.hash, new_ref.hash
        finally:
            old_c.close()
            new_c.close()


def _open(repo: Repository, h: ContentHash) -> Catalog:
    try:
        return repo.open_catalog(h)
    except ObjectMissing as exc:
        raise IncompleteTree(f"catalog {h.hex} was not uploaded") from exc


def _compare(old: Catalog, new: Catalog, lease: str) -> None:
    old_rows, new_rows = _rows(old.db), _rows(new.db)
    changed = {k for k in old_rows.keys() | new_rows.keys() if old_rows.get(k) != new_rows.get(k)}
    old_chunks, new_chunks = _chunks(old.db), _chunks(new.db)
    changed |= {(int(str(c[0])), int(str(c[1]))) for c in old_chunks ^ new_chunks}
    if changed:
        names = {**_names(old.db), **_names(new.db)}
        for md5 in sorted(changed):
            path = _path_of(md5, names, md5_pair(new.root_prefix), new.root_prefix)
            if not _inside_or_above(path, lease):
                raise OutsideChange(path)
    old_nested = {r.path: r.hash for r in old.nested()}
    new_nested = {r.path: r.hash for r in new.nested()}
    for path in sorted(old_nested.keys() | new_nested.keys()):
        if old_nested.get(path) != new_nested.get(path) and not _inside_or_above(path, lease):
            raise OutsideChange(path)


def _rows(db: sqlite3.Connection) -> dict[tuple[int, int], tuple[object, ...]]:
    return {(r[0], r[1]): r for r in db.execute("SELECT md5path_1, md5path_2, * FROM catalog")}


def _chunks(db: sqlite3.Connection) -> set[tuple[object, ...]]:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone():
        return set()
    return set(db.execute("SELECT md5path_1, md5path_2, offset, size, hash FROM chunks"))


def _names(db: sqlite3.Connection) -> dict[tuple[int, int], tuple[tuple[int, int], str]]:
    out = {}
    for a, b, pa, pb, name in db.execute(
        "SELECT md5path_1, md5path_2, parent_1, parent_2, name FROM catalog"
    ):
        text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)
        out[(a, b)] = ((pa, pb), text)
    return out


def _path_of(
    md5: tuple[int, int],
    names: dict[tuple[int, int], tuple[tuple[int, int], str]],
    root_md5: tuple[int, int],
    root_prefix: str,
) -> str:
    parts: list[str] = []
    seen = set()
    while md5 != root_md5 and md5 in names and md5 not in seen:
        seen.add(md5)
        md5, name = names[md5]
        parts.append(name)
    return root_prefix + "".join("/" + p for p in reversed(parts))


def check_catalog_object(
    stored: bytes, scratch: Path, max_entries: int, max_nested: int, max_bytes: int
) -> tuple[int, int]:
    """Rows and nested catalog references of one catalog object as it arrives (compressed, already
    re-hashed), before it is stored: a catalog over ``max_entries`` rows or ``max_nested`` nested
    catalogs could never be committed, and one that is not a catalog, or inflates past ``max_bytes``
    (a zlib bomb), is refused the same way. Raises ``IncompleteTree`` naming the limit."""
    fd, tmp = tempfile.mkstemp(prefix="catalog-", suffix=".db", dir=scratch)
    try:
        inflate = inflater()
        written = 0
        with os.fdopen(fd, "wb") as out:
            pending = stored
            while True:  # at most 1 MiB out per call: a bomb is stopped at the limit, not after it
                block = inflate.decompress(pending, 1 << 20)
                written += len(block)
                if written > max_bytes:
                    raise IncompleteTree(f"a catalog inflates to more than {max_bytes} bytes")
                out.write(block)
                pending = inflate.unconsumed_tail
                if inflate.eof or not (pending or block):
                    break
            if not inflate.eof:
                raise IncompleteTree("a catalog object is not a complete zlib stream")
        try:
            db = sqlite3.connect(f"file:{tmp}?mode=ro&immutable=1", uri=True)
            try:
                (rows,) = db.execute("SELECT count(*) FROM catalog").fetchone()
                (nested,) = db.execute("SELECT count(*) FROM nested_catalogs").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            raise IncompleteTree(f"an object named as a catalog is not one ({exc})") from exc
    except ZlibError as exc:
        raise IncompleteTree(f"a catalog object is not a zlib stream ({exc})") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if rows > max_entries:
        raise IncompleteTree(f"a catalog of {rows} entries, more than {max_entries} (limits.max_entries)")
    if nested > max_nested:
        raise IncompleteTree(
            f"a catalog with {nested} nested catalogs, more than {max_nested} (limits.max_nested_catalogs)"
        )
    return int(rows), int(nested)


@dataclass
class SubtreeStats:
    entries: int = 0
    catalogs: int = 0
    depth: int = 0


def check_subtree(
    repo: Repository,
    root: ContentHash,
    path: str,
    max_entries: int,
    max_catalogs: int,
    max_depth: int,
    published: ContentHash | None = None,
) -> SubtreeStats:
    """Every catalog from ``root`` (rooted at ``path``) down and every data object they name is stored;
    limits hold.

    ``max_catalogs`` and ``max_depth`` count the catalogs below ``root`` (``root`` itself is the
    leased path's own catalog, as a published tree's is). ``published``, the catalog published at
    ``path`` now: the objects its subtree names are stored (the published revision is complete, and
    garbage collection never sweeps what it names), so only the others are looked up: a re-push of one
    changed file among 20,000 looks up a few objects, not 20,000.
    """
    known = _named_objects(repo, published) if published is not None else set()
    stats = SubtreeStats()
    top = _open(repo, root)
    try:
        if top.root_prefix != path:
            raise IncompleteTree(f"catalog {root.hex} is rooted at {top.root_prefix or '/'}, not at {path}")
    finally:
        top.close()
    pending = [(root, 0)]
    while pending:
        h, depth = pending.pop()
        cat = _open(repo, h)
        try:
            stats.catalogs += 1
            stats.depth = max(stats.depth, depth)
            (rows,) = cat.db.execute("SELECT count(*) FROM catalog").fetchone()
            stats.entries += int(rows)
            if stats.entries > max_entries:
                raise IncompleteTree(f"more than {max_entries} entries (limits.max_entries)")
            if stats.catalogs - 1 > max_catalogs or stats.depth > max_depth:
                raise IncompleteTree(
                    f"more than {max_catalogs} nested catalogs or deeper than {max_depth} "
                    "(limits.max_nested_catalogs, limits.max_catalog_depth)"
                )
            for digest, suffix in cat.referenced_objects():
                if (digest, suffix) in known:
                    continue
                key = ContentHash(digest).object_name(Suffix(suffix))
                if not repo.store.exists(key):
                    raise IncompleteTree(f"object {key} was not uploaded")
            pending.extend((ref.hash, depth + 1) for ref in cat.nested())
        finally:
            cat.close()
    return stats


def _named_objects(repo: Repository, root: ContentHash) -> set[tuple[bytes, str]]:
    """The data objects (digest, suffix) the catalogs from ``root`` down name."""
    named: set[tuple[bytes, str]] = set()
    pending = [root]
    while pending:
        cat = _open(repo, pending.pop())
        try:
            named.update(cat.referenced_objects())
            pending.extend(ref.hash for ref in cat.nested())
        finally:
            cat.close()
    return named


def published_catalog(repo: Repository, path: str) -> ContentHash | None:
    """The nested catalog mounted at ``path`` in the published revision, if ``path`` has its own."""
    h = repo.manifest().root_catalog
    while True:
        cat = _open(repo, h)
        try:
            ref = cat.find_nested_for(path)
        finally:
            cat.close()
        if ref is None:
            return None
        if ref.path == path:
            return ref.hash
        h = ref.hash


def extract_subtree(repo: Repository, holder: ContentHash, path: str) -> tuple[ContentHash, int]:
    """A nested catalog for ``path`` holding the rows below it in catalog ``holder`` (where the publisher
    left them, in its parent's catalog): the same rows, hashes and chunks (nothing is re-ingested), the
    nested catalogs below it referenced as they are, and a ``.cvmfscatalog`` marker. Stored; (hash, size).
    """
    src = _open(repo, holder)
    work = repo.private / "tmp" / f"extract.{secrets.token_hex(6)}.db"
    try:
        root = src.lookup(path, with_chunks=False)
        if root is None or not root.is_dir:
            raise IncompleteTree(f"{path} is not a directory in the published tree")
        cat = Catalog.create(work, path, root)
        cat.begin()
        subtree = dict(Counters().subtree)
        pending = [path]
        while pending:
            directory = pending.pop()
            for d in src.listdir(directory, with_chunks=True):
                child = f"{directory}/{d.name}"
                cat.insert(child, d)
                if d.is_nested_mountpoint:
                    ref = src.nested_ref(child)
                    if ref is None:
                        raise IncompleteTree(f"{child} is a mountpoint without a nested catalog")
                    cat.set_nested(child, ref.hash, ref.size)
                    nested = _open(repo, ref.hash)
                    try:
                        subtree = add_counts(subtree, (nested.counters() or Counters()).totals())
                    finally:
                        nested.close()
                elif d.is_dir:
                    pending.append(child)
        if cat.lookup(f"{path}/{NESTED_MARKER}", with_chunks=False) is None:
            repo.store.put_object(EMPTY_HASH.object_name(), EMPTY_OBJECT)
            marker = Dirent(name=NESTED_MARKER, mode=0o100644, flags=file_flags(), size=0,
                            mtime=root.mtime, hash=EMPTY_HASH)  # fmt: skip
            cat.insert(f"{path}/{NESTED_MARKER}", marker)
        counters = Counters()
        counters.self_ = cat.compute_self_counters()
        counters.subtree = subtree
        cat.write_counters(counters)
        cat.set_property("revision", 1)
        cat.set_property("last_modified", int(time.time()))
        cat.commit()
        cat.close()
        return repo.store_catalog(work)
    finally:
        src.close()
        work.unlink(missing_ok=True)
