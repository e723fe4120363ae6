"""The local directory store: a tree laid out like a stock stratum 0, temporary files in its private
directory, atomic renames, fsync for durability."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from . import PRIVATE_DIR, ObjectMissing, ObjectStore


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory (after a rename into it: the new name is durable) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` (Linux), None where there is none; looked up on the first sync (importing ctypes
    costs a command's start-up), in the process's own symbols (no library search)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return cast(Callable[[int], int], fn)


# After this many bytes put, a background syncfs starts writing them to disk while the ingest goes on: the
# disk works during compression, and the commit's own syncfs finds little left (1 GiB ingest to a fresh
# ext4: commit 1.9 s -> 0.3 s). One syncfs for many objects, where a per-object sync_file_range cost ~90 us
# each on small files. Each object also counts as 16 KiB (its inode, directory entry and journal blocks):
# 20,000 small files (60 MB compressed) left 0.4 s of writeback to the commit when only bytes counted,
# 0.05 s now.
EARLY_SYNC_BYTES = 64 << 20
EARLY_SYNC_PER_FILE = 16 << 10


_TEMP_NUMBERS = itertools.count()  # next() is atomic under the GIL: safe across the ingest threads


class LocalStore(ObjectStore):
    """A directory laid out like a stock stratum 0 (``data/00`` ... ``data/ff``)."""

    early_sync_bytes = EARLY_SYNC_BYTES

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / PRIVATE_DIR / "tmp"
        # Plain strings for the per-object paths: pathlib costs microseconds per object, which adds up
        # over tens of thousands of small files.
        self._root_prefix = os.path.join(self.root, "")
        self._unsynced = 0
        self._early_sync: threading.Thread | None = None
        self._early_sync_lock = threading.Lock()

    @property
    def description(self) -> str:
        return str(self.root)

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
            tmp = os.path.join(self.staging, f"{os.urandom(8).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)
        self.note_written(len(data))
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)

    def put_object(self, key: str, data: bytes | memoryview) -> bool:
        # No stat first: the content index already skips what the repository holds, so the lookup nearly
        # always missed (a tenth of a small-file ingest's compression threads), and writing the same bytes
        # again over an object is harmless (an atomic rename of identical content).
        self.put(key, data)
        return True

    def put_file(self, key: str, path: str) -> None:
        """Rename ``path`` into place (it must be on this store's file system: no copy, no fsync)."""
        target = self._file(key)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            if not os.path.exists(path):
                raise
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)

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

    def note_written(self, nbytes: int) -> None:
        """Count bytes put under this root (here, or by a worker process): past ``early_sync_bytes``, a
        background sync starts."""
        self._unsynced += nbytes + EARLY_SYNC_PER_FILE  # a lost update between threads only delays the next
        if self._unsynced >= self.early_sync_bytes:
            self._start_early_sync()

    def _start_early_sync(self) -> None:
        with self._early_sync_lock:
            if self._early_sync is not None and self._early_sync.is_alive():
                return  # the running one takes what it finds; the count restarts when the next one starts
            self._unsynced = 0
            self._early_sync = threading.Thread(
                target=self._sync_quietly, name="rcds-early-sync", daemon=True
            )
            self._early_sync.start()

    def _sync_quietly(self) -> None:
        # Only a head start: durability comes from the commit's own sync, which reports any error.
        with contextlib.suppress(OSError):
            self.sync()

    def sync(self) -> None:
        syncfs = _syncfs()
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
