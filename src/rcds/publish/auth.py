"""Authentication and authorisation of publish requests: bearer tokens, X.509 certificates and proxies, localhost.

The behaviour follows Fermilab's cvmfs-user-pub (reference study ``cvmfs-user-pub.md`` section 4), with the
exact 403 bodies it sends, and with these deliberate fixes:

* The token issuer allowlist is checked **before** any key is fetched or used (the original let scitokens
  fetch keys for whatever issuer a token named, then checked the issuer).
* Tokens are refused over plain HTTP unless the client is on the loopback interface.
* ``exp`` and ``aud`` are required; the signing algorithm must be an asymmetric one that matches the key
  (``none`` and ``HS*`` never verify anything); symmetric (``oct``) keys in a JWKS are ignored.
* ``storage.create:<path>`` scopes are honoured as well as ``compute.create``, restricted by path.
* Optional per-group authorisation (:class:`Authorizer`): the original let any authorised identity publish
  under any ``group/`` CID prefix.

Nothing here knows about HTTP frameworks: the web layer passes in the client address, the ``Authorization``
header, the TLS peer DN (:func:`peer_dn_from_ssl_object`) and whether the connection is TLS, and turns an
:class:`AuthError` into ``403 Access denied`` with body ``error.message + "\\n"``.

:meth:`TokenVerifier.verify` (and so :meth:`Authenticator.authenticate` with a token) may block on HTTP for up
to the fetch timeout while issuer keys are (re)fetched; call it from a worker thread
(``asyncio.to_thread``). Everything here is thread-safe.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = [
    "WLCG_ANY_AUDIENCE",
    "AuthError",
    "Authenticator",
    "Authorizer",
    "GridMapfile",
    "GroupRule",
    "Identity",
    "JwksCache",
    "JwksError",
    "TokenVerifier",
    "dn_from_peercert",
    "identity_name_from_dn",
    "is_loopback",
    "peer_dn_from_ssl_object",
    "server_ssl_context",
    "strip_proxy_cns",
]

log = logging.getLogger(__name__)

WLCG_ANY_AUDIENCE: Final = "https://wlcg.cern.ch/jwt/v1/any"

# 403 bodies, exactly as cvmfs-user-pub sends them (without the trailing newline).
MSG_PARSE_AUTHORIZATION: Final = "Failure to parse Authorization"
MSG_UNRECOGNIZED_SCHEME: Final = "Unrecognized authorization scheme"
MSG_TOKENS_REQUIRE_HTTPS: Final = "Tokens require HTTPS"  # new in rcds
MSG_UNTRUSTED_ISSUER: Final = "Untrusted token issuer"
MSG_SCOPE_MISSING: Final = "compute.create scope missing from token"
MSG_DECODING_PREFIX: Final = "Error decoding token: "
MSG_MALFORMED_DN: Final = "Malformed DN"
MSG_UNRECOGNIZED_DN: Final = "Unrecognized DN"
MSG_CREDENTIAL_REQUIRED: Final = "Token or client cert required"


class AuthError(Exception):
    """A refused request: ``status`` (403) and ``message``, the exact response body without its newline."""

    def __init__(self, message: str, *, status: int = 403) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Identity:
    """Who made a request.

    ``method`` is ``"x509"``, ``"token"`` or ``"localhost"``; ``subject`` the proxy-stripped slash DN, the
    token's ``sub`` or ``"localhost"``; ``issuer`` the token issuer (else None); ``name`` the short name for
    logs and ``.publisher`` (see :func:`identity_name_from_dn`; the ``sub`` for tokens).
    """

    method: str
    subject: str
    issuer: str | None
    name: str


LOCALHOST_IDENTITY: Final = Identity("localhost", "localhost", None, "localhost")


def is_loopback(remote_addr: str) -> bool:
    """True for loopback client addresses: 127.0.0.0/8, ::1 and IPv4-mapped ``::ffff:127.x.y.z``."""
    try:
        addr = ipaddress.ip_address(remote_addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


# --- X.509 distinguished names ------------------------------------------------------------------------

# Python's getpeercert() names attributes by OpenSSL long name; the slash form (mod_ssl's
# LegacyDNStringFormat, X509_NAME_oneline) uses the short names. Unknown attributes keep the name Python gives
# (the long name, or the dotted OID).
_SHORT_NAMES: Final[Mapping[str, str]] = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
    "initials": "initials",
    "title": "title",
    "serialNumber": "serialNumber",
    "emailAddress": "emailAddress",
    "pseudonym": "pseudonym",
    "generationQualifier": "generationQualifier",
    "dnQualifier": "dnQualifier",
    "name": "name",
    "postalCode": "postalCode",
    "businessCategory": "businessCategory",
}


def _escape_control(value: str) -> str:
    # Like X509_NAME_oneline: control characters are written as \xHH (keeps logs and .publisher one line).
    if all(" " <= ch != "\x7f" for ch in value):
        return value
    return "".join(ch if " " <= ch != "\x7f" else f"\\x{ord(ch):02X}" for ch in value)


def dn_from_peercert(peercert: Mapping[str, Any]) -> str:
    """Slash-form subject DN (``/DC=org/DC=example/CN=Alice``) of a ``getpeercert()`` dict, in certificate order.

    Every attribute becomes one ``/<short name>=<value>`` component (also inside multi-valued RDNs, as
    OpenSSL's one-line form does). Returns ``""`` when the dict has no subject.
    """
    parts: list[str] = []
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            parts.append(f"/{_SHORT_NAMES.get(attr, attr)}={_escape_control(str(value))}")
    return "".join(parts)


def strip_proxy_cns(dn: str) -> str:
    """Remove trailing ``/CN=<digits>`` components (RFC 3820 proxy levels), repeatedly.

    Legacy ``/CN=proxy`` and ``/CN=limited proxy`` components are kept, as in cvmfs-user-pub.
    """
    while True:
        pos = dn.rfind("/CN=")
        if pos < 0:
            return dn
        value = dn[pos + 4 :]
        if not (value.isascii() and value.isdigit()):
            return dn
        dn = dn[:pos]


def identity_name_from_dn(dn: str) -> str:
    """Short name for a DN: the text after ``/CN=UID:`` if present, else the last CN value; cut at the next ``/``."""
    pos = dn.find("/CN=UID:")
    if pos >= 0:
        rest = dn[pos + len("/CN=UID:") :]
    else:
        pos = dn.rfind("/CN=")
        rest = dn[pos + len("/CN=") :] if pos >= 0 else dn
    return rest.split("/", 1)[0]


def peer_dn_from_ssl_object(ssl_obj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified client certificate's slash DN on a server-side TLS connection, or None without one.

    For a proxy this is the proxy's own DN (with its ``/CN=<digits>``); :func:`strip_proxy_cns` removes those.
    With aiohttp: ``peer_dn_from_ssl_object(request.transport.get_extra_info("ssl_object"))``.
    """
    if ssl_obj is None:
        return None
    cert = ssl_obj.getpeercert()
    if not cert:  # None: no certificate; {}: not verified (CERT_NONE)
        return None
    dn = dn_from_peercert(cert)
    return dn or None


def server_ssl_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    ca_file: str | os.PathLike[str] | None = None,
    ca_path: str | os.PathLike[str] | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A TLS server context that asks for grid client certificates, RFC 3820 proxies included.

    Client certificates are optional (``SSLVerifyClient optional``) unless ``require_client_cert``; a
    certificate that is presented but does not verify fails the handshake. Trust anchors come from
    ``ca_file`` and/or ``ca_path``, an OpenSSL hashed directory such as ``/etc/grid-security/certificates``.
    Without either, client certificates are not requested at all. ``VERIFY_ALLOW_PROXY_CERTS`` is set (the
    equivalent of ``OPENSSL_ALLOW_PROXY_CERTS=1``); legacy (pre-RFC) proxies do not verify. Python cannot set
    the verify depth; OpenSSL's default (100) is far above the 7 proxy levels cvmfs-user-pub allows.
    CRLs are not checked (neither were they in cvmfs-user-pub).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if ca_file is None and ca_path is None:
        if require_client_cert:
            raise ValueError("require_client_cert needs ca_file or ca_path")
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.load_verify_locations(cafile=ca_file, capath=ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    flags = ctx.verify_flags | ssl.VERIFY_ALLOW_PROXY_CERTS
    flags &= ~ssl.VERIFY_X509_STRICT
    ctx.verify_flags = flags
    return ctx


class GridMapfile:
    """The DNs of a grid-mapfile: the text between the first pair of ``"`` on each non-comment line.

    The file is re-read when its mtime (or size or inode) changes; that is checked at most every
    ``check_interval`` seconds. A missing or unreadable file counts as empty (a warning is logged once, until
    the file is readable again).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._dns: frozenset[str] = frozenset()
        self._signature: tuple[int, int, int] | None = None
        self._checked_at: float | None = None
        self._warned = False

    @staticmethod
    def parse(text: str) -> frozenset[str]:
        dns: set[str] = set()
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            parts = stripped.split('"', 2)
            if len(parts) == 3:
                dns.add(parts[1])
        return frozenset(dns)

    def _refresh_locked(self) -> None:
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._check_interval:
            return
        self._checked_at = now
        try:
            st = self.path.stat()
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature == self._signature:
                return
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            if not self._warned:
                log.warning("grid-mapfile %s unreadable, no DN is accepted: %s", self.path, exc)
                self._warned = True
            self._dns = frozenset()
            self._signature = None
            return
        self._dns = self.parse(text)
        self._signature = signature
        self._warned = False
        log.info("grid-mapfile %s loaded: %d DNs", self.path, len(self._dns))

    def reload(self) -> None:
        """Check the file now, regardless of the check interval."""
        with self._lock:
            self._checked_at = None
            self._refresh_locked()

    @property
    def dns(self) -> frozenset[str]:
        with self._lock:
            self._refresh_locked()
            return self._dns

    def contains(self, dn: str) -> bool:
        return dn in self.dns

    def __contains__(self, dn: object) -> bool:
        return isinstance(dn, str) and self.contains(dn)


# --- token keys -----------------------------------------------------------------------------------------


class JwksError(Exception):
    """Issuer keys could not be fetched or found; the message is short and safe to send to the client."""


# Asymmetric JWS algorithms accepted in token headers. The key decides which of them applies.
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS: Final[Mapping[str, str]] = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ALLOWED_ALGORITHMS: Final = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values()) | {"EdDSA"}
_MIN_RSA_BITS: Final = 2048
_MAX_DOCUMENT_BYTES: Final = 1 << 20

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


@dataclass(frozen=True)
class _Key:
    kid: str | None
    key: PublicKey
    alg: str | None  # the JWK's "alg", if it names one

    def allows(self, alg: str) -> bool:
        if self.alg is not None and alg != self.alg:
            return False
        if isinstance(self.key, rsa.RSAPublicKey):
            return alg in _RSA_ALGORITHMS
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return _EC_ALGORITHMS.get(self.key.curve.name) == alg
        return alg == "EdDSA"


def _parse_jwks(data: object) -> list[_Key]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("key set is not a JWKS document")
    keys: list[_Key] = []
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # symmetric ("oct") or unknown keys are never used
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        alg = jwk.get("alg")
        if (kid is not None and not isinstance(kid, str)) or (
            alg is not None and alg not in ALLOWED_ALGORITHMS
        ):
            continue
        try:
            obj: Any = jwt.PyJWK(jwk).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("ignoring unusable JWK %r: %s", kid, exc)
            continue
        if isinstance(obj, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            obj = obj.public_key()
        if not isinstance(obj, PublicKey):
            continue
        if isinstance(obj, rsa.RSAPublicKey) and obj.key_size < _MIN_RSA_BITS:
            log.warning("ignoring %d-bit RSA JWK %r", obj.key_size, kid)
            continue
        keys.append(_Key(kid, obj, alg))
    if not keys:
        raise JwksError("key set has no usable signing keys")
    return keys


def _is_url(location: str) -> bool:
    return location.startswith(("https://", "http://"))


def _check_url(url: str) -> None:
    """Keys travel over HTTPS only; plain HTTP is allowed for loopback hosts (tests, local issuers)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if (
        parts.scheme == "http"
        and parts.hostname
        and (parts.hostname == "localhost" or is_loopback(parts.hostname))
    ):
        return
    raise JwksError(f"refusing to fetch keys from {url!r}: HTTPS required")


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: list[_Key] | None = None
    fetched_at: float = 0.0
    attempted_at: float | None = None


class JwksCache:
    """Signing keys per issuer, from a JWKS file, a JWKS URL, or OpenID discovery.

    ``location`` (given per call by :class:`TokenVerifier`) is a JWKS URL (``https://``; ``http://`` only for
    loopback hosts), a file path, or None: then ``<issuer>/.well-known/openid-configuration`` is fetched and
    its ``jwks_uri`` used, as scitokens does. Key sets are kept for ``ttl`` seconds; a ``kid`` not in the set
    triggers a refetch, but no location is fetched more than once per ``min_refetch_interval`` seconds
    (failed attempts included, so a dead issuer cannot slow every request down). When a refetch fails the
    previous keys stay in use. HTTP fetches time out after ``timeout`` seconds and follow redirects as long
    as the final URL obeys the same HTTPS rule; bodies are capped at 1 MiB.
    """

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        min_refetch_interval: float = 60.0,
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._min_refetch_interval = min_refetch_interval
        self._timeout = timeout
        self._verify = verify
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str | None], _Entry] = {}
        self.fetch_count = 0  # successful and failed key-set loads, for tests and metrics

    def _http_get_json(self, url: str) -> object:
        _check_url(url)
        try:
            with (
                httpx.Client(timeout=self._timeout, verify=self._verify, follow_redirects=True) as client,
                client.stream("GET", url, headers={"Accept": "application/json"}) as response,
            ):
                _check_url(str(response.url))
                if response.status_code != 200:
                    raise JwksError(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > _MAX_DOCUMENT_BYTES:
                        raise JwksError(f"{url}: document too large")
        except httpx.HTTPError as exc:
            raise JwksError(f"cannot fetch {url}: {type(exc).__name__}") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise JwksError(f"{url}: invalid JSON") from exc

    def _load(self, issuer: str, location: str | None) -> list[_Key]:
        if location is None:
            config = self._http_get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
            jwks_uri = config.get("jwks_uri") if isinstance(config, dict) else None
            if not isinstance(jwks_uri, str):
                raise JwksError("issuer metadata has no jwks_uri")
            return _parse_jwks(self._http_get_json(jwks_uri))
        if _is_url(location):
            return _parse_jwks(self._http_get_json(location))
        try:
            data = json.loads(Path(location).read_bytes())
        except (OSError, ValueError) as exc:
            raise JwksError(f"cannot read key file {location}: {type(exc).__name__}") from exc
        return _parse_jwks(data)

    def _try_fetch(self, entry: _Entry, issuer: str, location: str | None, now: float) -> bool:
        if entry.attempted_at is not None and now - entry.attempted_at < self._min_refetch_interval:
            return False
        entry.attempted_at = now
        with self._lock:
            self.fetch_count += 1
        try:
            keys = self._load(issuer, location)
        except JwksError as exc:
            log.warning("keys for token issuer %s unavailable: %s", issuer, exc)
            return False
        entry.keys = keys
        entry.fetched_at = now
        log.info("loaded %d signing keys for token issuer %s", len(keys), issuer)
        return True

    @staticmethod
    def _find(keys: Sequence[_Key], kid: str | None) -> _Key | None:
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.kid == kid), None)

    def _get(self, issuer: str, location: str | None, kid: str | None) -> _Key:
        with self._lock:
            entry = self._entries.setdefault((issuer, location), _Entry())
        with entry.lock:
            now = self._clock()
            if entry.keys is None or now - entry.fetched_at >= self._ttl:
                self._try_fetch(entry, issuer, location, now)
            if entry.keys is None:
                raise JwksError("cannot fetch keys for issuer")
            key = self._find(entry.keys, kid)
            if key is None and kid is not None and self._try_fetch(entry, issuer, location, now):
                key = self._find(entry.keys, kid)
            if key is None:
                raise JwksError("no kid in token header" if kid is None else f"unknown key id {kid[:64]!r}")
            return key

    def get_key(self, issuer: str, location: str | None, kid: str | None) -> PublicKey:
        """The public key for ``kid`` (the only key when ``kid`` is None); raises :class:`JwksError`."""
        return self._get(issuer, location, kid).key


# --- tokens -------------------------------------------------------------------------------------------


def _norm_components(path: str) -> list[str] | None:
    """Components of an absolute path with ``.``/``..`` resolved; None if it is not absolute."""
    if not path.startswith("/"):
        return None
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
        else:
            out.append(part)
    return out


def _is_number(value: object) -> bool:
    # Not bool, not NaN/Infinity (json.loads accepts them; "exp": NaN would never expire).
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _decode_error(reason: str) -> AuthError:
    return AuthError(MSG_DECODING_PREFIX + reason)


class TokenVerifier:
    """Verifies WLCG/SciTokens bearer tokens (JWTs) for publishing.

    ``issuers`` maps each trusted issuer (the exact ``iss`` value) to its JWKS location: a file path, a URL,
    or None (or ``""``) for OpenID discovery (see :class:`JwksCache`). Accepted audiences are the WLCG "any"
    audience plus ``audiences``. ``clock`` returns Unix time; ``leeway`` (seconds) applies to ``exp``,
    ``nbf`` and ``iat``. ``exp``, ``aud`` and a printable ``sub`` are required.

    Scope: the space-separated ``scope`` claim must contain ``compute.create`` (what cvmfs-user-pub requires)
    or ``storage.create:<path>`` with ``<path>`` covering the target ``/<required_prefix>/<cid>``: ``/`` or any
    component-wise prefix of it (``/sw/dune`` covers CID ``dune/abc``, not ``dunex/abc``). For requests
    without a CID the target is ``/<required_prefix>`` itself, so only ``compute.create``,
    ``storage.create:/`` and ``storage.create:/<required_prefix>`` count.
    """

    def __init__(
        self,
        issuers: Mapping[str, str | None],
        audiences: Sequence[str],
        required_prefix: str = "sw",
        clock: Callable[[], float] = time.time,
        leeway: int = 60,
        jwks: JwksCache | None = None,
    ) -> None:
        self.issuers: Mapping[str, str | None] = {iss: loc or None for iss, loc in issuers.items()}
        self.audiences: frozenset[str] = frozenset({WLCG_ANY_AUDIENCE, *audiences})
        self.required_prefix = required_prefix
        self._clock = clock
        self._leeway = leeway
        self.jwks = jwks if jwks is not None else JwksCache()

    def _target(self, cid: str | None) -> list[str]:
        target = _norm_components("/" + self.required_prefix) or []
        if cid is None:
            return target
        return _norm_components("/" + "/".join([*target, cid])) or []

    def scope_allows(self, scope: object, cid: str | None) -> bool:
        if not isinstance(scope, str):
            return False
        target = self._target(cid)
        for item in scope.split():
            if item == "compute.create":
                return True
            if item.startswith("storage.create:"):
                path = _norm_components(item[len("storage.create:") :])
                if path is not None and target[: len(path)] == path:
                    return True
        return False

    def verify(self, token: str, cid: str | None) -> Identity:
        """Check a token for publishing ``cid``; return its identity or raise :class:`AuthError`."""
        jws = jwt.PyJWS()
        try:
            unverified = jws.decode_complete(token, options={"verify_signature": False})
            claims = json.loads(unverified["payload"])
        except (jwt.InvalidTokenError, ValueError):
            raise _decode_error("malformed token") from None
        header = unverified["header"]
        if not isinstance(claims, dict):
            raise _decode_error("malformed token")

        # The issuer allowlist comes first: nothing is fetched or trusted for an unknown issuer.
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise AuthError(MSG_UNTRUSTED_ISSUER)

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise _decode_error(f"algorithm {str(alg)[:20]!r} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _decode_error("malformed token")
        try:
            key = self.jwks._get(issuer, self.issuers[issuer], kid)
        except JwksError as exc:
            raise _decode_error(str(exc)) from None
        if not key.allows(alg):
            raise _decode_error(f"algorithm {alg} does not match the key")
        try:
            verified = jws.decode_complete(token, key=key.key, algorithms=[alg])
            claims = json.loads(verified["payload"])
        except jwt.InvalidSignatureError:
            raise _decode_error("signature verification failed") from None
        except (jwt.InvalidTokenError, ValueError):
            raise _decode_error("malformed token") from None

        self._check_claims(claims)
        if not self.scope_allows(claims.get("scope"), cid):
            raise AuthError(MSG_SCOPE_MISSING)
        subject = claims["sub"]
        return Identity("token", subject, issuer, subject)

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp = claims.get("exp")
        if exp is None:
            raise _decode_error("missing exp claim")
        if not _is_number(exp):
            raise _decode_error("invalid exp claim")
        if now - self._leeway >= exp:
            raise _decode_error("token expired")
        for name, reason in (("nbf", "token not yet valid"), ("iat", "token issued in the future")):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise _decode_error(f"invalid {name} claim")
            if value > now + self._leeway:
                raise _decode_error(reason)

        aud = claims.get("aud")
        if aud is None:
            raise _decode_error("missing aud claim")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise _decode_error("invalid aud claim")
        if self.audiences.isdisjoint(auds):
            raise _decode_error("audience not accepted")

        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or not sub.isprintable():
            raise _decode_error("invalid sub claim")


# --- putting it together ------------------------------------------------------------------------------


class Authenticator:
    """Turns a request's credentials into an :class:`Identity`, in cvmfs-user-pub's order.

    1. An ``Authorization`` header (even an empty one) means a bearer token, and only the token counts.
    2. Else a client certificate DN: proxy levels stripped, then looked up in the grid-mapfile.
    3. Else a loopback client is ``localhost`` (if ``allow_localhost``). Do not allow it when a reverse
       proxy on the same host forwards requests: every request would then come from localhost.
    """

    def __init__(
        self,
        gridmap: GridMapfile | None,
        tokens: TokenVerifier | None,
        allow_localhost: bool = True,
    ) -> None:
        self.gridmap = gridmap
        self.tokens = tokens
        self.allow_localhost = allow_localhost

    def authenticate(
        self,
        *,
        remote_addr: str,
        authorization: str | None,
        peer_dn: str | None,
        secure: bool,
        cid: str | None,
    ) -> Identity:
        if authorization is not None:
            parts = authorization.split(None, 1)
            if len(parts) != 2 or not parts[1].strip():
                raise AuthError(MSG_PARSE_AUTHORIZATION)
            scheme, token = parts[0], parts[1].strip()
            if scheme.lower() != "bearer":
                raise AuthError(MSG_UNRECOGNIZED_SCHEME)
            if not secure and not is_loopback(remote_addr):
                raise AuthError(MSG_TOKENS_REQUIRE_HTTPS)
            if self.tokens is None:
                raise AuthError(MSG_UNTRUSTED_ISSUER)
            return self.tokens.verify(token, cid)

        if peer_dn:
            dn = strip_proxy_cns(peer_dn)
            if "/CN=" not in dn:
                raise AuthError(MSG_MALFORMED_DN)
            if self.gridmap is None or not self.gridmap.contains(dn):
                raise AuthError(MSG_UNRECOGNIZED_DN)
            return Identity("x509", dn, None, identity_name_from_dn(dn))

        if self.allow_localhost and is_loopback(remote_addr):
            return LOCALHOST_IDENTITY
        raise AuthError(MSG_CREDENTIAL_REQUIRED)


@dataclass(frozen=True)
class GroupRule:
    """Who may publish the CIDs of one group (``<group>/...`` and the one-level CID ``<group>``).

    Every entry names a full identity, so no credential can pass for another kind: ``dns`` match X.509
    identities only (a token whose ``sub`` happens to be a DN does not), ``tokens`` are ``(issuer, sub)``
    pairs (the same ``sub`` from another trusted issuer is someone else), and ``issuers`` admit any token
    from that issuer.
    """

    group: str
    dns: frozenset[str] = frozenset()
    tokens: frozenset[tuple[str, str]] = frozenset()
    issuers: frozenset[str] = frozenset()


class Authorizer:
    """Per-group publishing rights, keyed on a CID's first component.

    A rule for group ``G`` governs ``G/...`` and the one-level CID ``G`` alike (otherwise ``G`` itself would
    be a way round the rule). Several rules for one group add up. CIDs whose first component has no rule are
    allowed when ``default_allow``, else refused. The ``localhost`` identity is always allowed.
    """

    def __init__(self, rules: Iterable[GroupRule], default_allow: bool = True) -> None:
        merged: dict[str, GroupRule] = {}
        for rule in rules:
            seen = merged.get(rule.group, GroupRule(rule.group))
            merged[rule.group] = GroupRule(
                rule.group, seen.dns | rule.dns, seen.tokens | rule.tokens, seen.issuers | rule.issuers
            )
        self._rules = merged
        self.default_allow = default_allow

    @staticmethod
    def group_of(cid: str) -> str:
        return cid.split("/", 1)[0]

    def allowed(self, identity: Identity, cid: str) -> bool:
        if identity.method == "localhost":
            return True
        rule = self._rules.get(self.group_of(cid))
        if rule is None:
            return self.default_allow
        if identity.method == "x509":
            return identity.subject in rule.dns
        if identity.method == "token" and identity.issuer is not None:
            return identity.issuer in rule.issuers or (identity.issuer, identity.subject) in rule.tokens
        return False

    def check(self, identity: Identity, cid: str) -> None:
        if not self.allowed(identity, cid):
            if "/" not in cid:
                raise AuthError(f"{identity.name} may not publish {cid}")
            raise AuthError(f"{identity.name} may not publish under {self.group_of(cid)}/")
