"""A remote store that knows which content-addressed objects it holds from a local index of what it wrote.

A stratum 1 in a bucket asks "is this object there?" for every object a new catalog references (tens of
thousands for a large one, nearly all present): one HEAD each would make an incremental snapshot cost as
many requests as the repository has files. ``IndexedStore`` answers from a local SQLite table of the
``data/`` keys it has written (and not deleted) instead, so the question costs no request and no bucket
is ever listed per snapshot.

The index is conservative: a key enters it only after its PUT was acknowledged, and leaves it before its DELETE is sent. So a key in the index is in the bucket;
a key written but not yet recorded (a crash in between) is only written again. Records are committed
one by one, as the PUTs are acknowledged. Keys of the ``.cvmfs*``
root files are not indexed: they go to the bucket.

An index that does not exist yet is built once from a listing of ``data/`` (``rebuild``): for a bucket
that already holds objects written without it (a lost state directory). Catalogs are left out of a
rebuilt index on purpose: a stratum 1 trusts a catalog it holds for its whole subtree, which only its own
records can vouch for (a garbage collection killed mid-sweep leaves catalogs over deleted objects); a
catalog not indexed is fetched and descended again, and each object below it is looked up.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..logs import fields
from . import ObjectStore

log = logging.getLogger("rcds.storage")

DATA_PREFIX = "data/"


class IndexedStore(ObjectStore):
    """``inner`` (a bucket) with presence of ``data/`` keys answered by the index at ``index_path``."""

    def __init__(self, inner: ObjectStore, index_path: Path) -> None:
        self.inner = inner
        self.parallelism = inner.parallelism
        self.public_url = inner.public_url
        self.index_path = Path(index_path)
        new = not self.index_path.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.index_path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS present (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        self._db.commit()
        if new or self._meta("built") is None:
            self.rebuild()

    @property
    def description(self) -> str:
        return self.inner.description

    def _meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def rebuild(self) -> int:
        """Fill the index from a listing of the bucket's ``data/`` (catalogs left out, see the module)."""
        count = 0
        with self._lock:
            self._db.execute("DELETE FROM present")
            batch: list[tuple[str]] = []
            for key in self.inner.iter_keys(DATA_PREFIX):
                if key.endswith("C"):
                    continue
                batch.append((key,))
                if len(batch) >= 10_000:
                    self._db.executemany("INSERT OR IGNORE INTO present (key) VALUES (?)", batch)
                    count += len(batch)
                    batch.clear()
            self._db.executemany("INSERT OR IGNORE INTO present (key) VALUES (?)", batch)
            count += len(batch)
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('built', 'listing')")
            self._db.commit()
        if count:
            log.info(
                "presence index rebuilt from the bucket", extra=fields(store=self.description, keys=count)
            )
        return count

    # --- presence: the index -------------------------------------------------------------------------

    def holds(self, key: str) -> bool:
        """Whether the index records ``key`` (a ``data/`` key): no request."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM present WHERE key = ?", (key,)).fetchone() is not None

    def _record(self, key: str) -> None:
        # Committed at once (WAL, synchronous=NORMAL: no fsync per commit, tens of microseconds against
        # milliseconds for the PUT), so that a killed process loses at most the records of the PUTs in
        # flight, and the next run writes only those again.
        if key.startswith(DATA_PREFIX):
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO present (key) VALUES (?)", (key,))
                self._db.commit()

    def _forget(self, keys: list[str]) -> None:
        data = [(k,) for k in keys if k.startswith(DATA_PREFIX)]
        if data:
            with self._lock:
                self._db.executemany("DELETE FROM present WHERE key = ?", data)
                self._db.commit()  # before the deletes are sent: the index never names a deleted key

    def exists(self, key: str) -> bool:
        return self.holds(key) if key.startswith(DATA_PREFIX) else self.inner.exists(key)

    def iter_keys(self, prefix: str = DATA_PREFIX) -> Iterator[str]:
        """The indexed keys under ``prefix`` (``data/...``); other prefixes are listed in the bucket."""
        if not prefix.startswith(DATA_PREFIX):
            yield from self.inner.iter_keys(prefix)
            return
        after, end = prefix, prefix + "\uffff"
        while True:  # in pages (keyset), so that memory stays bounded for millions of keys
            with self._lock:
                page = [
                    str(k)
                    for (k,) in self._db.execute(
                        "SELECT key FROM present WHERE key > ? AND key < ? ORDER BY key LIMIT 10000",
                        (after, end),
                    )
                ]
            yield from page
            if len(page) < 10000:
                return
            after = page[-1]

    # --- writes: the bucket, then the index ----------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.inner.put(key, data)
        self._record(key)

    def put_file(self, key: str, path: str) -> None:
        self.inner.put_file(key, path)
        self._record(key)

    def put_object(self, key: str, data: bytes | memoryview) -> bool:
        if self.holds(key):
            return False
        self.put(key, data)
        return True

    def put_durable(self, key: str, data: bytes) -> None:
        self.inner.put_durable(key, data)
        self._record(key)

    def delete(self, key: str) -> None:
        self._forget([key])
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        self._forget(batch)
        self.inner.delete_many(batch)

    def sync(self) -> None:
        """The bucket's puts are durable when acknowledged; the index's records are committed here."""
        self.inner.sync()
        with self._lock:
            self._db.commit()

    # --- reads: the bucket ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def version(self, key: str) -> str | None:
        return self.inner.version(key)

    def replace_if(self, key: str, data: bytes, version: str | None) -> None:
        self.inner.replace_if(key, data, version)

    def clean_staging(self) -> None:
        self.inner.clean_staging()

    def close(self) -> None:
        with self._lock:
            self._db.commit()
            self._db.close()
        self.inner.close()
