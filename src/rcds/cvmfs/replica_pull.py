"""The pull engine of a stratum 1 snapshot (``rcds.cvmfs.replica``): catalog trees pulled bottom-up.

``Pull`` downloads on ``jobs`` threads: for each catalog not yet in the replica, every object it
references that is missing is fetched into a staging file (``ReplicaStorage.staging_file``), hashed while
it streams and, once verified, stored through the replica's store (renamed into place, or uploaded);
nested catalogs likewise. Small objects are requested ``BATCH`` at a time (pipelined over HTTP). A catalog
is stored only after all of its objects and nested catalogs are, by the caller's thread (``run``), in
batches after a ``sync``: so "catalog present" means "subtree complete" and a snapshot never descends
into a catalog it has. Objects done are not remembered (memory stays bounded by what is in flight): a
later reference finds them present.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import failpoints, objects
from .hashes import Algorithm, ContentHash, Suffix
from .replica_store import ReplicaError, ReplicaStorage
from .sources import NotFound, Source

log = logging.getLogger("rcds.replica")

FLUSH_INTERVAL = 1.0  # seconds between batches of catalogs stored (each batch costs one syncfs)
PROGRESS_INTERVAL = 0.25
SMALL_OBJECT = 256 * 1024  # uncompressed bytes: smaller objects are fetched BATCH per pool task
BATCH = 16

Progress = Callable[[str, int, int], None]


class _HashingFile:
    """A download destination: an unbuffered file that hashes what it is given (rewinds restart both)."""

    def __init__(self, fd: int, algorithm: Algorithm) -> None:
        self.fd = fd
        self.algorithm = algorithm
        self.hasher = algorithm.new()
        self.size = 0
        self.dirty = False  # anything written since the file was created (HttpSource rewinds first)

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)
        self.dirty = True
        return len(data)

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def seek(self, pos: int) -> int:
        if pos != 0:
            raise OSError("can only rewind to the start")
        if self.dirty:  # two system calls per object saved: fetch rewinds before its first attempt
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.hasher, self.size = self.algorithm.new(), 0
        return 0

    def truncate(self) -> int:
        if self.dirty:
            os.ftruncate(self.fd, self.size)
            self.dirty = self.size > 0
        return self.size


class CorruptObject(Exception):
    """An object on the source does not hash to its name (after a second fetch past the caches)."""


def inflate(src: str | Path, dest: Path) -> None:
    inflater = objects.inflater()  # zlib-ng's when installed: faster
    with open(src, "rb") as f, open(dest, "wb") as out:
        while block := f.read(1 << 20):
            out.write(inflater.decompress(block))
        out.write(inflater.flush())
    if not inflater.eof:
        raise zlib.error("truncated zlib stream")


@dataclass(frozen=True)
class _CatalogInfo:
    objects: dict[str, tuple[ContentHash, int]]  # key -> hash, uncompressed size
    nested: list[ContentHash]
    previous: ContentHash | None
    revision: int
    is_root: bool


def _read_catalog(path: Path, with_objects: bool = True) -> _CatalogInfo:
    """What a catalog references: data objects (with hash algorithm and size), nested catalogs."""
    from .catalog import FLAG_EXTERNAL, FLAG_FILE, HASH_ALGORITHM_MASK, HASH_ALGORITHM_SHIFT, Catalog

    cat = Catalog(path)
    try:
        objects: dict[str, tuple[ContentHash, int]] = {}
        if with_objects:
            algo = f"(catalog.flags & {HASH_ALGORITHM_MASK}) >> {HASH_ALGORITHM_SHIFT}"
            queries = [
                (
                    Suffix.NONE,
                    f"SELECT hash, {algo}, size FROM catalog WHERE hash IS NOT NULL"
                    f" AND (flags & {FLAG_FILE}) != 0 AND (flags & {FLAG_EXTERNAL}) = 0",
                )
            ]
            if "chunks" in cat.tables:
                queries.append(
                    (
                        Suffix.PARTIAL,
                        f"SELECT chunks.hash, {algo}, chunks.size FROM chunks"
                        f" JOIN catalog USING (md5path_1, md5path_2) WHERE (catalog.flags & {FLAG_EXTERNAL}) = 0",
                    )
                )
            for suffix, query in queries:
                for digest, a, size in cat.db.execute(query):
                    h = ContentHash(bytes(digest), Algorithm.from_flag_value(a))
                    objects[h.object_name(suffix)] = (h, int(size or 0))
        return _CatalogInfo(
            objects, [ref.hash for ref in cat.nested()], cat.previous_revision, cat.revision, cat.is_root
        )
    finally:
        cat.close()


# --- the pull engine ---------------------------------------------------------------------------------

_WAITING, _READY, STORED, _FAILED = range(4)


class _Node:
    """A catalog being pulled: stored once ``pending`` (its missing objects and nested catalogs) is 0."""

    __slots__ = (
        "error", "h", "key", "label", "parents", "pending", "required", "revision", "root", "staged", "state",
    )  # fmt: skip

    def __init__(self, h: ContentHash) -> None:
        self.h = h
        self.key = h.object_name(Suffix.CATALOG)
        self.staged: str | None = None
        self.pending = 1  # held while the catalog is fetched and its references registered
        self.parents: list[_Node] = []
        self.state = _WAITING
        self.error: BaseException | None = None
        self.root = False
        self.required = False
        self.label = ""
        self.revision = -1


class Pull:
    """Pulls catalog trees bottom-up with ``jobs`` download threads; catalogs are stored by the caller's
    thread (``run``), in batches after a ``syncfs``, each only after its whole subtree."""

    def __init__(
        self, replica: ReplicaStorage, source: Source, jobs: int, gc_able: bool, progress: Progress | None
    ) -> None:
        self.replica = replica
        self.source = source
        self.gc_able = gc_able
        self.progress = progress
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="replica")
        self.lock = threading.Lock()
        self.wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.nodes: dict[str, _Node] = {}
        self.prestaged: dict[str, str] = {}  # root catalogs already downloaded by inspect()
        # Objects in flight -> catalogs waiting for them. Objects done are not remembered (memory stays
        # bounded by what is in flight): a later reference finds them in data/.
        self.waiting: dict[str, list[_Node]] = {}
        self.failed: dict[str, BaseException] = {}
        self.ready: list[_Node] = []
        self.roots: list[_Node] = []
        self.inflight = 0
        self.fatal: BaseException | None = None
        self.skipped: list[str] = []
        self.objects_fetched = self.bytes_fetched = self.objects_present = 0
        self.catalogs = self.catalogs_stored = self.objects_to_fetch = self.data_fetched = 0

    # --- downloads (any thread) ------------------------------------------------------------------

    def download(self, key: str, h: ContentHash, place: bool, fresh_only: bool = False) -> str:
        """Fetch ``key`` into a staging file beside it, verified against ``h`` while it streams; renamed
        into place if ``place``, else the staging file's path is returned.

        A mismatch is fetched once more past proxy caches (``no-cache``), as the CVMFS client does."""
        for fresh in (True,) if fresh_only else (False, True):
            tmp = self.replica.staging_file(key)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                try:
                    sink = _HashingFile(fd, h.algorithm)
                    self.source.fetch(key, sink, fresh=fresh)  # type: ignore[arg-type]
                finally:
                    os.close(fd)
                if sink.hasher.digest() != h.digest:
                    os.unlink(tmp)
                    if not fresh:
                        continue
                    raise CorruptObject(
                        f"{key} on the source is corrupt: its content does not hash to its name"
                    )
                if place:
                    self.replica.place(tmp, key)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            with self.lock:
                self.objects_fetched += 1
                self.bytes_fetched += sink.size
            return tmp
        raise AssertionError("unreachable")

    def download_many(self, batch: list[tuple[str, ContentHash]]) -> list[BaseException | None]:
        """``download`` of several small objects, requested together (``Source.fetch_many``: pipelined
        over HTTP), each renamed into place once verified. One result per object: None or its error."""
        staged: list[tuple[str, _HashingFile]] = []
        try:
            for key, h in batch:
                tmp = self.replica.staging_file(key)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                staged.append((tmp, _HashingFile(fd, h.algorithm)))
            items: list[tuple[str, Any]] = [
                (key, sink) for (key, _), (_, sink) in zip(batch, staged, strict=True)
            ]
            errors: list[BaseException | None] = list(self.source.fetch_many(items))
        except BaseException:
            for tmp, sink in staged:
                os.close(sink.fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        fetched = nbytes = 0
        for i, ((key, h), (tmp, sink)) in enumerate(zip(batch, staged, strict=True)):
            os.close(sink.fd)
            if errors[i] is None and sink.hasher.digest() == h.digest:
                self.replica.place(tmp, key)
                fetched += 1
                nbytes += sink.size
                continue
            os.unlink(tmp)
            if errors[i] is None:  # a mismatch: once more past the proxies' caches
                try:
                    self.download(key, h, place=True, fresh_only=True)
                except Exception as exc:
                    errors[i] = exc
        with self.lock:
            self.objects_fetched += fetched
            self.bytes_fetched += nbytes
        return errors

    def inspect(self, h: ContentHash) -> _CatalogInfo:
        """Revision and ``previous_revision`` of a root catalog (from the replica, else downloaded once
        and kept for the pull)."""
        key = h.object_name(Suffix.CATALOG)
        db = self.replica.tmp / f"inspect-{secrets.token_hex(4)}.db"
        try:
            if self.replica.present(key):
                with self.replica.object_file(key) as stored:
                    inflate(stored, db)
            else:
                staged = self.prestaged.get(key) or self.download(key, h, place=False)
                self.prestaged[key] = staged
                inflate(staged, db)
            return _read_catalog(db, with_objects=False)
        finally:
            db.unlink(missing_ok=True)

    # --- the tree (worker threads) ---------------------------------------------------------------

    def add_root(self, h: ContentHash, revision: int, label: str, required: bool) -> None:
        """Pull the tree of root catalog ``h`` (nothing if the replica has it). A ``required`` root that
        fails fails the snapshot; another one is skipped if it is missing on a garbage-collectable source."""
        key = h.object_name(Suffix.CATALOG)
        with self.lock:
            node = self.nodes.get(key)
            if node is None:
                if self.replica.present(key):
                    return
                node = self.nodes[key] = _Node(h)
                new = True
            else:
                new = False
            node.root, node.label, node.revision = True, node.label or label, revision
            node.required = node.required or required
            self.roots.append(node)
        if new:
            self._submit(self._catalog_task, node)

    def _submit(self, fn: Callable[..., None], *args: Any) -> bool:
        with self.lock:
            if self.fatal is not None:
                return False
            self.inflight += 1
        try:
            self.pool.submit(self._task, fn, *args)
        except RuntimeError:  # the pool is shutting down: the snapshot is being abandoned
            with self.lock:
                self.inflight -= 1
            return False
        return True

    def _task(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # a bug: never leave the main loop waiting for it
            log.exception("replica worker failed")
            with self.lock:
                self.fatal = self.fatal or exc
        finally:
            with self.lock:
                self.inflight -= 1
            self.wake.put(None)

    def _catalog_task(self, node: _Node) -> None:
        db = self.replica.tmp / f"{node.h.hex}-{secrets.token_hex(4)}.db"
        try:
            staged = self.prestaged.pop(node.key, None) or self.download(node.key, node.h, place=False)
            node.staged = staged
            inflate(staged, db)
            info = _read_catalog(db)
        except Exception as exc:
            self._fail(node, exc)
            return
        finally:
            db.unlink(missing_ok=True)
        with self.lock:
            self.catalogs += 1
        self._register(node, info)

    def _register(self, node: _Node, info: _CatalogInfo) -> None:
        new_objects: list[tuple[str, ContentHash, int]] = []
        new_catalogs: list[_Node] = []
        failed_child: BaseException | None = None
        with self.lock:
            for key, (h, size) in info.objects.items():
                if key in self.failed:
                    failed_child = self.failed[key]
                    continue
                waiters = self.waiting.get(key)
                if waiters is None:
                    waiters = self.waiting[key] = []
                    new_objects.append((key, h, size))
                waiters.append(node)
                node.pending += 1
            for h in info.nested:
                key = h.object_name(Suffix.CATALOG)
                child = self.nodes.get(key)
                if child is None:
                    if self.replica.present(key):
                        continue
                    child = self.nodes[key] = _Node(h)
                    new_catalogs.append(child)
                if child.state == STORED:
                    continue
                if child.state == _FAILED:
                    failed_child = child.error
                    continue
                child.parents.append(node)
                node.pending += 1
        batch: list[tuple[str, ContentHash]] = []
        for key, h, size in new_objects:
            if self.replica.present(key):
                self._object_done(key, None, present=True)
                continue
            with self.lock:
                self.objects_to_fetch += 1
            if size > SMALL_OBJECT:
                self._submit(self._objects_task, [(key, h)])
                continue
            batch.append((key, h))
            if len(batch) == BATCH:
                self._submit(self._objects_task, batch)
                batch = []
        if batch:
            self._submit(self._objects_task, batch)
        for child in new_catalogs:
            self._submit(self._catalog_task, child)
        if failed_child is not None:
            self._fail(node, failed_child)
        with self.lock:
            self._release(node)

    def _objects_task(self, batch: list[tuple[str, ContentHash]]) -> None:
        if self.fatal is not None:  # the snapshot fails anyway: stop early
            for key, _ in batch:
                self._object_done(key, self.fatal)
            return
        errors: list[BaseException | None]
        try:
            if len(batch) == 1:
                self.download(*batch[0], place=True)
                errors = [None]
            else:
                errors = self.download_many(batch)
        except Exception as exc:
            errors = [exc] * len(batch)
        for (key, _), error in zip(batch, errors, strict=True):
            if error is None:
                with self.lock:
                    self.data_fetched += 1
            self._object_done(key, error)

    def _object_done(self, key: str, exc: BaseException | None, present: bool = False) -> None:
        with self.lock:
            waiters = self.waiting.pop(key, [])
            if exc is None:
                self.objects_present += present
                for n in waiters:
                    self._release(n)
                return
            self.failed[key] = exc
        for n in waiters:
            self._fail(n, exc)

    def _release(self, node: _Node) -> None:
        """One of ``node``'s dependencies is done (lock held)."""
        node.pending -= 1
        if node.pending == 0 and node.state == _WAITING:
            node.state = _READY
            self.ready.append(node)

    def _fail(self, node: _Node, exc: BaseException) -> None:
        with self.lock:
            stack = [node]
            while stack:
                n = stack.pop()
                if n.state in (_FAILED, STORED):
                    continue
                n.state, n.error = _FAILED, exc
                if n.root:
                    tolerable = isinstance(exc, NotFound) and self.gc_able and not n.required
                    if tolerable:
                        self.skipped.append(f"{n.label}: {exc}")
                    elif self.fatal is None:
                        self.fatal = exc
                stack.extend(n.parents)
        self.wake.put(None)

    # --- storing (the caller's thread) -----------------------------------------------------------

    def abort(self) -> None:
        with self.lock:
            self.fatal = self.fatal or ReplicaError("aborted")
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.discard_staged()

    def discard_staged(self) -> None:
        """Remove downloaded catalogs that were not stored (their subtree failed, or the snapshot did)."""
        leftovers = [*self.prestaged.values(), *(n.staged for n in self.nodes.values() if n.state != STORED)]
        self.prestaged.clear()
        for staged in leftovers:
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)

    def run(self) -> None:
        """Until every root is stored or failed; raises the first fatal error (after storing every
        catalog that is complete, so that a re-run need not fetch them again)."""
        last_flush, last_progress = time.monotonic(), 0.0
        try:
            while True:
                with self.lock:
                    idle, pending_ready, fatal = self.inflight == 0, bool(self.ready), self.fatal
                now = time.monotonic()
                if pending_ready and (idle or fatal is not None or now - last_flush >= FLUSH_INTERVAL):
                    self._flush()
                    last_flush = now
                    continue
                if self.progress is not None and (idle or now - last_progress >= PROGRESS_INTERVAL):
                    last_progress = now
                    self.progress("objects", self.data_fetched, self.objects_to_fetch)
                    self.progress("catalogs", self.catalogs_stored, len(self.nodes))
                if idle:
                    break
                with contextlib.suppress(queue.Empty):  # until a task ends (or time for progress)
                    self.wake.get(timeout=PROGRESS_INTERVAL)
                    while True:
                        self.wake.get_nowait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.discard_staged()
        if self.fatal is not None:
            raise self.fatal
        for n in self.roots:
            if n.state != STORED and n.required:  # cannot happen without a fatal error
                raise ReplicaError(f"{n.label} was not completely pulled")

    def _flush(self) -> None:
        with self.lock:
            batch, self.ready = self.ready, []
        self.replica.store.sync()  # every object (and catalog file) below these catalogs is durable
        staged = []
        for node in batch:
            assert node.staged is not None
            staged.append((node.staged, node.key))
        self.replica.place_all(staged)  # independent: no catalog of a batch is above another
        failpoints.hit("replica-after-catalogs-batch")
        with self.lock:
            for node in batch:
                node.state = STORED
                self.catalogs_stored += 1
                for parent in node.parents:
                    if parent.state == _WAITING:
                        self._release(parent)


__all__ = ["STORED", "CorruptObject", "Progress", "Pull", "inflate"]
