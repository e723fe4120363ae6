"""The signed repository manifest ``.cvmfspublished``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import signing
from .hashes import EMPTY_MD5_HEX, ContentHash
from .signing import SignatureError, SignedText

if TYPE_CHECKING:  # signing needs cryptography; reading (the job client) does not
    from cryptography.hazmat.primitives.asymmetric import rsa


class ManifestError(SignatureError):
    """The manifest is malformed, for another repository, or its signature does not verify."""


# Writer order of the 2.12 tools (manifest.cc ExportString).
_ORDER = "CBRDSGANXHTMY"


@dataclass(frozen=True)
class Manifest:
    root_catalog: ContentHash
    revision: int
    ttl: int
    fqrn: str
    root_catalog_size: int = 0
    certificate: ContentHash | None = None
    history: ContentHash | None = None
    metainfo: ContentHash | None = None
    reflog: ContentHash | None = None
    timestamp: int = 0
    garbage_collectable: bool = True
    alt_paths: bool = False
    micro_catalog: str | None = None  # legacy `L`, read only

    def fields(self) -> dict[str, str]:
        f: dict[str, str] = {
            "C": self.root_catalog.hex,
            "B": str(self.root_catalog_size),
            "R": EMPTY_MD5_HEX,
            "D": str(self.ttl),
            "S": str(self.revision),
            "G": "yes" if self.garbage_collectable else "no",
            "A": "yes" if self.alt_paths else "no",
            "N": self.fqrn,
        }
        if self.certificate:
            f["X"] = self.certificate.hex
        if self.history:
            f["H"] = self.history.hex
        if self.timestamp:
            f["T"] = str(self.timestamp)
        if self.metainfo:
            f["M"] = self.metainfo.hex
        if self.reflog:
            f["Y"] = self.reflog.hex
        return f

    def body(self) -> bytes:
        f = self.fields()
        return "".join(f"{k}{f[k]}\n" for k in _ORDER if k in f).encode("utf-8")

    def sign(self, key: rsa.RSAPrivateKey) -> bytes:
        body = self.body()
        hash_hex = signing.body_hash_hex(body)
        return SignedText(body, hash_hex, signing.sign_sha1(key, hash_hex.encode("ascii"))).serialize()

    @classmethod
    def parse(cls, data: bytes) -> tuple[Manifest, SignedText]:
        try:
            signed = SignedText.parse(data, "manifest")
            signing.check_body_hash(signed, "manifest")
        except SignatureError as exc:  # a damaged manifest is a bad manifest, not a fetch failure
            raise ManifestError(str(exc)) from exc
        fields: dict[str, str] = {}
        for line in signed.body.decode("utf-8", "replace").split("\n"):
            if line:
                fields[line[0]] = line[1:]
        for required in "CRDS":
            if required not in fields:
                raise ManifestError(f"manifest has no {required} field")
        if fields["R"] != EMPTY_MD5_HEX:
            raise ManifestError("manifest root path hash is not MD5('')")

        def opt(key: str) -> ContentHash | None:
            return ContentHash.from_hex(fields[key]) if fields.get(key) else None

        try:
            manifest = cls(
                root_catalog=ContentHash.from_hex(fields["C"]),
                revision=int(fields["S"]),
                ttl=int(fields["D"]),
                fqrn=fields.get("N", ""),
                root_catalog_size=int(fields.get("B", "0") or 0),
                certificate=opt("X"),
                history=opt("H"),
                metainfo=opt("M"),
                reflog=opt("Y"),
                timestamp=int(fields.get("T", "0") or 0),
                garbage_collectable=fields.get("G", "no") == "yes",
                alt_paths=fields.get("A", "no") == "yes",
                micro_catalog=fields.get("L"),
            )
        except ValueError as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        return manifest, signed

    def verify_signature(self, signed: SignedText, certificate_pem: bytes) -> None:
        key = signing.certificate_public_key(certificate_pem)
        try:
            signing.verify_sha1(key, signed.hash_hex.encode("ascii"), signed.signature)
        except SignatureError as exc:
            raise ManifestError(str(exc)) from exc
