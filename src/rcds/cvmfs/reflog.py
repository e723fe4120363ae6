"""The reflog ``.cvmfsreflog``: every root catalog, certificate, history and metainfo ever published.

Garbage collection enumerates what it may sweep from here. It is stored uncompressed at the repository
root; the manifest's ``Y`` field is the SHA-1 of its bytes.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from pathlib import Path

from .hashes import ContentHash


class RefType(enum.IntEnum):
    CATALOG = 0
    CERTIFICATE = 1
    HISTORY = 2
    METAINFO = 3


class Reflog:
    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        uri = f"file:{path}" if writable else f"file:{path}?mode=ro&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None)

    @classmethod
    def create(cls, path: Path, fqrn: str) -> Reflog:
        if path.exists():
            path.unlink()
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA page_size = 1024")
        db.execute("BEGIN")
        db.execute(
            "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))"
        )
        db.execute(
            "CREATE TABLE refs (hash TEXT, type INTEGER, timestamp INTEGER, CONSTRAINT pk_refs PRIMARY KEY (hash))"
        )
        db.executemany(
            "INSERT INTO properties (key, value) VALUES (?, ?)",
            [("schema", "1.0"), ("schema_revision", "0"), ("fqrn", fqrn)],
        )
        db.execute("COMMIT")
        db.close()
        return cls(path, writable=True)

    def add(self, h: ContentHash, kind: RefType, timestamp: int | None = None) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO refs (hash, type, timestamp) VALUES (?, ?, ?)",
            (h.hex, int(kind), int(timestamp if timestamp is not None else time.time())),
        )

    def remove(self, h: ContentHash) -> None:
        self.db.execute("DELETE FROM refs WHERE hash = ?", (h.hex,))

    def contains(self, h: ContentHash) -> bool:
        return self.db.execute("SELECT 1 FROM refs WHERE hash = ?", (h.hex,)).fetchone() is not None

    def list(self, kind: RefType | None = None) -> list[tuple[ContentHash, RefType, int]]:
        q = "SELECT hash, type, timestamp FROM refs"
        rows = (
            self.db.execute(q + " WHERE type = ?", (int(kind),)) if kind is not None else self.db.execute(q)
        )
        return [(ContentHash.from_hex(h), RefType(t), int(ts)) for h, t, ts in rows]

    def properties(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM properties").fetchall())

    def close(self) -> None:
        self.db.close()
