"""Finding the user's credentials the way grid tools do.

Bearer tokens follow WLCG token discovery (WLCG Bearer Token Discovery, 2020): ``$BEARER_TOKEN``, then
the file ``$BEARER_TOKEN_FILE``, then ``$XDG_RUNTIME_DIR/bt_u<uid>``, then ``/tmp/bt_u<uid>``. Without a
token, an X.509 proxy: ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``. Servers are verified against
``$X509_CERT_DIR`` (the grid CA directory, hashed names), else ``/etc/grid-security/certificates`` when
it exists, else the system's trust store.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ClientError

GRID_CA_DIR = Path("/etc/grid-security/certificates")

log = logging.getLogger("rcds.client")


class CredentialError(ClientError):
    """A credential was named but cannot be used (unreadable, empty, insecure)."""


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    token_source: str | None = None  # where the token came from, for messages
    proxy: Path | None = None  # X.509 proxy file: certificate, key and chain in one PEM
    ca_dir: Path | None = None
    ca_file: Path | None = None

    @property
    def description(self) -> str:
        if self.token:
            return f"bearer token from {self.token_source}"
        if self.proxy:
            return f"X.509 proxy {self.proxy}"
        return "no credentials"

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context that verifies servers with the grid CAs and presents the proxy, if any."""
        if self.ca_dir or self.ca_file:
            ctx = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None,
                capath=str(self.ca_dir) if self.ca_dir else None,
            )
        else:
            ctx = ssl.create_default_context()
        if self.proxy is not None and self.token is None:
            try:
                ctx.load_cert_chain(str(self.proxy))
            except (OSError, ssl.SSLError) as exc:
                raise CredentialError(f"cannot use X.509 proxy {self.proxy}: {exc}") from exc
        return ctx

    @property
    def trust_description(self) -> str:
        """Where server certificates are checked against, for an error that says how to change it."""
        if self.ca_file:
            return f"the CA file {self.ca_file}"
        if self.ca_dir:
            return f"the CA directory {self.ca_dir}"
        paths = ssl.get_default_verify_paths()
        where = " and ".join(p for p in (paths.cafile, paths.capath) if p) or "its default location"
        return f"the system trust store ({where})"

    def headers_for(self, url: str) -> dict[str, str]:
        """The Authorization header, sent only over HTTPS or to this machine (a token is a secret)."""
        if not self.token or not _may_send_secret(url):
            return {}
        return {"Authorization": f"Bearer {self.token}"}


def _may_send_secret(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError(f"cannot read bearer token {path}: {exc.strerror}") from exc
    return text or None


def find_credentials(env: Mapping[str, str] | None = None, uid: int | None = None) -> Credentials:
    """The first credential found in the WLCG discovery order (see the module docstring)."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    ca_dir, ca_file = _trust(env)
    token = env.get("BEARER_TOKEN", "").strip()
    if token:
        return Credentials(token=token, token_source="$BEARER_TOKEN", ca_dir=ca_dir, ca_file=ca_file)
    candidates: list[Path] = []
    if env.get("BEARER_TOKEN_FILE"):
        named = Path(env["BEARER_TOKEN_FILE"])
        found = _read_token(named)
        if found is None:
            raise CredentialError(f"BEARER_TOKEN_FILE names {named}, which is missing or empty")
        return Credentials(token=found, token_source=str(named), ca_dir=ca_dir, ca_file=ca_file)
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / f"bt_u{uid}")
    candidates.append(Path("/tmp") / f"bt_u{uid}")
    for path in candidates:
        found = _read_token(path)
        if found is not None:
            return Credentials(token=found, token_source=str(path), ca_dir=ca_dir, ca_file=ca_file)
    proxy = Path(env["X509_USER_PROXY"]) if env.get("X509_USER_PROXY") else Path("/tmp") / f"x509up_u{uid}"
    if proxy.is_file():
        mode = proxy.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # The file holds a private key: the grid tools refuse a readable one, and so do we.
            raise CredentialError(f"X.509 proxy {proxy} is readable by others (chmod 600 it)")
        return Credentials(proxy=proxy, ca_dir=ca_dir, ca_file=ca_file)
    if env.get("X509_USER_PROXY"):
        raise CredentialError(f"X509_USER_PROXY names {proxy}, which does not exist")
    return Credentials(ca_dir=ca_dir, ca_file=ca_file)


def credentials_for_reading(env: Mapping[str, str] | None = None) -> Credentials:
    """Credentials for calls that need none to succeed (``config``, ``status`` while waiting).

    A stale ``X509_USER_PROXY`` must not stop a job that only reads: without usable credentials such
    calls go out with none, still verifying servers against the same CAs.
    """
    try:
        return find_credentials(env)
    except CredentialError as exc:
        log.info("going on without credentials: %s", exc)
        ca_dir, ca_file = _trust(os.environ if env is None else env)
        return Credentials(ca_dir=ca_dir, ca_file=ca_file)


def _trust(env: Mapping[str, str]) -> tuple[Path | None, Path | None]:
    if env.get("X509_CERT_DIR"):
        return Path(env["X509_CERT_DIR"]), None
    if env.get("RCDS_CA_FILE"):
        return None, Path(env["RCDS_CA_FILE"])
    if GRID_CA_DIR.is_dir():
        return GRID_CA_DIR, None
    return None, None


__all__ = ["CredentialError", "Credentials", "credentials_for_reading", "find_credentials"]
