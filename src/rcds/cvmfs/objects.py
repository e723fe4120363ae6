"""Compressing and naming content-addressed objects.

Objects are zlib *streams* (level 6, the CVMFS default), named by the hash of the compressed bytes.
"""

from __future__ import annotations

import zlib

from .hashes import Algorithm, ContentHash

ZLIB_LEVEL = 6  # file content: byte-identical to what the C++ publisher writes, so objects dedup
# Catalogs are rewritten on every publish and never shared with C++-written content; level 1 halves the
# time to compress a multi-MB catalog for ~3% more bytes (any zlib stream is valid for the client).
CATALOG_ZLIB_LEVEL = 1


class ObjectCorrupt(Exception):
    """An object's bytes do not hash to its name or do not inflate."""


def compress(
    data: bytes | memoryview, algorithm: Algorithm = Algorithm.SHA1, level: int = ZLIB_LEVEL
) -> tuple[bytes, ContentHash]:
    """Compress ``data`` and name it. zlib and hashlib release the GIL on large buffers."""
    stored = zlib.compress(data, level)
    return stored, ContentHash.of(stored, algorithm)


def decompress(stored: bytes) -> bytes:
    try:
        return zlib.decompress(stored)
    except zlib.error as exc:
        raise ObjectCorrupt(f"not a zlib stream: {exc}") from exc


def verify(stored: bytes, expected: ContentHash) -> None:
    actual = ContentHash.of(stored, expected.algorithm)
    if actual != expected:
        raise ObjectCorrupt(f"object {expected.hex} has content hash {actual.hex}")


EMPTY_OBJECT, EMPTY_HASH = compress(b"")
