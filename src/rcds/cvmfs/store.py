"""Object stores: where a stratum 0 keeps its public tree.

The writer only needs the small ``ObjectStore`` interface below, keyed by the repository-relative names a
web server serves (``data/ab/cdef...C``, ``.cvmfspublished``), so an S3 bucket can stand in for the local
directory later without the writer changing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

PRIVATE_DIR = ".rcds"  # never served: keys, state, staging
# The public root files of a stratum 0 or 1 (here, not in ``repository``, so that a replica need not
# import the writer and numpy to name them).
MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
REFLOG = ".cvmfsreflog"
MASTER_REPLICA = ".cvmfs_master_replica"
STATUS_JSON = ".cvmfs_status.json"


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory (after a rename into it: the new name is durable) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectMissing(KeyError):
    """The store has no object under that key."""


class ObjectStore(ABC):
    """A flat key -> bytes store with atomic, all-or-nothing puts."""

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

    def put_object(self, key: str, data: bytes | memoryview) -> bool:
        """Put a content-addressed object unless present (dedup). Returns True if it was written."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True


@functools.cache
def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs``, looked up on the first sync (ctypes and the lookup cost a command's start-up)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return cast(Callable[[int], int], fn)


_TEMP_NUMBERS = itertools.count()  # next() is atomic under the GIL: safe across the ingest threads


class LocalStore(ObjectStore):
    """A directory laid out like a stock stratum 0 (``data/00`` ... ``data/ff``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / PRIVATE_DIR / "tmp"
        # Plain strings for the per-object paths: pathlib costs microseconds per object, which adds up
        # over tens of thousands of small files.
        self._root_prefix = os.path.join(self.root, "")

    def initialize(self) -> None:
        for i in range(256):
            (self.root / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        (self.root / PRIVATE_DIR).chmod(0o700)

    def path(self, key: str) -> Path:
        return Path(self._file(key))

    def _file(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/") or key.startswith(PRIVATE_DIR):
            raise ValueError(f"bad object key {key!r}")
        return self._root_prefix + key

    def exists(self, key: str) -> bool:
        return os.path.exists(self._file(key))

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def put(self, key: str, data: bytes | memoryview) -> None:
        target = self._file(key)
        # Unique within this process by the counter, across processes by the pid in the prefix; a name
        # left by a crashed process of the same pid is skipped by O_EXCL.
        tmp = f"{self.staging}/{os.getpid()}-{next(_TEMP_NUMBERS)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            tmp = os.path.join(self.staging, f"{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)

    def put_durable(self, key: str, data: bytes) -> None:
        """Put and fsync file and directory at once: for the manifest, the last step of a publish."""
        self.put(key, data)
        fsync_path(self.path(key))
        fsync_path(self.path(key).parent)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def iter_keys(self, prefix: str = "data/") -> Iterator[str]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                yield f"{rel}/{f}"

    def sync(self) -> None:
        syncfs = _load_syncfs()
        if syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        os.sync()

    def clean_staging(self) -> None:
        """Remove temp files left by a crash (they were never renamed into place)."""
        if self.staging.is_dir():
            for f in self.staging.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
