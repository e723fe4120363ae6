"""``rcds get``: a published CID as a plain local directory, for nodes without a CVMFS mount.

It finds the CID over HTTP (verified manifest, catalogs) and hands the directory to ``materialize``,
which downloads each object once per node cache and hard-links it into place.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import ClientError
from .locate import Found, Locator, parse_target, resolve_repositories
from .materialize import MaterializeError, MaterializeStats, materialize
from .settings import ClientSettings, load_client_settings


def materialize_found(
    locator: Locator,
    found: Found,
    dest: Path,
    cache: Path | None,
    *,
    jobs: int = 8,
    link: bool = True,
    progress: bool = True,
) -> MaterializeStats:
    try:
        reader = locator.reader(found.repository)
        return materialize(
            reader, found.repo_path, dest, cache_dir=cache, jobs=jobs, link=link, progress=progress
        )
    except MaterializeError as exc:
        raise ClientError(str(exc)) from exc


def get(
    target: str,
    dest: Path,
    settings: ClientSettings | None = None,
    *,
    jobs: int = 8,
    link: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Materialise ``target`` (a CID or /cvmfs path) at ``dest``; returns what was done, for --json."""
    settings = settings or load_client_settings()
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise ClientError(f"{dest} already exists; rcds get makes a new directory")
    wanted = parse_target(target, settings)
    with Locator(
        settings, resolve_repositories(wanted, settings), "http", cache_dir=settings.cache
    ) as locator:
        found = locator.find(wanted.cid)
        if found is None:
            raise ClientError("\n".join([f"{wanted.cid} is not published.", *locator.looked_in()]))
        stats = materialize_found(
            locator, found, dest, settings.cache, jobs=jobs, link=link, progress=progress
        )
    return {
        "cid": found.cid,
        "repository": found.repository,
        "path": found.path,
        "dest": str(dest),
        **asdict(stats),
    }


__all__ = ["get", "materialize_found"]
