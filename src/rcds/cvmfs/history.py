"""The history (tags) database, stored as an ``H`` object and named by the manifest."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .hashes import ContentHash

TRUNK = "trunk"
TRUNK_PREVIOUS = "trunk-previous"

_CREATE = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE branches (branch TEXT, parent TEXT, initial_revision INTEGER,"
    " CONSTRAINT pk_branch PRIMARY KEY (branch), FOREIGN KEY (parent) REFERENCES branches (branch),"
    " CHECK ((branch <> '') OR (parent IS NULL)), CHECK ((branch = '') OR (parent IS NOT NULL)))",
    "CREATE TABLE tags (name TEXT, hash TEXT, revision INTEGER, timestamp INTEGER, channel INTEGER,"
    " description TEXT, size INTEGER, branch TEXT, CONSTRAINT pk_tags PRIMARY KEY (name),"
    " FOREIGN KEY (branch) REFERENCES branches (branch))",
    "CREATE TABLE recycle_bin (hash TEXT, flags INTEGER, CONSTRAINT pk_hash PRIMARY KEY (hash))",
)


@dataclass(frozen=True)
class Tag:
    name: str
    root_hash: ContentHash
    revision: int
    timestamp: int
    size: int
    description: str = ""
    branch: str = ""


class History:
    """A history database file on local disk."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        uri = f"file:{path}" if writable else f"file:{path}?mode=ro&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
        self.columns = {r[1] for r in self.db.execute("PRAGMA table_info(tags)")}

    @classmethod
    def create(cls, path: Path, fqrn: str) -> History:
        if path.exists():
            path.unlink()
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA page_size = 1024")
        db.execute("BEGIN")
        for statement in _CREATE:
            db.execute(statement)
        db.executemany(
            "INSERT INTO properties (key, value) VALUES (?, ?)",
            [("schema", "1.0"), ("schema_revision", "3"), ("fqrn", fqrn)],
        )
        db.execute("INSERT INTO branches (branch, parent, initial_revision) VALUES ('', NULL, 0)")
        db.execute("COMMIT")
        db.close()
        return cls(path, writable=True)

    def properties(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM properties").fetchall())

    def set_property(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO properties (key, value) VALUES (?, ?)", (key, value))

    def tags(self) -> list[Tag]:
        branch = "branch" if "branch" in self.columns else "''"
        size = "size" if "size" in self.columns else "0"
        rows = self.db.execute(
            f"SELECT name, hash, revision, timestamp, {size}, description, {branch} FROM tags ORDER BY revision DESC"
        ).fetchall()
        return [
            Tag(n, ContentHash.from_hex(h), int(r), int(t), int(s or 0), d or "", b or "")
            for n, h, r, t, s, d, b in rows
        ]

    def get(self, name: str) -> Tag | None:
        return next((t for t in self.tags() if t.name == name), None)

    def put(self, tag: Tag) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO tags (name, hash, revision, timestamp, channel, description, size, branch)"
            " VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
            (tag.name, tag.root_hash.hex, tag.revision, tag.timestamp, tag.description, tag.size, tag.branch),
        )

    def remove(self, name: str) -> None:
        self.db.execute("DELETE FROM tags WHERE name = ?", (name,))

    def branches(self) -> list[tuple[str, str | None, int]]:
        try:
            return [
                (b, p, int(r))
                for b, p, r in self.db.execute("SELECT branch, parent, initial_revision FROM branches")
            ]
        except sqlite3.OperationalError:
            return []

    def close(self) -> None:
        self.db.close()
