"""Service configuration: one TOML file, or the embedded local default.

Every key has a default, so the smallest useful file names its repositories::

    data_dir = "/srv/rcds"

    [[repository]]
    name = "user1.example.org"

    [[repository]]
    name = "user2.example.org"

The full list of keys, with defaults, is in the README ("Configuration").
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ingest.tarstream import IngestLimits
from ..tomlconfig import ConfigError, TomlTable

GiB = 1 << 30
MiB = 1 << 20

DEFAULT_REPOSITORIES = ("user1.rcds.local", "user2.rcds.local")


@dataclass(frozen=True)
class RepositorySettings:
    name: str
    storage: Path
    # Whether this server is the stratum 0 (publishes) for it; otherwise ``storage`` holds a replica.
    local: bool = True
    # A replica's source: the owning server's /cvmfs/<name> URLs (failover in order), and the master key.
    upstream: tuple[str, ...] = ()
    public_key: Path | None = None
    # Where a replica follows its upstream's notifications (API roots, ``.../api/v1``): None derives them from
    # ``upstream`` (``<base>/cvmfs/<name>`` -> ``<base>/api/v1``), () turns them off (polling only).
    notifications: tuple[str, ...] | None = None
    # The public files in an S3 bucket (``storage = "s3://bucket/prefix"``), ours or a replica's: {"url":
    # ..., plus rcds.storage.s3.S3Settings options}; ``storage`` is then the local private state directory
    # (``state``). Empty: the public files are in ``storage``.
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def notification_roots(self) -> tuple[str, ...]:
        if self.notifications is not None:
            return self.notifications
        from ..cvmfs.subscriber import api_root_of

        roots = (api_root_of(u, self.name) for u in self.upstream)
        return tuple(r for r in roots if r is not None)


@dataclass(frozen=True)
class NotificationSettings:
    """``[notifications]``: the server's announcement streams (``/api/v1/notifications/subscribe``)."""

    keepalive: float = 30.0  # seconds without a message before the latest one is sent again
    max_subscribers: int = 1000  # streams open at once; beyond, 503
    queue: int = 64  # messages waiting for one subscriber; beyond, it is dropped


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    ca_file: Path | None = None
    ca_path: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class GroupSettings:
    """``[auth.groups.<group>]``: X.509 DNs, token identities ``(issuer, sub)``, and whole token issuers."""

    group: str
    dns: tuple[str, ...] = ()
    tokens: tuple[tuple[str, str], ...] = ()
    issuers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    allow_localhost: bool = True
    gridmapfile: Path | None = Path("/etc/grid-security/grid-mapfile")
    # token issuer URL -> JWKS location (file path or URL), or "" to discover it from the issuer
    issuers: dict[str, str] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    groups: tuple[GroupSettings, ...] = ()
    groups_default_allow: bool = True


@dataclass(frozen=True)
class SourceSettings:
    """Server-side downloads (``publish?source=host/path``)."""

    # Host names, or "*.domain" for its subdomains, each with an optional ":port" (else the scheme's default
    # port only). GitHub archive links redirect to codeload.github.com.
    allow: tuple[str, ...] = ("github.com", "*.github.com", "*.githubusercontent.com")
    # Networks outside the public internet (loopback, private, link-local, ...) that downloads may reach;
    # every other non-public address is refused, whatever name resolves to it.
    allow_networks: tuple[str, ...] = ()
    scheme: str = "https"
    timeout: float = 300.0
    max_size: int = 4 * GiB


@dataclass(frozen=True)
class UploadLimits:
    """What one client may hold while an upload body (or a ``source=`` download) is being received.

    The defaults never stop an honest upload: a 3 GB tarball over a 1 Mbit/s link sends 125 KB every second,
    over a hundred times ``min_rate``, and never pauses for a minute. They do stop stalled or trickling
    uploads from holding a socket and an open spool file for ever (issue 12, defect 6).
    """

    idle_timeout: float = 60.0  # seconds without a byte of body, then the upload is cut (408)
    min_rate: int = 1024  # bytes per second, averaged over each rate_window of time spent waiting for data
    rate_window: float = 60.0
    max_uploads: int = 256  # uploads and downloads being received at once, in total (503 beyond)
    max_uploads_per_identity: int = 64  # ... and per identity (all localhost clients are one identity)
    retry_after: int = 10  # seconds, in the Retry-After of those 503 answers


@dataclass(frozen=True)
class StatusSettings:
    """``[status]``: the status page and ``/status.json`` (see docs/status.md)."""

    # Viewers without credentials see the non-sensitive parts (no identities); False: they get a 403.
    anonymous: bool = True
    # Identities that see identities (DNs, token subjects, publishers): DNs, "<issuer>#<sub>" or
    # "localhost". Empty: every authenticated identity does.
    operators: tuple[str, ...] = ()
    refresh: int = 10  # seconds between the page's own reloads
    sample_seconds: float = 60.0  # queue depth and replica lag are sampled this often for the charts
    cache_seconds: float = 2.0  # a status document is reused this long (0: built for every request)


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]``: the CVMFS-gateway-compatible API (``/api/v1``, docs/gateway.md)."""

    enabled: bool = False  # serve /api/v1 leases and payloads (default: when key_files are given)
    key_files: tuple[Path, ...] = ()  # files of ``plain_text <key id> <secret>`` lines
    # key id -> the lease paths it may take ("<repo>/<path>", "<repo>/" for the whole repository)
    key_paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    admin_keys: tuple[str, ...] = ()
    max_lease_time: float = 7200.0  # seconds a lease lives without a refresh (the stock default)


@dataclass(frozen=True)
class ServiceSettings:
    data_dir: Path
    repositories: tuple[RepositorySettings, ...]
    queue_dir: Path
    prefix: str = "sw"
    maxdays: float = 30.0  # a CID unused for longer is removed by the daily cleanup
    gcstarthour: int = 3  # repository i (1-based, configuration order) is cleaned at (gcstarthour-1+i) % 24
    auto_cleanup: bool = True  # run the daily cleanup and garbage collection
    gc_horizon_days: float = 3.0  # revisions newer than this are kept by garbage collection
    share_seconds: float = 3600.0  # how far a last-use time may move before its ts/ record is rewritten
    replica_interval: float = 15.0  # seconds between snapshots of each replica's upstream
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    max_upload: int = 4 * GiB
    uploads: UploadLimits = field(default_factory=UploadLimits)
    limits: IngestLimits = field(default_factory=IngestLimits)
    batch_max_jobs: int = 100
    batch_max_bytes: int = 512 * MiB
    # Publishes ingested at once per repository, each under a lease on its own path (0: by CPU count).
    # 1 is the serialized design of before: one transaction ingests a whole batch under the writer lock.
    ingest_slots: int = 0
    # An ingest that makes no progress for this long loses its lease; its result is refused at graft.
    lease_seconds: float = 120.0
    # Tarballs up to this size are small: with two slots or more one slot is kept for them alone.
    small_publish_bytes: int = 64 * MiB
    # A big upload staged as it arrives gives its ingest slot back once the staging has waited this long
    # for the uploader in all (a slow link): it is ingested from the spool when complete, as any other.
    early_staging_max_wait: float = 300.0
    publish_attempts: int = 3
    retry_delay: float = 5.0  # seconds before the first retry; doubles with each attempt
    # Longest wait between tries of a job waiting for the storage (full disk...): how soon publishing
    # resumes once space is back.
    max_retry_delay: float = 60.0
    touch_flush_seconds: float = 5.0
    auth: AuthSettings = field(default_factory=AuthSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    listeners: tuple[Listener, ...] = (Listener("127.0.0.1", 8080),)
    tls: TlsSettings | None = None
    # A connection that sends no complete request for this long (slow or stalled headers included) is closed.
    idle_timeout: float = 75.0
    # Open client connections at once; beyond it a new one gets a 503 and is closed. 0: derived at start from
    # the open-file limit, so that accept() and spool files never run out of file descriptors.
    max_connections: int = 0
    create_missing: bool = True  # create local repositories on first start
    embedded: bool = False
    status: StatusSettings = field(default_factory=StatusSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

    @property
    def slots(self) -> int:
        """``ingest_slots``, or by CPU count (2 to 8: a small publish always has a slot of its own)."""
        return self.ingest_slots or min(8, max(2, os.cpu_count() or 1))

    @property
    def local_repositories(self) -> tuple[RepositorySettings, ...]:
        return tuple(r for r in self.repositories if r.local)


def embedded_default(data_dir: Path | str = "rcds-data", port: int = 8080) -> ServiceSettings:
    """Two local repositories under ``data_dir``, HTTP on 127.0.0.1, localhost publishes without credentials."""
    data_dir = Path(data_dir).absolute()
    repos = tuple(RepositorySettings(name, data_dir / name) for name in DEFAULT_REPOSITORIES)
    return ServiceSettings(
        data_dir=data_dir,
        repositories=repos,
        queue_dir=data_dir / "queue",
        listeners=(Listener("127.0.0.1", port),),
        auth=AuthSettings(gridmapfile=None),
        embedded=True,
    )


def load_settings(path: Path | str) -> ServiceSettings:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return settings_from_dict(raw, base=path.parent)


def _s3_store(name: str, url: str, table: TomlTable) -> dict[str, Any]:
    """``storage = "s3://bucket[/subpath]"`` and ``[repository.s3]``: the keys are under
    ``<subpath>/<name>/`` (the alias CVMFS uses), or under the URL's path if it already ends with the name."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path.strip("/")
    if not parts.netloc:
        raise ConfigError(f"repository {name}: storage {url!r} names no bucket (s3://bucket/prefix)")
    if path.rsplit("/", 1)[-1] != name:
        path = f"{path}/{name}" if path else name
    store: dict[str, Any] = {"url": f"s3://{parts.netloc}/{path}"}
    for key in ("endpoint", "region", "addressing", "profile", "public_url"):
        if table.has(key):
            store[key] = table.text(key)
    for key in ("parallelism", "retries"):
        if table.has(key):
            store[key] = table.integer(key, 0)
    for key in ("https", "peek_before_put"):
        if table.has(key):
            store[key] = table.flag(key, True)
    if table.has("timeout"):
        store["timeout"] = table.number("timeout", 60.0)
    if store.get("addressing", "path") not in ("path", "virtual"):
        raise ConfigError(f"repository {name}: s3.addressing is 'path' or 'virtual'")
    table.done()
    return store


def settings_from_dict(raw: dict[str, Any], base: Path = Path(".")) -> ServiceSettings:
    r = TomlTable(raw, "")

    def resolve(p: str) -> Path:
        return (base / p).absolute()

    data_dir = resolve(r.text("data_dir", "rcds-data"))
    repos = []
    for i, item in enumerate(r.items("repository")):
        rr = TomlTable(item, f"repository[{i}].")
        name = rr.text("name")
        storage = rr.text("storage", str(data_dir / name))
        store: dict[str, Any] = {}
        if storage.startswith("s3://"):
            store = _s3_store(name, storage, TomlTable(rr.subtable("s3"), f"repository[{i}].s3."))
            storage = rr.text("state", str(data_dir / name))
        local = rr.flag("local", True)
        upstream_raw = rr.value("upstream", [], (str, list))
        upstream = tuple([upstream_raw] if isinstance(upstream_raw, str) else upstream_raw)
        key = rr.text("public_key", "")
        notify_raw = rr.value("notifications", None, (str, list, bool))
        if notify_raw is True:
            raise ConfigError(f"repository {name}: notifications is a URL, a list of URLs, or false")
        notify = (
            None
            if notify_raw is None
            else ()
            if notify_raw is False
            else ((notify_raw,) if isinstance(notify_raw, str) else tuple(str(u) for u in notify_raw))
        )
        if upstream and local:
            raise ConfigError(f"repository {name}: upstream is for replicas (local = false)")
        if upstream and not key:
            raise ConfigError(
                f"repository {name}: a replica needs the public_key its signatures are checked with"
            )
        repos.append(
            RepositorySettings(
                name,
                resolve(storage),
                local,
                tuple(u.rstrip("/") for u in upstream),
                resolve(key) if key else None,
                None if notify is None else tuple(u.rstrip("/") for u in notify),
                store,
            )
        )
        rr.done()
    if not repos:
        raise ConfigError("no [[repository]] configured")
    if len({x.name for x in repos}) != len(repos):
        raise ConfigError("repository names must be unique")

    lim = TomlTable(r.subtable("limits"), "limits.")
    d = IngestLimits()
    limits = IngestLimits(
        max_total_size=lim.integer("max_total_size", d.max_total_size),
        max_entries=lim.integer("max_entries", d.max_entries),
        max_file_size=lim.integer("max_file_size", d.max_file_size),
        max_path_length=lim.integer("max_path_length", d.max_path_length),
        max_name_length=lim.integer("max_name_length", d.max_name_length),
        max_compression_ratio=lim.number("max_compression_ratio", d.max_compression_ratio),
        ratio_grace=lim.integer("ratio_grace", d.ratio_grace),
        max_nested_catalogs=lim.integer("max_nested_catalogs", d.max_nested_catalogs),
        max_catalog_depth=lim.integer("max_catalog_depth", d.max_catalog_depth),
    )
    if limits.max_nested_catalogs < 0 or limits.max_catalog_depth < 0:
        raise ConfigError("limits.max_nested_catalogs and limits.max_catalog_depth must not be negative")
    max_upload = lim.integer("max_upload", 4 * GiB)
    batch_max_jobs = lim.integer("batch_max_jobs", 100)
    batch_max_bytes = lim.integer("batch_max_bytes", 512 * MiB)
    du = UploadLimits()
    uploads = UploadLimits(
        idle_timeout=lim.number("upload_idle_timeout", du.idle_timeout),
        min_rate=lim.integer("upload_min_rate", du.min_rate),
        rate_window=lim.number("upload_rate_window", du.rate_window),
        max_uploads=lim.integer("max_uploads", du.max_uploads),
        max_uploads_per_identity=lim.integer("max_uploads_per_identity", du.max_uploads_per_identity),
        retry_after=lim.integer("retry_after", du.retry_after),
    )
    if min(uploads.idle_timeout, uploads.rate_window) <= 0 or uploads.min_rate < 0:
        raise ConfigError("limits.upload_idle_timeout and upload_rate_window must be positive")
    if min(uploads.max_uploads, uploads.max_uploads_per_identity, uploads.retry_after) < 1:
        raise ConfigError("limits.max_uploads, max_uploads_per_identity and retry_after must be at least 1")
    lim.done()

    a = TomlTable(r.subtable("auth"), "auth.")
    groups = []
    for g, spec in a.subtable("groups").items():
        groups.append(_group_settings(str(g), spec))
    gridmap = a.text("gridmapfile", "/etc/grid-security/grid-mapfile")
    auth = AuthSettings(
        allow_localhost=a.flag("allow_localhost", True),
        gridmapfile=resolve(gridmap) if gridmap else None,
        issuers={str(k): str(v) for k, v in a.subtable("issuers").items()},
        audiences=tuple(a.texts("audiences", [f"https://{socket.gethostname()}"])),
        groups=tuple(groups),
        groups_default_allow=a.flag("groups_default_allow", True),
    )
    a.done()

    s = TomlTable(r.subtable("source"), "source.")
    source = SourceSettings(
        allow=tuple(s.texts("allow", list(SourceSettings.allow))),
        allow_networks=tuple(s.texts("allow_networks", [])),
        scheme=s.text("scheme", "https"),
        timeout=s.number("timeout", 300.0),
        max_size=s.integer("max_size", 4 * GiB),
    )
    if source.scheme not in ("http", "https"):
        raise ConfigError("source.scheme must be http or https")
    for network in source.allow_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError(f"source.allow_networks: {exc}") from exc
    s.done()

    n = TomlTable(r.subtable("notifications"), "notifications.")
    dn = NotificationSettings()
    notifications = NotificationSettings(
        keepalive=n.number("keepalive", dn.keepalive),
        max_subscribers=n.integer("max_subscribers", dn.max_subscribers),
        queue=n.integer("queue", dn.queue),
    )
    if notifications.keepalive <= 0 or min(notifications.max_subscribers, notifications.queue) < 1:
        raise ConfigError("notifications.keepalive must be positive, max_subscribers and queue at least 1")
    n.done()

    h = TomlTable(r.subtable("server"), "server.")
    listeners = []
    for spec in h.texts("http", ["127.0.0.1:8080"]):
        listeners.append(_listener(spec, tls=False))
    for spec in h.texts("https", []):
        listeners.append(_listener(spec, tls=True))
    tls = None
    if h.has("tls_cert"):
        tls = TlsSettings(
            cert=resolve(h.text("tls_cert")),
            key=resolve(h.text("tls_key")),
            ca_file=resolve(h.text("ca_file")) if h.has("ca_file") else None,
            ca_path=resolve(h.text("ca_path", "/etc/grid-security/certificates"))
            if not h.has("ca_file")
            else None,
            require_client_cert=h.flag("require_client_cert", False),
        )
    if any(li.tls for li in listeners) and tls is None:
        raise ConfigError("server.https needs server.tls_cert and server.tls_key")
    idle_timeout = h.number("idle_timeout", 75.0)
    max_connections = h.integer("max_connections", 0)
    if idle_timeout <= 0 or max_connections < 0:
        raise ConfigError("server.idle_timeout must be positive and server.max_connections not negative")
    h.done()

    st = TomlTable(r.subtable("status"), "status.")
    status = StatusSettings(
        anonymous=st.flag("anonymous", True),
        operators=tuple(st.texts("operators", [])),
        refresh=st.integer("refresh", 10),
        sample_seconds=st.number("sample_seconds", 60.0),
        cache_seconds=st.number("cache_seconds", 2.0),
    )
    if status.refresh < 1 or status.sample_seconds <= 0 or status.cache_seconds < 0:
        raise ConfigError(
            "status.refresh must be at least 1, status.sample_seconds positive, status.cache_seconds not negative"
        )
    st.done()

    gw = TomlTable(r.subtable("gateway"), "gateway.")
    key_files = tuple(resolve(f) for f in gw.texts("key_files", []))
    gateway = GatewaySettings(
        enabled=gw.flag("enabled", bool(key_files)),
        key_files=key_files,
        key_paths={str(k): _key_paths(str(k), v) for k, v in gw.subtable("key_paths").items()},
        admin_keys=tuple(gw.texts("admin_keys", [])),
        max_lease_time=gw.number("max_lease_time", 7200.0),
    )
    if gateway.max_lease_time <= 0:
        raise ConfigError("gateway.max_lease_time must be positive")
    gw.done()

    settings = ServiceSettings(
        data_dir=data_dir,
        repositories=tuple(repos),
        queue_dir=resolve(r.text("queue_dir", str(data_dir / "queue"))),
        prefix=r.text("prefix", "sw").strip("/"),
        maxdays=r.number("maxdays", 30.0),
        gcstarthour=r.integer("gcstarthour", 3),
        auto_cleanup=r.flag("auto_cleanup", True),
        gc_horizon_days=r.number("gc_horizon_days", 3.0),
        share_seconds=r.number("share_seconds", 3600.0),
        replica_interval=r.number("replica_interval", 15.0),
        notifications=notifications,
        max_upload=max_upload,
        uploads=uploads,
        limits=limits,
        batch_max_jobs=batch_max_jobs,
        batch_max_bytes=batch_max_bytes,
        ingest_slots=r.integer("ingest_slots", 0),
        lease_seconds=r.number("lease_seconds", 120.0),
        small_publish_bytes=r.integer("small_publish_bytes", 64 * MiB),
        early_staging_max_wait=r.number("early_staging_max_wait", 300.0),
        publish_attempts=r.integer("publish_attempts", 3),
        retry_delay=r.number("retry_delay", 5.0),
        max_retry_delay=r.number("max_retry_delay", 60.0),
        touch_flush_seconds=r.number("touch_flush_seconds", 5.0),
        auth=auth,
        source=source,
        listeners=tuple(listeners),
        tls=tls,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        create_missing=r.flag("create_missing", True),
        status=status,
        gateway=gateway,
    )
    r.done()
    if settings.maxdays <= 0 or settings.gc_horizon_days < 0 or not 0 <= settings.gcstarthour <= 23:
        raise ConfigError("maxdays must be positive, gc_horizon_days not negative, gcstarthour 0-23")
    if settings.retry_delay <= 0 or settings.max_retry_delay < settings.retry_delay:
        raise ConfigError("retry_delay must be positive and max_retry_delay at least retry_delay")
    if settings.ingest_slots < 0 or settings.lease_seconds <= 0 or settings.small_publish_bytes < 0:
        raise ConfigError("ingest_slots and small_publish_bytes must not be negative, lease_seconds positive")
    if settings.early_staging_max_wait < 0:
        raise ConfigError("early_staging_max_wait must not be negative")
    if not settings.prefix or "/" in settings.prefix:
        raise ConfigError("prefix must be one path component")
    return settings


def _group_settings(group: str, spec: Any) -> GroupSettings:
    """One ``[auth.groups.<group>]`` table.

    ``subjects`` keeps its old spelling for DNs (they start with ``/``); a token identity is written
    ``"<issuer>#<sub>"`` there or ``{issuer = ..., sub = ...}`` in ``tokens``. A bare token ``sub`` (which older
    versions matched from any issuer, and against DNs) is refused rather than silently reinterpreted.
    """
    where = f"auth.groups.{group}."
    gr = TomlTable(spec, where)
    dns: list[str] = []
    tokens: list[tuple[str, str]] = []
    for subject in gr.texts("subjects"):
        issuer, hash_sign, sub = subject.partition("#")
        if subject.startswith("/"):
            dns.append(subject)
        elif hash_sign and issuer.startswith(("https://", "http://")) and sub:
            tokens.append((issuer, sub))
        else:
            raise ConfigError(
                f"{where}subjects: {subject!r} is neither a DN (starting with /) nor a token identity "
                '"<issuer>#<sub>" (a token subject means nothing without its issuer)'
            )
    for i, item in enumerate(gr.items("tokens")):
        t = TomlTable(item, f"{where}tokens[{i}].")
        tokens.append((t.text("issuer"), t.text("sub")))
        t.done()
    issuers = tuple(gr.texts("issuers"))
    gr.done()
    return GroupSettings(group, tuple(dns), tuple(tokens), issuers)


def _key_paths(key_id: str, spec: Any) -> tuple[str, ...]:
    paths = [spec] if isinstance(spec, str) else spec
    if not isinstance(paths, list) or not all(isinstance(p, str) and "/" in p for p in paths):
        raise ConfigError(f'gateway.key_paths.{key_id}: a list of "<repository>/<path>" strings')
    return tuple(paths)


def _listener(spec: str, tls: bool) -> Listener:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {spec!r} must be HOST:PORT")
    return Listener(host.strip("[]"), int(port), tls)
