"""``--dry-run`` and ``--lint``: what each rule selects and excludes, before anything is copied.

Counts come from the catalogs (no object is fetched). A rule's *selection* is every entry it decides
(the rule that wins for that path); an exclusion's *removal* is what include rules would otherwise have
brought in. The lint looks for the mistakes users of ``cvmfs_shrinkwrap`` reported: rules on paths that
do not exist, exclusions that remove nothing (a no-op line that, in CVMFS 2.12, could even make a whole
tree vanish: cvmfs#3500), exclusions that remove what another rule explicitly names (in 2.12 a later
rule cannot re-include: cvmfs#4328), and a directory named without ``*`` (it is copied without its
content: cvmfs#3495/#3497).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cvmfs.reader import RepositoryReader
from .select import walk_selected
from .spec import Kind, Rule, Selector

__all__ = ["DryRun", "Finding", "RuleCount", "dry_run", "format_dry_run"]


@dataclass
class RuleCount:
    rule: Rule
    exists: bool = True
    files: int = 0
    bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    removed_files: int = 0  # exclusions: what they keep out of the export
    removed_bytes: int = 0
    removed_entries: int = 0

    @property
    def entries(self) -> int:
        return self.files + self.directories + self.symlinks


@dataclass
class Finding:
    rule: Rule
    message: str

    def __str__(self) -> str:
        return f"{self.rule.origin}: {self.rule.text}: {self.message}"


@dataclass
class DryRun:
    fqrn: str
    revision: int
    dialect: str
    counts: list[RuleCount]
    files: int = 0
    bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    passthrough_directories: int = 0
    findings: list[Finding] = field(default_factory=list)


def dry_run(reader: RepositoryReader, selector: Selector) -> DryRun:
    counts = {r.index: RuleCount(r) for r in selector.rules}
    result = DryRun(reader.fqrn, reader.revision, selector.dialect, list(counts.values()))
    for visit in walk_selected(reader, selector):
        result.directories += 1
        for c in visit.children:
            d = c.dirent
            target = counts[c.rule.index] if c.rule is not None else None
            if d.is_dir:
                if target is None:
                    result.passthrough_directories += 1
                else:
                    target.directories += 1
            elif d.is_symlink:
                result.symlinks += 1
                if target is not None:
                    target.symlinks += 1
            elif d.is_regular:
                result.files += 1
                result.bytes += d.size
                if target is not None:
                    target.files += 1
                    target.bytes += d.size
        for c in visit.excluded:
            assert c.rule is not None
            target = counts[c.rule.index]
            entries = reader.walk(c.path) if c.dirent.is_dir else [None]
            for e in entries:
                path, d = (c.path, c.dirent) if e is None else (e.path, e.dirent)
                if d.is_hidden or not selector.covered_by_include(path):
                    continue
                target.removed_entries += 1
                if d.is_regular:
                    target.removed_files += 1
                    target.removed_bytes += d.size
    _lint(reader, selector, result, counts)
    return result


def _lint(reader: RepositoryReader, selector: Selector, result: DryRun, counts: dict[int, RuleCount]) -> None:
    add = result.findings.append
    for r in selector.rules:
        count = counts[r.index]
        d = reader.lookup(r.path)
        count.exists = d is not None
        if d is None:
            add(Finding(r, f"matches nothing: {r.path or '/'} does not exist in revision {reader.revision}"))
            continue
        if r.kind is Kind.EXCLUDE:
            if count.removed_entries == 0:
                add(Finding(r, "excludes nothing that another rule selects (the line has no effect)"))
            named = [
                o
                for o in selector.rules
                if o.kind.includes
                and o.index != r.index
                and r.covers(o.path)
                and selector.decide(o.path)[1] is r
            ]
            for o in named:
                why = (
                    "exclusions are final in dialect 2.12; --dialect 2.14 lets a later rule re-include"
                    if selector.dialect == "2.12"
                    else "it comes later, so it wins"
                )
                add(
                    Finding(
                        r,
                        f"removes more than it names: also {o.path or '/'}, which {o.origin} includes ({why})",
                    )
                )
            continue
        if count.entries == 0:
            decided = selector.decide(r.path)[1]
            if decided is not None and decided.kind is Kind.EXCLUDE:
                add(Finding(r, f"has no effect: {decided.origin} ({decided.text}) excludes it"))
            else:
                add(Finding(r, "has no effect: other rules decide everything it names"))
        if r.kind is Kind.EXACT and d.is_dir and r.path:
            add(
                Finding(
                    r, f"selects the directory {r.path} without its content (write {r.path}/* to copy it)"
                )
            )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_dry_run(result: DryRun) -> str:
    lines = [f"{result.fqrn} revision {result.revision}, dialect {result.dialect}"]
    width = max([len(c.rule.text) for c in result.counts] + [10])
    for c in result.counts:
        if not c.exists:
            what = "matches nothing"
        elif c.rule.kind is Kind.EXCLUDE:
            what = f"excludes {c.removed_files} files, {_size(c.removed_bytes)} ({c.removed_entries} entries)"
        else:
            what = f"selects {c.files} files, {_size(c.bytes)}, {c.directories} directories, {c.symlinks} symlinks"
        lines.append(f"  {c.rule.text:<{width}}  {what}   [{c.rule.origin}]")
    lines.append(f"  pass-through directories: {result.passthrough_directories}")
    lines.append(
        f"total: {result.files} files, {_size(result.bytes)}, {result.directories} directories, "
        f"{result.symlinks} symlinks"
    )
    if result.findings:
        lines.append(f"lint: {len(result.findings)} finding(s)")
        lines.extend(f"  {f}" for f in result.findings)
    else:
        lines.append("lint: no findings")
    return "\n".join(lines) + "\n"
