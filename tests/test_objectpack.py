"""ObjectPack V2: build and parse, with every object re-hashed on the way in."""

from __future__ import annotations

import base64
import io

import pytest

from rcds.cvmfs import objectpack
from rcds.cvmfs.hashes import ContentHash, Suffix
from rcds.cvmfs.objectpack import PackEntry, PackError
from rcds.cvmfs.objects import compress


def _pack(objects: list[tuple[PackEntry, bytes]]) -> tuple[bytes, bytes]:
    raw_header, body = objectpack.build(objects)
    return raw_header, raw_header + b"".join(body)


def _objects() -> list[tuple[PackEntry, bytes]]:
    data, _ = compress(b"hello world\n" * 100)
    catalog, _ = compress(b"pretend catalog")
    return [
        (objectpack.content_entry(data), data),
        (objectpack.content_entry(catalog, Suffix.CATALOG), catalog),
    ]


def test_header_is_the_stock_layout() -> None:
    objects = _objects()
    raw_header, _ = _pack(objects)
    (e1, d1), (e2, d2) = objects
    expected = f"V2\nS{len(d1) + len(d2)}\nN2\n--\nC {e1.hash.hex} {len(d1)}\nC {e2.hash.hex}C {len(d2)}\n"
    assert raw_header.decode() == expected
    named = PackEntry(e1.hash, 5, name="a/b")
    assert named.header_line() == f"N {e1.hash.hex} 5 {base64.urlsafe_b64encode(b'a/b').decode()}\n"


def test_round_trip_hands_on_every_object() -> None:
    objects = _objects()
    raw_header, pack = _pack(objects)
    got: list[tuple[str, bytes]] = []
    entries = objectpack.read(
        io.BytesIO(pack), len(raw_header), objectpack.payload_digest(raw_header),
        lambda e, d: got.append((e.object_name, d)),
    )  # fmt: skip
    assert [e for e, _ in objects] == entries
    assert got == [(e.object_name, d) for e, d in objects]
    assert got[1][0].endswith("C")


def test_empty_pack() -> None:
    raw_header, pack = _pack([])
    assert raw_header == b"V2\nS0\nN0\n--\n"
    assert objectpack.read(io.BytesIO(pack), len(raw_header), None, lambda e, d: None) == []


def test_object_with_a_wrong_hash_is_refused() -> None:
    objects = _objects()
    entry, data = objects[0]
    objects[0] = (entry, data[:-1] + bytes([data[-1] ^ 1]))
    raw_header, pack = _pack(objects)
    accepted: list[PackEntry] = []
    with pytest.raises(PackError, match="does not hash to its name"):
        objectpack.read(io.BytesIO(pack), len(raw_header), None, lambda e, d: accepted.append(e))
    assert accepted == []


def test_wrong_digest_truncation_and_trailing_bytes_are_refused() -> None:
    raw_header, pack = _pack(_objects())
    with pytest.raises(PackError, match="payload_digest"):
        objectpack.read(io.BytesIO(pack), len(raw_header), "0" * 40, lambda e, d: None)
    with pytest.raises(PackError, match="before its last object"):
        objectpack.read(io.BytesIO(pack[:-3]), len(raw_header), None, lambda e, d: None)
    with pytest.raises(PackError, match="after the pack"):
        objectpack.read(io.BytesIO(pack + b"x"), len(raw_header), None, lambda e, d: None)


@pytest.mark.parametrize(
    "text",
    [
        "V1\nS0\nN0\n--\n",
        "V2\nS5\nN0\n--\n",  # sizes do not add up
        "V2\nS3\nN1\n--\nC abc 3\n",  # not a hash
        f"V2\nS1\nN1\n--\nC {'a' * 40}Q 1\n",  # unknown suffix
        f"V2\nS0\nN{objectpack.MAX_OBJECTS + 1}\n--\n",
        "V2\nS0\nN0\n",
    ],
)
def test_bad_headers_are_refused(text: str) -> None:
    with pytest.raises(PackError):
        objectpack.parse_header(text.encode())


def test_suffixed_hashes() -> None:
    h, suffix = objectpack.parse_suffixed_hash("ab" * 20 + "-rmd160C")
    assert h == ContentHash.from_hex("ab" * 20 + "-rmd160") and suffix is Suffix.CATALOG
    assert objectpack.parse_suffixed_hash("ab" * 20)[1] is Suffix.NONE
