"""Keeping a node cache of ``rcds get`` within bounds.

Every job on a node hard-links its files from the cache (``files/``), so an entry still in some job's
directory has a link count above one: removing its cache name would free nothing and cost a download
later. Only entries no job uses are candidates. Their age is taken from the inode's ctime, which
``link(2)`` and ``unlink(2)`` update: the last time a job started or stopped using the entry.

Pruning while ``rcds get`` runs is safe for the data (entries are complete before they get their name,
and a job's own links keep its files), but a get that looked up an entry a moment before it was pruned
fails to link it and must be run again; schedule pruning at a quiet time or with a generous age.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ..cvmfs.pieces import lstat_or_none
from ..logs import fields

log = logging.getLogger("rcds.client")

TMP_MAX_AGE = 3600.0  # seconds: older temp files are leftovers of killed processes


@dataclass
class PruneReport:
    entries_removed: int = 0
    bytes_freed: int = 0
    entries_in_use: int = 0  # linked into some job's directory: never removed
    entries_kept: int = 0  # unused, but young enough (or within --max-size)
    bytes_kept: int = 0  # of the unused entries kept
    metadata_removed: int = 0  # cached manifests' certificates and catalogs, fetched again when needed
    temp_removed: int = 0
    dry_run: bool = False


def prune_cache(
    cache: Path,
    *,
    max_age: float = 7 * 86400,
    max_bytes: int | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Remove unused entries older than ``max_age`` seconds, then the oldest until ``max_bytes`` remain."""
    now = time.time() if now is None else now
    report = PruneReport(dry_run=dry_run)
    if not (cache / "files").is_dir() and not (cache / "metadata").is_dir():
        raise FileNotFoundError(f"{cache} is not an rcds node cache (no files/ or metadata/)")
    unused: list[tuple[float, int, Path]] = []  # ctime, size, path
    for path in _files(cache / "files"):
        st = lstat_or_none(str(path))
        if st is None or not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            report.entries_in_use += 1
        else:
            unused.append((st.st_ctime, st.st_size, path))
    unused.sort()  # oldest first
    keep_bytes = sum(size for _, size, _ in unused)
    for ctime, size, path in unused:
        too_old = now - ctime > max_age
        too_big = max_bytes is not None and keep_bytes > max_bytes
        if not (too_old or too_big):
            report.entries_kept += 1
            report.bytes_kept += size
            continue
        if dry_run or _unlink(path):
            report.entries_removed += 1
            report.bytes_freed += size
            keep_bytes -= size
    for path in _files(cache / "metadata"):
        st = lstat_or_none(str(path))
        if st is not None and stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age:
            report.metadata_removed += dry_run or _unlink(path)
    for path in _files(cache / "tmp"):
        st = lstat_or_none(str(path))
        if st is not None and now - st.st_ctime > TMP_MAX_AGE:
            report.temp_removed += dry_run or _unlink(path)
    log.info("cache pruned", extra=fields(cache=str(cache), **report.__dict__))
    return report


def _files(top: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, _, names in os.walk(top):
        found.extend(Path(dirpath, n) for n in names)
    return found


def _unlink(path: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


__all__ = ["PruneReport", "prune_cache"]
