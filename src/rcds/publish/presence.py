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

PUBLISHER_FILE = ".publisher"  # written into every CID directory (the layout of the service rcds replaces)


@dataclass(frozen=True)
class Presence:
    repository: str
    cid: str
    path: str  # /cvmfs/<repository>/<prefix>/<cid>
    revision: int | None


class PresenceIndex:
    def __init__(self, repositories: Sequence[str], prefix: str) -> None:
        self.order = list(repositories)  # configuration order decides which copy ``exists`` names
        self.prefix = prefix
        self._cids: dict[str, dict[str, int | None]] = {r: {} for r in self.order}
        self._lock = threading.Lock()

    def replace(self, repository: str, cids: Iterable[str], revision: int | None = None) -> None:
        fresh: dict[str, int | None] = dict.fromkeys(cids, revision)
        with self._lock:
            self._cids[repository] = fresh

    def add(self, repository: str, cids: Iterable[str], revision: int) -> None:
        with self._lock:
            table = self._cids.setdefault(repository, {})
            for cid in cids:
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
            for cid in cids:
                table.pop(cid, None)

    def count(self, repository: str) -> int:
        return len(self._cids.get(repository, {}))

    def anywhere(self, cid: str) -> bool:
        return any(cid in table for table in self._cids.values())


class StorageView:
    """The live revision of a repository's storage directory (ours, or a replica), catalog by catalog.

    Catalogs are inflated into a temporary directory on first use; ``close`` removes them. Reads the
    files a stratum 0 or 1 serves, so it works for replicas that have no private ``.rcds`` directory.
    """

    def __init__(self, storage: Path) -> None:
        self.storage = Path(storage)
        manifest, _ = Manifest.parse((self.storage / ".cvmfspublished").read_bytes())
        self.revision = manifest.revision
        self._root = manifest.root_catalog
        self._tmp = tempfile.TemporaryDirectory(prefix="rcds-view-")
        self._opened: dict[str, Catalog] = {}

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
            stored = (self.storage / h.object_name(Suffix.CATALOG)).read_bytes()
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


def scan_cid_dirs(view: StorageView, top: str, marker: str = PUBLISHER_FILE) -> dict[str, Dirent]:
    """The CID directories under ``top`` (the prefix, or ts/), each with its directory entry.

    A directory directly under ``top`` that holds the file ``marker`` is a one-level CID; any other is a
    group whose subdirectories are two-level CIDs (the layout of the service rcds replaces).
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
            continue
        for grandchild in view.listdir(child_path):
            if grandchild.is_dir:
                found[f"{child.name}/{grandchild.name}"] = grandchild
    return found


def scan_published_cids(storage: Path, prefix: str) -> set[str]:
    """The CIDs under ``/<prefix>`` in the live revision of a repository's storage.

    Only the prefix catalog, the group catalogs and one-level CIDs' catalogs are opened, never the
    catalogs of the (many) two-level CIDs.
    """
    with StorageView(storage) as view:
        return set(scan_cid_dirs(view, prefix))
