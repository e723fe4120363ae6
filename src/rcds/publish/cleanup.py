"""Expiry of unused CIDs, one repository at a time.

A CID expires when its newest last-use time is more than ``maxdays`` days old. The newest time is the
latest of: this server's state (updates, touches, publishes), the ts records in *every* repository this
server can read (its own and its replicas of the other servers', so a touch on another server counts),
and the CID directory's own mtime (its publish). A ts record whose CID is in no repository is an orphan
and goes too.

Removal is one revision of the repository being cleaned; the caller (the service) keeps that
repository's publish worker paused meanwhile, and garbage collection follows (``rcds.cvmfs.gc``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..cvmfs.repository import Repository
from ..storage import MANIFEST, ObjectStore
from .lastuse import read_records, remove_empty_group, remove_records
from .presence import StorageView, scan_cid_dirs

log = logging.getLogger("rcds.cleanup")

DAY = 86400


@dataclass
class Expired:
    cid: str
    last_used: float
    source: str  # where the newest time came from: "state", "ts:<repository>", "published"


@dataclass
class CleanupPlan:
    repository: str
    revision: int
    expired: list[Expired] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # ts records in this repository without a CID
    kept: int = 0


def plan_cleanup(
    name: str,
    storages: Mapping[str, Path | ObjectStore],
    access_times: Mapping[str, float],
    prefix: str,
    maxdays: float,
    now: float,
) -> CleanupPlan:
    """What cleanup of repository ``name`` would remove; ``storages`` are all repositories readable here
    (a directory, or the store of a repository whose public files are in a bucket)."""
    views = {
        r: StorageView(p)
        for r, p in storages.items()
        if (p.exists(MANIFEST) if isinstance(p, ObjectStore) else (p / MANIFEST).exists())
    }
    try:
        cids_by_repo = {r: scan_cid_dirs(v, prefix) for r, v in views.items()}
        ts_by_repo = {r: read_records(v) for r, v in views.items()}
        plan = CleanupPlan(name, views[name].revision)
        horizon = now - maxdays * DAY
        for cid, dirent in sorted(cids_by_repo[name].items()):
            newest, source = float(dirent.mtime), "published"
            stored = access_times.get(cid)
            if stored is not None and stored > newest:
                newest, source = stored, "state"
            for repo, records in ts_by_repo.items():
                rec = records.get(cid)
                if rec is not None and rec.mtime > newest:
                    newest, source = float(rec.mtime), f"ts:{repo}"
            if newest < horizon:
                plan.expired.append(Expired(cid, newest, source))
            else:
                plan.kept += 1
        expired = {e.cid for e in plan.expired}  # their records go with them
        for cid in sorted(ts_by_repo[name]):
            if cid not in expired and not any(cid in cids for cids in cids_by_repo.values()):
                plan.orphans.append(cid)
        return plan
    finally:
        for v in views.values():
            v.close()


def apply_cleanup(
    repo: Repository, plan: CleanupPlan, prefix: str, clock: Callable[[], float] | None = None
) -> int | None:
    """Remove the plan's CIDs and orphan ts records in one revision; returns it (None: nothing to do)."""
    if not plan.expired and not plan.orphans:
        return None
    with repo.transaction() as txn:
        if clock is not None:
            txn.clock = clock
        for e in plan.expired:
            txn.remove(f"/{prefix}/{e.cid}")
            remove_empty_group(txn, f"/{prefix}", e.cid)
        remove_records(txn, [e.cid for e in plan.expired] + plan.orphans)
        return txn.commit().revision


__all__ = ["CleanupPlan", "Expired", "apply_cleanup", "plan_cleanup"]
