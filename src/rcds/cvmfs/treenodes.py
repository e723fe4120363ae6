"""A tree to add, as catalog rows: tree entries in, nodes out.

``Transaction.add_tree`` (``rcds.cvmfs.writer``) turns a tree's entries into nodes (``collect``): one
catalog row each, every file's content handed to the content writer as it comes; once the content is
stored, ``resolve`` puts it into the rows with the hard links and the directories' link counts; the
writer then writes the rows into catalogs. ``EarlyRows`` writes files' rows into the tree's own catalog
while the rest of the content is still being stored.
"""

from __future__ import annotations

import contextlib
import stat
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .catalog import FLAG_DIR, FLAG_FILE, FLAG_LINK, FLAG_SPECIAL, Catalog, Dirent, file_flags, make_hardlinks
from .content import ContentWriter, PendingContent
from .errors import TreeError
from .hashes import normalize_path
from .tree import EntryKind, TreeEntry

DIR_SIZE = 4096
_WHOLE_FILE_FLAGS, _CHUNKED_FILE_FLAGS = file_flags(chunked=False), file_flags(chunked=True)


@dataclass
class Node:
    """One entry of the tree: its catalog row, and the content that row waits for."""

    dirent: Dirent
    kind: EntryKind
    pending: PendingContent | None = None
    link_target: str | None = None  # for HARDLINK
    subdirs: int = 0

    def take_content(self) -> None:
        """The stored content's hash, chunks, flags and size into the row (waits for it); the node then
        waits for nothing (``resolve`` skips a file whose row ``EarlyRows`` has written)."""
        assert self.pending is not None
        stored = self.pending.result()
        d = self.dirent
        d.hash, d.chunks, d.size = stored.hash, stored.chunks, stored.size
        d.flags = _CHUNKED_FILE_FLAGS if stored.hash is None else _WHOLE_FILE_FLAGS
        self.pending = None


class EarlyRows:
    """The rows of a tree's own catalog, written while its content is still being stored.

    ``add_tree`` with ``nested`` makes the tree's catalog before it reads the entries, detached: nothing
    names it until every file has been stored, so a file that cannot be read still fails the call before
    the old tree is touched (``discard``). Files' rows go in, a few hundred at a time, once their content
    is stored, between the entries the main thread hands to the content workers, instead of all of them
    after the last file: for 20,000 small files the rows written after the last one took 0.04 s instead
    of 0.4 s, and the ingest 0.13 s less (the rest shares the cores with the workers). Directory rows
    (their link counts), hard links and the ``.cvmfscatalog`` marker wait for the end, as do all rows when
    the tree turns out to hold nested catalogs of its own.
    """

    FLUSH_EVERY = 256  # entries between looks at what has been stored

    def __init__(self, path: str, cat: Catalog, work_file: Path) -> None:
        self.path = path
        self.cat = cat
        self.work_file = work_file
        self.waiting: deque[tuple[str, Node, PendingContent]] = deque()  # files, in stream order
        self.written: set[str] = set()
        self._offered = 0
        cat.begin()

    def offer(self, rel: str, node: Node) -> None:
        if node.kind is EntryKind.FILE and node.pending is not None:
            self.waiting.append((rel, node, node.pending))
            self._offered += 1
            if self._offered % self.FLUSH_EVERY == 0:
                self.flush()

    def flush(self) -> None:
        """Write the rows of the files stored so far (in order: the oldest not stored stops it)."""
        rows: list[tuple[str, Dirent]] = []
        while self.waiting and self.waiting[0][2].ready():
            rel, node, _ = self.waiting.popleft()
            node.take_content()
            rows.append((absolute(self.path, rel), node.dirent))
            self.written.add(rel)
        if rows:
            self.cat.insert_many(rows)

    def discard(self) -> None:
        """Nothing of it is kept: the tree failed, or its rows go into catalogs of their own."""
        with contextlib.suppress(Exception):  # SQLite may have rolled back already (a full disk)
            self.cat.db.execute("ROLLBACK")
        self.cat.close()
        self.work_file.unlink(missing_ok=True)


def collect(
    entries: Iterable[TreeEntry], now: int, content: ContentWriter, early: EarlyRows | None
) -> dict[str, Node]:
    """The tree's nodes by relative path ("" is its root), directories the entries imply added; each file's
    content is handed to ``content`` as it comes, and its row to ``early``."""
    nodes: dict[str, Node] = {}
    for e in entries:
        rel = relative(e.path)
        if rel in nodes and not (e.kind is EntryKind.DIRECTORY and nodes[rel].kind is EntryKind.DIRECTORY):
            raise TreeError(f"duplicate entry {rel!r}")
        node = nodes[rel] = node_of(e, rel, content)
        if early is not None:
            early.offer(rel, node)
    # Directories the stream implied but did not list (tar files often omit them).
    for rel in list(nodes):
        p = rel
        while p:
            p = _parent(p)
            if p in nodes:
                if nodes[p].kind is not EntryKind.DIRECTORY:
                    raise TreeError(f"{p!r} is used as a directory but is not one")
                break
            nodes[p] = Node(dir_row(p.rsplit("/", 1)[-1], 0o755, now), EntryKind.DIRECTORY)
    if "" not in nodes:
        nodes[""] = Node(dir_row("", 0o755, now), EntryKind.DIRECTORY)
    return nodes


def node_of(e: TreeEntry, rel: str, content: ContentWriter) -> Node:
    """The catalog row for one entry; file content is handed to the content writer now."""
    perm = e.mode & 0o7777
    xattr = xattr_blob(e.xattrs)
    name = rel.rsplit("/", 1)[-1]

    def row(mode: int, flags: int, size: int = 0, symlink: str = "") -> Dirent:
        return Dirent(name=name, mode=mode, flags=flags, size=size, mtime=int(e.mtime), uid=int(e.uid),
                      gid=int(e.gid), symlink=symlink, xattr=xattr)  # fmt: skip

    if e.kind is EntryKind.DIRECTORY:
        return Node(row(stat.S_IFDIR | perm, FLAG_DIR, DIR_SIZE), e.kind)
    if e.kind is EntryKind.FILE:
        if e.source is not None:
            pending = content.add_file(e.source, e.size, e.lstat)
        elif e.stream is not None:
            pending = content.add_stream(e.stream, e.size)
        else:
            raise TreeError(f"{rel}: file entry without content")
        return Node(row(stat.S_IFREG | perm, FLAG_FILE, e.size), e.kind, pending)
    if e.kind is EntryKind.SYMLINK:
        target_len = len(e.target.encode("utf-8", "surrogateescape"))
        return Node(row(stat.S_IFLNK | 0o777, FLAG_FILE | FLAG_LINK, target_len, e.target), e.kind)
    if e.kind is EntryKind.HARDLINK:
        return Node(row(stat.S_IFREG | perm, FLAG_FILE), e.kind, link_target=relative(e.target))
    fmt = stat.S_IFMT(e.mode)
    if fmt not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        raise TreeError(f"{rel}: unknown special file type {oct(e.mode)}")
    size = e.rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return Node(row(fmt | perm, FLAG_FILE | FLAG_SPECIAL, size), e.kind)


def resolve(nodes: dict[str, Node]) -> None:
    """Content (waits for it), hard links and directory link counts into the rows."""
    for node in nodes.values():
        if node.pending is not None:
            node.take_content()
    groups: dict[str, list[str]] = {}
    for rel, node in nodes.items():
        if node.kind is EntryKind.HARDLINK:
            target = node.link_target or ""
            seen = set()
            while target in nodes and nodes[target].kind is EntryKind.HARDLINK and target not in seen:
                seen.add(target)
                target = nodes[target].link_target or ""
            if target not in nodes or nodes[target].kind is not EntryKind.FILE:
                raise TreeError(f"hard link {rel!r} points to {node.link_target!r}, not a file in the tree")
            groups.setdefault(target, [target]).append(rel)
    # CVMFS forms hard link groups within one directory only (cvmfs_swissknife check counts the
    # members per directory listing): names of one inode in different directories become copies.
    for target, members in groups.items():
        src = nodes[target].dirent
        by_dir: dict[str, list[str]] = {}
        for m in members:
            by_dir.setdefault(_parent(m), []).append(m)
        for directory, names in by_dir.items():
            for m in names:
                d = nodes[m].dirent
                nodes[m].dirent = replace(
                    src, name=d.name, chunks=list(src.chunks), hardlinks=make_hardlinks(len(names))
                )
                nodes[m].kind = EntryKind.FILE
                # group key, numbered per catalog when written
                nodes[m].link_target = f"{directory}/{target}" if len(names) > 1 else None
    for rel, node in nodes.items():
        if rel and node.kind is EntryKind.DIRECTORY:
            nodes[_parent(rel)].subdirs += 1
    for node in nodes.values():
        if node.kind is EntryKind.DIRECTORY:
            node.dirent.hardlinks = make_hardlinks(2 + node.subdirs)


def dir_row(name: str, perm: int, mtime: int) -> Dirent:
    """A directory's row (its link count set when the tree is resolved)."""
    return Dirent(name=name, mode=stat.S_IFDIR | perm, flags=FLAG_DIR, size=DIR_SIZE, mtime=mtime)


def relative(path: str) -> str:
    """An entry's path, relative to the tree's root ("" is the root); a path that leaves the tree is a
    ``TreeError``."""
    if path and path[0] != "/" and path[-1] != "/" and "//" not in path and "/." not in "/" + path:
        return path  # already relative and plain (a walk's paths): no split and join per entry
    try:
        rel = normalize_path(path)
    except ValueError as exc:
        raise TreeError(str(exc)) from exc
    return rel[1:]


def _parent(rel: str) -> str:
    """The directory holding ``rel`` in the tree ("" is the root)."""
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def absolute(base: str, rel: str | None) -> str:
    """The repository path of ``rel`` in the tree at ``base``."""
    return f"{base}/{rel}" if rel else base


def catalog_root(rel: str, boundaries: set[str]) -> str | None:
    """The nearest boundary at or above ``rel`` (a directory that roots a new catalog), if any."""
    p = rel
    while True:
        if p in boundaries:
            return p
        if not p:
            return None
        p = _parent(p)


def xattr_blob(xattrs: dict[bytes, bytes] | None) -> bytes | None:
    """Serialize extended attributes the way CVMFS does (version 1, byte lengths, sorted keys)."""
    if not xattrs:
        return None
    items = sorted(xattrs.items())
    if len(items) > 255:
        raise TreeError("too many extended attributes (255 at most)")
    out = bytearray([1, len(items)])
    for k, v in items:
        if not 0 < len(k) < 256 or len(v) > 255 or b"\x00" in k:
            raise TreeError("extended attribute key or value too long")
        out += bytes([len(k), len(v)]) + k + v
    return bytes(out)
