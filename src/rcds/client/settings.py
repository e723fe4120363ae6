"""Client settings: command-line options over environment variables over a TOML file over defaults.

The file is ``$RCDS_CLIENT_CONFIG``, else ``~/.config/rcds/client.toml``, else ``/etc/rcds/client.toml``
(the first that exists). Every key is optional::

    servers = ["https://rcds01.example.org", "https://rcds02.example.org"]  # publish servers
    group = "dune"                  # first half of the CID (default: your user name)
    prefix = "sw"                   # the servers' directory for CIDs inside each repository
    repositories = ["user1.example.org", "user2.example.org"]  # default: asked from the servers
    stratum_urls = ["http://s1.example.org:8000/cvmfs/@fqrn@"]  # default: <server>/cvmfs/@fqrn@
    proxies = "http://squid1:3128|http://squid2:3128;DIRECT"   # CVMFS_HTTP_PROXY syntax, or a list
    keys = "/etc/cvmfs/keys"        # master public keys: a directory or a .pub file
    mount_root = "/cvmfs"
    cache = "/scratch/rcds-cache"   # node cache for `rcds get`
    connect_timeout = 10            # seconds
    read_timeout = 60               # seconds without a byte from the server
    retries = 3                     # rounds over all servers before giving up

Environment: ``RCDS_SERVERS`` (space or comma separated), ``RCDS_GROUP``, ``RCDS_PREFIX``,
``RCDS_REPOSITORIES``, ``RCDS_STRATUM_URLS``, ``RCDS_HTTP_PROXY``, ``RCDS_KEYS``, ``RCDS_CACHE``.
"""

from __future__ import annotations

import getpass
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..tomlconfig import ConfigError, TomlTable

try:
    import tomllib  # novermin (vermin: minitoml is used before 3.11)
except ImportError:  # python < 3.11: the job client on a worker node
    from .. import minitoml as tomllib  # type: ignore[no-redef]

DIRECT = "DIRECT"
DEFAULT_PREFIX = "sw"
DEFAULT_KEY_DIRS = (Path("/etc/cvmfs/keys"),)


@dataclass(frozen=True)
class ClientSettings:
    servers: tuple[str, ...] = ()
    group: str = ""
    prefix: str = DEFAULT_PREFIX
    repositories: tuple[str, ...] = ()
    stratum_urls: tuple[str, ...] = ()
    proxies: tuple[str, ...] = ()
    keys: tuple[Path, ...] = DEFAULT_KEY_DIRS
    mount_root: Path = Path("/cvmfs")
    cache: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    source: str = field(default="defaults", compare=False)  # where the settings came from, for errors

    def with_overrides(self, **changes: Any) -> ClientSettings:
        """These settings with the given fields replaced; ``None`` values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def effective_group(self) -> str:
        return self.group or getpass.getuser()

    def repository_urls(self, fqrn: str) -> list[str]:
        """Where to read repository ``fqrn`` over HTTP: the stratum URLs, else the publish servers."""
        templates = self.stratum_urls or tuple(f"{s.rstrip('/')}/cvmfs/@fqrn@" for s in self.servers)
        return [t.replace("@fqrn@", fqrn) for t in templates]

    def public_key_files(self, fqrn: str) -> list[Path]:
        """Master public keys for ``fqrn``, found the way CVMFS lays out /etc/cvmfs/keys.

        A place may also be an rcds server's data directory (``rcds serve --data-dir``, where each
        repository keeps its keys in ``<fqrn>/.rcds/keys/``) or one repository's storage directory: a
        user of a server on this machine points ``--keys`` at what that server wrote, nothing to copy.
        """
        domain = fqrn.split(".", 1)[1] if "." in fqrn else fqrn
        found: list[Path] = []
        for place in self.keys:
            if place.is_file():
                found.append(place)
                continue
            for candidate in (
                place / f"{fqrn}.pub",
                place / domain / f"{fqrn}.pub",
                place / f"{domain}.pub",
                place / fqrn / ".rcds" / "keys" / f"{fqrn}.pub",
                place / ".rcds" / "keys" / f"{fqrn}.pub",
            ):
                if candidate.is_file():
                    found.append(candidate)
            if (place / domain).is_dir():
                found.extend(sorted(p for p in (place / domain).glob("*.pub") if p not in found))
        return found


def parse_proxies(spec: str) -> tuple[str, ...]:
    """A CVMFS_HTTP_PROXY string as an ordered failover list.

    ``a|b;c|d;DIRECT``: groups separated by ``;`` are tried in order; proxies within a group (``|``) are
    equivalent, so each client takes them in a random order to spread the load.
    """
    order: list[str] = []
    for group in spec.split(";"):
        members = [p.strip() for p in group.split("|") if p.strip()]
        random.shuffle(members)
        order.extend(DIRECT if p.upper() == DIRECT else _proxy_url(p) for p in members)
    return tuple(order)


def _proxy_url(proxy: str) -> str:
    return proxy if "://" in proxy else f"http://{proxy}"


def server_url(server: str) -> str:
    """A publish server as a base URL: a bare host name means HTTPS on the default port.

    Mistakes that would otherwise surface later as puzzling failures (a 404 for a URL ending in
    ``/pubapi``, a TLS error for another scheme) are refused here with what to write instead.
    """
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = f"https://{server}"
    scheme, rest = server.split("://", 1)
    if scheme.lower() not in ("http", "https"):
        raise ConfigError(
            f"server {server!r}: the scheme must be http:// or https:// (for example http://127.0.0.1:8080)"
        )
    host, _, path = rest.partition("/")
    if not host:
        raise ConfigError(f"server {server!r} names no host")
    if path.rstrip("/").split("/")[-1] == "pubapi":
        base = f"{scheme}://{host}"
        raise ConfigError(
            f"server {server!r}: give the base URL without /pubapi ({base}); rcds adds /pubapi/..."
        )
    return server


def _split(text: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[\s,]+", text) if part)


def config_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("RCDS_CLIENT_CONFIG")
    if explicit:
        return Path(explicit)
    for candidate in (Path.home() / ".config" / "rcds" / "client.toml", Path("/etc/rcds/client.toml")):
        if candidate.is_file():
            return candidate
    return None


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Settings from the configuration file, then the environment (which wins)."""
    env = os.environ if env is None else env
    settings = ClientSettings()
    path = config_path(env)
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        settings = _from_table(raw, path)
    overrides: dict[str, Any] = {}
    if env.get("RCDS_SERVERS"):
        overrides["servers"] = tuple(server_url(s) for s in _split(env["RCDS_SERVERS"]))
    if env.get("RCDS_GROUP"):
        overrides["group"] = env["RCDS_GROUP"]
    if env.get("RCDS_PREFIX"):
        overrides["prefix"] = env["RCDS_PREFIX"].strip("/")
    if env.get("RCDS_REPOSITORIES"):
        overrides["repositories"] = _split(env["RCDS_REPOSITORIES"])
    if env.get("RCDS_STRATUM_URLS"):
        overrides["stratum_urls"] = _split(env["RCDS_STRATUM_URLS"])
    if env.get("RCDS_HTTP_PROXY"):
        overrides["proxies"] = parse_proxies(env["RCDS_HTTP_PROXY"])
    if env.get("RCDS_KEYS"):
        overrides["keys"] = tuple(Path(p) for p in env["RCDS_KEYS"].split(":") if p)
    if env.get("RCDS_CACHE"):
        overrides["cache"] = Path(env["RCDS_CACHE"])
    if overrides:
        settings = replace(settings, **overrides, source=f"{settings.source} and the environment")
    return settings


def _from_table(raw: dict[str, Any], path: Path) -> ClientSettings:
    t = TomlTable(raw, "")
    proxies_raw = t.value("proxies", "", (str, list))
    if isinstance(proxies_raw, list):
        proxies = tuple(DIRECT if p == DIRECT else _proxy_url(str(p)) for p in proxies_raw)
    else:
        proxies = parse_proxies(proxies_raw) if proxies_raw else ()
    keys_raw = t.value("keys", "", (str, list))
    keys = tuple(Path(k) for k in ([keys_raw] if isinstance(keys_raw, str) else keys_raw) if k)
    cache = t.text("cache", "")
    settings = ClientSettings(
        servers=tuple(server_url(s) for s in t.texts("servers")),
        group=t.text("group", ""),
        prefix=t.text("prefix", DEFAULT_PREFIX).strip("/"),
        repositories=tuple(t.texts("repositories")),
        stratum_urls=tuple(t.texts("stratum_urls")),
        proxies=proxies,
        keys=keys or DEFAULT_KEY_DIRS,
        mount_root=Path(t.text("mount_root", "/cvmfs")),
        cache=Path(cache) if cache else None,
        connect_timeout=t.number("connect_timeout", 10.0),
        read_timeout=t.number("read_timeout", 60.0),
        retries=t.integer("retries", 3),
        source=str(path),
    )
    t.done()
    if settings.retries < 1:
        raise ConfigError(f"{path}: retries must be at least 1")
    return settings


__all__ = ["ClientSettings", "ConfigError", "load_client_settings", "parse_proxies", "server_url"]
