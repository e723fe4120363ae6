"""A stratum 0 repository: creation, keys, signing, and read access for the writer.

Storage layout (the public part is exactly what a stock stratum 0 serves)::

    <storage>/.cvmfspublished .cvmfswhitelist .cvmfsreflog .cvmfs_master_replica data/00..ff/
    <storage>/.rcds/            private, never served: repo.json, keys/, catalogs/ (cache of
                                uncompressed catalogs), content-index.db, lock, tmp/

With an S3 store (``repo.json`` names it: ``"store": {"url": "s3://bucket/alias", ...}``) the public part
is in the bucket (``rcds.storage.s3``) and ``<storage>`` holds only ``.rcds/``, the private state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import rsa

from ..storage import MANIFEST as MANIFEST  # the root files' names, re-exported for existing importers
from ..storage import MASTER_REPLICA as MASTER_REPLICA
from ..storage import PRIVATE_DIR, ObjectMissing, ObjectStore, store_from_settings
from ..storage import REFLOG as REFLOG
from ..storage import STATUS_JSON as STATUS_JSON
from ..storage import WHITELIST as WHITELIST
from ..storage.local import LocalStore
from . import failpoints, signing, whitelist
from .catalog import FLAG_DIR, Catalog, Dirent, make_hardlinks
from .chunking import ChunkParams
from .hashes import ContentHash, Suffix
from .history import TRUNK, TRUNK_PREVIOUS, History, Tag
from .manifest import Manifest
from .objects import CATALOG_ZLIB_LEVEL, compress, decompress, verify
from .reflog import Reflog, RefType
from .whitelist import Whitelist

if TYPE_CHECKING:
    from .reader import RepositoryReader
    from .writer import StagingTransaction, Transaction

DEFAULT_TTL = 15  # seconds: user code must appear fast (the CVMFS default is 240)
INGEST_LOCK = "ingest.lock"  # in <storage>/.rcds/: staged ingests (shared) against the GC sweep
REFLOG_CHECKSUM = "reflog.chksum"  # in <storage>/.rcds/, as cvmfs_server keeps it in its spool
WHITELIST_WARN = dt.timedelta(days=7)
EXTERNAL_WHITELIST_WARN = dt.timedelta(days=2)


class RepositoryError(Exception):
    """The repository does not exist, is locked, or is inconsistent."""


@dataclass(frozen=True)
class RootVersions:
    """The versions (``ObjectStore.version``: an ETag on a bucket with conditional writes, else None) of
    the reflog and the manifest a commit started from. ``publish_manifest`` replaces each only if it is
    still at that version, so that of two writers (two machines on one bucket) from the same revision the
    second fails instead of overwriting the first's reflog and manifest."""

    manifest: str | None
    reflog: str | None


@dataclass
class RepoConfig:
    fqrn: str
    ttl: int = DEFAULT_TTL
    keys_dir: str = ""
    chunk_min: int = ChunkParams().min_size
    chunk_avg: int = ChunkParams().avg_size
    chunk_max: int = ChunkParams().max_size
    whitelist_days: int = 30
    # Adopted repositories (rcds.cvmfs.adopt) whose whitelist someone else signs, e.g. OSG for
    # *.opensciencegrid.org: the master public key lives elsewhere and rcds never re-signs.
    public_key: str = ""
    external_whitelist: bool = False
    # Where the public files are when not in the storage directory: {"url": "s3://bucket/alias", plus
    # rcds.storage.s3.S3Settings options}; empty: the storage directory itself.
    store: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def chunk_params(self) -> ChunkParams:
        return ChunkParams(self.chunk_min, self.chunk_avg, self.chunk_max)


def _fsync_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Repository:
    """Open with ``Repository(storage)``; create with ``Repository.create(fqrn, storage)``."""

    def __init__(self, storage: Path | str) -> None:
        self.storage = Path(storage)
        self.private = self.storage / PRIVATE_DIR
        config_path = self.private / "repo.json"
        if not config_path.is_file():
            raise RepositoryError(f"{self.storage} is not an rcds repository (no {PRIVATE_DIR}/repo.json)")
        self.config = RepoConfig(**json.loads(config_path.read_text()))
        self.fqrn = self.config.fqrn
        self.keys_dir = Path(self.config.keys_dir) if self.config.keys_dir else self.private / "keys"
        self.store: ObjectStore = _open_configured_store(self.storage, self.config.store)
        # The root files' versions as last read (``manifest``), for the conditional replaces of
        # ``publish_manifest``; a transaction keeps its own (``manifest_and_versions``).
        self._versions = RootVersions(None, None)
        self.catalog_cache = self.private / "catalogs"
        self.catalog_cache.mkdir(exist_ok=True)
        self._certificate_key: rsa.RSAPrivateKey | None = None

    # --- creation --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        fqrn: str,
        storage: Path | str,
        ttl: int = DEFAULT_TTL,
        keys_dir: Path | None = None,
        chunk_params: ChunkParams | None = None,
        now: int | None = None,
        store: dict[str, object] | None = None,
    ) -> Repository:
        """``store``: the public files elsewhere than ``storage`` (``{"url": "s3://bucket/alias", ...}``);
        ``storage`` then holds only the private state."""
        storage = Path(storage)
        if (storage / PRIVATE_DIR / "repo.json").exists():
            raise RepositoryError(f"{storage} already holds a repository")
        _check_fqrn(fqrn)
        public = _open_configured_store(storage, store or {})
        if public.exists(MANIFEST):
            hint = f" 'rcds repo adopt --storage {storage}' (docs/migration.md)" if not store else ""
            raise RepositoryError(
                f"{public.description} holds a repository rcds did not create: take it over with{hint}"
                if not store
                else f"{public.description} already holds a repository ({MANIFEST} exists)"
            )
        if isinstance(public, LocalStore):
            public.initialize()
        else:
            (storage / PRIVATE_DIR / "tmp").mkdir(parents=True, exist_ok=True)
            (storage / PRIVATE_DIR).chmod(0o700)
        private = storage / PRIVATE_DIR
        params = chunk_params or ChunkParams()
        config = RepoConfig(
            fqrn,
            ttl,
            str(keys_dir) if keys_dir else "",
            params.min_size,
            params.avg_size,
            params.max_size,
            store=dict(store or {}),
        )
        kdir = keys_dir or private / "keys"
        kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        master = signing.generate_key()
        cert_key = signing.generate_key()
        cert = signing.make_certificate(cert_key, fqrn)
        _fsync_write(kdir / f"{fqrn}.masterkey", signing.private_key_pem(master), 0o600)
        _fsync_write(kdir / f"{fqrn}.key", signing.private_key_pem(cert_key), 0o600)
        _fsync_write(kdir / f"{fqrn}.crt", signing.certificate_pem(cert))
        _fsync_write(kdir / f"{fqrn}.pub", signing.public_key_pem(master.public_key()))
        _fsync_write(private / "repo.json", json.dumps(asdict(config), indent=2).encode())
        repo = cls(storage)
        repo.resign()
        repo.store.put(MASTER_REPLICA, b"")
        repo._publish_initial(now if now is not None else int(time.time()))
        return repo

    def _publish_initial(self, now: int) -> None:
        tmp = self.private / "tmp"
        root_row = Dirent(
            name="", mode=0o40755, flags=FLAG_DIR, size=4096, mtime=now, hardlinks=make_hardlinks(2)
        )
        cat_path = tmp / "root.db"
        cat = Catalog.create(cat_path, "", root_row, ttl=self.config.ttl)
        counters = cat.counters()
        assert counters is not None
        counters.self_ = cat.compute_self_counters()
        cat.write_counters(counters)
        cat.set_property("last_modified", now)
        cat.close()
        root_hash, root_size = self.store_catalog(cat_path)
        cert_hash = self.store_certificate()
        with self.history_for_update(None) as (hist_path, hist):
            hist.put(Tag(TRUNK, root_hash, 0, now, root_size, "current HEAD"))
        history_hash = self._store_sqlite_object(hist_path, Suffix.HISTORY)
        reflog_path = tmp / "reflog.db"
        reflog = Reflog.create(reflog_path, self.fqrn)
        for h, kind in (
            (root_hash, RefType.CATALOG),
            (cert_hash, RefType.CERTIFICATE),
            (history_hash, RefType.HISTORY),
        ):
            reflog.add(h, kind, now)
        reflog.close()
        manifest = Manifest(
            root_hash, 0, self.config.ttl, self.fqrn, root_size, cert_hash, history_hash, None, None, now
        )
        # No manifest may be there (If-None-Match where the store can: of two creators on one bucket key
        # one succeeds); a reflog without one is a crashed create's, replaced.
        self.publish_manifest(manifest, reflog_path, based_on=RootVersions(None, self.store.version(REFLOG)))

    # --- keys and signing ------------------------------------------------------------------------

    def _key_path(self, ext: str) -> Path:
        return self.keys_dir / f"{self.fqrn}.{ext}"

    @property
    def public_key_path(self) -> Path:
        return Path(self.config.public_key) if self.config.public_key else self._key_path("pub")

    def master_key(self) -> rsa.RSAPrivateKey:
        return signing.load_private_key(self._key_path("masterkey").read_bytes())

    def certificate_key(self) -> rsa.RSAPrivateKey:
        if self._certificate_key is None:  # parsing and validating an RSA key costs ~25 ms
            self._certificate_key = signing.load_private_key(self._key_path("key").read_bytes())
        return self._certificate_key

    def certificate_pem(self) -> bytes:
        return self._key_path("crt").read_bytes()

    def public_keys(self) -> list[signing.PublicKey]:
        return [signing.load_public_key(self.public_key_path.read_bytes())]

    def resign(self, days: int | None = None, now: dt.datetime | None = None) -> Whitelist:
        """Write a fresh whitelist for the current certificate (run well before the old one expires)."""
        if self.config.external_whitelist:
            raise RepositoryError(
                f"the whitelist of {self.fqrn} is signed outside rcds (external_whitelist): renew it there"
            )
        cert = signing.load_certificate(self.certificate_pem())
        validity = dt.timedelta(days=days or self.config.whitelist_days)
        data = whitelist.create(
            self.fqrn, [signing.certificate_fingerprint(cert)], self.master_key(), now, validity
        )
        self.store.put_durable(WHITELIST, data)
        wl, _ = Whitelist.parse(data)
        return wl

    def whitelist(self) -> Whitelist:
        return Whitelist.parse(self.store.get(WHITELIST))[0]

    def whitelist_warning(self, now: dt.datetime | None = None) -> str | None:
        wl = self.whitelist()
        now = now or dt.datetime.now(dt.UTC)
        if self.config.external_whitelist:
            # Signed elsewhere, often for a week at a time (OSG): only a whitelist that was not renewed
            # in time is worth a warning.
            todo, margin = "renew it where it is signed (external whitelist)", EXTERNAL_WHITELIST_WARN
        else:
            todo, margin = "run 'rcds repo resign'", WHITELIST_WARN
        if wl.is_expired(now):
            return (
                f"whitelist EXPIRED at {wl.expires:%Y-%m-%d %H:%M} UTC: clients reject the repository; {todo}"
            )
        if wl.expires - now < margin:
            return f"whitelist expires {wl.expires:%Y-%m-%d %H:%M} UTC (in {wl.expires - now}); {todo}"
        return None

    def store_certificate(self) -> ContentHash:
        stored, h = compress(self.certificate_pem())
        self.store.put_object(h.object_name(Suffix.CERTIFICATE), stored)
        return h

    # --- manifest, catalogs, history -------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The published manifest; remembers the root files' versions for the conditional replaces in
        ``publish_manifest`` (stores with conditional writes: a second writer cannot commit over it)."""
        manifest, self._versions = self.manifest_and_versions()
        return manifest

    def manifest_and_versions(self) -> tuple[Manifest, RootVersions]:
        """The published manifest and the root files' versions, remembered nowhere (a transaction's own:
        another ``manifest()`` call meanwhile, e.g. from a service thread, must not move its base)."""
        # The reflog's version first: a commit landing between the reads then fails at the reflog, before
        # it writes anything, rather than after replacing it.
        reflog = self.store.version(REFLOG)
        version = self.store.version(MANIFEST)
        return Manifest.parse(self.store.get(MANIFEST))[0], RootVersions(version, reflog)

    def publish_manifest(
        self,
        manifest: Manifest,
        reflog_path: Path,
        after_reflog: str = "after-reflog",
        based_on: RootVersions | None = None,
    ) -> Manifest:
        """The last step of every publish: reflog, then the signed manifest, each durable, each replaced
        only if still at ``based_on`` (default: as the last ``manifest()`` read them) where the store has
        conditional writes; else ``ConditionFailed`` and, if the reflog was refused, nothing written.

        ``after_reflog`` names the failure point between the two (garbage collection uses its own)."""
        based_on = based_on or self._versions
        reflog_bytes = reflog_path.read_bytes()
        manifest = dataclasses.replace(manifest, reflog=ContentHash.of(reflog_bytes))
        self.store.replace_if(REFLOG, reflog_bytes, based_on.reflog)
        self.write_reflog_checksum(manifest.reflog)
        failpoints.hit(after_reflog)
        self.store.sync()
        self.store.replace_if(MANIFEST, manifest.sign(self.certificate_key()), based_on.manifest)
        self._versions = RootVersions(self.store.version(MANIFEST), self.store.version(REFLOG))
        return manifest

    def write_reflog_checksum(self, h: ContentHash | None) -> None:
        """Keep ``.rcds/reflog.chksum`` as ``cvmfs_server`` keeps ``<spool>/reflog.chksum``: the hex SHA-1
        of the reflog, no newline. rcds does not need it; it is what hands the repository back to
        ``cvmfs_server`` (docs/migration.md, rollback), which refuses to publish when it does not match."""
        if h is not None:
            _fsync_write(self.private / REFLOG_CHECKSUM, h.hex.encode())

    def recover(self) -> list[str]:
        """Repair what an interrupted publish left behind; call with the writer lock held.

        Staging files and transaction scratch directories are removed. If the process died between
        replacing the reflog and replacing the manifest, the reflog is a superset of the published
        one; the manifest is re-signed (same revision and root catalog) so that ``Y`` matches it.
        """
        done: list[str] = []
        # Staged ingests (``StagingTransaction``) write temp files and scratch outside the writer lock:
        # clean only when none is alive (a crash's leftovers wait for a quiet moment, they are harmless).
        with contextlib.suppress(RepositoryError), self.ingest_lock(exclusive=True, blocking=False):
            self.store.clean_staging()
            # Scratch copies (history, reflog) a killed writer left; on local storage the store's staging
            # is this same directory, with a bucket it is not.
            scratch = self.private / "tmp"
            if scratch.is_dir():
                for f in scratch.iterdir():
                    if f.is_file():
                        with contextlib.suppress(FileNotFoundError):
                            f.unlink()
            txn_dir = self.private / "txn"
            if txn_dir.is_dir():
                for d in txn_dir.iterdir():
                    shutil.rmtree(d, ignore_errors=True)
                    done.append(f"removed scratch {d.name}")
        if self.store.exists(REFLOG):
            manifest = self.manifest()
            actual = ContentHash.of(self.store.get(REFLOG))
            if manifest.reflog is not None and actual != manifest.reflog:
                # Conditional too: on a bucket another machine's commit may land meanwhile.
                signed = dataclasses.replace(manifest, reflog=actual).sign(self.certificate_key())
                self.store.replace_if(MANIFEST, signed, self._versions.manifest)
                done.append("re-signed the manifest for a reflog left by an interrupted publish")
            checksum = self.private / REFLOG_CHECKSUM
            if checksum.exists() and checksum.read_text() != actual.hex:
                self.write_reflog_checksum(actual)
        return done

    def store_catalog(self, path: Path) -> tuple[ContentHash, int]:
        """Compress a finished catalog file into a ``C`` object; keep the uncompressed file in the cache."""
        raw = path.read_bytes()
        stored, h = compress(raw, level=CATALOG_ZLIB_LEVEL)
        self.store.put_object(h.object_name(Suffix.CATALOG), stored)
        cached = self.catalog_cache / h.hex
        if not cached.exists():
            os.replace(path, cached)
        return h, len(raw)

    def _store_sqlite_object(self, path: Path, suffix: Suffix) -> ContentHash:
        stored, h = compress(path.read_bytes())
        self.store.put_object(h.object_name(suffix), stored)
        return h

    def catalog_file(self, h: ContentHash) -> Path:
        """Local uncompressed copy of catalog ``h`` (from the cache, else fetched and verified)."""
        cached = self.catalog_cache / h.hex
        if not cached.exists():
            stored = self.store.get(h.object_name(Suffix.CATALOG))
            verify(stored, h)
            tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(decompress(stored))
            os.replace(tmp, cached)
        return cached

    def open_catalog(self, h: ContentHash) -> Catalog:
        return Catalog(self.catalog_file(h))

    @contextlib.contextmanager
    def history_for_update(self, previous: ContentHash | None) -> Iterator[tuple[Path, History]]:
        path = self.private / "tmp" / f"history.{os.getpid()}.db"
        if previous is None:
            hist = History.create(path, self.fqrn)
        else:
            stored = self.store.get(previous.object_name(Suffix.HISTORY))
            verify(stored, previous)
            path.write_bytes(decompress(stored))
            hist = History(path, writable=True)
            hist.set_property("previous_revision", previous.hex)
        try:
            yield path, hist
        finally:
            hist.close()

    def store_history(self, path: Path) -> ContentHash:
        return self._store_sqlite_object(path, Suffix.HISTORY)

    def update_history(self, previous: ContentHash | None, head: Tag) -> ContentHash:
        with self.history_for_update(previous) as (path, hist):
            old = hist.get(TRUNK)
            if old is not None:
                hist.put(
                    Tag(
                        TRUNK_PREVIOUS,
                        old.root_hash,
                        old.revision,
                        old.timestamp,
                        old.size,
                        "default undo target",
                    )
                )
            hist.put(head)
        return self.store_history(path)

    def reflog_copy(self) -> Path:
        """A private working copy of the published reflog."""
        path = self.private / "tmp" / f"reflog.{os.getpid()}.db"
        if self.store.exists(REFLOG):
            path.write_bytes(self.store.get(REFLOG))
        else:
            Reflog.create(path, self.fqrn).close()
        return path

    def reader(
        self, cache_dir: Path | None = None, check_whitelist_expiry: bool = True, strict: bool = True
    ) -> RepositoryReader:
        """A verifying reader of the published tree, straight from the store (a bucket too)."""
        from .reader import RepositoryReader
        from .sources import LocalSource, Source
        from .storesource import StoreSource

        source: Source = (
            LocalSource(self.storage) if isinstance(self.store, LocalStore) else StoreSource(self.store)
        )
        return RepositoryReader(
            source, self.public_keys(), self.fqrn, cache_dir, check_whitelist_expiry, strict
        )

    # --- locking and transactions ----------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, blocking: bool = True) -> Iterator[None]:
        """Exclusive writer lock (flock: released by the kernel if the process dies)."""
        fd = os.open(self.private / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise RepositoryError(f"{self.fqrn} is locked by another writer") from exc
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def ingest_lock(self, exclusive: bool, blocking: bool = True) -> Iterator[None]:
        """The lock between staged ingests (shared, each for its whole life: build, then until its graft
        is committed or dropped) and garbage collection's sweep (exclusive). A staged ingest runs outside
        the writer lock and reuses objects that exist, so a sweep must not run while one is alive."""
        fd = os.open(self.private / INGEST_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise RepositoryError(f"{self.fqrn} has ingests in progress") from exc
            yield
        finally:
            os.close(fd)

    def transaction(self) -> Transaction:
        from .writer import Transaction

        return Transaction(self)

    def staging(self, workers: int | None = None) -> StagingTransaction:
        """A staged ingest: builds one subtree without the writer lock, for ``Transaction.graft``."""
        from .writer import StagingTransaction

        return StagingTransaction(self, workers)

    def write_status(self, **fields: str) -> None:
        status: dict[str, str] = {}
        with contextlib.suppress(ValueError, ObjectMissing):
            status = json.loads(self.store.get(STATUS_JSON))
        status.update(fields)
        self.store.put(STATUS_JSON, json.dumps(status, indent=2).encode())

    def prune_catalog_cache(self, keep: set[str]) -> None:
        for f in self.catalog_cache.iterdir():
            if f.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()


def _open_configured_store(storage: Path, settings: dict[str, object]) -> ObjectStore:
    if not settings:
        return LocalStore(storage)
    try:
        return store_from_settings(settings)
    except ValueError as exc:
        raise RepositoryError(f"{storage}: bad store settings: {exc}") from exc


def _check_fqrn(fqrn: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,126}", fqrn) or ".." in fqrn:
        raise RepositoryError(f"bad repository name {fqrn!r} (letters, digits, '.', '-', '_')")


def copy_catalog(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
