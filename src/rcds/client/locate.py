"""Finding a CID in any of the repositories, through a CVMFS mount or over HTTP without one.

With a mount (the usual worker node), a CID is there when ``/cvmfs/<repo>/<prefix>/<cid>`` is a
directory, and that CID's own rather than one inside a one-level CID (``is_cid_directory``); the CVMFS
client refreshes its catalogs every TTL, so looking more often than that is pointless. Without one
(HPC nodes without FUSE), each repository is read like a CVMFS client reads it: the signed manifest is
fetched fresh (past caches), verified against the master key, and the CID is looked up in the catalogs,
through the site's proxies with failover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..cvmfs.reader import ReaderError, RepositoryReader
from ..cvmfs.signing import SignatureError
from ..cvmfs.sources import HttpSettings
from ..publish.cid import CidError, is_cid_directory, validate_cid
from .credentials import credentials_for_reading
from .errors import ClientError, ServersUnavailable
from .pubapi import PubApiClient
from .settings import ClientSettings

log = logging.getLogger("rcds.client")

Mode = Literal["auto", "mount", "http"]


@dataclass(frozen=True)
class Found:
    cid: str
    repository: str
    path: str  # /cvmfs/<repository>/<prefix>/<cid>: the name the CID has everywhere
    repo_path: str  # <prefix>/<cid>: the directory inside the repository
    local_path: Path | None  # the directory through this node's mount, if there is one
    via: str  # "mount" or the repository URLs it was read from


@dataclass(frozen=True)
class Target:
    """What to look for: a CID, and the repositories it may be in."""

    cid: str
    repositories: tuple[str, ...]


def parse_target(text: str, settings: ClientSettings) -> Target:
    """A CID, or a path ``/cvmfs/<repo>/<prefix>/<cid>`` (as ``exists`` answers), which names its repository."""
    repositories: tuple[str, ...] = ()
    cid = text
    for root in ("/cvmfs/", f"{str(settings.mount_root).rstrip('/')}/"):
        if text.startswith(root):
            parts = text[len(root) :].strip("/").split("/")
            if len(parts) < 3 or parts[1] != settings.prefix:
                raise ClientError(f"{text} is not a {root}<repository>/{settings.prefix}/<cid> path")
            repositories, cid = (parts[0],), "/".join(parts[2:])
            break
    try:
        cid = validate_cid(cid)
    except CidError as exc:
        raise ClientError(f"bad CID {cid!r}: {exc}") from exc
    return Target(cid, repositories)


class RepositoriesUnknown(ClientError):
    """No repository is configured and no publish server answered ``config`` (maybe only for now)."""


def resolve_repositories(target: Target, settings: ClientSettings) -> tuple[str, ...]:
    """The repositories to search: named by the target, configured, or else asked from the servers."""
    if target.repositories:
        return target.repositories
    if settings.repositories:
        return settings.repositories
    if not settings.servers:
        raise ClientError(
            "no repositories to search: set `repositories` (or RCDS_REPOSITORIES) or a publish server"
        )
    with PubApiClient(
        settings.servers,
        credentials_for_reading(),  # `config` needs none
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries=settings.retries,
    ) as api:
        try:
            return tuple(api.repositories())
        except ServersUnavailable as exc:
            raise RepositoriesUnknown(
                "no repositories configured and no publish server answered `config`:\n"
                + "\n".join(f"  {a}" for a in exc.attempts)
            ) from exc


class Locator:
    """Looks for CIDs in a set of repositories, keeping HTTP readers open between looks."""

    def __init__(
        self,
        settings: ClientSettings,
        repositories: tuple[str, ...],
        mode: Mode = "auto",
        cache_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.repositories = repositories
        self.mode = mode
        self._cache_dir = cache_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._readers: dict[str, RepositoryReader] = {}
        self.last_error: dict[str, str] = {}
        self.mounted = {r: self._is_mounted(r) for r in repositories}
        if mode == "mount" and not any(self.mounted.values()):
            raise ClientError(f"no CVMFS mount of {', '.join(repositories)} under {settings.mount_root}")

    def _is_mounted(self, repository: str) -> bool:
        if self.mode == "http":
            return False
        try:
            # Touching /cvmfs/<repo> is what makes autofs mount it.
            return (self.settings.mount_root / repository).is_dir()
        except OSError:
            return False

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Locator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_http(self) -> bool:
        return not all(self.mounted.values())

    def describe(self, repository: str) -> str:
        if self.mounted[repository]:
            return f"mount {self.settings.mount_root / repository}"
        return ", ".join(self.settings.repository_urls(repository)) or "no URL"

    def looked_in(self) -> list[str]:
        """``Looked in:`` and a line per repository: how it was looked at, and what was last seen."""
        return ["Looked in:"] + [
            f"  {r} via {self.describe(r)}: {self.last_error.get(r, 'not looked at')}"
            for r in self.repositories
        ]

    def find(self, cid: str) -> Found | None:
        """One look in every repository; None if the CID is in none of them (yet)."""
        repo_path = f"{self.settings.prefix}/{cid}"
        for repository in self.repositories:
            canonical = f"/cvmfs/{repository}/{repo_path}"
            if self.mounted[repository]:
                local = self.settings.mount_root / repository / repo_path
                with contextlib.suppress(OSError):
                    if local.is_dir() and self._own_on_mount(repository, cid):
                        return Found(cid, repository, canonical, repo_path, local, "mount")
                self.last_error[repository] = "not there yet"
                continue
            try:
                reader = self.reader(repository, fresh=True)
                dirent = reader.lookup(repo_path)
                own = dirent is not None and dirent.is_dir and self._own_in(reader, cid)
            except ReaderError as exc:
                self.last_error[repository] = str(exc)
                log.info("cannot read %s: %s", repository, exc)
                continue
            if own:
                return Found(cid, repository, canonical, repo_path, None, self.describe(repository))
            self.last_error[repository] = f"not in revision {reader.revision}"
        return None

    # A directory inside a one-level CID (which a tarball may have made look like a CID) is never the CID.

    def _own_on_mount(self, repository: str, cid: str) -> bool:
        top = self.settings.mount_root / repository / self.settings.prefix
        return is_cid_directory(cid, lambda path: os.path.lexists(top / path))

    def _own_in(self, reader: RepositoryReader, cid: str) -> bool:
        prefix = self.settings.prefix
        return is_cid_directory(cid, lambda path: reader.lookup(f"{prefix}/{path}") is not None)

    def reader(self, repository: str, fresh: bool = False) -> RepositoryReader:
        """An open, verified reader of ``repository`` over HTTP; ``fresh`` re-checks the manifest."""
        reader = self._readers.get(repository)
        if reader is not None:
            if fresh:
                reader.load_manifest(fresh=True)
            return reader
        keys = self.settings.public_key_files(repository)
        if not keys:
            places = ", ".join(str(p) for p in self.settings.keys)
            raise ClientError(
                f"no master public key for {repository} in {places}: pass --keys PATH (a .pub file, a"
                " directory laid out as /etc/cvmfs/keys, or the data directory of an rcds serve on this"
                " machine, e.g. --keys rcds-data), or set `keys` in the client configuration or RCDS_KEYS"
            )
        urls = self.settings.repository_urls(repository)
        if not urls:
            raise ClientError(f"no URL for {repository}: set `stratum_urls` or a publish server")
        try:
            reader = RepositoryReader.open(
                ";".join(urls),
                public_key=keys,
                fqrn=repository,
                cache_dir=self._metadata_cache(),
                proxies=list(self.settings.proxies) or None,
                settings=HttpSettings(
                    connect_timeout=self.settings.connect_timeout, read_timeout=self.settings.read_timeout
                ),
            )
        except (ValueError, SignatureError) as exc:  # what fetching raises is a ReaderError
            files = ", ".join(str(k) for k in keys)
            raise ClientError(f"cannot use the master public key of {repository} ({files}): {exc}") from exc
        self._readers[repository] = reader
        return reader

    def _metadata_cache(self) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir / "metadata"
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rcds-metadata-")
        return Path(self._tmp.name)

    def ttl(self) -> float | None:
        """The shortest catalog TTL of the repositories read over HTTP (None if none was read)."""
        ttls = [r.root_catalog.ttl for r in self._readers.values()]
        return float(min(ttls)) if ttls else None


__all__ = [
    "Found",
    "Locator",
    "Mode",
    "RepositoriesUnknown",
    "Target",
    "parse_target",
    "resolve_repositories",
]
