"""The status page (``/status``), its JSON (``/status.json``) and the per-CID page (``/status/cid?cid=C``).

Server-rendered HTML with inline SVG charts and an inline style sheet: no JavaScript, nothing fetched from
elsewhere (an air-gapped site sees the same page), and a ``<meta http-equiv="refresh">`` reload. The data
come from :class:`rcds.publish.status.StatusCollector`, which caches a document for a couple of seconds,
so a room full of open pages costs one set of queries per refresh.

Who sees what (``[status]`` in the configuration, docs/status.md):

* The viewer is authenticated exactly as the publish API does it (token, certificate, localhost), with no
  CID. A request without credentials is *anonymous*: it sees everything but identities (job identities,
  who published a CID), or gets a 403 when ``anonymous = false``. A token that does not verify gets the
  API's 403 with its reason; a certificate the grid-mapfile does not know (a browser offers whatever it
  holds) is treated as no credentials.
* Identities are shown to authenticated viewers, or only to ``operators`` when that list is set.
* Localhost (with ``allow_localhost``) counts as authenticated only when the request passes the API's
  browser checks (its Host header names this server, no foreign Origin): a page on another site whose
  name resolves to 127.0.0.1 (DNS rebinding) is served the anonymous view, never a DN.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..publish.auth import Authenticator, AuthError, Identity, peer_dn_from_ssl_object
from ..publish.cid import CidError
from ..publish.config import StatusSettings
from ..publish.service import PublishService
from ..publish.status import StatusCollector
from .pubapi import ApiError, _refuse_foreign_browser_requests, text
from .status_charts import bar_chart, line_chart

_HEADERS = {
    "Cache-control": "max-age=0",
    # No script at all, styles only inline, images only inline: whatever a CID or a reason contains, it
    # cannot run or fetch anything.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Vary": "Authorization",
}


@functools.cache
def _css() -> str:
    return resources.files("rcds.web").joinpath("static/status.css").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Viewer:
    identity: Identity | None  # None: anonymous
    sensitive: bool  # may see identities

    def describe(self) -> str:
        if self.identity is None:
            return "anonymous (identities hidden)"
        return f"{self.identity.name} ({self.identity.method})" + (
            "" if self.sensitive else ", identities hidden"
        )


def operator_key(identity: Identity) -> str:
    """How ``[status] operators`` names an identity: a DN, ``<issuer>#<sub>``, or ``localhost``."""
    if identity.method == "token":
        return f"{identity.issuer}#{identity.subject}"
    return identity.subject


class StatusPages:
    def __init__(
        self, service: PublishService, authenticator: Authenticator, collector: StatusCollector | None = None
    ) -> None:
        self.service = service
        self.authenticator = authenticator
        self.settings: StatusSettings = service.settings.status
        self.collector = collector or StatusCollector(service.settings, service)
        self._operators = frozenset(self.settings.operators)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.root)
        app.router.add_get("/status", self.page)
        app.router.add_get("/status.json", self.json)
        app.router.add_get("/status/cid", self.cid_page)
        app.router.add_get("/status/cid.json", self.cid_json)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        self.collector.close()

    # --- access ----------------------------------------------------------------------------------

    async def viewer(self, request: web.Request) -> Viewer:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        peer_dn = peer_dn_from_ssl_object(ssl_object) if ssl_object is not None else None
        authorization = request.headers.get("Authorization")
        call = functools.partial(
            self.authenticator.authenticate,
            remote_addr=request.remote or "",
            authorization=authorization,
            peer_dn=peer_dn,
            secure=request.secure,
            cid=None,
        )
        identity: Identity | None
        try:
            identity = await asyncio.to_thread(call) if authorization else call()
        except AuthError as err:
            if authorization is not None:
                raise ApiError(403, err.message) from err  # a token sent on purpose, and wrong: say so
            # No credentials, or a browser's grid certificate this server does not map: anonymous.
            identity = None
        if identity is not None and identity.method != "token":
            try:
                _refuse_foreign_browser_requests(request, identity)
            except ApiError:
                identity = None  # another site's page: what an anonymous viewer sees, and no more
        if identity is None:
            if not self.settings.anonymous:
                raise ApiError(403, "Token or client cert required")
            return Viewer(None, False)
        sensitive = not self._operators or operator_key(identity) in self._operators
        return Viewer(identity, sensitive)

    async def _guarded(self, request: web.Request) -> Viewer | web.Response:
        try:
            return await self.viewer(request)
        except ApiError as err:
            return text(err.status, err.body)

    # --- handlers --------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    async def page(self, request: web.Request) -> web.Response:
        viewer = await self._guarded(request)
        if isinstance(viewer, web.Response):
            return viewer
        doc = await asyncio.to_thread(self.collector.summary, viewer.sensitive)
        body = render_status(doc, viewer, self.settings.refresh)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers=_HEADERS)

    async def json(self, request: web.Request) -> web.Response:
        viewer = await self._guarded(request)
        if isinstance(viewer, web.Response):
            return viewer
        doc = await asyncio.to_thread(self.collector.summary, viewer.sensitive)
        return web.json_response(doc, headers=_HEADERS)

    async def _cid_doc(self, request: web.Request) -> tuple[Viewer, dict[str, Any]] | web.Response:
        viewer = await self._guarded(request)
        if isinstance(viewer, web.Response):
            return viewer
        raw = request.query.get("cid")
        if raw is None:
            return text(400, "Bad request: no cid")
        try:
            doc = await asyncio.to_thread(self.collector.cid, raw, viewer.sensitive)
        except CidError as exc:
            return text(400, f"Bad request: {exc}")
        return viewer, doc

    async def cid_page(self, request: web.Request) -> web.Response:
        got = await self._cid_doc(request)
        if isinstance(got, web.Response):
            return got
        viewer, doc = got
        body = render_cid(doc, viewer, self.settings.refresh)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers=_HEADERS)

    async def cid_json(self, request: web.Request) -> web.Response:
        got = await self._cid_doc(request)
        if isinstance(got, web.Response):
            return got
        return web.json_response(got[1], headers=_HEADERS)


# --- formatting ----------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 100 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def human_age(s: float | None) -> str:
    """An age: whole seconds at least (a revision 134 ms old is "0 s" old)."""
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 60 else human_seconds(s)


def utc(t: float | None, seconds: bool = True) -> str:
    if not t:
        return "–"
    fmt = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime(fmt) + " UTC"


def _hm(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M")


def _cid_link(cid: str) -> str:
    return f'<a href="/status/cid?cid={quote(cid, safe="/")}">{escape(cid)}</a>'


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[tuple[str, str]]], empty: str) -> str:
    """``headers``: (label, class); ``rows``: cells as (html, class). Cells are already escaped."""
    body = [
        "<tr>" + "".join(f'<td class="{c}">{h}</td>' if c else f"<td>{h}</td>" for h, c in row) + "</tr>"
        for row in rows
    ]
    if not body:
        return f'<div class="scroll"><p class="none">{escape(empty)}</p></div>'
    head = "".join(f'<th class="{c}">{escape(h)}</th>' if c else f"<th>{escape(h)}</th>" for h, c in headers)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _outcome(state: str) -> str:
    cls = {"published": "ok", "failed": "bad", "publishing": "warn", "queued": "muted"}.get(state, "")
    return f'<span class="{cls}">{escape(state)}</span>'


def _page(title: str, refresh: int, header: str, body: Sequence[str]) -> str:
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta http-equiv="refresh" content="{int(refresh)}">',
            f"<title>{escape(title)}</title><style>{_css()}</style></head><body>",
            header,
            "<main>",
            *body,
            "</main></body></html>",
        ]
    )


def _header(title: str, doc: dict[str, Any], viewer: Viewer, refresh: int, extra: str = "") -> str:
    return (
        f"<header><h1>{escape(title)}</h1>"
        f'<span class="meta">{escape(utc(doc["generated_at"]))} · refreshes every {refresh} s · '
        f"viewer: {escape(viewer.describe())}{extra}</span></header>"
    )


# --- the summary page ------------------------------------------------------------------------------


def render_status(doc: dict[str, Any], viewer: Viewer, refresh: int = 10) -> str:
    sensitive = bool(doc.get("sensitive"))
    q, p = doc["queue"], doc["publishes"]
    server = doc.get("server") or "rcds"
    out: list[str] = []
    cards = [
        ("queue depth", str(q["queued"]), "warn" if q["queued"] else ""),
        ("publishing now", str(q["publishing"]), ""),
        ("waiting for storage", str(q["waiting"]), "bad" if q["waiting"] else ""),
        ("published, last hour", str(p["last_hour"]), ""),
        ("published, last 24 h", str(p["last_day"]), ""),
        ("failed, last 24 h", str(p["failed_last_day"]), "bad" if p["failed_last_day"] else ""),
        ("bytes, last 24 h", human_bytes(p["bytes_last_day"]), ""),
    ]
    out.append('<section class="cards" id="summary">')
    for k, v, cls in cards:
        out.append(
            f'<div class="card"><div class="v {cls}">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        )
    out.append("</section>")

    now = float(doc["generated_at"])
    repos = doc["repositories"]
    out.append('<h2 id="repositories">Repositories</h2>')
    rows = []
    for r in repos:
        cleanup = r.get("next_cleanup")
        if cleanup is None:
            clean = '<span class="muted">replica: follows its owner</span>'
        else:
            n = cleanup.get("expiring")
            count = "counting…" if n is None else f"{n} CID{'s' if n != 1 else ''} to expire"
            when = (
                "now"
                if cleanup["at"] <= now
                else f"{utc(cleanup['at'], seconds=False)} (in {human_seconds(cleanup['at'] - now)})"
            )
            clean = escape(f"{when}: {count}") + (
                "" if cleanup.get("auto", True) else ' <span class="muted">(auto off)</span>'
            )
        wl_days = r.get("whitelist_days_left")
        wl = "–"
        if wl_days is not None:
            cls = "bad" if wl_days < 1 else "warn" if wl_days < 7 else ""
            wl = f'<span class="{cls}">{escape(utc(r["whitelist_expires"], seconds=False))} ({wl_days:.1f} days)</span>'
        disk = r.get("disk")
        disk_text = "–"
        if disk:
            used = disk["used"] / disk["total"] if disk["total"] else 0.0
            cls = "bad" if used > 0.95 else "warn" if used > 0.85 else ""
            disk_text = f'<span class="{cls}">{escape(human_bytes(disk["free"]))} free of {escape(human_bytes(disk["total"]))} ({used:.0%} used)</span>'
        state = escape(r["kind"])
        if r.get("storage_waiting"):
            state += ' <span class="bad">waiting for storage</span>'
        rows.append(
            [
                (escape(r["name"]), ""),
                (state, "wide"),
                (escape(str(r.get("revision", "–"))), "n"),
                (escape(human_age(r.get("revision_age"))), "n"),
                (escape(str(r.get("cids", "–"))), "n"),
                (escape(str(r.get("publishes_last_hour", "–"))), "n"),
                (clean, ""),
                (wl, "wide"),
                (disk_text, "wide"),
            ]
        )
    out.append(
        _table(
            [
                ("repository", ""),
                ("kind", "wide"),
                ("revision", "n"),
                ("age", "n"),
                ("CIDs", "n"),
                ("published/h", "n"),
                ("next cleanup", ""),
                ("whitelist expires", "wide"),
                ("disk", "wide"),
            ],
            rows,
            "no repositories",
        )
    )

    replicas = [r for r in repos if r["kind"] == "replica"]
    if replicas:
        out.append('<h2 id="replicas">Replicas of peer servers</h2>')
        rows = []
        for r in replicas:
            st = r.get("replica") or {}
            err = st.get("last_error")
            lag = st.get("lag")
            lag_cls = "bad" if lag is None or lag > 300 else "warn" if lag > 60 else "ok"
            rows.append(
                [
                    (escape(r["name"]), ""),
                    ("<br>".join(escape(u) for u in r.get("upstream", [])), "wide"),
                    (escape(str(st.get("revision", r.get("revision", "–")))), "n"),
                    (
                        f'<span class="{lag_cls}">{escape(human_seconds(lag)) if lag is not None else "never synced"}</span>',
                        "n",
                    ),
                    (escape(utc(st.get("last_success"))), "wide"),
                    (escape(str(st.get("failures", 0))), "n"),
                    (escape(err) if err else '<span class="ok">none</span>', "reason" if err else ""),
                ]
            )
        out.append(
            _table(
                [
                    ("replica", ""),
                    ("upstream", "wide"),
                    ("revision seen", "n"),
                    ("lag", "n"),
                    ("last sync", "wide"),
                    ("failures", "n"),
                    ("last error", ""),
                ],
                rows,
                "",
            )
        )

    if doc.get("leases"):
        out.append('<h2 id="leases">Leases</h2>')
        rows = [[(escape(str(v)), "") for v in lease.values()] for lease in doc["leases"]]
        keys = list(doc["leases"][0].keys())
        out.append(_table([(k, "") for k in keys], rows, ""))

    out.append('<h2 id="charts">Last 24 hours</h2><div class="charts">')
    out.extend(_charts(doc))
    out.append("</div>")

    job_headers_current = [
        ("CID", ""),
        ("state", ""),
        ("repository", "wide"),
        ("size", "n"),
        ("waiting", "n"),
        ("tries", "n"),
        ("note", ""),
    ]
    if sensitive:
        job_headers_current.append(("identity", "wide"))
    rows = []
    for j in doc["current"]:
        tries = j.get("attempts", 0) + j.get("waits", 0)
        row = [
            (_cid_link(j["cid"]), "cid"),
            (_outcome(j["state"]), ""),
            (escape(j.get("repository", "")), "wide"),
            (escape(human_bytes(j.get("size"))), "n"),
            (escape(human_seconds(j.get("age"))), "n"),
            (str(tries), "n"),
            (escape(j.get("reason", "")), "reason" if j.get("reason") else ""),
        ]
        if sensitive:
            row.append((escape(j.get("identity", "")), "wide"))
        rows.append(row)
    out.append('<h2 id="current">Current publishes</h2>')
    out.append(_table(job_headers_current, rows, "The queue is empty."))

    out.append('<h2 id="recent">Recent publishes</h2>')
    out.append(_jobs_table(doc["recent"], sensitive, "Nothing published in the last week."))
    older_failures = [j for j in doc.get("failed", []) if j not in doc["recent"]]
    if older_failures:
        out.append('<h2 id="failed">Earlier failures</h2>')
        out.append(_jobs_table(older_failures, sensitive, ""))

    out.append(
        '<footer>Machine-readable: <a href="/status.json">/status.json</a> (docs/status.md) · '
        f'<a href="/metrics">/metrics</a> · rcds {escape(str(doc.get("version", "")))}</footer>'
    )
    title = f"rcds status · {server}"
    return _page(title, refresh, _header(title, doc, viewer, refresh), out)


def _jobs_table(jobs: Sequence[dict[str, Any]], sensitive: bool, empty: str) -> str:
    headers = [
        ("finished", ""),
        ("CID", ""),
        ("outcome", ""),
        ("repository", "wide"),
        ("revision", "n"),
        ("size", "n"),
        ("files", "n"),
        ("seconds", "n"),
        ("reason", ""),
    ]
    if sensitive:
        headers.append(("identity", "wide"))
    rows = []
    for j in jobs:
        reason = j.get("reason", "")
        row = [
            (escape(utc(j.get("finished"))[11:19]) if j.get("finished") else "–", "n"),
            (_cid_link(j["cid"]), "cid"),
            (_outcome(j["state"]), ""),
            (escape(j.get("repository", "")), "wide"),
            (escape(str(j.get("revision", ""))), "n"),
            (escape(human_bytes(j.get("size"))), "n"),
            (escape(str(j.get("files", ""))), "n"),
            (f"{j['seconds']:.2f}" if "seconds" in j else "", "n"),
            (escape(reason), "reason" if reason else ""),
        ]
        if sensitive:
            row.append((escape(j.get("identity", "")), "wide"))
        rows.append(row)
    return _table(headers, rows, empty)


def _charts(doc: dict[str, Any]) -> list[str]:
    charts = doc["charts"]
    hours = charts["hours"]
    now = float(doc["generated_at"])
    out = []
    if hours:
        labels = [_hm(h["start"]) for h in hours]
        published = [float(h["published"]) for h in hours]
        tips = [f"{_hm(h['start'])}: {h['published']} published, {h['failed']} failed" for h in hours]
        out.append(
            _figure(
                "Publishes per hour (failed in red)",
                bar_chart(
                    published,
                    labels,
                    "Publishes per hour",
                    tips=tips,
                    stacked=[float(h["failed"]) for h in hours],
                ),
            )
        )
        latency = [h["latency_mean"] for h in hours]
        tips = [
            f"{_hm(h['start'])}: mean {human_seconds(h['latency_mean'])}, max {human_seconds(h['latency_max'])}"
            for h in hours
        ]
        out.append(
            _figure(
                "Publish latency per hour (upload to live, mean)",
                bar_chart(latency, labels, "Publish latency", fmt=_short_seconds, tips=tips, color="#d9822b"),
            )
        )
    start = now - 24 * 3600
    out.append(
        _figure(
            "Queue depth",
            line_chart([("queue depth", charts["queue_depth"])], start, now, "Queue depth", time_label=_hm),
        )
    )
    days = charts["days"]
    if days:
        out.append(
            _figure(
                "Bytes published per day",
                bar_chart(
                    [float(d["bytes"]) for d in days],
                    [d["day"][5:] for d in days],
                    "Bytes per day",
                    fmt=human_bytes,
                    every=1,
                    color="#2e9e5b",
                    tips=[f"{d['day']}: {human_bytes(d['bytes'])} in {d['published']} CIDs" for d in days],
                ),
            )
        )
    lag = charts.get("replica_lag") or {}
    if lag:
        out.append(
            _figure(
                "Replica lag",
                line_chart(list(lag.items()), start, now, "Replica lag", fmt=_short_seconds, time_label=_hm),
            )
        )
    return out


def _short_seconds(s: float) -> str:
    return human_seconds(s) if s else "0"


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{escape(caption)}</figcaption>{svg}</figure>"


# --- one CID -------------------------------------------------------------------------------------


def render_cid(doc: dict[str, Any], viewer: Viewer, refresh: int = 10) -> str:
    cid = doc["cid"]
    now = float(doc["generated_at"])
    facts: list[tuple[str, str]] = [("state", _outcome(doc.get("state", "missing")))]

    def add(label: str, value: object, html: bool = False) -> None:
        if value is None or value == "":
            return
        facts.append((label, str(value) if html else escape(str(value))))

    add("reason", doc.get("reason"))
    add("repository", doc.get("repository"))
    add("revision", doc.get("revision"))
    add("live revision", doc.get("live_revision"))
    add("path", doc.get("path"))
    add("submitted", utc(doc.get("submitted_at")) if doc.get("submitted_at") else None)
    add("published", utc(doc.get("published_at")) if doc.get("published_at") else None)
    add("last used", utc(doc.get("last_used")) if doc.get("last_used") else None)
    if doc.get("expires_at"):
        left = doc["expires_at"] - now
        add("expires", f"{utc(doc['expires_at'], seconds=False)} (in {human_seconds(left)}, if unused)")
    add("files", doc.get("files"))
    add("size", human_bytes(doc["size"]) if doc.get("size") is not None else None)
    add("tarball", human_bytes(doc["tarball_size"]) if doc.get("tarball_size") is not None else None)
    add("attempts", doc.get("attempts"))
    add("published by", doc.get("identity"))
    body = ['<p><a href="/status">← status</a></p>', '<dl class="facts">']
    body += [f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts]
    body.append("</dl>")
    tree = doc.get("tree")
    if tree is not None:
        total = doc.get("entries", len(tree))
        shown = f"first {len(tree)} of {total}" if doc.get("tree_truncated") else f"{len(tree)} entries"
        body.append(f'<h2 id="tree">Tree ({escape(shown)})</h2>')
        rows = []
        for e in tree:
            name = escape(e["path"]) + ("/" if e["type"] == "dir" else "")
            if e["type"] == "symlink":
                name += f' <span class="muted">→ {escape(e.get("target", ""))}</span>'
            size = "" if e["type"] == "dir" else human_bytes(e["size"])
            rows.append(
                [
                    (name, "cid"),
                    (escape(e["type"]), ""),
                    (escape(size), "n"),
                    (escape(utc(e["mtime"], seconds=False)), "wide"),
                ]
            )
        body.append(_table([("path", ""), ("type", ""), ("size", "n"), ("modified", "wide")], rows, "empty"))
    body.append(
        f'<footer>JSON: <a href="/status/cid.json?cid={quote(cid, safe="/")}">/status/cid.json?cid={escape(cid)}</a></footer>'
    )
    title = f"CID {cid}"
    return _page(title, refresh, _header(title, doc, viewer, refresh), body)


__all__ = [
    "StatusPages",
    "Viewer",
    "human_bytes",
    "human_seconds",
    "operator_key",
    "render_cid",
    "render_status",
]
