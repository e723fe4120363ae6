"""Reading a repository the way a CVMFS client does, without FUSE.

``RepositoryReader.open`` fetches and verifies the manifest ensemble (manifest, certificate, whitelist
with the master public key), then serves lookups, listings and file contents across nested catalogs
and chunked files. Every object is verified against its name before use and kept in an on-disk,
content-addressed cache, so many readers on one node fetch each object once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import signing
from .hashes import Algorithm, ContentHash, Suffix, normalize_path, parent_path
from .manifest import Manifest, ManifestError
from .objects import ObjectCorrupt, ZlibError, inflater
from .sources import HttpSettings, Source, open_source
from .whitelist import Whitelist

if TYPE_CHECKING:
    import tempfile

    from .catalog import Catalog, Dirent
    from .history import History

# The catalog and history modules (and sqlite3) are imported when a catalog or the history is first read:
# verifying the manifest ensemble alone (a replica snapshot with nothing new) needs neither.

# Most characters of paths whose holding catalog a reader remembers (about 16 MB).
_HOLDER_CACHE_CHARS = 16_000_000


class ReaderError(Exception):
    """The repository cannot be read: not found, not trusted, or corrupt."""


@dataclass(frozen=True)
class Entry:
    path: str
    dirent: Dirent


class ObjectCache:
    """Content-addressed cache of verified objects (compressed, as served) and of inflated catalogs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "catalogs").mkdir(exist_ok=True)

    def object_path(self, h: ContentHash, suffix: Suffix) -> Path:
        return self.root / h.object_name(suffix)

    def temp(self) -> Path:
        return self.root / "tmp" / os.urandom(8).hex()


class RepositoryReader:
    def __init__(
        self,
        source: Source,
        public_keys: list[signing.PublicKey],
        fqrn: str | None = None,
        cache_dir: Path | None = None,
        check_whitelist_expiry: bool = True,
        strict: bool = True,
    ) -> None:
        self.source = source
        # strict=False (the checker) records trust failures in ``trust_errors`` instead of raising.
        self.strict = strict
        self.trust_errors: list[str] = []
        self.public_keys = public_keys
        self.expected_fqrn = fqrn
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is None:
            import tempfile

            self._tmpdir = tempfile.TemporaryDirectory(prefix="rcds-cache-")
            cache_dir = Path(self._tmpdir.name)
        self.cache = ObjectCache(cache_dir)
        self.check_whitelist_expiry = check_whitelist_expiry
        self._catalogs: dict[ContentHash, Catalog] = {}
        # path -> (mountpoint, catalog hash) of the catalog holding its row, for the current revision
        self._holders: dict[str, tuple[str, ContentHash]] = {}
        self._holder_chars = 0
        self._lock = threading.RLock()
        self.manifest: Manifest
        self.whitelist: Whitelist
        self.load_manifest()

    @classmethod
    def open(
        cls,
        location: str | Path,
        public_key: Path | bytes | list[Path] | None = None,
        fqrn: str | None = None,
        cache_dir: Path | None = None,
        proxies: list[str] | None = None,
        settings: HttpSettings | None = None,
        check_whitelist_expiry: bool = True,
        strict: bool = True,
    ) -> RepositoryReader:
        """Open ``location`` (a storage directory or ``http://host/cvmfs/<fqrn>``; several URLs ``;``-separated)."""
        if public_key is None:
            keys: list[signing.PublicKey] = []
        elif isinstance(public_key, bytes):
            keys = [signing.load_public_key(public_key)]
        elif isinstance(public_key, list):
            keys = signing.load_public_keys(public_key)
        else:
            keys = [signing.load_public_key(Path(public_key).read_bytes())]
        if not keys:
            raise ReaderError("a master public key is needed to trust a repository")
        return cls(
            open_source(location, proxies, settings), keys, fqrn, cache_dir, check_whitelist_expiry, strict
        )

    def close(self) -> None:
        with self._lock:
            for c in self._catalogs.values():
                c.close()
            self._catalogs.clear()
        self.source.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self) -> RepositoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- trust -----------------------------------------------------------------------------------

    def load_manifest(self, fresh: bool = False) -> bool:
        """(Re)fetch and verify the manifest ensemble. Returns True if the root catalog changed."""
        try:
            data = self.source.get(".cvmfspublished", fresh=fresh)
            manifest, signed = Manifest.parse(data)
        except ManifestError as exc:
            raise ReaderError(f"bad manifest: {exc}") from exc
        except Exception as exc:
            raise ReaderError(f"cannot fetch manifest from {self.source.description}: {exc}") from exc
        old = getattr(self, "manifest", None)
        if old is not None and manifest.root_catalog == old.root_catalog:
            return False
        if old is not None and manifest.revision < old.revision:
            return False  # a lagging mirror or proxy: keep the newer revision we have
        self.trust_errors = []
        if self.expected_fqrn and manifest.fqrn != self.expected_fqrn:
            self._distrust(f"manifest is for {manifest.fqrn!r}, expected {self.expected_fqrn!r}")
        if manifest.certificate is None:
            raise ReaderError("manifest names no certificate")
        cert_pem = self.read_object(manifest.certificate, Suffix.CERTIFICATE)
        try:
            manifest.verify_signature(signed, cert_pem)
        except signing.SignatureError as exc:
            self._distrust(str(exc))
        try:
            wl_data = self.source.get(".cvmfswhitelist", fresh=fresh)
        except Exception as exc:
            raise ReaderError(f"cannot fetch whitelist: {exc}") from exc
        try:
            wl = Whitelist.verify(
                wl_data, manifest.fqrn, self.public_keys, check_expiry=self.check_whitelist_expiry
            )
        except signing.SignatureError as exc:
            self._distrust(str(exc))
            try:
                wl = Whitelist.parse(wl_data)[0]
            except signing.SignatureError as parse_exc:  # not even parsable: nothing to go on
                raise ReaderError(f"bad whitelist: {parse_exc}") from parse_exc
        fingerprint = signing.parse_fingerprint(signing.pem_certificate_fingerprint(cert_pem))
        if fingerprint not in wl.fingerprints:
            self._distrust("the publisher certificate is not in the whitelist")
        self.manifest, self.whitelist = manifest, wl
        self._holders, self._holder_chars = {}, 0  # they name the previous revision's catalogs
        return True

    def _distrust(self, message: str) -> None:
        if self.strict:
            raise ReaderError(message)
        self.trust_errors.append(message)

    @property
    def fqrn(self) -> str:
        return self.manifest.fqrn

    @property
    def revision(self) -> int:
        return self.manifest.revision

    def whitelist_expires_in(self) -> dt.timedelta:
        return self.whitelist.expires - dt.datetime.now(dt.timezone.utc)

    # --- objects ---------------------------------------------------------------------------------

    def object_file(self, h: ContentHash, suffix: Suffix = Suffix.NONE) -> Path:
        """Path of the verified object in the cache, fetching it if needed.

        A corrupt download is fetched once more with ``Cache-Control: no-cache``, as the CVMFS client
        does: a proxy that cached bad bytes would otherwise serve them until they expire (days).
        """
        path = self.cache.object_path(h, suffix)
        if path.exists():
            return path
        name = h.object_name(suffix)
        for fresh in (False, True):
            tmp = self.cache.temp()
            try:
                with open(tmp, "wb") as f:
                    writer = _HashingWriter(f, h.algorithm)
                    self.source.fetch(name, writer, fresh=fresh)  # type: ignore[arg-type]
                if writer.hasher.digest() != h.digest:
                    if not fresh:
                        tmp.unlink()
                        continue
                    raise ReaderError(f"object {name} is corrupt (content hash mismatch)")
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
                return path
            except Exception as exc:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                if isinstance(exc, ReaderError):
                    raise
                raise ReaderError(f"cannot fetch object {name}: {exc}") from exc
        raise AssertionError("unreachable")

    def iter_object(
        self, h: ContentHash, suffix: Suffix = Suffix.NONE, compressed: bool = True
    ) -> Iterator[bytes]:
        """The object's content, inflated block by block (bounded memory)."""
        path = self.object_file(h, suffix)
        inflating = inflater() if compressed else None
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                if inflating is None:
                    yield block
                    continue
                try:
                    out = inflating.decompress(block)
                except ZlibError as exc:
                    raise ReaderError(f"object {h.hex}{suffix.value} does not inflate: {exc}") from exc
                if out:
                    yield out
        if inflating is not None:
            tail = inflating.flush()
            if tail:
                yield tail
            if not inflating.eof:
                raise ReaderError(f"object {h.hex}{suffix.value} is truncated")

    def read_object(self, h: ContentHash, suffix: Suffix = Suffix.NONE, compressed: bool = True) -> bytes:
        return b"".join(self.iter_object(h, suffix, compressed))

    # --- catalogs --------------------------------------------------------------------------------

    def catalog(self, h: ContentHash) -> Catalog:
        with self._lock:
            cat = self._catalogs.get(h)
            if cat is None:
                path = self.cache.root / "catalogs" / h.hex
                if not path.exists():
                    tmp = self.cache.temp()
                    with open(tmp, "wb") as f:
                        for block in self.iter_object(h, Suffix.CATALOG):
                            f.write(block)
                    os.replace(tmp, path)
                from .catalog import Catalog

                cat = Catalog(path)
                self._catalogs[h] = cat
            return cat

    @property
    def root_catalog(self) -> Catalog:
        return self.catalog(self.manifest.root_catalog)

    def catalog_for(self, path: str) -> tuple[str, Catalog]:
        """The mountpoint and catalog that hold ``path``'s row.

        Resolved from the nearest ancestor already resolved in this revision (``_holders``), then
        downwards with one ``nested_catalogs`` probe per path component. Asking a parent catalog for
        the deepest nested catalog above ``path`` instead probes every ancestor again at every level,
        quadratic in the depth: repositories made by other tools (or before rcds limited nesting) can
        hold chains of a thousand nested catalogs, where that took seconds per lookup.
        """
        holders = self._holders
        hit = holders.get(path)
        if hit is not None:
            return hit[0], self.catalog(hit[1])
        unresolved = []  # path and its ancestors below the nearest resolved one, deepest first
        probe = path
        while True:
            if not probe:
                hit = ("", self.manifest.root_catalog)
                break
            hit = holders.get(probe)
            if hit is not None:
                break
            unresolved.append(probe)
            probe = parent_path(probe)
        mount, h = hit
        cat = self.catalog(h)
        if self._holder_chars > _HOLDER_CACHE_CHARS:  # bounded memory: start over (rarely, if ever)
            holders.clear()
            self._holder_chars = 0
        for p in reversed(unresolved):
            ref = cat.nested_ref(p)
            if ref is not None:
                mount, h = p, ref.hash
                cat = self.catalog(h)
            holders[p] = (mount, h)
            self._holder_chars += len(p)
        return mount, cat

    def iter_catalogs(
        self, root: ContentHash | None = None, mount: str = ""
    ) -> Iterator[tuple[str, ContentHash, Catalog]]:
        """Every catalog of a revision, parents before children."""
        stack = [(mount, root or self.manifest.root_catalog)]
        while stack:
            m, h = stack.pop()
            cat = self.catalog(h)
            yield m, h, cat
            stack.extend((ref.path, ref.hash) for ref in reversed(cat.nested()))

    def history(self) -> History | None:
        if self.manifest.history is None:
            return None
        path = self.cache.root / "catalogs" / (self.manifest.history.hex + "H")
        if not path.exists():
            path.write_bytes(self.read_object(self.manifest.history, Suffix.HISTORY))
        from .history import History

        return History(path)

    # --- file system view ------------------------------------------------------------------------

    def lookup(self, path: str) -> Dirent | None:
        path = normalize_path(path)
        return self.catalog_for(path)[1].lookup(path)

    def stat(self, path: str) -> Dirent:
        d = self.lookup(path)
        if d is None:
            raise FileNotFoundError(path)
        return d

    def listdir(self, path: str) -> list[Dirent]:
        path = normalize_path(path)
        d = self.stat(path)
        if not d.is_dir:
            raise NotADirectoryError(path)
        entries = self.catalog_for(path)[1].listdir(path)
        return [e for e in entries if not e.is_hidden]

    def walk(self, path: str = "") -> Iterator[Entry]:
        """Every entry at and below ``path``, parents before children (chunk lists loaded)."""
        path = normalize_path(path)
        top = self.stat(path)
        yield Entry(path, top)
        if not top.is_dir:
            return
        # Each directory travels with the catalog that lists its children, so a nested catalog is
        # entered once from its parent's row instead of being searched for from the root again.
        stack = [(path, self.catalog_for(path)[1])]
        while stack:
            p, cat = stack.pop()
            for d in cat.listdir(p, with_chunks=True):
                cp = f"{p}/{d.name}"
                inner = cat
                if d.is_nested_mountpoint:
                    ref = cat.nested_ref(cp)
                    if ref is not None:  # else a dangling mountpoint: nothing below it to list
                        inner = self.catalog(ref.hash)
                        d = inner.lookup(cp) or d
                yield Entry(cp, d)
                if d.is_dir:
                    stack.append((cp, inner))

    def iter_content(self, d: Dirent) -> Iterator[bytes]:
        """A regular file's bytes, block by block, verified."""
        if not d.is_regular:
            raise ReaderError(f"{d.name} is not a regular file")
        if d.is_external:
            raise ReaderError(f"{d.name} is an external file (not stored in the repository)")
        from .catalog import COMPRESSION_NONE

        compressed = d.compression != COMPRESSION_NONE
        pieces: list[tuple[ContentHash, Suffix, int, int]]  # hash, suffix, offset, size
        if d.is_chunked:
            pieces = [(c.hash, Suffix.PARTIAL, c.offset, c.size) for c in d.chunks]
        elif d.hash is None:
            raise ReaderError(f"{d.name}: regular file without content hash")
        else:
            pieces = [(d.hash, Suffix.NONE, 0, d.size)]
        expected = 0
        for h, suffix, offset, size in pieces:
            if offset != expected:
                raise ReaderError(f"{d.name}: chunk list has a gap at offset {expected}")
            n = 0
            for block in self.iter_object(h, suffix, compressed):
                n += len(block)
                yield block
            if n != size:
                raise ReaderError(f"{d.name}: piece at offset {offset} has {n} bytes, catalog says {size}")
            expected += size
        if expected != d.size:
            raise ReaderError(f"{d.name}: content covers {expected} bytes, catalog says {d.size}")

    def read(self, path: str) -> bytes:
        return b"".join(self.iter_content(self.stat(path)))

    def open_file(self, path: str) -> BinaryIO:
        """A read-only file object (content fetched on first read)."""
        return io.BytesIO(self.read(path))

    def copy_to(self, d: Dirent, dest: BinaryIO) -> int:
        n = 0
        for block in self.iter_content(d):
            dest.write(block)
            n += len(block)
        return n


class _HashingWriter:
    """Writes through to a file while hashing what passes, so a fetch is verified without a re-read.

    A source that fails over mid-transfer rewinds it to the start, which also restarts the hash.
    """

    def __init__(self, f: BinaryIO, algorithm: Algorithm) -> None:
        self._f = f
        self._algorithm = algorithm
        self.hasher = algorithm.new()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return self._f.write(data)

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int) -> int:
        if pos != 0:
            raise io.UnsupportedOperation("can only rewind to the start")
        self.hasher = self._algorithm.new()
        return self._f.seek(0)

    def truncate(self) -> int:
        return self._f.truncate()


__all__ = ["Entry", "ObjectCorrupt", "ReaderError", "RepositoryReader"]
