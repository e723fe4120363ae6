"""File catalogs: the SQLite databases that list a repository's entries.

One ``Catalog`` wraps one catalog file on local disk. It reads every schema the reference fixtures use
(legacy 1.x, 2.x) and writes the current one (schema 2.5, revision 7). Rows are keyed by the MD5 of the
repository-absolute path; nested catalogs cover subtrees and are listed by path in ``nested_catalogs``.
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..compat import SLOTS
from .hashes import Algorithm, ContentHash, md5_pair, parent_path

SCHEMA = "2.5"
SCHEMA_REVISION = 7
DEFAULT_TTL = 240

# flags (catalog_sql.h SqlDirent)
FLAG_DIR = 1
FLAG_NESTED_MOUNTPOINT = 2
FLAG_FILE = 4
FLAG_LINK = 8
FLAG_SPECIAL = 16
FLAG_NESTED_ROOT = 32
FLAG_CHUNKED = 64
FLAG_EXTERNAL = 128
HASH_ALGORITHM_SHIFT = 8
HASH_ALGORITHM_MASK = 0x7 << HASH_ALGORITHM_SHIFT
COMPRESSION_SHIFT = 11
COMPRESSION_MASK = 0x7 << COMPRESSION_SHIFT
FLAG_BIND_MOUNTPOINT = 0x4000
FLAG_HIDDEN = 0x8000
FLAG_DIRECT_IO = 0x10000
TRANSITION_FLAGS = FLAG_NESTED_MOUNTPOINT | FLAG_NESTED_ROOT

COMPRESSION_ZLIB = 0
COMPRESSION_NONE = 1

NESTED_MARKER = ".cvmfscatalog"

COUNTER_KINDS = (
    "regular",
    "symlink",
    "special",
    "dir",
    "nested",
    "chunked",
    "chunks",
    "file_size",
    "chunked_size",
    "xattr",
    "external",
    "external_file_size",
)

# The statements below reproduce the table layout the 2.12 tools create, column order included.
_CREATE = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, parent_2 INTEGER,"
    " hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, mtimens INTEGER,"
    " flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, xattr BLOB,"
    "  CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2))",
    "CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2)",
    "CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER,  hash BLOB,"
    "  CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size),"
    "  FOREIGN KEY (md5path_1, md5path_2) REFERENCES    catalog(md5path_1, md5path_2))",
    "CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER,"
    " CONSTRAINT pk_nested_catalogs PRIMARY KEY (path))",
    "CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER,"
    " CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path))",
    "CREATE TABLE statistics (counter TEXT, value INTEGER, CONSTRAINT pk_statistics PRIMARY KEY (counter))",
)


class CatalogError(Exception):
    """A catalog cannot be opened or is inconsistent."""


@dataclass(frozen=True)
class Chunk:
    offset: int
    size: int
    hash: ContentHash


@dataclass(**SLOTS)
class Dirent:
    """One catalog row. ``flags`` holds the type, nesting, chunking, algorithm and compression bits."""

    name: str
    mode: int
    flags: int
    size: int = 0
    mtime: int = 0
    mtimens: int | None = None
    uid: int = 0
    gid: int = 0
    hash: ContentHash | None = None
    symlink: str = ""
    hardlinks: int = 1
    xattr: bytes | None = None
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_special(self) -> bool:
        return not (self.is_dir or self.is_symlink or self.is_regular)

    @property
    def is_chunked(self) -> bool:
        return bool(self.flags & FLAG_CHUNKED)

    @property
    def is_external(self) -> bool:
        return bool(self.flags & FLAG_EXTERNAL)

    @property
    def is_nested_mountpoint(self) -> bool:
        return bool(self.flags & FLAG_NESTED_MOUNTPOINT)

    @property
    def is_nested_root(self) -> bool:
        return bool(self.flags & FLAG_NESTED_ROOT)

    @property
    def is_hidden(self) -> bool:
        return bool(self.flags & FLAG_HIDDEN)

    @property
    def compression(self) -> int:
        return (self.flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT

    @property
    def linkcount(self) -> int:
        return self.hardlinks & 0xFFFFFFFF

    @property
    def hardlink_group(self) -> int:
        return self.hardlinks >> 32

    @property
    def rdev(self) -> int:
        """Device number of a char/block device (stored in ``size``)."""
        return self.size if stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode) else 0

    def with_links(self, linkcount: int, group: int | None = None) -> Dirent:
        g = self.hardlink_group if group is None else group
        return replace(self, hardlinks=(g << 32) | linkcount)


def type_flags(mode: int) -> int:
    """The type bits of ``flags`` for a mode (no nesting, chunking or algorithm bits)."""
    if stat.S_ISDIR(mode):
        return FLAG_DIR
    if stat.S_ISLNK(mode):
        return FLAG_FILE | FLAG_LINK
    if stat.S_ISREG(mode):
        return FLAG_FILE
    return FLAG_FILE | FLAG_SPECIAL


def file_flags(algorithm: Algorithm = Algorithm.SHA1, chunked: bool = False, compression: int = 0) -> int:
    flags = FLAG_FILE | (algorithm.flag_value << HASH_ALGORITHM_SHIFT) | (compression << COMPRESSION_SHIFT)
    return flags | FLAG_CHUNKED if chunked else flags


def _root_entry(root_path: str, root: Dirent) -> Dirent:
    """A catalog's root row: no transition flags; a nested catalog's is marked as its root."""
    flags = root.flags & ~TRANSITION_FLAGS
    return replace(root, flags=flags | FLAG_NESTED_ROOT if root_path else flags)


def mountpoint_entry(root: Dirent) -> Dirent:
    """The row that mounts a nested catalog in its parent: the nested catalog's root row, marked as a
    mountpoint (the inverse of ``_root_entry``)."""
    return replace(root, flags=(root.flags & ~FLAG_NESTED_ROOT) | FLAG_NESTED_MOUNTPOINT)


def make_hardlinks(linkcount: int, group: int = 0) -> int:
    return (group << 32) | linkcount


@dataclass
class Counters:
    """The 24 statistics counters: ``self_<kind>`` and ``subtree_<kind>``."""

    self_: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KINDS, 0))
    subtree: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KINDS, 0))

    def totals(self) -> dict[str, int]:
        return {k: self.self_[k] + self.subtree[k] for k in COUNTER_KINDS}

    def rows(self) -> list[tuple[str, int]]:
        out = [(f"self_{k}", v) for k, v in self.self_.items()]
        out += [(f"subtree_{k}", v) for k, v in self.subtree.items()]
        return sorted(out)


def add_counts(a: dict[str, int], b: dict[str, int], sign: int = 1) -> dict[str, int]:
    return {k: a.get(k, 0) + sign * b.get(k, 0) for k in COUNTER_KINDS}


@dataclass(frozen=True)
class NestedRef:
    path: str
    hash: ContentHash
    size: int


_ROW_COLUMNS = (
    "hardlinks",
    "hash",
    "size",
    "mode",
    "mtime",
    "mtimens",
    "flags",
    "name",
    "symlink",
    "uid",
    "gid",
    "xattr",
)


class Catalog:
    """A catalog database on local disk, read-only unless opened with ``writable=True``."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        try:
            if writable:
                self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            else:
                self.db = sqlite3.connect(
                    f"file:{path}?mode=ro&immutable=1",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            # Names are raw bytes in CVMFS; undecodable ones round-trip as surrogate escapes.
            self.db.text_factory = _text
            self.db.execute(f"PRAGMA query_only = {0 if writable else 1}")
            self.properties = dict(self.db.execute("SELECT key, value FROM properties").fetchall())
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(catalog)")}
        except sqlite3.DatabaseError as exc:
            raise CatalogError(f"{path}: not a catalog database: {exc}") from exc
        if not columns:
            raise CatalogError(f"{path}: no catalog table")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.tables = tables
        self._select = ", ".join(
            c if c in columns else {"hardlinks": "1", "uid": "0", "gid": "0"}.get(c, "NULL")
            for c in _ROW_COLUMNS
        )
        self._has_nested_size = "size" in {
            r[1] for r in self.db.execute("PRAGMA table_info(nested_catalogs)")
        }
        if writable:
            self.db.execute("PRAGMA journal_mode = DELETE")
            self.db.execute("PRAGMA synchronous = OFF")  # durability comes from the object store

    # --- creation ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, root_path: str, root: Dirent, ttl: int | None = None) -> Catalog:
        """A new empty catalog whose root entry is ``root`` at ``root_path`` ("" = repository root)."""
        if path.exists():
            path.unlink()
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA page_size = 1024")  # the 2.12 tools' page size: small catalogs stay small
        db.execute("BEGIN")
        for statement in _CREATE:
            db.execute(statement)
        props: list[tuple[str, str]] = [("schema", SCHEMA), ("schema_revision", str(SCHEMA_REVISION))]
        if root_path:
            props.append(("root_prefix", root_path))
        if ttl is not None and not root_path:
            props.append(("TTL", str(ttl)))
        props += [("revision", "0")]
        db.executemany("INSERT INTO properties (key, value) VALUES (?, ?)", props)
        db.executemany(
            "INSERT INTO statistics (counter, value) VALUES (?, 0)",
            [(f"{p}_{k}",) for p in ("self", "subtree") for k in COUNTER_KINDS],
        )
        db.execute("COMMIT")
        db.close()
        cat = cls(path, writable=True)
        cat.insert(root_path, _root_entry(root_path, root), parent=None if root_path else (0, 0))
        return cat

    def set_root(self, root_path: str, root: Dirent) -> None:
        """Rewrite the root entry, as ``create`` writes it (a writer that made the catalog before it knew
        the root directory's final link count)."""
        self.update(root_path, _root_entry(root_path, root))

    def close(self) -> None:
        self.db.close()

    # --- properties ----------------------------------------------------------------------------

    @property
    def schema(self) -> float:
        return float(self.properties.get("schema", "1.0"))

    @property
    def revision(self) -> int:
        return int(self.properties.get("revision", "0"))

    @property
    def root_prefix(self) -> str:
        return str(self.properties.get("root_prefix", ""))

    @property
    def is_root(self) -> bool:
        return "root_prefix" not in self.properties

    @property
    def ttl(self) -> int:
        return int(self.properties.get("TTL", DEFAULT_TTL))

    @property
    def last_modified(self) -> int:
        return int(self.properties.get("last_modified", "0"))

    @property
    def previous_revision(self) -> ContentHash | None:
        text = self.properties.get("previous_revision")
        if not text or set(text) == {"0"}:
            return None
        return ContentHash.from_hex(text)

    def set_property(self, key: str, value: str | int) -> None:
        self.db.execute("INSERT OR REPLACE INTO properties (key, value) VALUES (?, ?)", (key, str(value)))
        self.properties[key] = str(value)

    # --- reading -------------------------------------------------------------------------------

    def _dirent(self, row: tuple[Any, ...], md5: tuple[int, int], with_chunks: bool) -> Dirent:
        hardlinks, hsh, size, mode, mtime, mtimens, flags, name, symlink, uid, gid, xattr = row
        flags_i = int(flags)
        algorithm = Algorithm.from_flag_value((flags_i & HASH_ALGORITHM_MASK) >> HASH_ALGORITHM_SHIFT)
        d = Dirent(
            name=str(name),
            mode=int(mode),
            flags=flags_i,
            size=int(size or 0),
            mtime=int(mtime or 0),
            mtimens=None if mtimens is None else int(mtimens),
            uid=int(uid or 0),
            gid=int(gid or 0),
            hash=ContentHash(bytes(hsh), algorithm) if hsh else None,
            symlink=str(symlink or ""),
            hardlinks=int(hardlinks) if hardlinks is not None else 1,
            xattr=bytes(xattr) if xattr is not None else None,
        )
        if with_chunks and d.is_chunked:
            d.chunks = self.chunks_of(md5, algorithm)
        return d

    def chunks_of(self, md5: tuple[int, int], algorithm: Algorithm = Algorithm.SHA1) -> list[Chunk]:
        if "chunks" not in self.tables:
            return []
        rows = self.db.execute(
            "SELECT offset, size, hash FROM chunks WHERE md5path_1 = ? AND md5path_2 = ? ORDER BY offset", md5
        ).fetchall()
        return [Chunk(int(o), int(s), ContentHash(bytes(h), algorithm)) for o, s, h in rows]

    def lookup(self, path: str, with_chunks: bool = True) -> Dirent | None:
        md5 = md5_pair(path)
        row = self.db.execute(
            f"SELECT {self._select} FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?", md5
        ).fetchone()
        return self._dirent(row, md5, with_chunks) if row else None

    def listdir(self, path: str, with_chunks: bool = False) -> list[Dirent]:
        """Entries whose parent is ``path``, sorted by name."""
        rows = self.db.execute(
            f"SELECT {self._select}, md5path_1, md5path_2 FROM catalog WHERE parent_1 = ? AND parent_2 = ?",
            md5_pair(path),
        ).fetchall()
        out = [self._dirent(r[:-2], (r[-2], r[-1]), with_chunks) for r in rows]
        out.sort(key=lambda d: d.name.encode("utf-8", "surrogateescape"))
        return out

    def iter_rows(self) -> Iterator[tuple[tuple[int, int], tuple[int, int], Dirent]]:
        """Every row as ``(md5, parent md5, dirent)`` (chunks not loaded)."""
        for r in self.db.execute(
            f"SELECT md5path_1, md5path_2, parent_1, parent_2, {self._select} FROM catalog"
        ):
            yield (r[0], r[1]), (r[2], r[3]), self._dirent(r[4:], (r[0], r[1]), False)

    def iter_chunks(self) -> Iterator[tuple[tuple[int, int], int, int, bytes]]:
        if "chunks" not in self.tables:
            return
        for a, b, off, size, h in self.db.execute(
            "SELECT md5path_1, md5path_2, offset, size, hash FROM chunks"
        ):
            yield (a, b), int(off), int(size), bytes(h)

    def nested(self) -> list[NestedRef]:
        size = "size" if self._has_nested_size else "0"
        rows = self.db.execute(f"SELECT path, sha1, {size} FROM nested_catalogs").fetchall()
        return [NestedRef(p, ContentHash.from_hex(h), int(s or 0)) for p, h, s in rows]

    def nested_ref(self, path: str) -> NestedRef | None:
        size = "size" if self._has_nested_size else "0"
        row = self.db.execute(
            f"SELECT path, sha1, {size} FROM nested_catalogs WHERE path = CAST(? AS TEXT)", (_raw(path),)
        ).fetchone()
        return NestedRef(row[0], ContentHash.from_hex(row[1]), int(row[2] or 0)) if row else None

    def find_nested_for(self, path: str) -> NestedRef | None:
        """The direct child catalog whose mountpoint is ``path`` or one of its ancestors."""
        probe = path
        while probe and probe != self.root_prefix:
            ref = self.nested_ref(probe)
            if ref:
                return ref
            probe = parent_path(probe)
        return None

    def counters(self) -> Counters | None:
        if "statistics" not in self.tables:
            return None
        values = dict(self.db.execute("SELECT counter, value FROM statistics").fetchall())
        c = Counters()
        for k in COUNTER_KINDS:
            c.self_[k] = int(values.get(f"self_{k}", 0))
            c.subtree[k] = int(values.get(f"subtree_{k}", 0))
        return c

    def referenced_objects(self) -> Iterator[tuple[bytes, str]]:
        """Raw digests and suffixes of the data objects this catalog references (not nested catalogs)."""
        for (h,) in self.db.execute(
            "SELECT hash FROM catalog WHERE hash IS NOT NULL AND (flags & ?) = 0 AND (flags & ?) != 0",
            (FLAG_EXTERNAL, FLAG_FILE),
        ):
            yield bytes(h), ""
        if "chunks" in self.tables:
            for (h,) in self.db.execute(
                "SELECT chunks.hash FROM chunks JOIN catalog USING (md5path_1, md5path_2)"
                " WHERE (catalog.flags & ?) = 0",
                (FLAG_EXTERNAL,),
            ):
                yield bytes(h), "P"

    def compute_self_counters(self) -> dict[str, int]:
        """Recount this catalog's own entries the way ``cvmfs_swissknife check`` does."""
        q = self.db.execute
        c = dict.fromkeys(COUNTER_KINDS, 0)
        reg, link, special, dirs = FLAG_FILE, FLAG_LINK, FLAG_SPECIAL, FLAG_DIR
        (c["dir"],) = q("SELECT count(*) FROM catalog WHERE flags & ?", (dirs,)).fetchone()
        (c["symlink"],) = q("SELECT count(*) FROM catalog WHERE flags & ?", (link,)).fetchone()
        (c["special"],) = q("SELECT count(*) FROM catalog WHERE flags & ?", (special,)).fetchone()
        c["regular"], c["file_size"] = q(
            "SELECT count(*), coalesce(sum(size), 0) FROM catalog WHERE flags & ? AND NOT flags & ?",
            (reg, link | special),
        ).fetchone()
        c["chunked"], c["chunked_size"] = q(
            "SELECT count(*), coalesce(sum(size), 0) FROM catalog WHERE flags & ?", (FLAG_CHUNKED,)
        ).fetchone()
        c["external"], c["external_file_size"] = q(
            "SELECT count(*), coalesce(sum(size), 0) FROM catalog WHERE flags & ? AND NOT flags & ?",
            (FLAG_EXTERNAL, link | special),
        ).fetchone()
        if "chunks" in self.tables:
            (c["chunks"],) = q("SELECT count(*) FROM chunks").fetchone()
        if "xattr" in {r[1] for r in q("PRAGMA table_info(catalog)")}:
            (c["xattr"],) = q("SELECT count(*) FROM catalog WHERE xattr IS NOT NULL").fetchone()
        (c["nested"],) = q("SELECT count(*) FROM nested_catalogs").fetchone()
        return {k: int(v) for k, v in c.items()}

    # --- writing -------------------------------------------------------------------------------

    _INSERT_ROW = (
        "INSERT INTO catalog (md5path_1, md5path_2, parent_1, parent_2, hardlinks, hash, size, mode, mtime,"
        " mtimens, flags, name, symlink, uid, gid, xattr)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,CAST(? AS TEXT),CAST(? AS TEXT),?,?,?)"
    )
    _INSERT_CHUNK = "INSERT INTO chunks (md5path_1, md5path_2, offset, size, hash) VALUES (?,?,?,?,?)"

    @staticmethod
    def _row_values(md5: tuple[int, int], parent: tuple[int, int], d: Dirent) -> tuple[object, ...]:
        return (*md5, *parent, d.hardlinks, d.hash.digest if d.hash else None, d.size, d.mode, d.mtime,
                d.mtimens, d.flags, _raw(d.name), _raw(d.symlink), d.uid, d.gid, d.xattr)  # fmt: skip

    def insert(self, path: str, d: Dirent, parent: tuple[int, int] | None = None) -> None:
        md5 = md5_pair(path)
        if parent is None:
            parent = md5_pair(parent_path(path)) if path else (0, 0)
        self.db.execute(self._INSERT_ROW, self._row_values(md5, parent, d))
        if d.chunks:
            self.db.executemany(
                self._INSERT_CHUNK, [(*md5, c.offset, c.size, c.hash.digest) for c in d.chunks]
            )

    def insert_many(self, rows: Iterable[tuple[str, Dirent]]) -> None:
        """``insert`` of many rows in one statement (a tree's 20,000 rows: ~3x faster than one by one);
        each parent's path hash is computed once."""
        parents: dict[str, tuple[int, int]] = {}
        values: list[tuple[object, ...]] = []
        chunks: list[tuple[object, ...]] = []
        for path, d in rows:
            md5 = md5_pair(path)
            parent = (0, 0)
            if path:
                up = parent_path(path)
                if up not in parents:
                    parents[up] = md5_pair(up)
                parent = parents[up]
            values.append(self._row_values(md5, parent, d))
            chunks.extend((*md5, c.offset, c.size, c.hash.digest) for c in d.chunks)
        self.db.executemany(self._INSERT_ROW, values)
        if chunks:
            self.db.executemany(self._INSERT_CHUNK, chunks)

    def update(self, path: str, d: Dirent) -> None:
        """Rewrite the row at ``path`` (same path, new fields); chunks are replaced too."""
        md5 = md5_pair(path)
        self.db.execute(
            "UPDATE catalog SET hardlinks=?, hash=?, size=?, mode=?, mtime=?, mtimens=?, flags=?,"
            " name=CAST(? AS TEXT), symlink=CAST(? AS TEXT), uid=?, gid=?, xattr=? WHERE md5path_1=? AND md5path_2=?",
            (
                d.hardlinks,
                d.hash.digest if d.hash else None,
                d.size,
                d.mode,
                d.mtime,
                d.mtimens,
                d.flags,
                _raw(d.name),
                _raw(d.symlink),
                d.uid,
                d.gid,
                d.xattr,
                *md5,
            ),
        )
        self.db.execute("DELETE FROM chunks WHERE md5path_1=? AND md5path_2=?", md5)
        if d.chunks:
            self.db.executemany(
                "INSERT INTO chunks (md5path_1, md5path_2, offset, size, hash) VALUES (?,?,?,?,?)",
                [(*md5, c.offset, c.size, c.hash.digest) for c in d.chunks],
            )

    def delete(self, path: str) -> None:
        md5 = md5_pair(path)
        self.db.execute("DELETE FROM catalog WHERE md5path_1=? AND md5path_2=?", md5)
        self.db.execute("DELETE FROM chunks WHERE md5path_1=? AND md5path_2=?", md5)

    def delete_subtree(self, path: str) -> list[str]:
        """Delete ``path`` and every row below it in this catalog; returns nested mountpoints cut off."""
        cut: list[str] = []
        stack = [path]
        while stack:
            p = stack.pop()
            for child in self.listdir(p):
                cp = f"{p}/{child.name}"
                if child.is_dir and not child.is_nested_mountpoint:
                    stack.append(cp)
                else:
                    self.delete(cp)
                if child.is_nested_mountpoint:
                    cut.append(cp)
                    self.remove_nested(cp)
            self.delete(p)
        ref = self.nested_ref(path)
        if ref:
            cut.append(path)
            self.remove_nested(path)
        return cut

    def set_nested(self, path: str, catalog_hash: ContentHash, size: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO nested_catalogs (path, sha1, size) VALUES (CAST(? AS TEXT), ?, ?)",
            (_raw(path), catalog_hash.hex, size),
        )

    def remove_nested(self, path: str) -> None:
        self.db.execute("DELETE FROM nested_catalogs WHERE path = CAST(? AS TEXT)", (_raw(path),))

    def max_hardlink_group(self) -> int:
        (value,) = self.db.execute("SELECT coalesce(max(hardlinks >> 32), 0) FROM catalog").fetchone()
        return int(value)

    def write_counters(self, counters: Counters) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO statistics (counter, value) VALUES (?, ?)", counters.rows()
        )

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def vacuum_if_needed(self, max_free_ratio: float = 0.2) -> None:
        (free,) = self.db.execute("PRAGMA freelist_count").fetchone()
        (pages,) = self.db.execute("PRAGMA page_count").fetchone()
        if pages and free / pages > max_free_ratio:
            self.db.execute("VACUUM")


def _raw(text: str) -> bytes:
    """Bind text as its raw bytes (``CAST(? AS TEXT)`` in SQL) so non-UTF-8 names survive."""
    return text.encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
