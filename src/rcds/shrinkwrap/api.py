"""``rcds shrinkwrap`` as a function: source, selection, destination, format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cvmfs.reader import ReaderError, RepositoryReader
from ..cvmfs.sources import SourceError
from ..publish.cid import CidError, validate_cid
from .dryrun import DryRun, dry_run
from .export import ExportStats, ShrinkwrapError, export
from .spec import Kind, Rule, Selector, SpecError, parse_line, read_spec

__all__ = ["ShrinkwrapResult", "build_rules", "open_repository", "shrinkwrap"]

FORMATS = ("dir", "tar", "squashfs", "oci")


@dataclass
class ShrinkwrapResult:
    fqrn: str
    revision: int
    dest: str
    format: str
    stats: ExportStats | None = None
    dry_run: DryRun | None = None
    output: str | None = None  # the tarball, image or OCI layout
    image: dict[str, Any] = field(default_factory=dict)  # OCI: digests, tag, pushed reference

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "repository": self.fqrn,
            "revision": self.revision,
            "dest": self.dest,
            "format": self.format,
            "output": self.output,
        }
        if self.stats is not None:
            out.update(asdict(self.stats))
        if self.image:
            out["image"] = self.image
        if self.dry_run is not None:
            out["findings"] = [str(f) for f in self.dry_run.findings]
        return out


def build_rules(
    spec_files: Sequence[Path] = (), cids: Sequence[str] = (), paths: Sequence[str] = (), prefix: str = "sw"
) -> list[Rule]:
    """The rules of the spec files in order, then one recursive rule per CID (``/<prefix>/<cid>*``) and
    per path given on the command line (a path ending in a rule character is taken as a rule)."""
    rules: list[Rule] = []
    for f in spec_files:
        rules.extend(read_spec(Path(f), start=len(rules)))
    for cid in cids:
        try:
            validate_cid(cid)
        except CidError as exc:
            raise SpecError(f"--cid {cid}: {exc}") from exc
        rule = parse_line(f"/{prefix.strip('/')}/{cid}/*", len(rules), "command line")
        assert rule is not None
        rules.append(rule)
    for p in paths:
        text = p if p.endswith("*") or p[:1] in "!^" else p.rstrip("/") + "/*"
        rule = parse_line(text if text[:1] in "/!^" else "/" + text, len(rules), "command line")
        if rule is None:
            raise SpecError(f"--path {p!r} is empty")
        rules.append(rule)
    if not rules:
        raise SpecError("nothing selected: give --spec, --cid or --path")
    if all(r.kind is Kind.EXCLUDE for r in rules):
        raise SpecError("the specification only excludes: nothing would be exported")
    return rules


def open_repository(
    location: str,
    keys: Sequence[Path],
    fqrn: str | None = None,
    proxies: Sequence[str] | None = None,
    cache: Path | None = None,
) -> RepositoryReader:
    """A trusted reader: a storage directory, or URLs (``;``-separated, tried in order) through proxies."""
    if not keys:
        raise ShrinkwrapError("a master public key (--key) is needed to trust the repository")
    try:
        return RepositoryReader.open(
            location,
            public_key=[Path(k) for k in keys],
            fqrn=fqrn,
            cache_dir=(cache / "metadata") if cache is not None else None,
            proxies=list(proxies) if proxies else None,
        )
    except (ReaderError, SourceError, OSError, ValueError) as exc:
        raise ShrinkwrapError(f"cannot open the repository at {location}: {exc}") from exc


def shrinkwrap(
    location: str,
    keys: Sequence[Path],
    dest: Path,
    rules: list[Rule],
    *,
    dialect: str,
    fqrn: str | None = None,
    proxies: Sequence[str] | None = None,
    cache: Path | None = None,
    jobs: int = 8,
    gc: bool = False,
    dry: bool = False,
    fmt: str = "dir",
    output: Path | None = None,
    base_image: str | None = None,
    tag: str = "latest",
    push: str | None = None,
    insecure_registry: bool = False,
    progress: bool = True,
) -> ShrinkwrapResult:
    """Export the selection into ``dest`` and, for ``fmt`` other than ``dir``, pack it into ``output``."""
    if fmt not in FORMATS:
        raise ShrinkwrapError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt != "dir" and output is None and not dry:
        raise ShrinkwrapError(f"--format {fmt} needs --output")
    selector = Selector(rules, dialect)
    reader = open_repository(location, keys, fqrn, proxies, cache)
    with reader:
        result = ShrinkwrapResult(reader.fqrn, reader.revision, str(dest), fmt)
        if dry:
            result.dry_run = dry_run(reader, selector)
            return result
        options = {"format": fmt, "jobs": jobs, "cache": str(cache) if cache else None, "gc": gc}
        result.stats = export(
            reader,
            selector,
            dest,
            cache_dir=cache,
            jobs=jobs,
            progress=progress,
            gc=gc,
            source=location,
            options=options,
        )
    if fmt == "dir":
        return result
    from . import pack

    assert output is not None
    tree = Path(dest) / result.fqrn
    if fmt == "tar":
        pack.write_tar(tree, Path(output), result.fqrn)
    elif fmt == "squashfs":
        pack.write_squashfs(tree, Path(output))
    else:
        result.image = pack.write_oci(
            tree,
            Path(output),
            result.fqrn,
            tag=tag,
            base=base_image,
            revision=result.revision,
        )
        if push:
            result.image["pushed"] = pack.push_oci(Path(output), tag, push, insecure=insecure_registry)
    result.output = str(output)
    return result
