"""Format test vectors: object names, path hashes, signatures, whitelist expiry, manifest and xattr layout.

Expected values come from the CernVM-FS sources and test suite (see shared/cvmfs-format.md, sections 1, 3,
4, 5.7 and 12), checked independently of rcds where possible (``hashlib``, ``zlib``, ``cryptography``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from rcds.cvmfs import signing, whitelist
from rcds.cvmfs.errors import TreeError
from rcds.cvmfs.hashes import EMPTY_MD5_HEX, Algorithm, ContentHash, Suffix, md5_pair
from rcds.cvmfs.manifest import Manifest, ManifestError
from rcds.cvmfs.objects import EMPTY_HASH, EMPTY_OBJECT, ObjectCorrupt, compress, decompress, verify
from rcds.cvmfs.signing import SignedText
from rcds.cvmfs.treenodes import xattr_blob
from rcds.cvmfs.whitelist import Whitelist, WhitelistError

UTC = dt.UTC


@pytest.fixture(scope="module")
def master_key() -> rsa.RSAPrivateKey:
    return signing.generate_key()


@pytest.fixture(scope="module")
def certificate_key() -> rsa.RSAPrivateKey:
    return signing.generate_key()


def _hash(fill: str, algorithm: Algorithm = Algorithm.SHA1) -> ContentHash:
    return ContentHash(bytes.fromhex(fill * 20), algorithm)


# --- objects and hashes ----------------------------------------------------------------------------


def test_empty_object_name_is_sha1_of_the_zlib_stream_of_nothing() -> None:
    assert EMPTY_HASH.hex == "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78"
    assert hashlib.sha1(EMPTY_OBJECT).hexdigest() == EMPTY_HASH.hex
    assert zlib.compress(b"", 6) == EMPTY_OBJECT
    assert compress(b"") == (EMPTY_OBJECT, EMPTY_HASH)  # whichever compressor deflates the rest


def test_objects_are_zlib_streams_named_by_the_hash_of_the_compressed_bytes() -> None:
    data = b"some file content\n" * 100
    stored, h = compress(data)
    # a zlib stream header (not raw deflate, not gzip): deflate, 32 KiB window, header checksum
    assert stored[0] == 0x78 and (stored[0] << 8 | stored[1]) % 31 == 0
    assert zlib.decompress(stored) == data  # the standard library inflates it, as every client does
    assert h.hex == hashlib.sha1(stored).hexdigest()
    assert h.hex != hashlib.sha1(data).hexdigest()
    assert decompress(stored) == data


def test_object_verification_rejects_bytes_that_do_not_match_the_name() -> None:
    stored, h = compress(b"payload")
    verify(stored, h)
    with pytest.raises(ObjectCorrupt):
        verify(stored[:-1] + bytes([stored[-1] ^ 1]), h)
    with pytest.raises(ObjectCorrupt):
        decompress(b"not zlib at all")


def test_md5_path_pairs_match_the_reference_catalog() -> None:
    assert EMPTY_MD5_HEX == "d41d8cd98f00b204e9800998ecf8427e"
    assert md5_pair("") == (338333539836370388, 9098107892288553193)
    assert md5_pair("/empty") == (3878625190343979120, -3561843141118348707)


def test_md5_path_pair_is_the_digest_split_little_endian_signed() -> None:
    digest = hashlib.md5(b"/some/path").digest()
    a, b = md5_pair("/some/path")
    assert a.to_bytes(8, "little", signed=True) + b.to_bytes(8, "little", signed=True) == digest


@pytest.mark.parametrize(
    ("suffix", "letter"),
    [
        (Suffix.NONE, ""),
        (Suffix.CATALOG, "C"),
        (Suffix.HISTORY, "H"),
        (Suffix.CERTIFICATE, "X"),
        (Suffix.METAINFO, "M"),
        (Suffix.PARTIAL, "P"),
    ],
)
def test_object_name_is_two_hex_fanout_then_the_rest_then_the_suffix(suffix: Suffix, letter: str) -> None:
    h = ContentHash(bytes.fromhex("abcdef0123456789abcdef0123456789abcdef01"))
    assert h.object_name(suffix) == "data/ab/cdef0123456789abcdef0123456789abcdef01" + letter


def test_object_name_puts_the_algorithm_id_before_the_suffix_letter() -> None:
    h = ContentHash(bytes.fromhex("ab" + "00" * 19), Algorithm.RMD160)
    assert h.object_name(Suffix.CATALOG) == "data/ab/" + "00" * 19 + "-rmd160C"
    h = ContentHash(bytes.fromhex("ab" + "00" * 19), Algorithm.SHAKE128)
    assert h.object_name(Suffix.PARTIAL) == "data/ab/" + "00" * 19 + "-shake128P"


@pytest.mark.parametrize(
    ("text", "algorithm"),
    [
        ("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78", Algorithm.SHA1),
        ("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78-rmd160", Algorithm.RMD160),
        ("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78-shake128", Algorithm.SHAKE128),
    ],
)
def test_content_hash_parses_hex_with_algorithm_id_and_renders_it_back(
    text: str, algorithm: Algorithm
) -> None:
    h = ContentHash.from_hex(text)
    assert h.algorithm is algorithm
    assert h.digest == bytes.fromhex(text[:40])
    assert h.hex == text
    assert len(h.hex) == {Algorithm.SHA1: 40, Algorithm.RMD160: 47, Algorithm.SHAKE128: 49}[algorithm]


@pytest.mark.parametrize(
    "text",
    [
        "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b7",  # 39 hex
        "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78C",  # suffix letters are not part of a hash
        "d41d8cd98f00b204e9800998ecf8427e",  # MD5 is never a content hash
        "zz" * 20,
        "",
    ],
)
def test_content_hash_rejects_malformed_hex(text: str) -> None:
    with pytest.raises(ValueError):
        ContentHash.from_hex(text)


def test_shake128_content_hash_is_shake128_squeezed_to_160_bits() -> None:
    assert ContentHash.of(b"abc", Algorithm.SHAKE128).digest == hashlib.shake_128(b"abc").digest(20)
    assert ContentHash.of(b"abc").digest == hashlib.sha1(b"abc").digest()


def test_catalog_flag_values_of_the_hash_algorithms() -> None:
    assert [a.flag_value for a in (Algorithm.SHA1, Algorithm.RMD160, Algorithm.SHAKE128)] == [0, 1, 2]
    assert Algorithm.from_flag_value(2) is Algorithm.SHAKE128


# --- whitelist -------------------------------------------------------------------------------------


def _whitelist_expiring(at: dt.datetime) -> Whitelist:
    return Whitelist("repo.example", at - dt.timedelta(days=30), at, [])


@pytest.mark.parametrize(
    ("now", "expired"),
    [
        (dt.datetime(2030, 1, 1, 11, 0, 0, tzinfo=UTC), False),
        (dt.datetime(2030, 1, 1, 11, 59, 59, tzinfo=UTC), False),  # the hour before the expiry's hour
        (dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC), True),  # in the expiry hour, before 12:30
        (dt.datetime(2030, 1, 1, 12, 29, 59, tzinfo=UTC), True),
        (dt.datetime(2030, 1, 1, 12, 30, 0, tzinfo=UTC), True),
        (dt.datetime(2030, 1, 2, 0, 0, 0, tzinfo=UTC), True),
    ],
)
def test_whitelist_expiry_is_checked_at_hour_granularity(now: dt.datetime, expired: bool) -> None:
    wl = _whitelist_expiring(dt.datetime(2030, 1, 1, 12, 30, 0, tzinfo=UTC))
    assert wl.is_expired(now) is expired


def test_whitelist_expiry_compares_in_utc_whatever_the_callers_timezone() -> None:
    wl = _whitelist_expiring(dt.datetime(2030, 1, 1, 12, 30, 0, tzinfo=UTC))
    cest = dt.timezone(dt.timedelta(hours=2))
    assert wl.is_expired(dt.datetime(2030, 1, 1, 13, 59, 59, tzinfo=cest)) is False  # 11:59:59 UTC
    assert wl.is_expired(dt.datetime(2030, 1, 1, 14, 0, 0, tzinfo=cest)) is True  # 12:00 UTC


def test_whitelist_text_layout(master_key: rsa.RSAPrivateKey) -> None:
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    fingerprint = ":".join(["AB"] * 20)
    data = whitelist.create("repo.example", [fingerprint], master_key, now, dt.timedelta(days=30))
    signed = SignedText.parse(data, "whitelist")
    assert signed.body == f"20300102030405\nE20300201030405\nNrepo.example\n{fingerprint}\n".encode()
    assert data.startswith(signed.body + b"--\n" + signed.hash_hex.encode() + b"\n")
    assert signed.hash_hex == hashlib.sha1(signed.body).hexdigest()


def test_whitelist_signature_is_raw_pkcs1_type1_over_the_hex_hash_text(master_key: rsa.RSAPrivateKey) -> None:
    data = whitelist.create("repo.example", [":".join(["CD"] * 20)], master_key)
    signed = SignedText.parse(data, "whitelist")
    assert len(signed.signature) == 256
    recovered = master_key.public_key().recover_data_from_signature(
        signed.signature, padding.PKCS1v15(), None
    )
    assert recovered == signed.hash_hex.encode("ascii")
    # Not a DigestInfo signature: a standard PKCS#1 v1.5/SHA-1 verification must fail.
    with pytest.raises(InvalidSignature):
        master_key.public_key().verify(
            signed.signature, signed.hash_hex.encode(), padding.PKCS1v15(), hashes.SHA1()
        )


def test_whitelist_verifies_with_the_master_key_and_lists_the_fingerprint(
    master_key: rsa.RSAPrivateKey, certificate_key: rsa.RSAPrivateKey
) -> None:
    cert = signing.make_certificate(certificate_key, "repo.example")
    fingerprint = signing.certificate_fingerprint(cert)
    data = whitelist.create("repo.example", [fingerprint], master_key)
    wl = Whitelist.verify(data, "repo.example", [master_key.public_key()])
    assert wl.fingerprints == [fingerprint.replace(":", "").lower()]
    assert wl.expires - wl.created == whitelist.DEFAULT_VALIDITY


def test_whitelist_is_rejected_with_another_master_key(
    master_key: rsa.RSAPrivateKey, certificate_key: rsa.RSAPrivateKey
) -> None:
    data = whitelist.create("repo.example", [":".join(["CD"] * 20)], master_key)
    with pytest.raises(WhitelistError, match="does not verify"):
        Whitelist.verify(data, "repo.example", [certificate_key.public_key()])


def test_whitelist_is_rejected_for_another_repository(master_key: rsa.RSAPrivateKey) -> None:
    data = whitelist.create("repo.example", [":".join(["CD"] * 20)], master_key)
    with pytest.raises(WhitelistError, match=r"not 'other\.example'"):
        Whitelist.verify(data, "other.example", [master_key.public_key()])


def test_expired_whitelist_is_rejected_only_when_expiry_is_checked(master_key: rsa.RSAPrivateKey) -> None:
    created = dt.datetime(2020, 1, 1, tzinfo=UTC)
    data = whitelist.create("repo.example", [":".join(["CD"] * 20)], master_key, created)
    with pytest.raises(WhitelistError, match="expired"):
        Whitelist.verify(data, "repo.example", [master_key.public_key()])
    wl = Whitelist.verify(data, "repo.example", [master_key.public_key()], check_expiry=False)
    assert wl.expires == dt.datetime(2020, 1, 31, tzinfo=UTC)
    # ...and the hour before its expiry hour it was still valid:
    Whitelist.verify(
        data, "repo.example", [master_key.public_key()], now=dt.datetime(2020, 1, 30, 23, 59, tzinfo=UTC)
    )


def test_certificate_fingerprint_is_sha1_of_der_in_colon_separated_uppercase(
    certificate_key: rsa.RSAPrivateKey,
) -> None:
    from cryptography.hazmat.primitives import serialization

    cert = signing.make_certificate(certificate_key, "repo.example")
    der_sha1 = hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    assert signing.certificate_fingerprint(cert) == ":".join(der_sha1[i : i + 2] for i in range(0, 40, 2))
    assert signing.parse_fingerprint(signing.certificate_fingerprint(cert) + " # comment") == der_sha1.lower()


# --- manifest --------------------------------------------------------------------------------------


def _full_manifest() -> Manifest:
    return Manifest(
        root_catalog=_hash("11"),
        revision=42,
        ttl=15,
        fqrn="repo.example",
        root_catalog_size=18432,
        certificate=_hash("22"),
        history=_hash("33"),
        metainfo=_hash("44"),
        reflog=_hash("55"),
        timestamp=1_700_000_000,
        garbage_collectable=True,
        alt_paths=False,
    )


def test_manifest_fields_are_written_in_the_cvmfs_order() -> None:
    body = _full_manifest().body().decode()
    assert body.endswith("\n")
    lines = body.splitlines()
    assert [line[0] for line in lines] == list("CBRDSGANXHTMY")
    assert lines == [
        "C" + "11" * 20,
        "B18432",
        "Rd41d8cd98f00b204e9800998ecf8427e",
        "D15",
        "S42",
        "Gyes",
        "Ano",
        "Nrepo.example",
        "X" + "22" * 20,
        "H" + "33" * 20,
        "T1700000000",
        "M" + "44" * 20,
        "Y" + "55" * 20,
    ]


def test_manifest_leaves_out_optional_fields_that_are_unset() -> None:
    m = Manifest(root_catalog=_hash("11"), revision=1, ttl=240, fqrn="repo.example")
    assert [line[0] for line in m.body().decode().splitlines()] == list("CBRDSGAN")


def test_manifest_round_trips_through_sign_and_parse(certificate_key: rsa.RSAPrivateKey) -> None:
    m = _full_manifest()
    parsed, signed = Manifest.parse(m.sign(certificate_key))
    assert parsed == m
    assert signed.body == m.body()


def test_manifest_signature_is_pkcs1v15_sha1_over_the_hex_hash_text(
    certificate_key: rsa.RSAPrivateKey,
) -> None:
    data = _full_manifest().sign(certificate_key)
    signed = SignedText.parse(data, "manifest")
    assert signed.hash_hex == hashlib.sha1(signed.body).hexdigest()
    assert data == signed.body + b"--\n" + signed.hash_hex.encode() + b"\n" + signed.signature
    certificate_key.public_key().verify(
        signed.signature, signed.hash_hex.encode("ascii"), padding.PKCS1v15(), hashes.SHA1()
    )
    with pytest.raises(InvalidSignature):
        certificate_key.public_key().verify(signed.signature, signed.body, padding.PKCS1v15(), hashes.SHA1())


def test_manifest_signature_made_by_cryptography_verifies_in_rcds(certificate_key: rsa.RSAPrivateKey) -> None:
    m = _full_manifest()
    body = m.body()
    hash_hex = hashlib.sha1(body).hexdigest()
    sig = certificate_key.sign(hash_hex.encode(), padding.PKCS1v15(), hashes.SHA1())
    data = SignedText(body, hash_hex, sig).serialize()
    parsed, signed = Manifest.parse(data)
    cert = signing.make_certificate(certificate_key, "repo.example")
    parsed.verify_signature(signed, signing.certificate_pem(cert))


def test_manifest_with_a_changed_body_byte_is_rejected(certificate_key: rsa.RSAPrivateKey) -> None:
    data = _full_manifest().sign(certificate_key)
    tampered = data.replace(b"S42\n", b"S43\n", 1)
    with pytest.raises(ManifestError, match="does not match its hash line"):
        Manifest.parse(tampered)


def test_manifest_signature_by_another_key_is_rejected(
    certificate_key: rsa.RSAPrivateKey, master_key: rsa.RSAPrivateKey
) -> None:
    parsed, signed = Manifest.parse(_full_manifest().sign(master_key))
    cert = signing.make_certificate(certificate_key, "repo.example")
    with pytest.raises(ManifestError):
        parsed.verify_signature(signed, signing.certificate_pem(cert))


@pytest.mark.parametrize("missing", list("CRDS"))
def test_manifest_without_a_mandatory_field_is_rejected(
    missing: str, certificate_key: rsa.RSAPrivateKey
) -> None:
    body = b"".join(
        line + b"\n" for line in _full_manifest().body().splitlines() if not line.startswith(missing.encode())
    )
    hash_hex = hashlib.sha1(body).hexdigest()
    data = SignedText(body, hash_hex, signing.sign_sha1(certificate_key, hash_hex.encode())).serialize()
    with pytest.raises(ManifestError, match=f"no {missing} field"):
        Manifest.parse(data)


# --- extended attributes ---------------------------------------------------------------------------


def test_xattr_blob_is_version_count_then_sorted_length_prefixed_pairs() -> None:
    blob = xattr_blob({b"user.zz": b"", b"user.a": b"value-1", b"security.x": b"\x00\x01"})
    expected = (
        bytes([1, 3])
        + bytes([10, 2])
        + b"security.x\x00\x01"
        + bytes([6, 7])
        + b"user.avalue-1"
        + bytes([7, 0])
        + b"user.zz"
    )
    assert blob == expected


def test_xattr_blob_is_null_without_attributes() -> None:
    assert xattr_blob(None) is None
    assert xattr_blob({}) is None


@pytest.mark.parametrize(
    "xattrs",
    [
        {b"k" * 256: b"v"},  # key longer than 255 bytes
        {b"key": b"v" * 256},  # value longer than 255 bytes
        {b"": b"v"},  # empty key
        {b"a\x00b": b"v"},  # NUL in key
        {f"user.{i}".encode(): b"" for i in range(256)},  # more than 255 attributes
    ],
)
def test_xattr_blob_rejects_what_the_one_byte_fields_cannot_hold(xattrs: dict[bytes, bytes]) -> None:
    with pytest.raises(TreeError):
        xattr_blob(xattrs)
