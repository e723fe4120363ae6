"""Object storage: where a stratum 0 keeps its public tree (a local directory or an S3 bucket).

Everything that writes or reads a repository's public files (the writer, the content index, garbage
collection, the checker's and the server's readers) goes through ``ObjectStore``, keyed by the
repository-relative names a web server serves (``data/ab/cdef...C``, ``.cvmfspublished``). Private
state (keys, content index, locks, scratch, the catalog cache) is never in a store: it stays in a local
private directory.

``open_store(location)`` turns a repository's storage setting into a store: a path is a ``LocalStore``,
``s3://bucket/prefix`` an ``S3Store`` (``rcds.storage.s3``, needing the ``s3`` extra).
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

PRIVATE_DIR = ".rcds"  # never served: keys, state, staging
# The public root files of a stratum 0 or 1 (here, not in ``repository``, so that a replica need not
# import the writer and numpy to name them).
MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
REFLOG = ".cvmfsreflog"
MASTER_REPLICA = ".cvmfs_master_replica"
STATUS_JSON = ".cvmfs_status.json"


class ObjectMissing(KeyError):
    """The store has no object under that key."""


class StorageError(OSError):
    """The store failed (after its retries): the message names the store (e.g. the bucket) and why.

    An ``EIO`` to the publish service (rcds.publish.transient): its jobs wait for the storage and are
    retried, as on a failing disk, rather than failed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConditionFailed(StorageError):
    """A conditional replace lost: the object changed since it was read (another writer committed)."""


class ObjectStore(ABC):
    """A flat key -> bytes store with atomic, all-or-nothing puts."""

    # How many puts a writer should keep in flight: None = one per core (a local disk is CPU-bound); a
    # remote store is latency-bound and wants more.
    parallelism: int | None = None
    # Where HTTP clients can read the keys directly (a public bucket's URL), for a server to redirect to.
    public_url: str = ""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the store is, for messages (a directory, ``s3://bucket/prefix at endpoint``)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store atomically: a reader sees the old value, or none, or the complete new one."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def iter_keys(self, prefix: str = "data/") -> Iterator[str]: ...

    @abstractmethod
    def sync(self) -> None:
        """Make every completed put durable. Called before anything that references those objects."""

    def put_file(self, key: str, path: str) -> None:
        """Store the content of the local file ``path`` under ``key`` (atomically, as ``put``), consuming
        the file: it is moved into place or removed. A local store renames it (give it a file on the same
        file system); a remote one uploads it, streaming."""
        with open(path, "rb") as f:
            data = f.read()
        self.put(key, data)
        os.unlink(path)

    def put_object(self, key: str, data: bytes | memoryview) -> bool:
        """Put a content-addressed object unless present (dedup). Returns True if it was written."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def put_durable(self, key: str, data: bytes) -> None:
        """Put, durable when this returns (root files: the manifest is the last step of a publish)."""
        self.put(key, data)
        self.sync()

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete each key (missing ones are no error); a remote store batches."""
        for key in keys:
            self.delete(key)

    def version(self, key: str) -> str | None:
        """A token that changes whenever ``key`` is replaced (None: missing, or no conditional writes)."""
        return None

    def replace_if(self, key: str, data: bytes, version: str | None) -> None:
        """Replace ``key`` durably, only if it is still at ``version`` (from ``version``) where the store
        can make that condition atomic; raises ``ConditionFailed`` if it moved on. Stores without
        conditional writes just replace: their writers rely on the repository's writer lock."""
        self.put_durable(key, data)

    def clean_staging(self) -> None:  # noqa: B027 - optional hook
        """Remove what an interrupted put left behind (temporary files), if the store has any."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def is_remote(location: str | object) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def open_store(location: Any, **options: Any) -> ObjectStore:
    """The store for a storage setting: a local directory (path) or ``s3://bucket[/prefix]``; ``options``
    are the S3 settings (``rcds.storage.s3.S3Settings`` fields)."""
    if is_remote(location):
        from .s3 import S3Settings, S3Store

        return S3Store(S3Settings.from_url(str(location), **options))
    from pathlib import Path

    from .local import LocalStore

    return LocalStore(Path(location))


def store_from_settings(settings: Mapping[str, object]) -> ObjectStore:
    """The store of a repository's ``store`` settings: ``{"url": "s3://bucket/alias", **S3 options}``."""
    options = dict(settings)
    return open_store(str(options.pop("url", "")), **options)
