"""A stratum 1 in Python: ``snapshot`` makes a local storage directory a verified copy of a repository.

What ``cvmfs_server snapshot`` / ``cvmfs_swissknife pull`` do (``cvmfs-format.md`` 7.4), for a storage
directory that ``rcds.web.repo_http`` (or any web server) then serves like a stock stratum 1::

    <storage>/.cvmfspublished .cvmfswhitelist .cvmfsreflog       public, like every stratum 1
              .cvmfs_last_snapshot .cvmfs_status.json data/00..ff data/txn
    <storage>/.rcds-replica/  private, never served: lock, reader cache (certificate), tmp/, the
                              marker ``unfinished`` while a snapshot may leave staged downloads, the
                              marker ``gc-unfinished`` while a garbage collection may have left its
                              sweep half done (``rcds.cvmfs.replica_gc``), gc/ (its scratch), and
                              ``reflog.chksum`` (for ``cvmfs_swissknife check -R``)

One snapshot:

1. ``GET .cvmfs_master_replica`` (a stratum 0 that allows replication), then the manifest ensemble through
   ``RepositoryReader``: manifest signature against the certificate, certificate fingerprint in the
   whitelist, whitelist signed by one of the master keys, not expired, repository name. The manifest and
   whitelist are fetched past proxy caches and kept byte for byte.
2. A source revision older than the replica's is refused (a stale mirror or proxy must not roll the
   replica back); the same revision with another root catalog is refused too. The same revision: nothing
   is pulled, but a re-signed whitelist (or manifest) is still copied, as ``cvmfs_server snapshot``
   does, so that the replica's whitelist never expires while the source's is kept fresh.
3. Pull, bottom-up: for each catalog not yet in the replica's ``data/``, every object it references
   (files, chunks) that is missing is downloaded into a staging file beside its final name
   (``data/ab/.<name>.<random>.tmp``, which no server serves), hashed while it streams and renamed into
   place; nested catalogs likewise. A catalog is renamed into ``data/`` only after all of
   its objects and nested catalogs are, with a ``syncfs`` in between, so "catalog present" means "subtree
   complete": a catalog already present is not descended (what makes incremental snapshots cheap), and
   an interrupted snapshot resumes where it stopped. Downloads run on ``jobs`` threads.
   What is pulled, as ``swissknife pull -p`` does: the current revision; on every snapshot after the
   first, also the revisions published since the replica's (the root catalogs' ``previous_revision``
   chain back to the replica's revision), so a client still on one of them can fail over to this
   replica; and every root catalog a tag of the history database names (read from the new history
   database, which is stored only after them). Missing old revisions and tags are skipped when the
   source is garbage-collectable (``G=yes``); the current revision must be complete.
   Nested catalogs' own ``previous_revision`` is not followed: the root chain already reaches every
   version of them that a published revision used, and following it into swept history would only fail.
4. The history database, certificate and meta-info objects; ``syncfs``; the replica's own
   ``.cvmfsreflog`` (every root catalog it holds, certificate, history, meta-info); then the whitelist
   and, last, the manifest, both byte-identical to the source's; each with fsync and rename. Then
   ``.cvmfs_last_snapshot`` and ``last_snapshot`` in ``.cvmfs_status.json`` (``date --utc`` text).

Crash safety: until the manifest is replaced the replica serves the previous revision, completely. A
process killed mid-way leaves downloaded objects and stored catalogs (all complete subtrees) behind;
the next snapshot fetches only what is still missing, and first removes the staged files the killed
one left (only then: the ``unfinished`` marker says so). Objects are renamed into place without an
fsync of their own; the ``syncfs`` before each batch of catalogs and before the manifest orders them on
disk. After a power loss an object renamed since the last ``syncfs`` may be empty: a zero-length file
never counts as present (no stored object is empty, except an uncompressed empty file, recognised by
name). ``.cvmfs_is_snapshotting`` exists while a new revision is being pulled.

Garbage collection (``rcds.cvmfs.replica_gc``) runs under the same lock as a snapshot. It deletes a
swept tree's objects before its catalogs, so a collection killed mid-sweep leaves catalogs that are
present but no longer complete, which breaks the rule a snapshot relies on; it leaves the marker
``gc-unfinished`` too, and a snapshot that finds it first finishes that collection (which deletes those
catalogs, so they are fetched again if a revision still needs them) before it trusts any catalog.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import random
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..logs import fields
from ..storage import MANIFEST, MASTER_REPLICA, REFLOG, STATUS_JSON, WHITELIST
from ..storage.local import LocalStore
from . import failpoints, objects, signing
from .hashes import Algorithm, ContentHash, Suffix
from .manifest import Manifest, ManifestError
from .reader import ReaderError, RepositoryReader
from .sources import DIRECT, HttpSettings, HttpSource, NotFound, Source, SourceError, open_source

if TYPE_CHECKING:
    from .history import Tag

# The catalog, history and reflog modules (sqlite3 and their own) are imported where a snapshot has work
# for them: a snapshot with nothing new reads only the manifest ensemble, and ``rcds replicate`` polling
# hundreds of repositories pays every module it imports on every call.

log = logging.getLogger("rcds.replica")

PRIVATE_DIR = ".rcds-replica"  # never served (repo_http serves only .cvmfs* root files and data/XX/)
LAST_SNAPSHOT = ".cvmfs_last_snapshot"
IS_SNAPSHOTTING = ".cvmfs_is_snapshotting"
FLUSH_INTERVAL = 1.0  # seconds between batches of catalogs stored (each batch costs one syncfs)
PROGRESS_INTERVAL = 0.25
SMALL_OBJECT = 256 * 1024  # uncompressed bytes: smaller objects are fetched BATCH per pool task
BATCH = 16

# The only objects that may legitimately be empty: an empty file stored uncompressed.
_EMPTY_KEYS = frozenset(ContentHash.of(b"", a).object_name(Suffix.NONE) for a in Algorithm)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

Progress = Callable[[str, int, int], None]


class ReplicaError(Exception):
    """The snapshot failed; the replica still serves the revision it served before."""


@dataclass
class SnapshotReport:
    fqrn: str
    revision: int  # what the replica serves now
    previous_revision: int | None  # what it served before (None: a new replica)
    changed: bool  # the replica now serves another revision
    objects_fetched: int  # objects downloaded into data/ (files, chunks, catalogs, history, ...)
    bytes_fetched: int
    objects_present: int  # references (per catalog descended) to objects already in data/
    catalogs: int  # catalogs downloaded and descended
    seconds: float
    revisions_pulled: list[int] = field(default_factory=list)  # root catalogs pulled, newest first
    skipped: list[str] = field(default_factory=list)  # old revisions or tags missing on the source

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def date_utc(when: float | None = None) -> str:
    """``date --utc`` in the C locale, as the stock tools write it: ``Fri Oct  4 12:00:00 UTC 2024``."""
    d = dt.datetime.fromtimestamp(time.time() if when is None else when, dt.UTC)
    return f"{_DAYS[d.weekday()]} {_MONTHS[d.month - 1]} {d.day:2d} {d:%H:%M:%S} UTC {d.year}"


# --- the public entry points -------------------------------------------------------------------------


def snapshot(
    source_url: str | list[str],
    storage: Path | str,
    *,
    public_keys: list[Path] | bytes,
    fqrn: str | None = None,
    proxies: list[str] | None = None,
    jobs: int = 8,
    progress: Progress | None = None,
    settings: HttpSettings | None = None,
) -> SnapshotReport:
    """Bring the replica in ``storage`` up to the source's current revision (creating it if needed).

    ``source_url``: the repository's base URL(s) (``http://host/cvmfs/<fqrn>``, several for failover,
    as a list or ``;``-separated; a local directory works too). ``public_keys``: the master public key
    files (a directory stands for its ``*.pub``) or one PEM key. ``fqrn``: the expected repository name;
    default the replica's own, else the last path component of a ``/cvmfs/<fqrn>`` URL, else whatever
    the verified manifest names. ``progress(phase, done, total)`` is called from this thread.
    Raises ``ReplicaError``; the replica then still serves what it served before.
    """
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    started = time.monotonic()
    replica = _Replica(Path(storage))
    with replica.locked():
        if replica.gc_unfinished.exists():  # before any catalog is trusted for being present
            _finish_interrupted_gc(replica)
        current = replica.current_manifest()
        expected = fqrn or (current.fqrn if current else None) or _fqrn_from_url(source_url)
        source = _RootFilesFresh(_open(source_url, proxies, settings))
        try:
            return _Snapshot(replica, source, _load_keys(public_keys), expected, current, jobs, progress).run(
                started
            )
        finally:
            source.close()
            replica.finished()  # no staged files left behind (a killed run leaves the marker)


def watch(
    source_url: str | list[str],
    storage: Path | str,
    *,
    interval: float = 15.0,
    stop: threading.Event,
    public_keys: list[Path] | bytes,
    fqrn: str | None = None,
    proxies: list[str] | None = None,
    jobs: int = 8,
    settings: HttpSettings | None = None,
    jitter: float = 0.2,
    on_report: Callable[[SnapshotReport], None] | None = None,
    wake: threading.Event | None = None,
) -> None:
    """Snapshot every ``interval`` seconds (+- ``jitter``, a fraction) until ``stop`` is set, and at once
    whenever ``wake`` is set (a notification; whoever sets ``stop`` must set ``wake`` too).

    A failed snapshot (source down, bad signature, ...) is logged and retried at the next interval; the
    replica meanwhile serves what it has. ``on_report`` gets every successful report.
    """
    failures = 0
    while not stop.is_set():
        try:
            report = snapshot(
                source_url,
                storage,
                public_keys=public_keys,
                fqrn=fqrn,
                proxies=proxies,
                jobs=jobs,
                settings=settings,
            )
        except Exception as exc:
            failures += 1
            if failures == 1 or failures % 20 == 0:  # a source that stays down must not flood the log
                log.warning(
                    "snapshot failed",
                    extra=fields(
                        storage=str(storage), failures=failures, error=f"{type(exc).__name__}: {exc}"
                    ),
                )
        else:
            if failures:
                log.info("snapshot source back", extra=fields(storage=str(storage), after_failures=failures))
            failures = 0
            if on_report is not None:
                on_report(report)
        delay = max(0.0, interval * random.uniform(1 - jitter, 1 + jitter))
        if wake is None:
            stop.wait(delay)
        else:
            wake.wait(delay)
            wake.clear()


# --- helpers -----------------------------------------------------------------------------------------


def _finish_interrupted_gc(replica: _Replica) -> None:
    from .gc import GcError
    from .replica_gc import finish_interrupted_gc

    try:
        finish_interrupted_gc(replica)
    except (GcError, OSError) as exc:
        raise ReplicaError(
            f"{replica.storage}: a garbage collection was interrupted and cannot be finished, so the"
            f" catalogs present cannot be trusted: {exc}"
        ) from exc


def _open(source_url: str | list[str], proxies: list[str] | None, settings: HttpSettings | None) -> Source:
    if isinstance(source_url, list):
        if not source_url:
            raise ReplicaError("no source URL")
        return HttpSource(source_url, proxies or [DIRECT], settings)
    return open_source(source_url, proxies, settings)


def _fqrn_from_url(source_url: str | list[str]) -> str | None:
    first = (
        (source_url[0] if isinstance(source_url, list) else source_url.split(";")[0]) if source_url else ""
    )
    parts = first.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "cvmfs" and parts[-1] else None


def _load_keys(public_keys: list[Path] | bytes) -> list[signing.PublicKey]:
    try:
        if isinstance(public_keys, bytes):
            return [signing.load_public_key(public_keys)]
        paths: list[Path] = []
        for p in map(Path, public_keys):
            paths.extend(sorted(p.glob("*.pub")) if p.is_dir() else [p])
        keys = signing.load_public_keys(paths)
    except (OSError, ValueError, signing.SignatureError) as exc:
        raise ReplicaError(f"cannot load the master public key: {exc}") from exc
    if not keys:
        raise ReplicaError("a master public key is needed to trust the source")
    return keys


class _RootFilesFresh(Source):
    """The source, with the ``.cvmfs*`` root files fetched past proxy caches and kept byte for byte.

    A proxy may hold a manifest for a minute; a snapshot wants the newest one, and must store exactly
    the bytes the reader verified.
    """

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.captured: dict[str, bytes] = {}

    def fetch(self, key: str, dest: Any, fresh: bool = False) -> None:
        if key.startswith(".cvmfs"):
            data = self.inner.get(key, fresh=True)
            self.captured[key] = data
            dest.write(data)
        else:
            self.inner.fetch(key, dest, fresh)

    def fetch_many(
        self, items: Sequence[tuple[str, BinaryIO]], fresh: bool = False
    ) -> list[SourceError | None]:
        if any(key.startswith(".cvmfs") for key, _ in items):
            return super().fetch_many(items, fresh)
        return self.inner.fetch_many(items, fresh)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def close(self) -> None:
        self.inner.close()

    @property
    def description(self) -> str:
        return self.inner.description


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


class _Corrupt(Exception):
    pass


def _inflate(src: str | Path, dest: Path) -> None:
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


# --- the storage directory ---------------------------------------------------------------------------


_STAGING_TAG = secrets.token_hex(4)
_staging_counter = itertools.count()  # next() is atomic under the GIL: no lock needed


class _Replica:
    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.root = str(storage)  # objects are addressed with plain strings: pathlib costs ~40 us each
        self.private = storage / PRIVATE_DIR
        self.tmp = self.private / "tmp"
        self.txn = storage / "data" / "txn"
        self.unfinished = self.private / "unfinished"  # exists while a snapshot may leave staged files
        self.gc_unfinished = self.private / "gc-unfinished"  # a GC sweep may be half done (replica_gc)
        self.store = LocalStore(storage)
        self.store.staging = self.tmp  # put/put_durable stage here (same file system, never served)
        self.prepared = False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if (self.storage / ".rcds" / "repo.json").exists():
            raise ReplicaError(f"{self.storage} holds a stratum 0 of rcds: refusing to replicate into it")
        self.private.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.private / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ReplicaError(
                    f"another snapshot (or a garbage collection) of {self.storage} is running"
                ) from exc
            yield
        finally:
            os.close(fd)

    def prepare(self) -> None:
        """The stratum 1 layout (``data/00``..``ff``, ``data/txn``); leftovers of a killed run removed."""
        for i in range(256):
            (self.storage / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        for d in (self.txn, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
        if self.unfinished.exists():  # a snapshot was killed: its staged downloads lie beside the objects
            for i in range(256):
                with os.scandir(f"{self.root}/data/{i:02x}") as entries:
                    for e in entries:
                        if e.name.startswith(".") and e.name.endswith(".tmp"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(e.path)
        self.unfinished.touch()
        self.prepared = True

    def finished(self) -> None:
        if self.prepared:  # else the marker (of a killed run, if any) must stay until prepare() cleans up
            self.unfinished.unlink(missing_ok=True)

    def serves(self, manifest: bytes, whitelist: bytes) -> bool:
        """True if the replica is complete (no killed run's leftovers) and serves exactly these bytes."""
        if self.unfinished.exists():
            return False
        try:
            with open(self.path(MANIFEST), "rb") as f:
                if f.read() != manifest:
                    return False
            with open(self.path(WHITELIST), "rb") as f:
                return f.read() == whitelist
        except FileNotFoundError:
            return False

    def current_manifest(self) -> Manifest | None:
        try:
            return Manifest.parse((self.storage / MANIFEST).read_bytes())[0]
        except FileNotFoundError:
            return None
        except ManifestError as exc:
            raise ReplicaError(f"the replica's own {MANIFEST} is unreadable: {exc}") from exc

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def present(self, key: str) -> bool:
        try:
            st = os.stat(f"{self.root}/{key}")
        except FileNotFoundError:
            return False
        return st.st_size > 0 or key in _EMPTY_KEYS

    def staging_file(self, key: str) -> str:
        """A temporary name beside the object's final one: ``data/ab/.<name>.<random>.tmp``. A rename
        within one directory costs half of one out of a shared staging directory, where 8 threads
        creating and renaming away files contend (measured: 113 against 279 us of CPU per object). Unique
        by a random tag per process and a counter (a random suffix per file cost ~4 us of ``urandom``)."""
        return f"{self.root}/{key[:8]}.{key[8:]}.{_STAGING_TAG}{next(_staging_counter)}.tmp"

    def write_reflog(self, data: bytes) -> None:
        """Replace the replica's own ``.cvmfsreflog`` (durably), then its checksum where a stock stratum 1
        keeps it in its spool directory: ``cvmfs_swissknife check -R <this file>`` verifies a replica.
        The checksum differs from the manifest's ``Y`` (the source's reflog), which is never rewritten."""
        self.write_root_file(REFLOG, data)
        chksum = self.private / "reflog.chksum"
        tmp = chksum.with_name(chksum.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(hashlib.sha1(data).hexdigest().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, chksum)

    def update_status(self, **fields: str) -> None:
        """Set ``fields`` in ``.cvmfs_status.json`` (``last_snapshot``, ``last_gc``), keeping the others."""
        status: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads(Path(self.path(STATUS_JSON)).read_text())
            status = loaded if isinstance(loaded, dict) else {}
        status.update(fields)
        self.write_root_file(STATUS_JSON, (json.dumps(status, indent=2) + "\n").encode(), durable=False)

    def write_root_file(self, key: str, data: bytes, durable: bool = True) -> bool:
        """Replace a root file unless it already has these bytes. True if it was written."""
        with contextlib.suppress(FileNotFoundError):
            if Path(self.path(key)).read_bytes() == data:
                return False
        if durable:
            self.store.put_durable(key, data)
        else:
            self.store.put(key, data)
        return True


# --- the pull engine ---------------------------------------------------------------------------------

_WAITING, _READY, _STORED, _FAILED = range(4)


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


class _Pull:
    """Pulls catalog trees bottom-up with ``jobs`` download threads; catalogs are stored by the caller's
    thread (``run``), in batches after a ``syncfs``, each only after its whole subtree."""

    def __init__(
        self, replica: _Replica, source: Source, jobs: int, gc_able: bool, progress: Progress | None
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
                    raise _Corrupt(f"{key} on the source is corrupt: its content does not hash to its name")
                if place:
                    os.replace(tmp, self.replica.path(key))
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
                os.replace(tmp, self.replica.path(key))
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
                _inflate(self.replica.path(key), db)
            else:
                staged = self.prestaged.get(key) or self.download(key, h, place=False)
                self.prestaged[key] = staged
                _inflate(staged, db)
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
            _inflate(staged, db)
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
                if child.state == _STORED:
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
                if n.state in (_FAILED, _STORED):
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
        leftovers = [*self.prestaged.values(), *(n.staged for n in self.nodes.values() if n.state != _STORED)]
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
            if n.state != _STORED and n.required:  # cannot happen without a fatal error
                raise ReplicaError(f"{n.label} was not completely pulled")

    def _flush(self) -> None:
        with self.lock:
            batch, self.ready = self.ready, []
        self.replica.store.sync()  # every object (and catalog file) below these catalogs is on disk
        for node in batch:
            assert node.staged is not None
            os.replace(node.staged, self.replica.path(node.key))
        failpoints.hit("replica-after-catalogs-batch")
        with self.lock:
            for node in batch:
                node.state = _STORED
                self.catalogs_stored += 1
                for parent in node.parents:
                    if parent.state == _WAITING:
                        self._release(parent)


# --- one snapshot ------------------------------------------------------------------------------------


class _Snapshot:
    def __init__(
        self,
        replica: _Replica,
        source: _RootFilesFresh,
        keys: list[signing.PublicKey],
        fqrn: str | None,
        current: Manifest | None,
        jobs: int,
        progress: Progress | None,
    ) -> None:
        self.replica = replica
        self.source = source
        self.keys = keys
        self.fqrn = fqrn
        self.current = current
        self.jobs = jobs
        self.progress = progress
        self.aux: list[tuple[str, str]] = []  # history and meta-info: downloaded, stored by _finish

    def run(self, started: float) -> SnapshotReport:
        reader, manifest_bytes, whitelist_bytes = self._verified_ensemble()
        try:
            m, cur = reader.manifest, self.current
            self._check_succession(m)
            changed = cur is None or m.revision != cur.revision
            if not changed and self.replica.serves(manifest_bytes, whitelist_bytes):
                # Nothing new and nothing re-signed (the polling case): only the stamps, no directories,
                # no syncfs, no reflog rewrite. The ensemble was verified all the same.
                return self._up_to_date(m, started)
            self.replica.prepare()
            if changed:
                log.info(
                    "snapshot starts",
                    extra=fields(
                        repository=m.fqrn, revision=m.revision, previous=cur.revision if cur else None
                    ),
                )
                self.replica.write_root_file(IS_SNAPSHOTTING, (date_utc() + "\n").encode(), durable=False)
            pull = _Pull(self.replica, reader.source, self.jobs, m.garbage_collectable, self.progress)
            try:
                roots = self._pull(pull, m)
                self._finish(pull, reader, m, manifest_bytes, whitelist_bytes, roots)
            except ReplicaError:
                raise
            except _Corrupt as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {exc}") from exc
            except SourceError as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {exc}") from exc
            except Exception as exc:
                raise ReplicaError(f"{m.fqrn} revision {m.revision}: {type(exc).__name__}: {exc}") from exc
            finally:
                pull.abort()  # after a complete run: only discards the catalogs of skipped revisions
                for staged, _key in self.aux:  # not stored if the snapshot failed
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staged)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.replica.path(IS_SNAPSHOTTING))
        finally:
            reader.close()
        report = SnapshotReport(
            m.fqrn,
            m.revision,
            cur.revision if cur else None,
            changed,
            pull.objects_fetched,
            pull.bytes_fetched,
            pull.objects_present,
            pull.catalogs,
            time.monotonic() - started,
            sorted({n.revision for n in pull.roots if n.state == _STORED}, reverse=True),
            pull.skipped,
        )
        for what in pull.skipped:
            log.info("snapshot: skipped, no longer on the source", extra=fields(repository=m.fqrn, what=what))
        log.info(
            "snapshot" if changed else "snapshot: up to date",
            extra=fields(
                repository=m.fqrn, revision=m.revision, previous=report.previous_revision,
                objects=report.objects_fetched, bytes=report.bytes_fetched, present=report.objects_present,
                catalogs=report.catalogs, seconds=round(report.seconds, 3),
            ),
        )  # fmt: skip
        return report

    def _up_to_date(self, m: Manifest, started: float) -> SnapshotReport:
        stamp = date_utc()
        self.replica.write_root_file(LAST_SNAPSHOT, (stamp + "\n").encode(), durable=False)
        self.replica.update_status(last_snapshot=stamp)
        report = SnapshotReport(
            m.fqrn, m.revision, m.revision, False, 0, 0, 0, 0, time.monotonic() - started, [], []
        )
        log.info(
            "snapshot: up to date",
            extra=fields(repository=m.fqrn, revision=m.revision, seconds=round(report.seconds, 3)),
        )
        return report

    def _verified_ensemble(self) -> tuple[RepositoryReader, bytes, bytes]:
        """The reader (manifest ensemble verified) and the exact manifest and whitelist bytes."""
        where = self.source.description
        try:
            self.source.get(MASTER_REPLICA)
        except NotFound as exc:
            raise ReplicaError(
                f"{where} is not a CernVM-FS server for replication (no {MASTER_REPLICA})"
            ) from exc
        except SourceError as exc:
            raise ReplicaError(f"cannot reach {where}: {exc}") from exc
        try:
            reader = RepositoryReader(self.source, self.keys, self.fqrn, self.replica.private / "cache")
        except (ReaderError, OSError) as exc:
            raise ReplicaError(f"{where}: {exc}") from exc
        manifest_bytes = self.source.captured[MANIFEST]
        whitelist_bytes = self.source.captured[WHITELIST]
        if Manifest.parse(manifest_bytes)[0] != reader.manifest:  # the reader verified these very bytes
            reader.close()
            raise ReplicaError("internal error: the verified manifest is not the one fetched")
        return reader, manifest_bytes, whitelist_bytes

    def _check_succession(self, m: Manifest) -> None:
        cur = self.current
        if not m.fqrn:
            raise ReplicaError("the source's manifest names no repository (N)")
        if cur is None:
            return
        if cur.fqrn != m.fqrn:
            raise ReplicaError(
                f"{self.replica.storage} is a replica of {cur.fqrn}, the source serves {m.fqrn}"
            )
        if m.revision < cur.revision:
            raise ReplicaError(
                f"the source serves revision {m.revision} of {m.fqrn}, older than the replica's {cur.revision}:"
                " refusing to roll back (a stale mirror or proxy?)"
            )
        if m.revision == cur.revision and m.root_catalog != cur.root_catalog:
            raise ReplicaError(
                f"the source's revision {m.revision} of {m.fqrn} has another root catalog than the replica's"
                " (was the repository re-created? move the replica away to start over)"
            )

    def _pull(self, pull: _Pull, m: Manifest) -> list[ContentHash]:
        """Pull every tree to replicate; returns the root catalogs the replica should then hold.

        Everything is looked at first (revision chain, history, tags), then the pool starts."""
        chain = self._revision_chain(pull, m) if self.current is not None else []
        tags: list[Tag] = []
        for h, suffix in ((m.history, Suffix.HISTORY), (m.metainfo, Suffix.METAINFO)):
            if h is not None and not self.replica.present(key := h.object_name(suffix)):
                self.aux.append((pull.download(key, h, place=False), key))
                if suffix is Suffix.HISTORY:
                    tags = self._tags(self.aux[-1][0])
        pull.add_root(m.root_catalog, m.revision, f"revision {m.revision}", required=True)
        for h, revision in chain:
            pull.add_root(h, revision, f"revision {revision}", required=False)
        for tag in tags:
            pull.add_root(tag.root_hash, tag.revision, f"tag {tag.name!r} (revision {tag.revision})", False)
        pull.run()
        return [m.root_catalog, *(h for h, _r in chain), *(t.root_hash for t in tags)]

    def _revision_chain(self, pull: _Pull, m: Manifest) -> list[tuple[ContentHash, int]]:
        """The root catalogs published between the replica's revision and the source's, newest first."""
        cur = self.current
        assert cur is not None
        chain: list[tuple[ContentHash, int]] = []
        if m.revision <= cur.revision:
            return chain
        info = pull.inspect(m.root_catalog)
        last = info.revision
        h = info.previous
        while h is not None and h != cur.root_catalog:
            try:
                info = pull.inspect(h)
            except NotFound as exc:
                if not m.garbage_collectable:
                    raise
                pull.skipped.append(f"revisions before {last}: {exc}")
                break
            if not cur.revision < info.revision < last:
                break
            chain.append((h, info.revision))
            last, h = info.revision, info.previous
        return chain

    def _tags(self, staged: str) -> list[Tag]:
        from .history import History

        db = self.replica.tmp / f"history-{secrets.token_hex(4)}.db"
        try:
            _inflate(staged, db)
            hist = History(db)
            try:
                return list(hist.tags())
            finally:
                hist.close()
        finally:
            db.unlink(missing_ok=True)

    def _finish(
        self,
        pull: _Pull,
        reader: RepositoryReader,
        m: Manifest,
        manifest_bytes: bytes,
        whitelist_bytes: bytes,
        roots: list[ContentHash],
    ) -> None:
        """History, certificate, meta-info; syncfs; reflog; whitelist; manifest last; snapshot stamps."""
        r = self.replica
        for staged, key in self.aux:
            os.replace(staged, r.path(key))
        if m.certificate is not None and not r.present(key := m.certificate.object_name(Suffix.CERTIFICATE)):
            tmp = r.staging_file(key)
            shutil.copyfile(reader.object_file(m.certificate, Suffix.CERTIFICATE), tmp)
            pull.objects_fetched += 1
            pull.bytes_fetched += os.stat(tmp).st_size
            os.replace(tmp, r.path(key))
        failpoints.hit("replica-after-objects")
        r.store.sync()  # everything the new manifest names is on disk before it
        self._write_reflog(m, roots)
        failpoints.hit("replica-before-manifest")
        r.write_root_file(WHITELIST, whitelist_bytes)
        r.write_root_file(MANIFEST, manifest_bytes)
        stamp = date_utc()
        r.write_root_file(LAST_SNAPSHOT, (stamp + "\n").encode(), durable=False)
        r.update_status(last_snapshot=stamp)

    def _write_reflog(self, m: Manifest, roots: list[ContentHash]) -> None:
        """The replica's own reflog: every root catalog it holds, plus the current auxiliary objects."""
        from .reflog import Reflog, RefType

        r = self.replica
        path = r.tmp / "reflog.db"
        path.unlink(missing_ok=True)
        reflog: Reflog | None = None
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(r.path(REFLOG), path)
            try:
                reflog = Reflog(path, writable=True)
                reflog.properties()
            except Exception as exc:  # not a database: start a new one rather than fail every snapshot
                log.warning(
                    "replica reflog unreadable, re-created", extra=fields(repository=m.fqrn, error=str(exc))
                )
                if reflog is not None:
                    reflog.close()
                reflog = None
        if reflog is None:
            reflog = Reflog.create(path, m.fqrn)
        try:
            now = int(time.time())
            refs = [(h, RefType.CATALOG, Suffix.CATALOG) for h in roots]
            refs += [
                (h, kind, suffix)
                for h, kind, suffix in (
                    (m.certificate, RefType.CERTIFICATE, Suffix.CERTIFICATE),
                    (m.history, RefType.HISTORY, Suffix.HISTORY),
                    (m.metainfo, RefType.METAINFO, Suffix.METAINFO),
                )
                if h is not None
            ]
            for h, kind, suffix in refs:
                if r.present(h.object_name(suffix)) and not reflog.contains(h):
                    reflog.add(h, kind, now)
        finally:
            reflog.close()
        data = path.read_bytes()
        path.unlink()
        r.write_reflog(data)
