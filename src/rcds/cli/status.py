"""``rcds status``: the status page's summary in a terminal, from a server or from a local configuration."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import click


@click.command("status")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Read the server's files (state database, repositories) named by this configuration.",
)
@click.option("--server", "server_url", default=None, help="Ask a running server: http(s)://host:port")
@click.option("--watch", type=float, default=None, metavar="SECONDS", help="Redraw every SECONDS until ^C.")
@click.option("--json", "as_json", is_flag=True, help="The /status.json document (docs/status.md).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Bearer token for --server (else $BEARER_TOKEN, $BEARER_TOKEN_FILE; else anonymous).")  # fmt: skip
@click.option("--cacert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="CA bundle for an https --server.")  # fmt: skip
def status(
    config_path: Path | None,
    server_url: str | None,
    watch: float | None,
    as_json: bool,
    token_file: Path | None,
    cacert: Path | None,
) -> None:
    """What rcds is doing: repositories, queue, publishes, replicas, next cleanup.

    With --server, what that server's /status.json says (identities only if your credentials may see
    them). With --config, the same summary read from the files on this host (the state database and the
    repositories; replica lag and errors live in the server's memory and are not there). Without either:
    the embedded default server on http://127.0.0.1:8080.
    """
    if config_path is not None and server_url is not None:
        raise click.UsageError("--config or --server, not both")
    if watch is not None and watch <= 0:
        raise click.BadParameter("must be positive", param_hint="--watch")
    fetch = _local(config_path) if config_path is not None else _remote(server_url or "http://127.0.0.1:8080",
                                                                        token_file, cacert)  # fmt: skip
    try:
        _loop(fetch, watch, as_json)
    except KeyboardInterrupt:  # ^C ends --watch, quietly
        return


def _loop(fetch: Any, watch: float | None, as_json: bool) -> None:
    while True:
        try:
            doc = fetch()
        except click.ClickException as exc:
            if watch is None:
                raise
            click.echo(f"rcds status: {exc.format_message()} (retrying in {watch:g} s)", err=True)
            doc = None
        if as_json and doc is not None:
            click.echo(json.dumps(doc, indent=None if watch else 2, sort_keys=True))
        elif doc is not None:
            text = render_text(doc)
            if watch is not None and sys.stdout.isatty():
                click.clear()
            click.echo(text)
        if watch is None:
            return
        time.sleep(watch)


def _local(config_path: Path) -> Any:
    from ..publish.config import load_settings
    from ..publish.status import StatusCollector
    from ..tomlconfig import ConfigError

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc
    collector = StatusCollector(settings)
    first = [True]

    def fetch() -> dict[str, Any]:
        doc = collector.build(sensitive=True)
        if first[0]:  # the cleanup estimates start in the background: give them a moment, once
            first[0] = False
            collector.wait_estimates(20)
            doc = collector.build(sensitive=True)
        return doc

    return fetch


def _remote(url: str, token_file: Path | None, cacert: Path | None) -> Any:
    import os

    import httpx

    headers = {}
    token = None
    if token_file is not None:
        token = token_file.read_text().strip()
    elif os.environ.get("BEARER_TOKEN"):
        token = os.environ["BEARER_TOKEN"].strip()
    elif os.environ.get("BEARER_TOKEN_FILE"):
        token = Path(os.environ["BEARER_TOKEN_FILE"]).read_text().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    client = httpx.Client(
        base_url=url.rstrip("/"), headers=headers, timeout=30, verify=str(cacert) if cacert else True
    )

    def fetch() -> dict[str, Any]:
        try:
            r = client.get("/status.json")
        except httpx.HTTPError as exc:
            raise click.ClickException(f"{url}: {exc}") from exc
        if r.status_code != 200:
            raise click.ClickException(f"{url}: {r.status_code} {r.text.strip()}")
        doc: dict[str, Any] = r.json()
        return doc

    return fetch


# --- text --------------------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _utc(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def render_text(doc: dict[str, Any]) -> str:
    """The summary as plain text, about one screen."""
    now = float(doc["generated_at"])
    q, p = doc["queue"], doc["publishes"]
    lines = [
        f"rcds status · {doc.get('server') or '(from files)'} · {_utc(now)}",
        f"queue: {q['queued']} queued, {q['publishing']} publishing, {q['waiting']} waiting for storage",
        f"published, last hour: {p['last_hour']} · published, last 24 h: {p['last_day']} "
        f"({_bytes(p['bytes_last_day'])}) · failed: {p['failed_last_day']}",
        "",
        f"{'repository':<28} {'kind':<7} {'rev':>6} {'age':>7} {'CIDs':>7} {'pub/h':>6}  next cleanup",
    ]
    for r in doc["repositories"]:
        cleanup = r.get("next_cleanup")
        if cleanup is None:
            st = r.get("replica") or {}
            extra = f"lag {_secs(st.get('lag'))}" + (
                f", error: {st['last_error']}" if st.get("last_error") else ""
            )
        else:
            n = cleanup.get("expiring")
            extra = f"{_utc(cleanup['at'])}: {'?' if n is None else n} to expire"
        lines.append(
            f"{r['name']:<28} {r['kind']:<7} {r.get('revision', '-')!s:>6} {_secs(r.get('revision_age')):>7} "
            f"{r.get('cids', '-')!s:>7} {r.get('publishes_last_hour', '-')!s:>6}  {extra}"
        )
        notes = []
        if r.get("whitelist_days_left") is not None:
            notes.append(f"whitelist {r['whitelist_days_left']:.1f} days")
        if r.get("disk"):
            notes.append(f"disk {_bytes(r['disk']['free'])} free of {_bytes(r['disk']['total'])}")
        if r.get("storage_waiting"):
            notes.append("WAITING FOR STORAGE")
        if notes:
            lines.append(f"{'':<28} " + ", ".join(notes))
    sensitive = bool(doc.get("sensitive"))
    shown = {j["cid"] for j in doc["recent"][:15]}
    failures = [j for j in doc.get("failed", []) if j["cid"] not in shown][:5]
    for title, jobs in (
        ("current", doc["current"]),
        ("recent", doc["recent"][:15]),
        ("earlier failed", failures),
    ):
        if not jobs and title == "earlier failed":
            continue
        lines += ["", f"{title} publishes:" if jobs else f"{title} publishes: none"]
        for j in jobs:
            when = j.get("finished") and dt.datetime.fromtimestamp(j["finished"], dt.UTC).strftime("%H:%M:%S")
            secs = f"{j['seconds']:.2f}s" if "seconds" in j else _secs(j.get("age"))
            who = f" [{j['identity']}]" if sensitive and j.get("identity") else ""
            lines.append(
                f"  {when or '':8} {j['state']:<10} {j['cid']:<40} {_bytes(j.get('size')):>9} "
                f"{j.get('files', '')!s:>5} {secs:>8}{who}"
            )
            if j.get("reason"):
                lines.append(f"           {j['reason']}")
    return "\n".join(lines)


__all__ = ["render_text", "status"]
