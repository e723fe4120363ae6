"""``rcds serve`` and ``rcds repo ...``: the server side of the command line."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from ..cvmfs.checker import check_repository
from ..cvmfs.reader import ReaderError, RepositoryReader
from ..cvmfs.repository import DEFAULT_TTL, Repository, RepositoryError
from ..cvmfs.store import PRIVATE_DIR
from ..cvmfs.writer import TransactionError


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="TOML configuration file. Without it: the embedded local default (two repositories, 127.0.0.1).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("rcds-data"),
    show_default=True,
    help="Embedded default only: where repositories and the queue live.",
)
@click.option("--port", type=int, default=8080, show_default=True, help="Embedded default only: HTTP port.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def serve(config_path: Path | None, data_dir: Path, port: int, log_format: str) -> None:
    """Run the publish server: /pubapi, /metrics and /cvmfs/<repo>/ on one port."""
    from .. import logs
    from ..publish.config import embedded_default, load_settings
    from ..tomlconfig import ConfigError
    from ..web.server import run

    logs.configure(log_format)
    try:
        settings = load_settings(config_path) if config_path else embedded_default(data_dir, port)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc
    run(settings)


@click.group()
def repo() -> None:
    """Create, inspect, change, check and serve repositories (stratum 0)."""


def _open_repo(storage: Path) -> Repository:
    try:
        return Repository(storage)
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from exc


@repo.command("create")
@click.argument("fqrn")
@click.option("--storage", type=click.Path(path_type=Path), required=True, help="Public storage directory.")
@click.option("--ttl", type=int, default=DEFAULT_TTL, show_default=True, help="Root catalog TTL in seconds.")
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Where to keep the keys (default: <storage>/{PRIVATE_DIR}/keys).",
)
def repo_create(fqrn: str, storage: Path, ttl: int, keys_dir: Path | None) -> None:
    """Create repository FQRN: keys, certificate, whitelist, empty root catalog, signed manifest."""
    try:
        r = Repository.create(fqrn, storage, ttl=ttl, keys_dir=keys_dir)
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created {fqrn} in {storage} (revision {r.manifest().revision}, TTL {ttl} s)")
    click.echo(f"master public key: {r.public_key_path}")


@repo.command("info")
@click.option("--storage", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def repo_info(storage: Path, as_json: bool) -> None:
    """Show revision, timestamps and whitelist expiry; warn when the whitelist is close to expiry."""
    r = _open_repo(storage)
    m = r.manifest()
    wl = r.whitelist()
    info = {
        "fqrn": r.fqrn,
        "revision": m.revision,
        "published": dt.datetime.fromtimestamp(m.timestamp, dt.UTC).isoformat(),
        "root_catalog": m.root_catalog.hex,
        "ttl": m.ttl,
        "whitelist_expires": wl.expires.isoformat(),
        "public_key": str(r.public_key_path),
    }
    warning = r.whitelist_warning()
    if as_json:
        click.echo(json.dumps({**info, "warning": warning}))
    else:
        for k, v in info.items():
            click.echo(f"{k:18} {v}")
    if warning:
        click.secho(f"WARNING: {warning}", fg="yellow", err=True)


@repo.command("resign")
@click.option("--storage", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--days", type=int, default=30, show_default=True, help="Validity of the new whitelist.")
def repo_resign(storage: Path, days: int) -> None:
    """Sign a fresh whitelist with the master key (do this before the old one expires)."""
    r = _open_repo(storage)
    wl = r.resign(days)
    click.echo(f"whitelist of {r.fqrn} valid until {wl.expires:%Y-%m-%d %H:%M} UTC")


@repo.command("add")
@click.option("--storage", type=click.Path(path_type=Path, exists=True), required=True)
@click.argument("path")
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--nested/--no-nested", default=True, show_default=True, help="Give the tree its own catalog.")
def repo_add(storage: Path, path: str, source: Path, nested: bool) -> None:
    """Publish directory SOURCE at PATH (replacing what is there) as a new revision."""
    r = _open_repo(storage)
    try:
        with r.transaction() as txn:
            n = txn.add_directory(path, source, nested=nested)
            result = txn.commit()
    except (TransactionError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    s = result.stats
    click.echo(
        f"revision {result.revision}: {n} entries, {s.bytes_in} bytes in, {s.objects_written} new objects "
        f"({s.bytes_written} bytes), {s.pieces_from_index} reused, {result.seconds:.2f} s commit"
    )


@repo.command("remove")
@click.option("--storage", type=click.Path(path_type=Path, exists=True), required=True)
@click.argument("paths", nargs=-1, required=True)
def repo_remove(storage: Path, paths: tuple[str, ...]) -> None:
    """Remove PATHS (and everything below them) in one new revision."""
    r = _open_repo(storage)
    try:
        with r.transaction() as txn:
            missing = [p for p in paths if not txn.remove(p)]
            if missing:
                raise click.ClickException(f"not found: {', '.join(missing)}")
            result = txn.commit()
    except TransactionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revision {result.revision}")


def _reader(
    location: str,
    key: Path | None,
    ignore_expiry: bool = False,
    strict: bool = True,
    proxies: tuple[str, ...] = (),
) -> RepositoryReader:
    if key is None:
        local = Path(location)
        try:
            key = Repository(local).public_key_path
        except RepositoryError as exc:
            raise click.ClickException(
                "--key is needed for a repository that is not a local rcds storage"
            ) from exc
    try:
        return RepositoryReader.open(
            location,
            key,
            check_whitelist_expiry=not ignore_expiry,
            strict=strict,
            proxies=list(proxies) or None,
        )
    except ReaderError as exc:
        raise click.ClickException(str(exc)) from exc


_location = click.argument("location")
_key = click.option(
    "--key",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Master public key (default: the storage's own key).",
)
_proxy = click.option(
    "--proxy", "proxies", multiple=True, help="HTTP proxy URL or DIRECT (repeatable, in order)."
)


@repo.command("check")
@_location
@_key
@_proxy
@click.option(
    "--no-data", is_flag=True, help="Check that objects exist without downloading and hashing them."
)
@click.option("--ignore-expiry", is_flag=True, help="Report an expired whitelist as a warning only.")
def repo_check(
    location: str, key: Path | None, proxies: tuple[str, ...], no_data: bool, ignore_expiry: bool
) -> None:
    """Verify a repository (storage directory or URL) against the format's invariants."""
    reader = _reader(location, key, ignore_expiry, strict=False, proxies=proxies)
    try:
        report = check_repository(reader, verify_objects=not no_data)
    finally:
        reader.close()
    for issue in report.issues:
        click.echo(str(issue))
    status = "OK" if report.ok else f"{len(report.errors)} ERRORS"
    click.echo(
        f"{status}: revision {reader.manifest.revision}, {report.catalogs} catalogs, {report.entries} entries, "
        f"{report.objects} objects"
    )
    sys.exit(0 if report.ok else 1)


@repo.command("ls")
@_location
@click.argument("path", default="/")
@_key
@_proxy
def repo_ls(location: str, path: str, key: Path | None, proxies: tuple[str, ...]) -> None:
    """List a directory of a repository."""
    with _reader(location, key, proxies=proxies) as reader:
        try:
            entries = reader.listdir(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise click.ClickException(f"{exc.__class__.__name__}: {path}") from exc
        for d in entries:
            kind = "d" if d.is_dir else "l" if d.is_symlink else "-" if d.is_regular else "s"
            target = f" -> {d.symlink}" if d.is_symlink else ""
            click.echo(f"{kind}{d.mode & 0o7777:04o} {d.size:>12} {d.name}{target}")


@repo.command("cat")
@_location
@click.argument("path")
@_key
@_proxy
def repo_cat(location: str, path: str, key: Path | None, proxies: tuple[str, ...]) -> None:
    """Write a file of a repository to standard output."""
    with _reader(location, key, proxies=proxies) as reader:
        try:
            d = reader.stat(path)
            out = sys.stdout.buffer
            for block in reader.iter_content(d):
                out.write(block)
        except (FileNotFoundError, ReaderError) as exc:
            raise click.ClickException(str(exc)) from exc


@repo.command("serve")
@click.option(
    "--storage",
    "storages",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="Storage directory to serve (repeatable).",
)
@click.option(
    "--create",
    "create_fqrn",
    default=None,
    metavar="FQRN",
    help="Create the (single) storage as repository FQRN first if it does not exist yet.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def repo_serve(storages: tuple[Path, ...], create_fqrn: str | None, host: str, port: int) -> None:
    """Serve storage directories over HTTP at /cvmfs/<fqrn>/ like a stock stratum 0."""
    from ..web.repo_http import run

    if create_fqrn:
        if len(storages) != 1:
            raise click.ClickException("--create takes exactly one --storage")
        if not (storages[0] / PRIVATE_DIR / "repo.json").exists():
            Repository.create(create_fqrn, storages[0])
            click.echo(f"created {create_fqrn} in {storages[0]}")
    repos = {}
    for s in storages:
        r = _open_repo(s)
        repos[r.fqrn] = r.storage
        warning = r.whitelist_warning()
        if warning:
            click.secho(f"WARNING {r.fqrn}: {warning}", fg="yellow", err=True)
    run(repos, host=host, port=port)
