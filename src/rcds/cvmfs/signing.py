"""RSA keys, the publisher certificate and the two signature schemes of CernVM-FS.

* The manifest is signed with the certificate's key: RSASSA-PKCS1-v1_5 with a SHA-1 DigestInfo over the
  ASCII hex hash of the manifest body.
* The whitelist is signed with the master key as a *raw* PKCS#1 type-1 block holding the ASCII hex hash
  itself (``RSA_private_encrypt``): no DigestInfo, no hashing.

Both are done here with modular exponentiation on the key numbers, so that a host crypto policy that
forbids SHA-1 signatures (RHEL 9 DEFAULT) cannot break publishing. ``cryptography`` is used for key
generation, PEM and X.509 handling; without it (the job client on a bare python3) ``pkcs1`` reads the
public keys and certificates that verifying needs, and the rest is not available.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import pkcs1

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

# Verifying (manifests, whitelists, what every reader and replica does) reads keys and certificates with
# ``pkcs1`` whether or not ``cryptography`` is installed: importing ``cryptography`` costs ~25 ms, most of
# a no-op snapshot or a `wait` poll run as a command. Signing, key generation and X.509 building import it
# when they are called. A bare python3 (the job client) has only the verifying half.
HAVE_CRYPTOGRAPHY = importlib.util.find_spec("cryptography") is not None
NO_CRYPTOGRAPHY = "signing and key generation need the 'cryptography' package"

KEY_BITS = 2048
# DER prefix of DigestInfo for SHA-1 (RFC 8017 section 9.2, note 1).
_SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")


class SignatureError(Exception):
    """A signature does not verify, or a key cannot be used."""


class _PublicNumbers(Protocol):
    @property
    def n(self) -> int: ...

    @property
    def e(self) -> int: ...


class PublicKey(Protocol):
    """What verifying needs of an RSA public key: ``cryptography``'s, or ``pkcs1``'s on a bare python3."""

    def public_numbers(self) -> _PublicNumbers: ...


def generate_key() -> rsa.RSAPrivateKey:
    try:
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def public_key_pem(key: rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``), what clients read from ``<fqrn>.pub``."""
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(data: bytes) -> rsa.RSAPrivateKey:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SignatureError("only RSA keys are supported")
    return key


def load_public_key(data: bytes) -> PublicKey:
    """The RSA key of a PEM public key or certificate (what verifying needs: modulus and exponent)."""
    try:
        return pkcs1.load_public_key(data)
    except pkcs1.NotRsaKey as exc:
        raise SignatureError("only RSA public keys are supported") from exc


def load_public_keys(paths: list[Path]) -> list[PublicKey]:
    return [load_public_key(p.read_bytes()) for p in paths]


def make_certificate(key: rsa.RSAPrivateKey, fqrn: str, days: int = 3650) -> x509.Certificate:
    """Self-signed publisher certificate, CN = fqrn. Clients do not check its validity period."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqrn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        from cryptography import x509
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SignatureError(f"invalid certificate: {exc}") from exc


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER encoding, uppercase hex bytes joined by ``:`` (the whitelist form)."""
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # a bare python3 (the job client) only verifies
        raise SignatureError(NO_CRYPTOGRAPHY) from exc
    return _der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _der_fingerprint(der: bytes) -> str:
    digest = hashlib.sha1(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 40, 2))


def pem_certificate_fingerprint(pem: bytes) -> str:
    """``certificate_fingerprint`` of a PEM certificate."""
    try:
        return _der_fingerprint(pkcs1.certificate_der(pem))
    except ValueError as exc:
        raise SignatureError(f"invalid certificate: {exc}") from exc


def certificate_public_key(pem: bytes) -> PublicKey:
    """The RSA key of a PEM certificate (the publisher's, which signs the manifest)."""
    try:
        der = pkcs1.certificate_der(pem)
        return pkcs1.certificate_public_key(der)
    except pkcs1.NotRsaKey as exc:
        raise SignatureError("certificate key is not RSA") from exc
    except ValueError as exc:
        raise SignatureError(f"invalid certificate: {exc}") from exc


def parse_fingerprint(line: str) -> str | None:
    """Whitelist line -> lowercase hex without colons, or None when the line is not a fingerprint."""
    for stop in (" ", "\t", "#"):
        line = line.split(stop, 1)[0]
    text = line.replace(":", "").lower()
    if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
        return text
    return None


# --- raw RSA ---------------------------------------------------------------------------------------


def _modulus_bytes(n: int) -> int:
    return (n.bit_length() + 7) // 8


def _type1_pad(payload: bytes, k: int) -> bytes:
    if len(payload) > k - 11:
        raise SignatureError("payload too long for the key")
    return b"\x00\x01" + b"\xff" * (k - 3 - len(payload)) + b"\x00" + payload


def _private_op(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    k = _modulus_bytes(n)
    # CRT for speed; pow() with three ints is constant work in Python's bignum sense.
    m = int.from_bytes(block, "big")
    s1 = pow(m, numbers.dmp1, numbers.p)
    s2 = pow(m, numbers.dmq1, numbers.q)
    h = (numbers.iqmp * (s1 - s2)) % numbers.p
    s = s2 + h * numbers.q
    return s.to_bytes(k, "big")


def _public_op(key: PublicKey, signature: bytes) -> bytes:
    numbers = key.public_numbers()
    k = _modulus_bytes(numbers.n)
    if len(signature) != k:
        raise SignatureError(f"signature has {len(signature)} bytes, key needs {k}")
    s = int.from_bytes(signature, "big")
    if s >= numbers.n:
        raise SignatureError("signature out of range")
    return pow(s, numbers.e, numbers.n).to_bytes(k, "big")


def _type1_unpad(block: bytes) -> bytes:
    if block[:2] != b"\x00\x01":
        raise SignatureError("bad PKCS#1 type 1 block")
    end = block.find(b"\x00", 2)
    if end < 10 or any(b != 0xFF for b in block[2:end]):
        raise SignatureError("bad PKCS#1 type 1 padding")
    return block[end + 1 :]


def sign_raw(key: rsa.RSAPrivateKey, payload: bytes) -> bytes:
    """``RSA_private_encrypt`` with PKCS#1 padding: the whitelist scheme."""
    return _private_op(key, _type1_pad(payload, _modulus_bytes(key.public_key().public_numbers().n)))


def recover_raw(key: PublicKey, signature: bytes) -> bytes:
    """``RSA_public_decrypt``: the payload a raw signature carries."""
    return _type1_unpad(_public_op(key, signature))


def sign_sha1(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-1: the manifest scheme (``EVP_SignInit(EVP_sha1())``)."""
    return sign_raw(key, _SHA1_DIGEST_INFO + hashlib.sha1(message).digest())


def verify_sha1(key: PublicKey, message: bytes, signature: bytes) -> None:
    try:
        recovered = recover_raw(key, signature)
    except SignatureError as exc:  # say what failed, not only how
        raise SignatureError(f"manifest signature does not verify ({exc})") from exc
    if recovered != _SHA1_DIGEST_INFO + hashlib.sha1(message).digest():
        raise SignatureError("manifest signature does not verify")


@dataclass(frozen=True)
class SignedText:
    """A CVMFS signed text file: ``body`` (ends with ``\\n``), ``--\\n``, hash hex line, raw signature."""

    body: bytes
    hash_hex: str
    signature: bytes

    @classmethod
    def parse(cls, data: bytes, what: str) -> SignedText:
        if not data:
            raise SignatureError(f"{what} is empty")
        cut = data.find(b"\n--\n")
        if cut < 0:
            if data.startswith(b"--\n"):
                raise SignatureError(f"{what} has no content before the signature marker")
            raise SignatureError(f"{what} has no signature marker")
        body = data[: cut + 1]
        rest = data[cut + 4 :]
        nl = rest.find(b"\n")
        if nl < 0:
            raise SignatureError(f"{what} has no hash line after the marker")
        try:
            hash_hex = rest[:nl].decode("ascii")
        except UnicodeDecodeError as exc:
            raise SignatureError(f"{what} hash line is not ASCII") from exc
        return cls(body, hash_hex, rest[nl + 1 :])

    def serialize(self) -> bytes:
        return self.body + b"--\n" + self.hash_hex.encode("ascii") + b"\n" + self.signature


def body_hash_hex(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()


def check_body_hash(signed: SignedText, what: str) -> None:
    text = signed.hash_hex
    algorithm = "sha1"
    if text.endswith("-shake128"):
        algorithm, text = "shake128", text[: -len("-shake128")]
    elif text.endswith("-rmd160"):
        algorithm, text = "rmd160", text[: -len("-rmd160")]
    if algorithm == "shake128":
        actual = hashlib.shake_128(signed.body).hexdigest(20)
    elif algorithm == "rmd160":
        actual = hashlib.new("ripemd160", signed.body).hexdigest()
    else:
        actual = hashlib.sha1(signed.body).hexdigest()
    if actual != text:
        raise SignatureError(f"{what} body does not match its hash line")
