"""Read a repository's public files straight from its object store (``rcds repo check`` and the reader
of a stratum 0 whose storage is a bucket), without going through a web server."""

from __future__ import annotations

from typing import BinaryIO

from ..storage import ObjectMissing, ObjectStore
from .sources import NotFound, Source


class StoreSource(Source):
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def fetch(self, key: str, dest: BinaryIO, fresh: bool = False) -> None:
        try:
            dest.write(self.store.get(key))
        except ObjectMissing as exc:
            raise NotFound(key, [f"{self.store.description}: no such object"]) from exc

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    @property
    def description(self) -> str:
        return self.store.description
