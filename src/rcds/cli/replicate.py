"""``rcds replicate``: a stratum 1 snapshot, in a module of its own.

A polling cron job or a ``--watch`` loop over hundreds of repositories pays the command's start-up on every
call, so this module imports only click and ``rcds.cvmfs.replica`` (not the repository writer, the checker,
garbage collection or the service configuration that the other server commands need): a snapshot with
nothing new is then mostly the interpreter's start-up (bench/replicate.py measures it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import threading

    from ..cvmfs.subscriber import Activity, NotificationSubscriber

_proxy = click.option(
    "--proxy", "proxies", multiple=True, help="HTTP proxy URL or DIRECT (repeatable, in order)."
)


@click.command("replicate")
@click.argument("urls", metavar="URL...", nargs=-1, required=True)
@click.option(
    "--storage",
    required=True,
    help="The replica's storage directory, or s3://BUCKET/PREFIX (keys PREFIX/data/..., PREFIX/.cvmfspublished;"
    " needs --state).",
)
@click.option(
    "--state",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="With an s3:// storage: the local directory for the replica's private state (lock, staging, the"
    " index of objects in the bucket; it remembers the bucket: later runs may give --storage DIR instead).",
)
@click.option(
    "--s3",
    "s3_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="An S3 setting, as in [repository.s3]: endpoint, region, addressing (path or virtual), https,"
    " profile, parallelism, retries, timeout (repeatable). Credentials: AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or profile=NAME.",
)
@click.option(
    "--key",
    "keys",
    type=click.Path(path_type=Path, exists=True),
    multiple=True,
    required=True,
    help="Master public key (a directory: all its *.pub; repeatable).",
)
@click.option("--fqrn", default=None, help="Expected repository name (default: from the URL or the replica).")
@_proxy
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Parallel downloads (and, into a bucket, PUTs).",
)
@click.option("--watch", is_flag=True, help="Keep snapshotting every --interval seconds until interrupted.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds between snapshots with --watch.",
)
@click.option(
    "--notifications",
    "notify_roots",
    multiple=True,
    help="With --watch: notification server API root to follow (repeatable; default: derived from each "
    "http(s) URL <base>/cvmfs/<fqrn> as <base>/api/v1); 'none' to only poll.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot.")
def replicate(
    urls: tuple[str, ...], storage: str, state: Path | None, s3_options: tuple[str, ...],
    keys: tuple[Path, ...], fqrn: str | None, proxies: tuple[str, ...], jobs: int, watch: bool,
    interval: float, notify_roots: tuple[str, ...], as_json: bool,
) -> None:  # fmt: skip
    """Make STORAGE a stratum 1 of the repository at URL (several URLs: failover in order; or a directory).

    Verifies the signed manifest with the master key, pulls what the replica does not have yet (catalogs
    after their subtrees, the manifest last) and leaves STORAGE ready to be served like a stock stratum 1:
    a directory, or an S3 bucket (--storage s3://BUCKET/PREFIX --state DIR) that clients and other
    stratum 1s read over its HTTP endpoint.
    """
    from .. import logs
    from ..cvmfs import replica

    logs.configure("text", logging.INFO if watch and not as_json else logging.WARNING)

    def show(report: replica.SnapshotReport) -> None:
        if as_json:
            click.echo(json.dumps(report.as_dict()))
        elif not watch or report.changed:
            what = "updated" if report.changed else "up to date"
            was = report.previous_revision
            since = f" (was {was})" if report.changed and was is not None else ""
            click.echo(
                f"{report.fqrn}: revision {report.revision}{since} {what}: {report.objects_fetched} objects, "
                f"{report.bytes_fetched} bytes fetched, {report.objects_present} present, "
                f"{report.catalogs} catalogs in {report.seconds:.2f} s"
            )
        for what in report.skipped if not as_json else []:
            click.echo(f"  skipped: {what}")

    directory, store = _replica_location(storage, state, s3_options)
    key_paths, proxy_list = list(keys), list(proxies) or None
    url_list = [u for arg in urls for u in arg.split(";") if u]
    remote = any(u.startswith(("http://", "https://")) for u in url_list)
    source: str | list[str] = url_list if remote or len(url_list) != 1 else url_list[0]
    if not watch:
        try:
            report = replica.snapshot(
                source,
                directory,
                public_keys=key_paths,
                fqrn=fqrn,
                proxies=proxy_list,
                jobs=jobs,
                store=store,
            )
        except replica.ReplicaError as exc:
            raise click.ClickException(str(exc)) from exc
        show(report)
        return
    import signal
    import threading

    stop, wake = threading.Event(), threading.Event()

    def stop_now(*_args: object) -> None:
        stop.set()
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_now)
    subscriber = _replica_subscriber(url_list, fqrn, notify_roots, directory, store, wake) if remote else None
    try:
        replica.watch(
            source, directory, interval=interval, stop=stop, public_keys=key_paths, fqrn=fqrn,
            proxies=proxy_list, jobs=jobs, on_report=show, wake=wake, store=store,
        )  # fmt: skip
    finally:
        if subscriber is not None:
            subscriber.stop()


def _replica_location(
    storage: str, state: Path | None, s3_options: tuple[str, ...]
) -> tuple[Path, dict[str, Any] | None]:
    """The directory ``snapshot`` takes (the replica, or a bucket replica's state) and the bucket's
    settings (None: local, or the bucket the state directory recorded)."""
    if not storage.startswith("s3://"):
        if s3_options:
            raise click.UsageError("--s3 is for an s3:// --storage")
        if state is not None:
            raise click.UsageError(
                "--state is for an s3:// --storage (a local replica keeps its state inside)"
            )
        return Path(storage), None
    if state is None:
        raise click.UsageError("an s3:// --storage needs --state DIR (the replica's local private state)")
    from ..storage.s3 import S3Settings

    try:
        options = S3Settings.parse_options(s3_options)
        S3Settings.from_url(storage, **options)  # the URL and the names checked here, before any work
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return state, {"url": storage, **options}


def _replica_subscriber(
    urls: list[str],
    fqrn: str | None,
    roots: tuple[str, ...],
    storage: Path,
    store: dict[str, Any] | None,
    wake: threading.Event,
) -> NotificationSubscriber | None:
    """``rcds replicate --watch``: follow the source's notifications, waking the loop for a newer revision.

    The message is only a hint (the snapshot verifies what it fetches); without a stream the interval
    goes on alone.
    """
    from ..cvmfs.manifest import Manifest, ManifestError
    from ..cvmfs.subscriber import NotificationSubscriber, api_root_of

    if roots and all(r.lower() == "none" for r in roots):
        return None
    name = fqrn or urls[0].rstrip("/").rsplit("/", 1)[-1]
    if not roots:
        roots = tuple(r for r in (api_root_of(u, name) for u in urls) if r is not None)
    if not roots:
        return None

    from ..cvmfs.replica_store import ReplicaError, recorded_store
    from ..storage import MANIFEST, ObjectMissing, ObjectStore, store_from_settings

    public: Path | ObjectStore = storage
    with contextlib.suppress(ReplicaError):
        store = store or recorded_store(storage) or None
    if store:
        public = store_from_settings(store)  # the bucket itself: a message costs one GET

    def on_message(message: Activity) -> None:
        try:
            data = (
                public.get(MANIFEST) if isinstance(public, ObjectStore) else (public / MANIFEST).read_bytes()
            )
            have = Manifest.parse(data)[0].revision
        except (OSError, ObjectMissing, ManifestError):
            have = -1
        if message.revision > have:
            wake.set()

    return NotificationSubscriber(list(roots), name, on_message).start()
