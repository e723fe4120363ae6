"""``rcds publish``, ``rcds wait`` and ``rcds get``: the client side of the command line.

Exit codes (also in docs/client.md): 0 done; 1 error (bad input, configuration, local I/O); 2 usage;
3 timed out; 4 no server could be reached or gave a usable answer; 5 refused or failed by the server.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..client.errors import ClientError
from ..client.jobcli import get_output, reading_settings, wait_output  # shared with the job client
from ..client.settings import ClientSettings, load_client_settings, server_url
from ..client.tarball import DEFAULT_EXCLUDES
from ..tomlconfig import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _client_command(func: F) -> F:
    """Client errors become one clear message on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ClientError as exc:
            click.echo(f"rcds: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ConfigError as exc:
            click.echo(f"rcds: configuration error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _logging(verbose: bool) -> None:
    from .. import logs

    logs.configure("text", logging.INFO if verbose else logging.WARNING)


def _settings(**overrides: Any) -> ClientSettings:
    return load_client_settings().with_overrides(**overrides)


def _servers(values: tuple[str, ...]) -> tuple[str, ...] | None:
    try:
        return tuple(server_url(v) for v in values) if values else None
    except ConfigError as exc:  # a mistyped --server is bad input, not a configuration file problem
        raise ClientError(f"--server: {exc}") from exc


_server_option = click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="URL",
    help="Publish server (repeatable; default: RCDS_SERVERS or the client configuration).",
)
_verbose_option = click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")


def _reading_options(func: F) -> F:
    """Where and how to read repositories without a mount (shared by wait and get)."""
    for option in reversed(
        [
            click.option(
                "--repository", "repositories", multiple=True, help="Repository to search (repeatable)."
            ),
            click.option(
                "--stratum-url",
                "stratum_urls",
                multiple=True,
                metavar="URL",
                help="Repository URL template with @fqrn@ (repeatable; default: <server>/cvmfs/@fqrn@).",
            ),
            click.option(
                "--proxy",
                "proxies",
                multiple=True,
                help="HTTP proxy, or a CVMFS_HTTP_PROXY string like 'http://a:3128|http://b:3128;DIRECT'.",
            ),
            click.option(
                "--keys",
                type=click.Path(path_type=Path, exists=True),
                multiple=True,
                help="Where the repositories' master public keys are: a .pub file, a directory laid out as"
                " /etc/cvmfs/keys (the default), or the data directory of an rcds serve on this machine"
                " (repeatable).",
            ),
            click.option("--prefix", default=None, help="The servers' CID directory (default sw)."),
        ]
    ):
        func = option(func)
    return func


def _reading_settings(
    servers: tuple[str, ...],
    repositories: tuple[str, ...],
    stratum_urls: tuple[str, ...],
    proxies: tuple[str, ...],
    keys: tuple[Path, ...],
    prefix: str | None,
    cache: Path | None,
) -> ClientSettings:
    """The settings with the options of ``_reading_options`` (and ``--server``, ``--cache``) applied."""
    return reading_settings(servers, repositories, stratum_urls, proxies, keys, prefix, cache)


# --- publish -------------------------------------------------------------------------------------


@click.command("publish")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@_server_option
@click.option(
    "--group", default=None, help="First half of the CID (default: configuration, else your user name)."
)
@click.option("--cid", default=None, help="Publish under this CID instead of <group>/<sha256>.")
@click.option(
    "--exclude", "excludes", multiple=True, metavar="PATTERN", help="Leave out matching names or paths."
)
@click.option(
    "--no-default-excludes",
    is_flag=True,
    help=f"Keep what is left out by default: {' '.join(DEFAULT_EXCLUDES)}.",
)
@click.option("--wait", "wait_", is_flag=True, help="Wait until the CID is published.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
@click.option("--dry-run", is_flag=True, help="Only compute and print the CID.")
@click.option(
    "--tmpdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where to write the compressed tarball before the upload (default: $TMPDIR).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_json_option
@_verbose_option
@_client_command
def publish(
    source: Path,
    servers: tuple[str, ...],
    group: str | None,
    cid: str | None,
    excludes: tuple[str, ...],
    no_default_excludes: bool,
    wait_: bool,
    timeout: float,
    dry_run: bool,
    tmpdir: Path | None,
    quiet: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Publish a directory or a tarball; print its CID and path.

    A directory becomes a reproducible tarball, so the same tree always has the same CID and is uploaded
    once. An already published CID is not uploaded again; its last-use time is refreshed instead.
    """
    from ..client.publish import PRESENT, QUEUED
    from ..client.publish import publish as do_publish

    _logging(verbose)
    settings = _settings(servers=_servers(servers), group=group)
    patterns = (*(() if no_default_excludes else DEFAULT_EXCLUDES), *excludes)
    result = do_publish(
        source,
        settings,
        cid=cid,
        excludes=patterns,
        wait=wait_,
        timeout=timeout,
        progress=not quiet,
        tmpdir=tmpdir,
        dry_run=dry_run,
    )
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(result.cid)
    if result.path:
        click.echo(result.path)
    if result.state == PRESENT:
        click.echo(f"already published (last-use time refreshed on {result.server})", err=True)
    elif result.state == QUEUED:
        # Say plainly that nothing checked the outcome: a rejected tarball shows only to whoever waits.
        what = (
            f"uploaded {result.uploaded_bytes:,} bytes to {result.server}"
            if result.uploaded_bytes
            else f"{result.server} is already publishing it"
        )
        click.echo(
            f"{what}; did not wait for the publish to finish: --wait waits, and so does a job's"
            f" `rcds wait {result.cid}`; both report a rejected upload with the server's reason",
            err=True,
        )


# --- wait ----------------------------------------------------------------------------------------


@click.command("wait")
@click.argument("target", metavar="CID|/cvmfs/REPO/PREFIX/CID")
@click.option("--timeout", type=float, default=1200.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "mount", "http"]),
    default="auto",
    show_default=True,
    help="Look through the CVMFS mount, over HTTP, or the mount where there is one.",
)
@click.option("--link", type=click.Path(path_type=Path), default=None, help="Make this symlink to the code.")
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write `export` lines here: RCDS_* and jobsub's INPUT_TAR_DIR_LOCAL and INPUT_TAR_FILE"
    " (other variables already in the file are kept).",
)
@click.option(
    "--index",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="N >= 1: name the variables as jobsub does for its N-th additional tarball (INPUT_TAR_DIR_LOCAL_N...).",
)
@click.option("--touch", is_flag=True, help="Refresh the CID's last-use time on the publish servers.")
@click.option(
    "--get",
    "get_dest",
    type=click.Path(path_type=Path),
    default=None,
    help="Without a mount: copy the code into this new directory once found (as rcds get).",
)
@click.option(
    "--cache", type=click.Path(path_type=Path, file_okay=False), default=None, help="Node cache for --get."
)
@click.option(
    "--max-interval", type=float, default=None, help="Longest pause between looks (default: the TTL)."
)
@click.option("--mount-root", type=click.Path(path_type=Path), default=None, help="Default /cvmfs.")
@click.option(
    "--follow",
    is_flag=True,
    help="Over HTTP: look again as soon as a publish server announces a new revision.",
)
@_reading_options
@_server_option
@_json_option
@_verbose_option
@_client_command
def wait(
    target: str,
    timeout: float,
    mode: str,
    link: Path | None,
    env_file: Path | None,
    index: int,
    touch: bool,
    get_dest: Path | None,
    cache: Path | None,
    max_interval: float | None,
    mount_root: Path | None,
    follow: bool,
    repositories: tuple[str, ...],
    stratum_urls: tuple[str, ...],
    proxies: tuple[str, ...],
    keys: tuple[Path, ...],
    prefix: str | None,
    servers: tuple[str, ...],
    as_json: bool,
    verbose: bool,
) -> None:
    """Wait until a CID is published, then link it where the job expects it.

    Prints the directory that holds the code (through the mount, or the --get copy).
    """
    from ..client.wait import wait as do_wait

    _logging(verbose)
    settings = _reading_settings(
        servers, repositories, stratum_urls, proxies, keys, prefix, cache
    ).with_overrides(mount_root=mount_root)
    result = do_wait(
        target,
        settings,
        timeout=timeout,
        mode=mode,  # type: ignore[arg-type]
        max_delay=max_interval,
        link=link,
        env_file=env_file,
        touch=touch,
        get_dest=get_dest,
        progress=not as_json,
        index=index,
        follow=follow,
    )
    click.echo(wait_output(result, as_json, index, link.name if link is not None else None))


# --- get -----------------------------------------------------------------------------------------


@click.command("get")
@click.argument("target", metavar="CID|/cvmfs/REPO/PREFIX/CID")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Node-wide cache: objects are downloaded once per node and hard-linked into DEST.",
)
@click.option("--jobs", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel downloads.")
@click.option("--copy", is_flag=True, help="Copy files out of the cache instead of hard-linking them.")
@_reading_options
@_server_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_json_option
@_verbose_option
@_client_command
def get(
    target: str,
    dest: Path,
    cache: Path | None,
    jobs: int,
    copy: bool,
    repositories: tuple[str, ...],
    stratum_urls: tuple[str, ...],
    proxies: tuple[str, ...],
    keys: tuple[Path, ...],
    prefix: str | None,
    servers: tuple[str, ...],
    quiet: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Copy a published CID into the new directory DEST, over HTTP, without a CVMFS mount.

    Signatures and every object's hash are verified. DEST appears complete or not at all; an interrupted
    get resumes from what it already downloaded.
    """
    from ..client.get import get as do_get

    _logging(verbose)
    settings = _reading_settings(servers, repositories, stratum_urls, proxies, keys, prefix, cache)
    result = do_get(target, dest, settings, jobs=jobs, link=not copy, progress=not (quiet or as_json))
    click.echo(get_output(result, dest, as_json))


# --- cache ---------------------------------------------------------------------------------------


@click.group("cache")
def cache() -> None:
    """Look after a node cache of rcds get."""


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("iBb"), ""
    if number and number[-1].upper() in units:
        number, unit = number[:-1], number[-1].upper()
    try:
        return int(float(number) * units[unit])
    except ValueError as exc:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 500M, 20G)") from exc


@cache.command("prune")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--max-age-days", type=float, default=7.0, show_default=True, help="Remove unused entries older."
)
@click.option(
    "--max-size", default=None, help="Then remove the oldest unused entries down to this (e.g. 20G)."
)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@_json_option
@_verbose_option
@_client_command
def cache_prune(
    directory: Path, max_age_days: float, max_size: str | None, dry_run: bool, as_json: bool, verbose: bool
) -> None:
    """Remove node-cache entries no job uses (never the ones linked into a job's directory)."""
    from ..client.cache import prune_cache

    _logging(verbose)
    try:
        report = prune_cache(
            directory,
            max_age=max_age_days * 86400,
            max_bytes=_size(max_size) if max_size else None,
            dry_run=dry_run,
        )
    except FileNotFoundError as exc:
        raise ClientError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.__dict__))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {report.entries_removed} entries ({report.bytes_freed:,} bytes); kept {report.entries_in_use}"
        f" in use and {report.entries_kept} unused ({report.bytes_kept:,} bytes)"
    )
