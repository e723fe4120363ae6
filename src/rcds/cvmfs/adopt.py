"""Taking over a stratum 0 that ``cvmfs_server`` made (``rcds repo adopt``).

A repository created and published by the CernVM-FS server tools keeps its public tree in
``/srv/cvmfs/<fqrn>`` (``.cvmfspublished``, ``.cvmfswhitelist``, ``.cvmfsreflog``, ``data/``), its keys in
``/etc/cvmfs/keys/<fqrn>.{masterkey,pub,key,crt}``, and its book-keeping in ``/var/spool/cvmfs/<fqrn>``
(the transaction locks, ``reflog.chksum``) and ``/etc/cvmfs/repositories.d/<fqrn>/server.conf``.

Adoption checks that everything fits, then adds only rcds's private state (``<storage>/.rcds/``): nothing
that is published is rewritten, so the current revision, its history (``trunk``, ``trunk-previous``)
and reflog simply continue with the next rcds publish, and clients, stratum 1s and squids notice nothing.
It refuses, saying why, when:

* the keys do not belong to the repository: the ``.pub`` must verify the whitelist, the ``.crt`` must be
  the certificate that signed the published manifest (and be listed in the whitelist), the ``.key`` must
  be its private key and the ``.masterkey`` the private half of the ``.pub``;
* ``cvmfs_server`` has a transaction open or is publishing (its spool's lock files);
* the reflog does not match the manifest or the spool's ``reflog.chksum``;
* a catalog has a schema rcds does not write (anything but 2.5, revision 7 or older), or the
  repository is configured for another hash or compression algorithm, another storage type, or is a
  stratum 1.

Then the content index is seeded from the objects the catalogs reference (so publishing a file that is
already stored costs no compression), the reflog checksum is kept as ``.rcds/reflog.chksum`` (the file
``cvmfs_server`` keeps in its spool, needed to hand the repository back), and the whitelist is re-signed
only if it expires within a week.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..storage import PRIVATE_DIR
from ..storage.local import LocalStore
from . import signing
from .catalog import (
    COMPRESSION_MASK,
    FLAG_CHUNKED,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    HASH_ALGORITHM_MASK,
    Catalog,
    CatalogError,
)
from .chunking import ChunkParams
from .contentindex import ContentIndex
from .hashes import ContentHash, Suffix
from .history import History
from .manifest import Manifest, ManifestError
from .objects import ObjectCorrupt, decompress, verify
from .reflog import Reflog
from .repository import (
    MANIFEST,
    REFLOG,
    REFLOG_CHECKSUM,
    WHITELIST,
    WHITELIST_WARN,
    RepoConfig,
    Repository,
    RepositoryError,
    _check_fqrn,
    _fsync_write,
)
from .signing import SignatureError
from .whitelist import Whitelist, WhitelistError

DEFAULT_KEYS = Path("/etc/cvmfs/keys")
DEFAULT_SPOOL = Path("/var/spool/cvmfs")  # /var/spool/cvmfs/<fqrn>
DEFAULT_SERVER_CONF = Path("/etc/cvmfs/repositories.d")  # <fqrn>/server.conf
# What cvmfs_server leaves in the spool while a transaction is open or a publish runs (the first two
# are the 2.x names, the last the name of older releases).
TRANSACTION_MARKERS = ("in_transaction.lock", "is_publishing.lock", "in_transaction")
MAX_SCHEMA_REVISION = 7  # what the 2.12 tools and rcds write; an unknown newer revision is refused


class AdoptError(RepositoryError):
    """The storage, keys or state do not fit: nothing was changed."""


@dataclass
class AdoptReport:
    fqrn: str
    storage: str
    revision: int
    keys_dir: str
    keys_copied: bool
    catalogs: int = 0
    objects_indexed: int = 0
    objects_missing: int = 0
    whitelist_expires: str = ""
    whitelist_resigned: bool = False
    reflog_checksum: str = ""
    chunk_sizes: tuple[int, int, int] = (0, 0, 0)
    checked_only: bool = False
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def read_server_conf(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a ``server.conf`` (shell syntax, without expansion; quotes removed)."""
    out: dict[str, str] = {}
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def adopt(
    storage: Path | str,
    keys_dir: Path | str = DEFAULT_KEYS,
    fqrn: str | None = None,
    spool_dir: Path | str | None = None,
    server_conf: Path | str | None = None,
    copy_keys: bool = False,
    seed_index: bool = True,
    check_only: bool = False,
    now: dt.datetime | None = None,
    public_key: Path | str | None = None,
    external_whitelist: bool = False,
) -> AdoptReport:
    """Check the repository in ``storage`` and, unless ``check_only``, make it an rcds repository.

    ``spool_dir`` and ``server_conf`` default to ``cvmfs_server``'s places for the repository, and are
    used when they exist. With ``copy_keys`` the keys are copied into ``<storage>/.rcds/keys``; else the
    repository refers to them where they are. ``public_key`` is the master public key that verifies the
    whitelist when it is not ``<keys_dir>/<fqrn>.pub``. With ``external_whitelist`` the whitelist is
    signed by someone else (OSG signs those of ``*.opensciencegrid.org`` with its domain key): no
    ``.masterkey`` is needed and rcds never re-signs it.
    """
    storage = Path(storage).absolute()
    keys_dir = Path(keys_dir).absolute()
    manifest, signed_manifest = _load_manifest(storage)
    if fqrn is not None and fqrn != manifest.fqrn:
        raise AdoptError(f"{storage} holds {manifest.fqrn}, not {fqrn}")
    fqrn = manifest.fqrn
    _check_fqrn(fqrn)
    if (storage / PRIVATE_DIR / "repo.json").exists():
        raise AdoptError(f"{storage} is already an rcds repository ({PRIVATE_DIR}/repo.json exists)")

    spool = Path(spool_dir) if spool_dir is not None else DEFAULT_SPOOL / fqrn
    if spool_dir is not None and not spool.is_dir():
        raise AdoptError(f"spool directory {spool} does not exist")
    if spool.is_dir():
        for name in TRANSACTION_MARKERS:
            if (spool / name).exists():
                raise AdoptError(
                    f"cvmfs_server has a transaction open or is publishing ({spool / name} exists): "
                    f"publish or abort it (cvmfs_server abort -f {fqrn}) and stop the old service first"
                )
    conf_path = Path(server_conf) if server_conf is not None else DEFAULT_SERVER_CONF / fqrn / "server.conf"
    if server_conf is not None and not conf_path.is_file():
        raise AdoptError(f"server configuration {conf_path} does not exist")
    conf = read_server_conf(conf_path) if conf_path.is_file() else {}
    report = AdoptReport(
        fqrn, str(storage), manifest.revision, str(keys_dir), copy_keys, checked_only=check_only
    )
    params = _check_server_conf(conf, storage, report)
    report.chunk_sizes = (params.min_size, params.avg_size, params.max_size)

    store = LocalStore(storage)
    pub_path = Path(public_key).absolute() if public_key is not None else keys_dir / f"{fqrn}.pub"
    wl = _check_keys(store, keys_dir, pub_path, fqrn, manifest, signed_manifest, external_whitelist)
    report.whitelist_expires = wl.expires.isoformat()
    report.reflog_checksum = _check_reflog(storage, fqrn, manifest, spool if spool.is_dir() else None)
    _check_history(store, manifest)

    with tempfile.TemporaryDirectory(prefix="rcds-adopt-") as tmp:
        objects = _check_catalogs(store, manifest.root_catalog, Path(tmp), report)
        if check_only:
            report.objects_indexed = len(objects)
            return report
        private = storage / PRIVATE_DIR
        private.mkdir(mode=0o700, exist_ok=True)
        store.initialize()  # only creates what is missing: data/00..ff exist already, .rcds/tmp does not
        if seed_index:
            _seed_index(store, private / "content-index.db", objects, report)

    kdir = keys_dir
    if copy_keys:
        kdir = private / "keys"
        kdir.mkdir(mode=0o700, exist_ok=True)
        for ext, mode in (("masterkey", 0o600), ("key", 0o600), ("crt", 0o644)):
            if ext != "masterkey" or not external_whitelist:
                _fsync_write(kdir / f"{fqrn}.{ext}", (keys_dir / f"{fqrn}.{ext}").read_bytes(), mode)
        _fsync_write(kdir / f"{fqrn}.pub", pub_path.read_bytes())
        report.keys_dir = str(kdir)
    _fsync_write(private / REFLOG_CHECKSUM, report.reflog_checksum.encode())
    _fsync_write(
        private / "adopted.json",
        json.dumps(
            {
                "adopted_at": (now or dt.datetime.now(dt.UTC)).isoformat(),
                "revision": manifest.revision,
                "root_catalog": manifest.root_catalog.hex,
                "keys": str(keys_dir),
                "public_key": str(pub_path),
                "external_whitelist": external_whitelist,
                "spool": str(spool) if spool.is_dir() else None,
                "server_conf": str(conf_path) if conf else None,
            },
            indent=2,
        ).encode(),
    )
    config = RepoConfig(
        fqrn, manifest.ttl, "" if copy_keys else str(kdir), params.min_size, params.avg_size, params.max_size,
        public_key="" if copy_keys or public_key is None else str(pub_path), external_whitelist=external_whitelist,
    )  # fmt: skip
    # repo.json last: until it exists the storage is not an rcds repository, and a failed adoption can
    # simply be run again.
    _fsync_write(private / "repo.json", json.dumps(asdict(config), indent=2).encode())
    repo = Repository(storage)
    if external_whitelist:
        warning = repo.whitelist_warning(now)
        if warning:
            report.warnings.append(warning)
    elif repo.whitelist().expires - (now or dt.datetime.now(dt.UTC)) < WHITELIST_WARN:
        report.whitelist_expires = repo.resign(now=now).expires.isoformat()
        report.whitelist_resigned = True
    return report


def _load_manifest(storage: Path) -> tuple[Manifest, signing.SignedText]:
    path = storage / MANIFEST
    if not path.is_file():
        raise AdoptError(f"{storage} is no stratum 0 storage (no {MANIFEST})")
    try:
        return Manifest.parse(path.read_bytes())
    except ManifestError as exc:
        raise AdoptError(f"{path}: {exc}") from exc


def _check_server_conf(conf: dict[str, str], storage: Path, report: AdoptReport) -> ChunkParams:
    """Refuse settings rcds cannot continue with; take the chunk sizes (so chunks keep deduplicating)."""
    kind = conf.get("CVMFS_REPOSITORY_TYPE", "stratum0")
    if kind != "stratum0":
        raise AdoptError(f"server.conf: CVMFS_REPOSITORY_TYPE={kind}: only a stratum 0 can be adopted")
    algorithm = conf.get("CVMFS_HASH_ALGORITHM", "sha1")
    if algorithm != "sha1":
        raise AdoptError(f"server.conf: CVMFS_HASH_ALGORITHM={algorithm}: rcds publishes SHA-1 objects only")
    compression = conf.get("CVMFS_COMPRESSION_ALGORITHM", "default")
    if compression not in ("default", "zlib"):
        raise AdoptError(f"server.conf: CVMFS_COMPRESSION_ALGORITHM={compression}: rcds publishes zlib only")
    upstream = conf.get("CVMFS_UPSTREAM_STORAGE")
    if upstream:
        parts = upstream.split(",")
        if parts[0] != "local":
            raise AdoptError(
                f"server.conf: CVMFS_UPSTREAM_STORAGE={upstream}: only local storage can be adopted"
            )
        if len(parts) == 3 and Path(parts[2]).absolute() != storage:
            report.warnings.append(
                f"server.conf names the storage {parts[2]}, adopting the copy in {storage}"
            )
    if conf.get("CVMFS_USE_FILE_CHUNKING", "true").lower() == "false":
        report.warnings.append("server.conf disabled file chunking; rcds chunks files over the minimum size")
    default = ChunkParams()
    try:
        return ChunkParams(
            int(conf.get("CVMFS_MIN_CHUNK_SIZE", default.min_size)),
            int(conf.get("CVMFS_AVG_CHUNK_SIZE", default.avg_size)),
            int(conf.get("CVMFS_MAX_CHUNK_SIZE", default.max_size)),
        )
    except ValueError as exc:
        raise AdoptError(f"server.conf: bad chunk size: {exc}") from exc


def _same_key(a: signing.PublicKey, b: signing.PublicKey) -> bool:
    # By the numbers: one side may be cryptography's key, the other pkcs1's (signing verifies with pkcs1).
    x, y = a.public_numbers(), b.public_numbers()
    return (x.n, x.e) == (y.n, y.e)


def _check_keys(
    store: LocalStore,
    keys_dir: Path,
    pub_path: Path,
    fqrn: str,
    manifest: Manifest,
    signed: signing.SignedText,
    external_whitelist: bool,
) -> Whitelist:
    """The keys belong to this repository and to each other; returns the (verified) whitelist."""
    paths = {ext: keys_dir / f"{fqrn}.{ext}" for ext in ("crt", "key", "masterkey")}
    paths["pub"] = pub_path
    if external_whitelist:
        del paths["masterkey"]
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        hint = (
            "" if external_whitelist else " (a whitelist signed elsewhere, as OSG does: --external-whitelist)"
        )
        raise AdoptError(f"missing key files: {', '.join(missing)}{hint}")
    try:
        pub = signing.load_public_key(paths["pub"].read_bytes())
        local_cert = signing.load_certificate(paths["crt"].read_bytes())
        cert_key = signing.load_private_key(paths["key"].read_bytes())
        master = None if external_whitelist else signing.load_private_key(paths["masterkey"].read_bytes())
    except (SignatureError, ValueError, OSError) as exc:
        raise AdoptError(f"cannot read the keys in {keys_dir}: {exc}") from exc
    try:
        wl = Whitelist.verify(store.get(WHITELIST), fqrn, [pub], check_expiry=False)
    except (WhitelistError, SignatureError, KeyError) as exc:
        raise AdoptError(f"the whitelist does not verify with {paths['pub']} (wrong key?): {exc}") from exc
    if manifest.certificate is None:
        raise AdoptError("the manifest names no certificate")
    try:
        stored = store.get(manifest.certificate.object_name(Suffix.CERTIFICATE))
        verify(stored, manifest.certificate)
        published_pem = decompress(stored)
        manifest.verify_signature(signed, published_pem)
        published = signing.load_certificate(published_pem)
    except (ManifestError, SignatureError, KeyError, ObjectCorrupt) as exc:
        raise AdoptError(f"the published manifest does not verify with its certificate: {exc}") from exc
    if signing.parse_fingerprint(signing.certificate_fingerprint(published)) not in wl.fingerprints:
        raise AdoptError("the certificate that signed the manifest is not in the whitelist")
    der = serialization.Encoding.DER
    if local_cert.public_bytes(der) != published.public_bytes(der):
        raise AdoptError(
            f"{paths['crt']} is not the certificate that signed the published manifest (wrong key?)"
        )
    published_key = published.public_key()
    if not isinstance(published_key, rsa.RSAPublicKey) or not _same_key(cert_key.public_key(), published_key):
        raise AdoptError(f"{paths['key']} is not the private key of {paths['crt']}")
    if master is not None and not _same_key(master.public_key(), pub):
        raise AdoptError(f"{paths['masterkey']} is not the private key of {paths['pub']}")
    return wl


def _check_reflog(storage: Path, fqrn: str, manifest: Manifest, spool: Path | None) -> str:
    """The reflog is the one the manifest and ``cvmfs_server``'s checksum name; returns its checksum."""
    path = storage / REFLOG
    if not path.is_file():
        raise AdoptError(
            f"no {REFLOG} in {storage}: garbage collection needs it (cvmfs_server's 'reflog reconstruct' makes one)"
        )
    actual = ContentHash.of(path.read_bytes()).hex
    if manifest.reflog is not None and manifest.reflog.hex != actual:
        raise AdoptError(f"{REFLOG} does not match the manifest (Y={manifest.reflog.hex}, file {actual})")
    if spool is not None and (spool / REFLOG_CHECKSUM).is_file():
        kept = (spool / REFLOG_CHECKSUM).read_text().strip()
        if kept != actual:
            raise AdoptError(
                f"{spool / REFLOG_CHECKSUM} says {kept}, the reflog in {storage} is {actual}: "
                "copy the storage again after stopping cvmfs_server"
            )
    try:
        reflog = Reflog(path)
        try:
            name = reflog.properties().get("fqrn")
        finally:
            reflog.close()
    except sqlite3.DatabaseError as exc:
        raise AdoptError(f"{REFLOG} is unreadable: {exc}") from exc
    if name is not None and name != fqrn:
        raise AdoptError(f"{REFLOG} belongs to {name}, not {fqrn}")
    return actual


def _check_history(store: LocalStore, manifest: Manifest) -> None:
    if manifest.history is None:
        return
    try:
        stored = store.get(manifest.history.object_name(Suffix.HISTORY))
        verify(stored, manifest.history)
    except (KeyError, ObjectCorrupt) as exc:
        raise AdoptError(f"the history database {manifest.history.hex} is missing or damaged: {exc}") from exc
    with tempfile.NamedTemporaryFile(suffix=".db") as f:
        f.write(decompress(stored))
        f.flush()
        try:
            History(Path(f.name)).close()
        except sqlite3.DatabaseError as exc:
            raise AdoptError(f"the history database is unreadable: {exc}") from exc


def _check_catalogs(
    store: LocalStore, root: ContentHash, tmp: Path, report: AdoptReport
) -> set[tuple[bytes, str]]:
    """Every catalog of the current revision has a schema rcds writes; returns the data objects they
    reference that the content index can learn (SHA-1, zlib)."""
    objects: set[tuple[bytes, str]] = set()
    pending: list[tuple[str, ContentHash]] = [("/", root)]
    while pending:
        where, h = pending.pop()
        try:
            stored = store.get(h.object_name(Suffix.CATALOG))
            verify(stored, h)
        except (KeyError, ObjectCorrupt) as exc:
            raise AdoptError(f"catalog {h.hex} ({where}) is missing or damaged: {exc}") from exc
        path = tmp / h.hex
        path.write_bytes(decompress(stored))
        try:
            cat = Catalog(path)
        except CatalogError as exc:
            raise AdoptError(f"catalog {h.hex} ({where}): {exc}") from exc
        try:
            revision = int(cat.properties.get("schema_revision", "0"))
            if cat.schema != 2.5 or revision > MAX_SCHEMA_REVISION:
                raise AdoptError(
                    f"catalog {where} has schema {cat.properties.get('schema', '?')} revision {revision};"
                    f" rcds continues schema 2.5 up to revision {MAX_SCHEMA_REVISION} only"
                    " (publish once with cvmfs_server 2.12 to migrate the catalogs)"
                )
            objects.update(_indexable(cat))
            pending.extend((ref.path or "/", ref.hash) for ref in cat.nested())
        finally:
            cat.close()
            path.unlink()
        report.catalogs += 1
    return objects


def _indexable(cat: Catalog) -> Iterator[tuple[bytes, str]]:
    """Regular files (and their chunks) stored as rcds stores them: SHA-1, zlib, not external."""
    plain = FLAG_LINK | FLAG_EXTERNAL | HASH_ALGORITHM_MASK | COMPRESSION_MASK
    for (h,) in cat.db.execute(
        "SELECT hash FROM catalog WHERE hash IS NOT NULL AND (flags & ?) != 0 AND (flags & ?) = 0"
        " AND (flags & ?) = 0",
        (FLAG_FILE, plain, FLAG_CHUNKED),
    ):
        yield bytes(h), Suffix.NONE.value
    if "chunks" in cat.tables:
        for (h,) in cat.db.execute(
            "SELECT chunks.hash FROM chunks JOIN catalog USING (md5path_1, md5path_2) WHERE (catalog.flags & ?) = 0",
            (plain,),
        ):
            yield bytes(h), Suffix.PARTIAL.value


def _seed_index(
    store: LocalStore, index_path: Path, objects: set[tuple[bytes, str]], report: AdoptReport
) -> None:
    """Record SHA-256 of each object's content -> the object, as the content writer does when storing."""
    index = ContentIndex(index_path)
    try:
        for n, (digest, suffix) in enumerate(sorted(objects)):
            h = ContentHash(digest)
            try:
                data = decompress(store.get(h.object_name(Suffix(suffix))))
            except (KeyError, ObjectCorrupt):
                report.objects_missing += 1
                continue
            index.put(hashlib.sha256(data).digest() + suffix.encode(), digest)
            report.objects_indexed += 1
            if n % 10_000 == 9_999:
                index.flush()
    finally:
        index.close()
    if report.objects_missing:
        report.warnings.append(
            f"{report.objects_missing} objects the catalogs reference are missing or unreadable (rcds repo check)"
        )


__all__ = ["AdoptError", "AdoptReport", "adopt", "read_server_conf"]
