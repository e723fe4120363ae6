"""Which CIDs each repository's *published* (signed, live) revision holds.

``exists`` is answered from here, in memory: it must be fast (thousands of requests per second from
polling clients) and must say ``PRESENT`` only once a signed manifest that contains the CID is live. The
index is built from the repository's catalogs at start-up and then kept current by whoever commits (the
publish workers, cleanup).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..cvmfs.catalog import Catalog
from ..cvmfs.hashes import normalize_path
from ..cvmfs.repository import Repository

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

    def count(self, repository: str) -> int:
        return len(self._cids.get(repository, {}))


def scan_published_cids(repo: Repository, prefix: str) -> set[str]:
    """The CIDs under ``/<prefix>`` in the repository's live revision.

    A directory directly under the prefix is a one-level CID if it holds a ``.publisher`` file, else a
    group whose subdirectories are two-level CIDs. Only the prefix catalog, the group catalogs and
    one-level CIDs' catalogs are opened, never the catalogs of the (many) two-level CIDs.
    """
    manifest = repo.manifest()
    opened: dict[str, Catalog] = {}

    def catalog_for(path: str) -> Catalog:
        mount = ""
        cat = opened.get("") or opened.setdefault("", repo.open_catalog(manifest.root_catalog))
        while True:
            ref = cat.find_nested_for(path)
            if ref is None:
                return cat
            mount = ref.path
            if mount not in opened:
                opened[mount] = repo.open_catalog(ref.hash)
            cat = opened[mount]

    found: set[str] = set()
    top = normalize_path(prefix)
    try:
        d = catalog_for(top).lookup(top)
        if d is None or not d.is_dir:
            return found
        for child in catalog_for(top).listdir(top):
            if not child.is_dir:
                continue
            child_path = f"{top}/{child.name}"
            if catalog_for(child_path + "/" + PUBLISHER_FILE).lookup(child_path + "/" + PUBLISHER_FILE):
                found.add(child.name)
                continue
            for grandchild in catalog_for(child_path).listdir(child_path):
                if grandchild.is_dir:
                    found.add(f"{child.name}/{grandchild.name}")
    finally:
        for cat in opened.values():
            cat.close()
    return found
