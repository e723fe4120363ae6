"""``rcds replicate``: a stratum 1 snapshot, in a module of its own.

A polling cron job or a ``--watch`` loop over hundreds of repositories pays the command's start-up on every
call, so this module imports only click and ``rcds.cvmfs.replica`` (not the repository writer, the checker,
garbage collection or the service configuration that the other server commands need): a snapshot with
nothing new is then mostly the interpreter's start-up (bench/replicate.py measures it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

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
    "--storage", type=click.Path(path_type=Path), required=True, help="The replica's storage directory."
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
@click.option("--jobs", type=click.IntRange(min=1), default=8, show_default=True, help="Parallel downloads.")
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
    urls: tuple[str, ...], storage: Path, keys: tuple[Path, ...], fqrn: str | None, proxies: tuple[str, ...],
    jobs: int, watch: bool, interval: float, notify_roots: tuple[str, ...], as_json: bool,
) -> None:  # fmt: skip
    """Make STORAGE a stratum 1 of the repository at URL (several URLs: failover in order; or a directory).

    Verifies the signed manifest with the master key, pulls what the replica does not have yet (catalogs
    after their subtrees, the manifest last) and leaves STORAGE ready to be served like a stock stratum 1.
    """
    import signal
    import threading

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

    key_paths, proxy_list = list(keys), list(proxies) or None
    url_list = [u for arg in urls for u in arg.split(";") if u]
    remote = any(u.startswith(("http://", "https://")) for u in url_list)
    source: str | list[str] = url_list if remote or len(url_list) != 1 else url_list[0]
    if not watch:
        try:
            report = replica.snapshot(
                source, storage, public_keys=key_paths, fqrn=fqrn, proxies=proxy_list, jobs=jobs
            )
        except replica.ReplicaError as exc:
            raise click.ClickException(str(exc)) from exc
        show(report)
        return
    stop, wake = threading.Event(), threading.Event()

    def stop_now(*_args: object) -> None:
        stop.set()
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_now)
    subscriber = _replica_subscriber(url_list, fqrn, notify_roots, storage, wake) if remote else None
    try:
        replica.watch(
            source, storage, interval=interval, stop=stop, public_keys=key_paths, fqrn=fqrn,
            proxies=proxy_list, jobs=jobs, on_report=show, wake=wake,
        )  # fmt: skip
    finally:
        if subscriber is not None:
            subscriber.stop()


def _replica_subscriber(
    urls: list[str], fqrn: str | None, roots: tuple[str, ...], storage: Path, wake: threading.Event
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

    def on_message(message: Activity) -> None:
        try:
            have = Manifest.parse((storage / ".cvmfspublished").read_bytes())[0].revision
        except (OSError, ManifestError):
            have = -1
        if message.revision > have:
            wake.set()

    return NotificationSubscriber(list(roots), name, on_message).start()
