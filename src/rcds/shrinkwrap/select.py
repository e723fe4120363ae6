"""Walking the part of a repository that a specification selects, straight from the catalogs.

Only directories the rules reach are listed: a directory under a recursive or flat rule is listed from
its catalog, any other selected directory only looks up the names the rules give for it. So a rule
naming ten files of a repository with millions of entries costs ten lookups, not a full walk, and memory
holds one directory listing per level of the walk (depth first).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..cvmfs.catalog import Dirent
from ..cvmfs.reader import RepositoryReader
from .spec import ALL, Rule, Selector

__all__ = ["Child", "DirVisit", "list_children", "walk_selected"]


@dataclass
class Child:
    name: str
    path: str  # repository path
    dirent: Dirent
    rule: Rule | None  # the rule that selected (or excluded) it; None for pass-through directories


@dataclass
class DirVisit:
    """One selected directory and what of its content the specification selects and excludes."""

    path: str
    dirent: Dirent
    depth: int
    children: list[Child] = field(default_factory=list)  # selected, sorted by name
    excluded: list[Child] = field(default_factory=list)  # left out by an exclusion rule


def list_children(reader: RepositoryReader, path: str, names: set[str] | None = ALL) -> list[Dirent]:
    """The visible entries of a directory (chunk lists loaded), nested catalogs crossed; ``names``
    limits them to those names (looked up one by one instead of listing the directory)."""
    out: list[Dirent] = []
    if names is ALL:
        _, cat = reader.catalog_for(path)
        for row in cat.listdir(path, with_chunks=True):
            if row.is_nested_mountpoint:
                # The mountpoint row is a copy; the nested catalog's root row is the authority.
                row = reader.catalog_for(f"{path}/{row.name}")[1].lookup(f"{path}/{row.name}") or row
            if not row.is_hidden:
                out.append(row)
        return out
    for name in sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape")):
        d = reader.lookup(f"{path}/{name}")
        if d is not None and not d.is_hidden:
            out.append(d)
    return out


def walk_selected(reader: RepositoryReader, selector: Selector, top: str = "") -> Iterator[DirVisit]:
    """Every selected directory, parents before children, depth first."""
    root = reader.stat(top)
    stack: list[tuple[str, Dirent, int]] = [(top, root, 0)]
    while stack:
        path, dirent, depth = stack.pop()
        visit = DirVisit(path, dirent, depth)
        uniform = selector.same_for_every_child(path)
        decision: tuple[bool, Rule | None] | None = None
        for d in list_children(reader, path, selector.child_candidates(path)):
            child_path = f"{path}/{d.name}"
            if decision is None or not uniform:
                decision = selector.decide(child_path)
            selected, rule = decision
            if selected:
                visit.children.append(Child(d.name, child_path, d, rule))
            elif rule is not None:
                visit.excluded.append(Child(d.name, child_path, d, rule))
        yield visit
        for c in reversed(visit.children):
            if c.dirent.is_dir:
                stack.append((c.path, c.dirent, depth + 1))
