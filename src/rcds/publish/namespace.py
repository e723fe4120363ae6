"""The CID namespace rule: each name directly under the prefix has exactly one kind.

A CID is published at ``/cvmfs/<repo>/<prefix>/<cid>`` (jobsub_lite builds that path itself), so the
one-level CID ``G`` and the group ``G`` of two-level CIDs ``G/x`` would be one directory, and whatever one
published would show up as the other. The rule that rules this out by construction:

    Each top-level name under the prefix is either a **one-level CID** (a leaf: the directory holds the
    CID's files and its ``.publisher``) or a **group** (the directory holds two-level CIDs), never both,
    across every repository the server knows (its own and its replicas of the other servers', i.e. the
    presence index) and its queue of active jobs.

The service checks it before an upload's body is read and again, under one lock with the enqueue, when
the upload is queued; a worker checks it once more against its open transaction before it writes. The
audit (``audit``, ``rcds audit``) finds the collisions that repositories made before this rule, or by two
servers that accepted conflicting uploads at the same moment, already hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..logs import fields
from .presence import PresenceIndex, scan_published_cids

log = logging.getLogger("rcds.publish")

LEAF: Final = "one-level cid"
GROUP: Final = "group"
RULE: Final = "a name is either a one-level cid or a group, never both"
QUEUE: Final = "queue"  # Claim.where of an active job


class NamespaceConflict(Exception):
    """A CID that would break the namespace rule; the message is the reason (after ``Bad request: ``)."""


@dataclass(frozen=True)
class Claim:
    """One thing that gives the top-level name ``name`` its kind."""

    name: str
    kind: str  # LEAF or GROUP
    where: str  # a repository, or QUEUE
    cid: str | None = None  # the active job's CID (queue claims only)

    def describe(self) -> str:
        if self.where == QUEUE:
            what = f"the one-level cid {self.cid}" if self.kind == LEAF else str(self.cid)
            return f"{what}, already queued"
        what = f"the one-level cid {self.name}" if self.kind == LEAF else f"the group {self.name}/"
        return f"{what} in {self.where}"


def top_name(cid: str) -> str:
    """The top-level name under the prefix that ``cid`` occupies: itself, or its group."""
    return cid.split("/", 1)[0]


def kind_of(cid: str) -> str:
    """The kind ``cid`` gives its top-level name."""
    return GROUP if "/" in cid else LEAF


class Namespace:
    """Answers "what kind is the top-level name N, and where" from the presence index and the queue."""

    def __init__(self, presence: PresenceIndex, active_named: Callable[[str], list[str]]) -> None:
        self.presence = presence
        self.active_named = active_named  # StateDB.active_named: the queue's CIDs named N or N/...

    def claims(self, name: str, skip_repository: str | None = None, queue: bool = True) -> list[Claim]:
        """Every repository (in configuration order) and active job that gives ``name`` a kind."""
        found: list[Claim] = []
        for repository in self.presence.order:
            if repository == skip_repository:
                continue
            if self.presence.is_cid(repository, name):
                found.append(Claim(name, LEAF, repository))
            if self.presence.is_group(repository, name):
                found.append(Claim(name, GROUP, repository))
        if queue:
            found.extend(Claim(name, kind_of(c), QUEUE, c) for c in self.active_named(name))
        return found

    def conflict(self, cid: str, skip_repository: str | None = None, queue: bool = True) -> str | None:
        """Why ``cid`` may not be published (the first claim of the other kind), or None."""
        kind = kind_of(cid)
        for claim in self.claims(top_name(cid), skip_repository, queue):
            if claim.kind != kind:
                return f"cid {cid} conflicts with {claim.describe()}: {RULE}"
        return None

    def check(self, cid: str) -> None:
        reason = self.conflict(cid)
        if reason is not None:
            raise NamespaceConflict(reason)


# --- the audit -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collision:
    """A breach of the rule found in published repositories."""

    name: str  # the top-level name
    problem: str  # "mixed" (a leaf here, a group there) or "nested" (a CID-like directory inside a leaf)
    repositories: tuple[str, ...]
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "problem": self.problem, "repositories": list(self.repositories),
                "detail": self.detail}  # fmt: skip


def find_collisions(
    presence: PresenceIndex, shadowed: Mapping[str, Sequence[str]], only: str | None = None
) -> list[Collision]:
    """The collisions the index shows (``only``: those that involve that repository).

    ``shadowed``: per repository, the CID-like directories ``N/x`` found inside one-level CIDs ``N``
    (``scan_cid_dirs``); the index itself never holds them.
    """
    repos = presence.order
    scope = [only] if only is not None else repos
    candidates: set[str] = set()
    for r in scope:  # the other repositories are asked name by name, never copied
        candidates |= presence.top_names(r)
    found: list[Collision] = []
    for name in sorted(candidates):
        leaf_in = tuple(r for r in repos if presence.is_cid(r, name))
        group_in = tuple(r for r in repos if presence.is_group(r, name))
        if leaf_in and group_in:
            found.append(
                Collision(name, "mixed", tuple(dict.fromkeys(leaf_in + group_in)),
                          f"{name} is a one-level cid in {', '.join(leaf_in)} and a group in {', '.join(group_in)}")
            )  # fmt: skip
    for r in scope:
        for path in sorted(shadowed.get(r, ())):
            name = top_name(path)
            found.append(
                Collision(name, "nested", (r,),
                          f"{path} in {r} looks like a cid (it holds a .publisher) inside the one-level cid {name}")
            )  # fmt: skip
    return found


@dataclass
class AuditReport:
    repositories: list[str] = field(default_factory=list)  # scanned
    skipped: list[str] = field(default_factory=list)  # no published revision (a replica not snapshotted)
    cids: int = 0
    collisions: list[Collision] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"repositories": self.repositories, "skipped": self.skipped, "cids": self.cids,
                "collisions": [c.as_dict() for c in self.collisions]}  # fmt: skip


def audit(storages: Mapping[str, Path], prefix: str) -> AuditReport:
    """Scan the live revision of every repository in ``storages`` (configuration order) for collisions."""
    report = AuditReport()
    presence = PresenceIndex(list(storages), prefix)
    shadowed: dict[str, list[str]] = {}
    for name, storage in storages.items():
        if not (storage / ".cvmfspublished").exists():
            report.skipped.append(name)
            continue
        shadowed[name] = []
        cids = scan_published_cids(storage, prefix, shadowed=shadowed[name])
        presence.replace(name, cids)
        report.repositories.append(name)
        report.cids += len(cids)
    report.collisions = find_collisions(presence, shadowed)
    return report


def log_collisions(collisions: Iterable[Collision], already: set[str]) -> None:
    """Warn once per collision (``already``: the details warned about before, updated)."""
    for c in collisions:
        if c.detail not in already:
            already.add(c.detail)
            log.warning(
                "namespace collision",
                extra=fields(name=c.name, problem=c.problem, repositories=",".join(c.repositories),
                             detail=c.detail),
            )  # fmt: skip


__all__ = [
    "GROUP", "LEAF", "AuditReport", "Claim", "Collision", "Namespace", "NamespaceConflict", "audit",
    "find_collisions", "kind_of", "log_collisions", "top_name",
]  # fmt: skip
