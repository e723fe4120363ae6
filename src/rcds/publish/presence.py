"""Which CIDs each repository's *published* (signed, live) revision holds.

``exists`` is answered from here, in memory: it must be fast (thousands of requests per second from
polling clients) and must say ``PRESENT`` only once a signed manifest that contains the CID is live. The
index is built from the repository's catalogs at start-up and then kept current by whoever commits (the
publish workers, cleanup).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cvmfs.catalog import Catalog, Dirent
from ..cvmfs.hashes import ContentHash, Suffix, normalize_path
from ..cvmfs.manifest import Manifest
from ..cvmfs.objects import decompress
from ..storage import ObjectStore
from .cid import PUBLISHER_FILE as PUBLISHER_FILE


@dataclass(frozen=True)
class Presence:
    repository: str
    cid: str
    path: str  # /cvmfs/<repository>/<prefix>/<cid>
    revision: int | None


class PresenceIndex:
    """Per repository: its CIDs (-> the revision that showed them) and its groups (-> how many CIDs).

    The group counts let the namespace rule (``namespace``) ask "is N a group here?" in one dictionary
    look-up per repository, as ``find`` asks "is C a CID here?".
    """

    def __init__(self, repositories: Sequence[str], prefix: str) -> None:
        self.order = list(repositories)  # configuration order decides which copy ``exists`` names
        self.prefix = prefix
        self._cids: dict[str, dict[str, int | None]] = {r: {} for r in self.order}
        self._groups: dict[str, dict[str, int]] = {r: {} for r in self.order}
        self._lock = threading.Lock()

    def replace(self, repository: str, cids: Iterable[str], revision: int | None = None) -> None:
        fresh: dict[str, int | None] = dict.fromkeys(cids, revision)
        groups: dict[str, int] = {}
        for cid in fresh:
            _count_group(groups, cid, 1)
        with self._lock:
            self._cids[repository] = fresh
            self._groups[repository] = groups

    def add(self, repository: str, cids: Iterable[str], revision: int) -> None:
        with self._lock:
            table = self._cids.setdefault(repository, {})
            groups = self._groups.setdefault(repository, {})
            for cid in cids:
                if cid not in table:
                    _count_group(groups, cid, 1)
                table[cid] = revision

    def find(self, cid: str) -> Presence | None:
        for repo in self.order:
            table = self._cids.get(repo)
            if table is not None and cid in table:
                return Presence(repo, cid, f"/cvmfs/{repo}/{self.prefix}/{cid}", table.get(cid))
        return None

    def remove(self, repository: str, cids: Iterable[str]) -> None:
        with self._lock:
            table = self._cids.get(repository, {})
            groups = self._groups.get(repository, {})
            for cid in cids:
                if cid in table:
                    del table[cid]
                    _count_group(groups, cid, -1)

    def is_cid(self, repository: str, name: str) -> bool:
        return name in self._cids.get(repository, ())

    def is_group(self, repository: str, name: str) -> bool:
        return name in self._groups.get(repository, ())

    def top_names(self, repository: str) -> set[str]:
        """The top-level names ``repository`` uses: its one-level CIDs and its groups."""
        with self._lock:
            leaves = {c for c in self._cids.get(repository, {}) if "/" not in c}
            return leaves | set(self._groups.get(repository, {}))

    def count(self, repository: str) -> int:
        return len(self._cids.get(repository, {}))

    def anywhere(self, cid: str) -> bool:
        return any(cid in table for table in self._cids.values())


def _count_group(groups: dict[str, int], cid: str, delta: int) -> None:
    group, slash, _ = cid.partition("/")
    if not slash:
        return
    left = groups.get(group, 0) + delta
    if left > 0:
        groups[group] = left
    else:
        groups.pop(group, None)


class StorageView:
    """The live revision of a repository's storage directory (ours, or a replica), catalog by catalog.

    Catalogs are inflated into a temporary directory on first use; ``close`` removes them. Reads the
    files a stratum 0 or 1 serves, so it works for replicas that have no private ``.rcds`` directory.
    """

    def __init__(self, storage: Path | ObjectStore) -> None:
        """``storage``: a directory, or the object store of a repository whose files are in a bucket."""
        self.store = storage if isinstance(storage, ObjectStore) else None
        self.storage = Path(storage) if not isinstance(storage, ObjectStore) else Path()
        manifest, _ = Manifest.parse(self._read(".cvmfspublished"))
        self.revision = manifest.revision
        self._root = manifest.root_catalog
        self._tmp = tempfile.TemporaryDirectory(prefix="rcds-view-")
        self._opened: dict[str, Catalog] = {}

    def _read(self, key: str) -> bytes:
        return self.store.get(key) if self.store is not None else (self.storage / key).read_bytes()

    def close(self) -> None:
        for cat in self._opened.values():
            cat.close()
        self._opened.clear()
        self._tmp.cleanup()

    def __enter__(self) -> StorageView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, mount: str, h: ContentHash) -> Catalog:
        cat = self._opened.get(mount)
        if cat is None:
            path = Path(self._tmp.name) / h.hex
            stored = self._read(h.object_name(Suffix.CATALOG))
            path.write_bytes(decompress(stored))
            cat = self._opened[mount] = Catalog(path)
        return cat

    def catalog_for(self, path: str) -> Catalog:
        """The catalog that holds ``path``'s row."""
        cat = self._open("", self._root)
        while True:
            ref = cat.find_nested_for(path)
            if ref is None:
                return cat
            cat = self._open(ref.path, ref.hash)

    def lookup(self, path: str) -> Dirent | None:
        path = normalize_path(path)
        return self.catalog_for(path).lookup(path)

    def listdir(self, path: str) -> list[Dirent]:
        path = normalize_path(path)
        return self.catalog_for(path).listdir(path)


def scan_cid_dirs(
    view: StorageView, top: str, marker: str = PUBLISHER_FILE, shadowed: list[str] | None = None
) -> dict[str, Dirent]:
    """The CID directories under ``top`` (the prefix, or ts/), each with its directory entry.

    A directory directly under ``top`` that holds the file ``marker`` is a one-level CID, and everything
    inside it is its content, never another CID; any other directory is a group whose subdirectories are
    two-level CIDs (the layout of the service rcds replaces). With ``shadowed``, the CID-like directories
    found inside one-level CIDs (a subdirectory holding ``marker``, ``<name>/<sub>``) are appended to it:
    namespace collisions, which the audit reports.
    """
    found: dict[str, Dirent] = {}
    top = normalize_path(top)
    d = view.lookup(top)
    if d is None or not d.is_dir:
        return found
    for child in view.listdir(top):
        if not child.is_dir:
            continue
        child_path = f"{top}/{child.name}"
        if view.lookup(f"{child_path}/{marker}") is not None:
            found[child.name] = child
            if shadowed is not None:
                shadowed.extend(
                    f"{child.name}/{sub.name}"
                    for sub in view.listdir(child_path)
                    if sub.is_dir and view.lookup(f"{child_path}/{sub.name}/{marker}") is not None
                )
            continue
        for grandchild in view.listdir(child_path):
            if grandchild.is_dir:
                found[f"{child.name}/{grandchild.name}"] = grandchild
    return found


def scan_published_cids(
    storage: Path | ObjectStore, prefix: str, shadowed: list[str] | None = None
) -> set[str]:
    """The CIDs under ``/<prefix>`` in the live revision of a repository's storage.

    Only the prefix catalog, the group catalogs and one-level CIDs' catalogs are opened, never the
    catalogs of the (many) two-level CIDs. ``shadowed``: as for ``scan_cid_dirs``.
    """
    with StorageView(storage) as view:
        return set(scan_cid_dirs(view, prefix, shadowed=shadowed))
