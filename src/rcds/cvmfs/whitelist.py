"""The ``.cvmfswhitelist``: which publisher certificates the master key vouches for, until when."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import signing
from .signing import SignatureError, SignedText

if TYPE_CHECKING:  # signing needs cryptography; verifying (the job client) does not
    from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_VALIDITY = dt.timedelta(days=30)
_FORMAT = "%Y%m%d%H%M%S"


class WhitelistError(SignatureError):
    """The whitelist is malformed, expired, for another repository, or not signed by a trusted key."""


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime(_FORMAT)


def _parse_stamp(text: str) -> dt.datetime:
    if len(text) != 14 or not text.isdigit():
        raise WhitelistError(f"bad whitelist timestamp {text!r}")
    # By hand, not strptime: that imports _strptime and compiles its regular expressions (~2 ms of a
    # command that polls a replica).
    try:
        return dt.datetime(
            int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]),
            int(text[12:14]), tzinfo=dt.timezone.utc,
        )  # fmt: skip
    except ValueError as exc:
        raise WhitelistError(f"bad whitelist timestamp {text!r}") from exc


@dataclass(frozen=True)
class Whitelist:
    fqrn: str
    created: dt.datetime
    expires: dt.datetime
    fingerprints: list[str] = field(default_factory=list)  # lowercase hex, no colons

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        """CVMFS checks at hour granularity: valid while the current UTC hour is before the expiry's."""
        now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
        hour = now.replace(minute=0, second=0, microsecond=0)
        expiry_hour = self.expires.replace(minute=0, second=0, microsecond=0)
        return not hour < expiry_hour

    def body(self, display_fingerprints: list[str]) -> bytes:
        lines = [_stamp(self.created), "E" + _stamp(self.expires), "N" + self.fqrn, *display_fingerprints]
        return ("\n".join(lines) + "\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> tuple[Whitelist, SignedText]:
        signed = SignedText.parse(data, "whitelist")
        signing.check_body_hash(signed, "whitelist")
        lines = signed.body.decode("ascii", "replace").split("\n")
        if len(lines) < 3:
            raise WhitelistError("whitelist too short")
        created = _parse_stamp(lines[0])
        if not lines[1].startswith("E"):
            raise WhitelistError("whitelist has no expiry line")
        expires = _parse_stamp(lines[1][1:])
        if not lines[2].startswith("N"):
            raise WhitelistError("whitelist has no repository name line")
        fqrn = lines[2][1:]
        prints: list[str] = []
        for line in lines[3:]:
            if line in ("Vpkcs7", "Wcachain"):
                raise WhitelistError(f"whitelist option {line} is not supported")
            fp = signing.parse_fingerprint(line)
            if fp:
                prints.append(fp)
        return cls(fqrn, created, expires, prints), signed

    @classmethod
    def verify(
        cls,
        data: bytes,
        fqrn: str,
        master_keys: list[signing.PublicKey],
        now: dt.datetime | None = None,
        check_expiry: bool = True,
    ) -> Whitelist:
        wl, signed = cls.parse(data)
        if wl.fqrn != fqrn:
            raise WhitelistError(f"whitelist is for {wl.fqrn!r}, not {fqrn!r}")
        if check_expiry and wl.is_expired(now):
            raise WhitelistError(f"whitelist expired at {wl.expires:%Y-%m-%d %H:%M} UTC")
        for key in master_keys:
            try:
                if signing.recover_raw(key, signed.signature) == signed.hash_hex.encode("ascii"):
                    return wl
            except SignatureError:
                continue
        raise WhitelistError("whitelist signature does not verify with any master key")


def create(
    fqrn: str,
    certificate_fingerprints: list[str],
    master_key: rsa.RSAPrivateKey,
    now: dt.datetime | None = None,
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> bytes:
    """Signed whitelist text. ``certificate_fingerprints`` are in the ``AB:CD:...`` display form."""
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(microsecond=0)
    prints = [p for p in (signing.parse_fingerprint(f) for f in certificate_fingerprints) if p]
    wl = Whitelist(fqrn, now, now + validity, prints)
    body = wl.body(certificate_fingerprints)
    hash_hex = signing.body_hash_hex(body)
    signature = signing.sign_raw(master_key, hash_hex.encode("ascii"))
    return SignedText(body, hash_hex, signature).serialize()
