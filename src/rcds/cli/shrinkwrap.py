"""``rcds shrinkwrap`` (export a subset of a repository) and ``rcds trace`` (traces to specifications).

Exit codes: 0 done; 1 error (source, specification, local I/O); 2 usage; 6 ``--lint`` found problems.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ..client.settings import parse_proxies

LINT_EXIT = 6


def _logging(verbose: bool) -> None:
    from .. import logs

    logs.configure("text", logging.INFO if verbose else logging.WARNING)


@click.command("shrinkwrap")
@click.argument("source", metavar="URL|STORAGE")
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Master public key of the repository (repeatable).",
)
@click.option("--fqrn", default=None, help="Expected repository name (checked against the manifest).")
@click.option(
    "--spec",
    "spec_files",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Specification file in the cvmfs_shrinkwrap syntax (repeatable; rules keep their order).",
)
@click.option(
    "--dialect",
    type=click.Choice(["2.12", "2.14"]),
    required=True,
    help="2.12: exclusions are final; 2.14: the last rule that covers a path wins.",
)
@click.option("--cid", "cids", multiple=True, help="Also export this CID (/<prefix>/<cid>, recursive).")
@click.option(
    "--path", "paths", multiple=True, help="Also export this path recursively (or a rule: !/x, ^/d/*)."
)
@click.option("--prefix", default="sw", show_default=True, help="Directory of the CIDs in the repository.")
@click.option("--dest", type=click.Path(path_type=Path, file_okay=False), required=True, help="Export base.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["dir", "tar", "squashfs", "oci"]),
    default="dir",
    show_default=True,
    help="What to produce: the export directory alone, or also a reproducible tarball, a squashfs image or"
    " an OCI image built from it (--output).",
)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Tarball, image or OCI layout.")
@click.option(
    "--base-image", default=None, metavar="OCI_LAYOUT[:TAG]", help="OCI: add the layer onto this image."
)
@click.option("--tag", default="latest", show_default=True, help="OCI: tag in the image layout.")
@click.option("--push", default=None, metavar="docker://HOST/NAME:TAG", help="OCI: push the image (skopeo).")
@click.option("--insecure-registry", is_flag=True, help="OCI: push over plain HTTP / without TLS checks.")
@click.option("--proxy", "proxies", multiple=True, help="HTTP proxy or a CVMFS_HTTP_PROXY string.")
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Node cache of rcds get: content found there is linked, not downloaded.",
)
@click.option("--jobs", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel downloads.")
@click.option("--gc", is_flag=True, help="Remove .data files no visible tree uses any more.")
@click.option(
    "--dry-run", "dry", is_flag=True, help="Print what each rule selects and excludes; copy nothing."
)
@click.option("--lint", is_flag=True, help="Like --dry-run, exit 6 if the lint finds problems.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def shrinkwrap(
    source: str,
    keys: tuple[Path, ...],
    fqrn: str | None,
    spec_files: tuple[Path, ...],
    dialect: str,
    cids: tuple[str, ...],
    paths: tuple[str, ...],
    prefix: str,
    dest: Path,
    fmt: str,
    output: Path | None,
    base_image: str | None,
    tag: str,
    push: str | None,
    insecure_registry: bool,
    proxies: tuple[str, ...],
    cache: Path | None,
    jobs: int,
    gc: bool,
    dry: bool,
    lint: bool,
    quiet: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Export a subset of a CVMFS repository into DEST (CVMFS shrinkwrap layout), without FUSE.

    SOURCE is a repository URL (stratum 0 or 1; several separated by ';' are tried in order) or a
    storage directory. Re-running brings DEST up to date: only what changed is copied, what the
    specification no longer selects is removed; an interrupted run continues where it stopped.
    """
    from ..shrinkwrap.api import build_rules
    from ..shrinkwrap.api import shrinkwrap as run
    from ..shrinkwrap.dryrun import format_dry_run
    from ..shrinkwrap.export import ShrinkwrapError
    from ..shrinkwrap.pack import PackError
    from ..shrinkwrap.spec import SpecError

    _logging(verbose)
    try:
        rules = build_rules(spec_files, cids, paths, prefix)
        proxy_list = [p for v in proxies for p in parse_proxies(v)] or None
        result = run(
            source,
            keys,
            dest,
            rules,
            dialect=dialect,
            fqrn=fqrn,
            proxies=proxy_list,
            cache=cache,
            jobs=jobs,
            gc=gc,
            dry=dry or lint,
            fmt=fmt,
            output=output,
            base_image=base_image,
            tag=tag,
            push=push,
            insecure_registry=insecure_registry,
            progress=not (quiet or as_json),
        )
    except (SpecError, ShrinkwrapError, PackError) as exc:
        click.echo(f"rcds: error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    elif result.dry_run is not None:
        click.echo(format_dry_run(result.dry_run), nl=False)
    else:
        s = result.stats
        assert s is not None
        click.echo(
            f"{result.fqrn} revision {result.revision} -> {result.dest}: {s.files} files, {s.directories} "
            f"directories, {s.symlinks} symlinks; {s.placed_files} placed, {s.unchanged_files} unchanged, "
            f"{s.fetched_files} downloaded ({s.downloaded_bytes} bytes), {s.cached_files} from the cache, "
            f"{s.removed_entries} removed"
        )
        if result.output:
            click.echo(result.output)
    if lint and result.dry_run is not None and result.dry_run.findings:
        sys.exit(LINT_EXIT)


@click.group("trace")
def trace() -> None:
    """CVMFS tracer files: build shrinkwrap specifications from them, or record one without CVMFS."""


@trace.command("spec")
@click.argument(
    "traces", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False)
)
@click.option(
    "--policy",
    type=click.Choice(["pdir", "exact"]),
    default="pdir",
    show_default=True,
    help="As spec_builder.py: pdir copies the parent directory of each opened file flat (^dir/*), exact only"
    " the paths the trace names.",
)
@click.option(
    "--filters",
    multiple=True,
    type=click.Choice(
        ["open", "opendir", "lookup", "statfs", "getattr", "listxattr", "getxattr", "readlink"]
    ),
    help="Leave out these calls (repeatable), as spec_builder.py --filters.",
)
@click.option(
    "--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Default stdout."
)
def trace_spec(traces: tuple[Path, ...], policy: str, filters: tuple[str, ...], output: Path | None) -> None:
    """Build one specification from one or more trace files (merged), as CVMFS's spec_builder.py."""
    from ..shrinkwrap.trace import TraceError, build_spec, read_trace

    try:
        events = [e for t in traces for e in read_trace(t)]
        text = build_spec(events, policy=policy, filters=set(filters))
    except (TraceError, OSError) as exc:
        click.echo(f"rcds: error: {exc}", err=True)
        sys.exit(1)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text, encoding="utf-8", errors="surrogateescape")


@trace.command("record", context_settings={"ignore_unknown_options": True})
@click.option("--root", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="The exported tree the workflow reads (<dest>/<fqrn>); paths are recorded relative to it.")  # fmt: skip
@click.option(
    "--output", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Trace file."
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def trace_record(root: Path, output: Path, command: tuple[str, ...]) -> None:
    """Run COMMAND under strace and write what it touched below ROOT as a CVMFS trace file."""
    from ..shrinkwrap.trace import TraceError, record_with_strace

    try:
        code, events = record_with_strace(list(command), root, output)
    except TraceError as exc:
        click.echo(f"rcds: error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{events} events written to {output}", err=True)
    sys.exit(code)
