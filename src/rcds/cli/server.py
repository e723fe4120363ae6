"""``rcds serve`` and ``rcds repo ...``: the server side of the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

# Every command here needs the server extra, whose modules are now imported only where used (numpy by the
# chunker): look for it up front, so that a missing extra is named before any work, not half-way through.
if importlib.util.find_spec("numpy") is None:
    raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

from ..cvmfs.checker import check_repository
from ..cvmfs.errors import TransactionError
from ..cvmfs.gc import GcReport, ProgressFn
from ..cvmfs.manifest import Manifest, ManifestError
from ..cvmfs.reader import ReaderError, RepositoryReader
from ..cvmfs.repository import DEFAULT_TTL, Repository, RepositoryError
from ..publish.config import RepositorySettings, ServiceSettings
from ..storage import PRIVATE_DIR
from ..storage.local import LocalStore


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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text, or as one JSON object each (for log collectors).",
)
def serve(config_path: Path | None, data_dir: Path, port: int, log_format: str) -> None:
    """Run the publish server: /pubapi, /metrics and /cvmfs/<repo>/ on one port."""
    from .. import logs
    from ..publish.config import embedded_default, load_settings
    from ..tomlconfig import ConfigError
    from ..web.server import ListenError, run

    logs.configure(log_format)
    try:
        settings = load_settings(config_path) if config_path else embedded_default(data_dir, port)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc
    try:
        run(settings)
    except ListenError as exc:
        click.echo(f"rcds serve: {exc}", err=True)
        sys.exit(1)


def _service_settings(config_path: Path | None, data_dir: Path) -> ServiceSettings:
    from ..publish.config import embedded_default, load_settings
    from ..tomlconfig import ConfigError

    try:
        return load_settings(config_path) if config_path else embedded_default(data_dir)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc


def _when(text: str | None) -> float | None:
    """``--at``: epoch seconds, or an ISO 8601 date/time (local time unless it names a zone)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise click.BadParameter(f"not a time: {text!r} (epoch seconds or 2026-12-24T03:00)") from exc


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The server's TOML configuration (default: the embedded default under --data-dir).",
)
_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("rcds-data"),
    show_default=True,
    help="Without --config: the embedded default's data directory (as given to rcds serve).",
)


@click.command("cleanup")
@_config_option
@_data_dir_option
@click.option(
    "--repo",
    "repos",
    multiple=True,
    help="Only this repository (repeatable; default: every local one). A replica the server keeps of another"
    " server's repository is garbage collected only.",
)
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option("--at", "at", default=None, help="Pretend it is this time (to preview future expiry).")
@click.option("--no-gc", is_flag=True, help="Skip garbage collection after the removal.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as one JSON list.")
def cleanup(
    config_path: Path | None, data_dir: Path, repos: tuple[str, ...], dry_run: bool, at: str | None,
    no_gc: bool, as_json: bool,
) -> None:  # fmt: skip
    """Remove CIDs unused for maxdays days, one repository at a time, then collect garbage.

    Safe while ``rcds serve`` runs: the server leaves a repository alone while it is being cleaned and
    picks up the new revision within seconds.
    """
    from .. import logs
    from ..publish.service import PublishService

    logs.configure("text", logging.INFO if not as_json else logging.WARNING)
    settings = _service_settings(config_path, data_dir)
    svc = PublishService(settings)
    svc.open()
    try:
        names = list(repos) or list(svc.repositories)
        unknown = [n for n in names if n not in svc.repositories and n not in svc.replica_locks]
        if unknown:
            raise click.ClickException(
                f"neither a local repository nor a replica of this server: {', '.join(unknown)}"
            )
        reports = [svc.cleanup(n, dry_run=dry_run, now=_when(at), gc=not no_gc) for n in names]
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        svc.close()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports]))
        return
    for r in reports:
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{r.plan.repository}: {verb} {len(r.plan.expired)} CIDs and {len(r.plan.orphans)} orphan ts records,"
            f" kept {r.plan.kept}" + (f" (revision {r.revision})" if r.revision else "")
        )
        for e in r.plan.expired:
            click.echo(
                f"  {e.cid}  last used {dt.datetime.fromtimestamp(e.last_used):%Y-%m-%d %H:%M} ({e.source})"
            )
        if r.gc is not None:
            click.echo(
                f"  gc: {r.gc.objects_swept} objects, {r.gc.bytes_freed:,} bytes {'to free' if dry_run else 'freed'}"
            )


@click.command("gc")
@_config_option
@_data_dir_option
@click.option("--repo", "repos", multiple=True, help="Only this repository or replica (repeatable).")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as one JSON object.")
def gc(
    config_path: Path | None, data_dir: Path, repos: tuple[str, ...], dry_run: bool, as_json: bool
) -> None:
    """Garbage-collect the server's local repositories and its replicas of the others' (keeping
    gc_horizon_days of revisions). A replica not snapshotted yet is skipped."""
    settings = _service_settings(config_path, data_dir)
    ours = {r.name: r.storage for r in settings.repositories if r.local or r.upstream}
    unknown = [n for n in repos if n not in ours]
    if unknown:
        raise click.ClickException(
            f"neither a local repository nor a replica of this server: {', '.join(unknown)}"
        )
    written = {r.name for r in settings.repositories if _has_been_written(r)}
    names = [n for n in (repos or tuple(ours)) if n in written]
    reports = {
        name: dataclasses.asdict(_gc_storage(ours[name], settings.gc_horizon_days, dry_run, as_json))
        for name in names
    }
    if as_json:
        click.echo(json.dumps(reports))


def _has_been_written(rs: RepositorySettings) -> bool:
    """Whether a repository or replica of the configuration holds anything yet: its manifest in its
    directory, or, for one in a bucket, the record its state directory keeps of the bucket."""
    from ..cvmfs.replica_store import PRIVATE_DIR as REPLICA_PRIVATE_DIR
    from ..cvmfs.replica_store import REPLICA_JSON

    if not rs.store:
        return (rs.storage / ".cvmfspublished").exists()
    if rs.local:
        return (rs.storage / PRIVATE_DIR / "repo.json").exists()
    return (rs.storage / REPLICA_PRIVATE_DIR / REPLICA_JSON).exists()


@click.command("audit")
@_config_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def audit(config_path: Path | None, data_dir: Path, as_json: bool) -> None:
    """Find CID namespace collisions in the server's repositories and replicas; exit 1 if there are any.

    A name under the prefix must be a one-level CID or a group, never both: reported are names that are
    one kind in one repository and the other in another ("mixed"), and directories holding a .publisher
    inside a one-level CID ("nested"). Reads the live revisions only; safe while ``rcds serve`` runs.
    """
    from ..publish.namespace import audit as audit_namespace

    settings = _service_settings(config_path, data_dir)
    storages = {r.name: r.storage for r in settings.repositories}
    try:
        report = audit_namespace(storages, settings.prefix)
    except (OSError, ManifestError, RepositoryError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for c in report.collisions:
            click.echo(f"{c.problem}: {c.detail}")
        for name in report.skipped:
            click.echo(f"skipped {name}: no published revision yet")
        status = "OK" if not report.collisions else f"{len(report.collisions)} COLLISIONS"
        click.echo(
            f"{status}: {report.cids} CIDs in {len(report.repositories)} repositories under /{settings.prefix}"
        )
    sys.exit(1 if report.collisions else 0)


_storage_option = click.option(
    "--storage",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="The repository's public storage directory (the one rcds repo create was given).",
)


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


@repo.command("adopt")
@click.option(
    "--storage",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="The repository's storage, as cvmfs_server keeps it (/srv/cvmfs/<fqrn>).",
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=Path("/etc/cvmfs/keys"),
    show_default=True,
    help="Directory holding <fqrn>.masterkey, .pub, .key and .crt.",
)
@click.option("--fqrn", default=None, help="Expected repository name (default: the manifest's).")
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="cvmfs_server's spool directory (default /var/spool/cvmfs/<fqrn> if it exists): open transactions,"
    " reflog.chksum.",
)
@click.option(
    "--server-conf",
    type=click.Path(path_type=Path),
    default=None,
    help="cvmfs_server's server.conf (default /etc/cvmfs/repositories.d/<fqrn>/server.conf if it exists).",
)
@click.option(
    "--copy-keys",
    is_flag=True,
    help=f"Copy the keys into <storage>/{PRIVATE_DIR}/keys instead of referring to them.",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Master public key that verifies the whitelist (default: <keys>/<fqrn>.pub).",
)
@click.option(
    "--external-whitelist",
    is_flag=True,
    help="The whitelist is signed elsewhere (OSG signs those of *.opensciencegrid.org): no .masterkey needed,"
    " rcds never re-signs it; keep whatever renews it today.",
)
@click.option("--no-index", is_flag=True, help="Do not seed the content index from the stored objects.")
@click.option("--check-only", is_flag=True, help="Run every check, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def repo_adopt(
    storage: Path, keys_dir: Path, fqrn: str | None, spool_dir: Path | None, server_conf: Path | None,
    copy_keys: bool, public_key: Path | None, external_whitelist: bool, no_index: bool, check_only: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Take over a repository made by cvmfs_server (see docs/migration.md).

    Verifies the manifest, whitelist and keys, that no cvmfs_server transaction is open and that every
    catalog has a schema rcds continues; then adds rcds's private state (content index seeded from the
    stored objects, reflog checksum) without rewriting anything published. The revision, history and
    reflog continue with the next publish.
    """
    from ..cvmfs.adopt import adopt

    try:
        report = adopt(
            storage, keys_dir, fqrn=fqrn, spool_dir=spool_dir, server_conf=server_conf, copy_keys=copy_keys,
            seed_index=not no_index, check_only=check_only, public_key=public_key,
            external_whitelist=external_whitelist,
        )  # fmt: skip
    except RepositoryError as exc:
        raise click.ClickException(f"not adopted: {exc}") from exc
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    for w in report.warnings:
        click.secho(f"WARNING: {w}", fg="yellow", err=True)
    verb = "can be adopted" if check_only else "adopted"
    click.echo(
        f"{report.fqrn} {verb}: revision {report.revision}, {report.catalogs} catalogs,"
        f" {report.objects_indexed} objects {'indexable' if check_only else 'indexed'}; keys in {report.keys_dir};"
        f" whitelist valid until {report.whitelist_expires}"
        + (" (re-signed)" if report.whitelist_resigned else "")
    )
    if not check_only:
        click.echo(f'next: [[repository]] name = "{report.fqrn}" storage = "{report.storage}" in rcds.toml')


@repo.command("info")
@_storage_option
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
@_storage_option
@click.option("--days", type=int, default=30, show_default=True, help="Validity of the new whitelist.")
def repo_resign(storage: Path, days: int) -> None:
    """Sign a fresh whitelist with the master key (do this before the old one expires)."""
    r = _open_repo(storage)
    wl = r.resign(days)
    click.echo(f"whitelist of {r.fqrn} valid until {wl.expires:%Y-%m-%d %H:%M} UTC")


@repo.command("add")
@_storage_option
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
@_storage_option
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


@repo.command("gc")
@_storage_option
@click.option(
    "--horizon-days",
    type=float,
    default=3.0,
    show_default=True,
    help="Keep every revision newer than this many days, and the one current at that point.",
)
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def repo_gc(storage: Path, horizon_days: float, dry_run: bool, as_json: bool) -> None:
    """Delete objects that only revisions older than the horizon (and not tagged) reference.

    STORAGE is a stratum 0 or a replica made by ``rcds replicate`` (or by the server for another server's
    repository); a replica keeps its manifest and whitelist as the source signed them, and a collection
    fails at once while a snapshot of it runs.
    """
    report = _gc_storage(storage, horizon_days, dry_run, as_json)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report)))


def _gc_storage(storage: Path, horizon_days: float, dry_run: bool, as_json: bool) -> GcReport:
    """Collect the stratum 0 or the replica (detected as ``rcds repo serve`` does) in ``storage``."""
    from ..cvmfs.gc import collect_garbage
    from ..cvmfs.replica_gc import collect_replica_garbage, is_replica

    horizon = horizon_days * 86400
    if is_replica(storage):
        from ..cvmfs.replica_store import ReplicaError, ReplicaStorage

        replica = ReplicaStorage(storage)  # a directory, or the state of a replica in a bucket
        try:
            manifest = replica.current_manifest()
        except (ReplicaError, OSError) as exc:
            raise click.ClickException(f"{storage}: {exc}") from exc
        finally:
            replica.close()
        if manifest is None:
            raise click.ClickException(f"{replica.where} holds no revision yet")
        fqrn = manifest.fqrn
        return _collect(
            fqrn,
            lambda progress: collect_replica_garbage(
                storage, horizon=horizon, dry_run=dry_run, progress=progress
            ),
            dry_run,
            as_json,
        )
    r = _open_repo(storage)
    return _collect(
        r.fqrn,
        lambda progress: collect_garbage(r, horizon=horizon, dry_run=dry_run, progress=progress),
        dry_run,
        as_json,
    )


def _collect(fqrn: str, run: Callable[[ProgressFn], GcReport], dry_run: bool, as_json: bool) -> GcReport:
    """One garbage collection with a progress line on a terminal and a summary (unless ``as_json``)."""
    from .. import logs

    logs.configure("text", logging.WARNING)  # warnings (missing catalogs, recovery) go to stderr
    show = not as_json and sys.stderr.isatty()
    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if show and (now - last[0] > 0.5 or done == total):
            last[0] = now
            of = f"/{total}" if total else ""
            click.echo(f"\r{phase:8} {done}{of}\033[K", nl=False, err=True)

    try:
        report = run(progress)
    except RepositoryError as exc:  # GcError too: not collectable, another GC or a snapshot is running
        raise click.ClickException(f"{fqrn}: {exc}") from exc
    finally:
        if show:
            click.echo("\r\033[K", nl=False, err=True)
    if not as_json:
        would = "would delete" if dry_run else "deleted"
        kept = report.revisions_kept
        click.echo(
            f"{fqrn}: kept {len(kept)} revisions ({_span(kept)}); {would} {report.roots_swept} root catalogs:"
            f" {report.objects_swept} objects, {report.catalogs_swept} catalogs, {report.aux_swept} auxiliary"
            f" objects, {report.bytes_freed} bytes in {report.seconds:.2f} s"
        )
    return report


def _reader(
    location: str,
    key: Path | None,
    ignore_expiry: bool = False,
    strict: bool = True,
    proxies: tuple[str, ...] = (),
) -> RepositoryReader:
    if not location.startswith(("http://", "https://")) and (Path(location) / PRIVATE_DIR).is_dir():
        with contextlib.suppress(RepositoryError):
            repo = Repository(Path(location))
            if not isinstance(repo.store, LocalStore):  # public files in a bucket: read them there
                return repo.reader(check_whitelist_expiry=not ignore_expiry, strict=strict)
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
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="HTTP port to listen on.")
def repo_serve(storages: tuple[Path, ...], create_fqrn: str | None, host: str, port: int) -> None:
    """Serve storage directories over HTTP at /cvmfs/<fqrn>/ like a stock stratum 0 (or 1, for replicas)."""
    from ..web.repo_http import run

    if create_fqrn:
        if len(storages) != 1:
            raise click.ClickException("--create takes exactly one --storage")
        if not (storages[0] / PRIVATE_DIR / "repo.json").exists():
            Repository.create(create_fqrn, storages[0])
            click.echo(f"created {create_fqrn} in {storages[0]}")
    repos = {}
    for s in storages:
        if not (s / PRIVATE_DIR / "repo.json").exists() and (s / ".cvmfspublished").is_file():
            # A replica (rcds replicate, or any stratum 1's storage): its name is in its manifest.
            try:
                fqrn = Manifest.parse((s / ".cvmfspublished").read_bytes())[0].fqrn
            except ManifestError as exc:
                raise click.ClickException(f"{s}: {exc}") from exc
            repos[fqrn] = s.absolute()
            continue
        r = _open_repo(s)
        repos[r.fqrn] = r.storage
        warning = r.whitelist_warning()
        if warning:
            click.secho(f"WARNING {r.fqrn}: {warning}", fg="yellow", err=True)
    try:
        run(repos, host=host, port=port)
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:  # not the listening socket: a real error
            raise
        click.echo(
            f"rcds repo serve: cannot listen on {host}:{port}: {os.strerror(exc.errno).lower()}", err=True
        )
        sys.exit(1)


def _span(revisions: list[int]) -> str:
    if len(revisions) <= 5:
        return ", ".join(map(str, revisions))
    return f"{revisions[0]} ... {revisions[-1]}"
