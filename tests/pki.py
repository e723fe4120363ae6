"""Test PKI for the auth tests: a CA, host and user certificates, RFC 3820 proxies, and a token issuer.

Everything is real crypto made with ``cryptography``; nothing here imports rcds, so the tests check rcds
against an independent construction (the slash DNs of :func:`slash_dn` included).

Proxies follow RFC 3820 as ``voms-proxy-init``/``grid-proxy-init`` make them: signed by the user's (or the
previous proxy's) key, subject = issuer subject + ``CN=<digits>``, a critical ProxyCertInfo extension with
the inheritAll policy, keyUsage digitalSignature + keyEncipherment. A proxy file holds the proxy
certificate, its key, then the chain up to (not including) the CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

PROXY_CERT_INFO_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
ID_PPL_INHERIT_ALL = "1.3.6.1.5.5.7.21.1"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_SHORT = {
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.COUNTRY_NAME: "C",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.USER_ID: "UID",
    NameOID.EMAIL_ADDRESS: "emailAddress",
}


# --- DER for the ProxyCertInfo extension ------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def proxy_cert_info_der(path_len: int | None = None, policy_language: str = ID_PPL_INHERIT_ALL) -> bytes:
    """``ProxyCertInfo ::= SEQUENCE { pCPathLenConstraint INTEGER OPTIONAL, proxyPolicy ProxyPolicy }``,
    ``ProxyPolicy ::= SEQUENCE { policyLanguage OBJECT IDENTIFIER, policy OCTET STRING OPTIONAL }``."""
    policy = _der(0x30, _der_oid(policy_language))
    return _der(0x30, (_der_int(path_len) if path_len is not None else b"") + policy)


# --- certificates ---------------------------------------------------------------------------------------


def slash_dn(name: x509.Name) -> str:
    """The OpenSSL one-line (slash) form of a name, in certificate order."""
    return "".join(f"/{_SHORT.get(a.oid, a.oid.dotted_string)}={a.value!s}" for a in name)


@dataclass(frozen=True)
class Credential:
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()  # issuing certificates below the CA (proxies: user cert, ...)

    @property
    def dn(self) -> str:
        return slash_dn(self.cert.subject)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.crt`` (certificate, then chain) and ``<stem>.key``."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem() + self.chain_pem())
        key.write_bytes(self.key_pem())
        key.chmod(0o600)
        return cert, key

    def write_proxy_file(self, path: Path) -> Path:
        """One file like voms-proxy-init's ``/tmp/x509up_u<uid>``: certificate, key, chain."""
        path.write_bytes(self.cert_pem() + self.key_pem() + self.chain_pem())
        path.chmod(0o600)
        return path


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _validity(builder: x509.CertificateBuilder, hours: float = 12) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(
        now + dt.timedelta(hours=hours)
    )


def _name(*attrs: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


_KU_END_ENTITY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def make_ca(cn: str = "rcds Test CA") -> Credential:
    key = new_rsa_key()
    name = _name(
        (NameOID.DOMAIN_COMPONENT, "org"), (NameOID.DOMAIN_COMPONENT, "example"), (NameOID.COMMON_NAME, cn)
    )
    ku = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    builder = (
        _validity(x509.CertificateBuilder(), hours=48)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Credential(builder.sign(key, hashes.SHA256()), key)


def _issued_by(ca: Credential, subject: x509.Name, key: PrivateKey) -> x509.CertificateBuilder:
    return (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_KU_END_ENTITY, critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )


def make_host_cert(ca: Credential, names: Sequence[str] = ("localhost", "127.0.0.1")) -> Credential:
    key = new_rsa_key()
    subject = _name(
        (NameOID.DOMAIN_COMPONENT, "org"),
        (NameOID.DOMAIN_COMPONENT, "example"),
        (NameOID.COMMON_NAME, names[0]),
    )
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    builder = (
        _issued_by(ca, subject, key)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return Credential(builder.sign(ca.key, hashes.SHA256()), key)


def make_user_cert(ca: Credential, cn: str = "Alice Smith", uid: str | None = "alice") -> Credential:
    """Subject ``/DC=org/DC=example/OU=People/CN=<cn>[/CN=UID:<uid>]``, clientAuth."""
    attrs = [
        (NameOID.DOMAIN_COMPONENT, "org"),
        (NameOID.DOMAIN_COMPONENT, "example"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "People"),
        (NameOID.COMMON_NAME, cn),
    ]
    if uid is not None:
        attrs.append((NameOID.COMMON_NAME, f"UID:{uid}"))
    key = new_rsa_key()
    builder = _issued_by(ca, _name(*attrs), key).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return Credential(builder.sign(ca.key, hashes.SHA256()), key)


def _proxy(
    issuer: Credential, last_cn: str, extensions: Iterable[tuple[x509.ExtensionType, bool]]
) -> Credential:
    key = new_rsa_key()
    subject = x509.Name([*issuer.cert.subject, x509.NameAttribute(NameOID.COMMON_NAME, last_cn)])
    builder = (
        _validity(x509.CertificateBuilder(), hours=6)
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(_KU_END_ENTITY, critical=True)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return Credential(builder.sign(issuer.key, hashes.SHA256()), key, (issuer.cert, *issuer.chain))


def make_proxy(issuer: Credential, path_len: int | None = None) -> Credential:
    """An RFC 3820 proxy of ``issuer`` (a user certificate or another proxy), ``CN=<random digits>``."""
    digits = str(secrets.randbelow(9 * 10**9) + 10**9)
    pci = x509.UnrecognizedExtension(PROXY_CERT_INFO_OID, proxy_cert_info_der(path_len))
    return _proxy(issuer, digits, [(pci, True)])


def make_legacy_proxy(issuer: Credential) -> Credential:
    """A pre-RFC ("legacy", Globus GT2) proxy: ``CN=proxy``, no ProxyCertInfo. OpenSSL does not verify these."""
    return _proxy(issuer, "proxy", [])


def openssl_subject_hash(cert_file: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(cert_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def write_ca_dir(directory: Path, cas: Iterable[Credential]) -> Path:
    """An OpenSSL hashed CA directory (like ``/etc/grid-security/certificates``): ``<hash>.N`` symlinks."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, ca in enumerate(cas):
        pem = directory / f"ca{i}.pem"
        pem.write_bytes(ca.cert_pem())
        h = openssl_subject_hash(pem)
        n = 0
        while (directory / f"{h}.{n}").exists():
            n += 1
        (directory / f"{h}.{n}").symlink_to(pem.name)
    return directory


# --- tokens ---------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(obj: object) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


class TokenIssuer:
    """A WLCG-profile token issuer with an RSA key (kid ``rsa1``, RS256) and an EC P-256 key (``ec1``, ES256)."""

    def __init__(
        self, issuer: str, audience: str = "https://rcds.example", subject: str = "alice-0001"
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.subject = subject
        self.keys: dict[str, tuple[PrivateKey, str]] = {
            "rsa1": (new_rsa_key(), "RS256"),
            "ec1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        }

    def jwk(self, kid: str) -> dict[str, Any]:
        key, alg = self.keys[kid]
        pub = key.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            text = jwt.algorithms.RSAAlgorithm.to_jwk(pub)
        else:
            text = jwt.algorithms.ECAlgorithm.to_jwk(pub)
        data: dict[str, Any] = json.loads(text)
        data.update(kid=kid, alg=alg, use="sig")
        return data

    def jwks(self, kids: Iterable[str] | None = None) -> dict[str, Any]:
        return {"keys": [self.jwk(k) for k in (kids if kids is not None else self.keys)]}

    def write_jwks(self, path: Path, kids: Iterable[str] | None = None) -> Path:
        path.write_text(json.dumps(self.jwks(kids)))
        return path

    def public_pem(self, kid: str = "rsa1") -> bytes:
        return (
            self.keys[kid][0]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def claims(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        remove: Iterable[str] = (),
        now: float | None = None,
    ) -> dict[str, Any]:
        t = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "wlcg.ver": "1.0",
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.audience,
            "exp": t + 1200,
            "iat": t,
            "nbf": t,
            "jti": str(uuid.uuid4()),
            "scope": "compute.create",
        }
        claims.update(overrides or {})
        for name in remove:
            claims.pop(name, None)
        return claims

    def make_token(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        remove: Iterable[str] = (),
        kid: str | None = "rsa1",
        signing_kid: str = "rsa1",
        headers: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed token; ``kid`` is what the header says (None: no kid), ``signing_kid`` the key that signs."""
        key, alg = self.keys[signing_kid]
        hdr: dict[str, Any] = {"typ": "JWT", **(headers or {})}
        if kid is not None:
            hdr["kid"] = kid
        # PyJWS, not jwt.encode: the claims are not validated, so tests can sign malformed ones (iss: 42).
        payload = json.dumps(self.claims(overrides, remove=remove, now=now), separators=(",", ":")).encode()
        return jwt.PyJWS().encode(payload, key, algorithm=alg, headers=hdr)

    def unsigned_token(self, overrides: Mapping[str, Any] | None = None) -> str:
        """``alg: none``, empty signature."""
        return f"{_b64json({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa1'})}.{_b64json(self.claims(overrides))}."

    def hs256_token(
        self, secret: bytes, overrides: Mapping[str, Any] | None = None, kid: str = "rsa1"
    ) -> str:
        """HS256 with a chosen secret (the classic attack: the issuer's public key PEM as HMAC secret)."""
        signing_input = (
            f"{_b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64json(self.claims(overrides))}"
        )
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(sig)}"
