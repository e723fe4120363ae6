"""RSA public keys and X.509 certificates read with the standard library alone.

The job client (``rcds.client.bundle``) verifies repositories on a bare ``python3`` without
``cryptography``. Verifying needs only the modulus and exponent (``signing`` does the RSA arithmetic
with ``pow`` in any case), so this reads them out of the DER the CVMFS files hold: a master key
``<fqrn>.pub`` (SubjectPublicKeyInfo, ``BEGIN PUBLIC KEY``, or PKCS#1 ``BEGIN RSA PUBLIC KEY``) and
the publisher certificate (``BEGIN CERTIFICATE``), whose SHA-1 of the DER is its whitelist fingerprint.
The reading is strict: a length that runs past its parent, trailing bytes or a wrong tag is an error.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

# DER tags
_INTEGER, _BIT_STRING, _NULL, _OID, _SEQUENCE = 0x02, 0x03, 0x05, 0x06, 0x30
_EXPLICIT_0 = 0xA0  # [0] EXPLICIT: the certificate version
_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
# What ``base64.b64decode(validate=True)`` accepts, checked here: importing base64 costs a no-op snapshot
# command about 1 ms (tests/test_replicate.py).
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


class NotRsaKey(ValueError):
    """A well-formed key or certificate whose key is not RSA."""


@dataclass(frozen=True)
class RsaPublicKey:
    n: int
    e: int

    def public_numbers(self) -> RsaPublicKey:
        """The shape of ``cryptography``'s keys, which ``signing`` reads ``n`` and ``e`` from."""
        return self


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Each ``-----BEGIN <label>-----`` block of ``data``: (label, DER)."""
    blocks = []
    for m in _PEM.finditer(data):
        text = b"".join(m.group(2).split())
        bad = f"bad base64 in the {m.group(1).decode()} block"
        if not _BASE64.fullmatch(text):
            raise ValueError(bad)
        try:
            der = binascii.a2b_base64(text)
        except binascii.Error as exc:  # a wrong length
            raise ValueError(bad) from exc
        blocks.append((m.group(1).decode(), der))
    return blocks


def load_public_key(data: bytes) -> RsaPublicKey:
    """The RSA key of a PEM public key (SubjectPublicKeyInfo or PKCS#1) or certificate: the first block."""
    blocks = pem_blocks(data)
    if not blocks:
        raise ValueError("no PEM block found")
    label, der = blocks[0]
    if label == "CERTIFICATE":
        return certificate_public_key(der)
    if label == "PUBLIC KEY":
        return _spki(der)
    if label == "RSA PUBLIC KEY":
        return _rsa_public_key(der)
    raise ValueError(f"not a public key: {label}")


def certificate_der(pem: bytes) -> bytes:
    """The DER of the first certificate in ``pem``, checked to be one."""
    for label, der in pem_blocks(pem):
        if label == "CERTIFICATE":
            certificate_public_key(der)
            return der
    raise ValueError("no certificate found")


def certificate_public_key(der: bytes) -> RsaPublicKey:
    """The subject's key of an X.509 certificate (its validity is not checked: CVMFS does not either)."""
    cert = _Der(der).whole(_SEQUENCE)
    tbs = cert.take(_SEQUENCE)
    cert.take(_SEQUENCE)  # signatureAlgorithm
    cert.take(_BIT_STRING)  # signatureValue
    cert.end()
    if tbs.peek() == _EXPLICIT_0:
        tbs.take(_EXPLICIT_0)  # version
    tbs.take(_INTEGER)  # serialNumber
    for _ in ("signature", "issuer", "validity", "subject"):
        tbs.take(_SEQUENCE)
    return _spki(tbs.take_raw(_SEQUENCE))


def _spki(der: bytes) -> RsaPublicKey:
    spki = _Der(der).whole(_SEQUENCE)
    algorithm = spki.take(_SEQUENCE)
    key_bits = spki.take(_BIT_STRING)
    spki.end()
    if algorithm.take(_OID).data != _RSA_ENCRYPTION:
        raise NotRsaKey("only RSA public keys are supported")
    if not algorithm.at_end():
        algorithm.take(_NULL)
    algorithm.end()
    if key_bits.data[:1] != b"\x00":
        raise ValueError("public key bit string has unused bits")
    return _rsa_public_key(key_bits.data[1:])


def _rsa_public_key(der: bytes) -> RsaPublicKey:
    seq = _Der(der).whole(_SEQUENCE)
    n, e = seq.integer(), seq.integer()
    seq.end()
    if n <= 0 or e <= 1:
        raise ValueError("RSA key numbers out of range")
    return RsaPublicKey(n, e)


class _Der:
    """A cursor over the DER elements of ``data`` (one level)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def whole(self, tag: int) -> _Der:
        """The single element ``data`` is, with nothing after it."""
        inner = self.take(tag)
        self.end()
        return inner

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def end(self) -> None:
        if not self.at_end():
            raise ValueError("trailing bytes in DER")

    def _header(self, tag: int) -> tuple[int, int]:
        """(start of contents, end of contents) of the next element, which must have ``tag``."""
        data, pos = self.data, self.pos
        if pos + 2 > len(data):
            raise ValueError("truncated DER")
        if data[pos] != tag:
            raise ValueError(f"DER tag {data[pos]:#04x} where {tag:#04x} was expected")
        length, pos = data[pos + 1], pos + 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or pos + count > len(data):
                raise ValueError("bad DER length")
            length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
        if pos + length > len(data):
            raise ValueError("DER length runs past its end")
        return pos, pos + length

    def take(self, tag: int) -> _Der:
        start, stop = self._header(tag)
        self.pos = stop
        return _Der(self.data[start:stop])

    def take_raw(self, tag: int) -> bytes:
        """The next element with its tag and length (to read it again as a whole)."""
        begin = self.pos
        _, stop = self._header(tag)
        self.pos = stop
        return self.data[begin:stop]

    def integer(self) -> int:
        value = self.take(_INTEGER).data
        if not value:
            raise ValueError("empty DER integer")
        return int.from_bytes(value, "big", signed=True)


__all__ = ["NotRsaKey", "RsaPublicKey", "certificate_der", "certificate_public_key", "load_public_key"]
