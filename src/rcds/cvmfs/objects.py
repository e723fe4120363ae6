"""Compressing and naming content-addressed objects.

Objects are standard zlib streams, named by the hash of the compressed bytes. They are deflated with
zlib-ng when it is installed (level 5: objects as small as stock zlib's level 6, made about twice as fast;
see ``bench/codecs.py`` and README "Objects and compression"), else with the standard library's zlib.
Any zlib inflates either; the bytes differ from stock zlib's, which only matters to our own dedup, and
that goes by the content index (keyed by the uncompressed bytes), not by the compressed bytes.

Objects are inflated with ISA-L (``isal``) when it is installed, else zlib-ng, else the standard zlib:
on the benchmark tree's objects ISA-L inflates 1.4x as fast as zlib-ng and 2.8x as fast as zlib, with the
same stream semantics (``max_length``, ``unconsumed_tail``, ``eof``, ``unused_data``). Reading is what
every ``rcds get``, shrinkwrap export and stratum 1 snapshot spends most of its CPU on.
"""

from __future__ import annotations

import zlib
from typing import Protocol, cast

from .hashes import Algorithm, ContentHash

try:
    # Optional: the job client runs these modules on a bare python3, where the standard zlib does it all.
    from zlib_ng import zlib_ng
except ImportError:
    ZLIB_NG = False
else:
    ZLIB_NG = True
try:
    from isal import isal_zlib  # inflate only: its deflate at our ratio is no faster than zlib-ng's
except ImportError:
    ISAL = False
else:
    ISAL = True


class Inflater(Protocol):
    """What ``zlib.decompressobj()`` returns (zlib-ng's has the same interface)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def unconsumed_tail(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes: ...
    def flush(self, length: int = ..., /) -> bytes: ...


if ZLIB_NG:
    # zlib-ng 5 against stock zlib 6 on the ingest benchmark's tree: 1.9x (text) and 2.3x (binaries) the
    # deflate speed for 0.3% larger (text) and 0.5% smaller (binaries) objects; catalogs 6% smaller than
    # stock zlib 1 at the same speed. Inflate runs 1.6-1.9x faster.
    ZLIB_LEVEL = 5
    CATALOG_ZLIB_LEVEL = 5
    _compress = zlib_ng.compress
    _decompress = zlib_ng.decompress
    ZlibError: tuple[type[Exception], ...] = (
        zlib.error,
        cast("type[Exception]", zlib_ng.error),
    )  # stub: an instance
else:
    ZLIB_LEVEL = 6  # the CVMFS default
    # Catalogs are rewritten on every publish; level 1 halves the time to compress a multi-MB catalog for
    # ~3% more bytes.
    CATALOG_ZLIB_LEVEL = 1
    _compress = zlib.compress
    _decompress = zlib.decompress
    ZlibError = (zlib.error,)
if ISAL:
    _decompress = isal_zlib.decompress
    ZlibError = (*ZlibError, cast("type[Exception]", isal_zlib.error))
"""What a bad stream raises: ``zlib.error``, ``zlib_ng.error`` or ``isal_zlib.error`` (neither is a
subclass of ``zlib.error``)."""


# An empty file is CVMFS's well-known object e8ec3d88... (stock zlib's bytes for nothing), whatever
# deflates the rest: the C++ publisher writes it too, and the catalogs' ``.cvmfscatalog`` markers name it.
EMPTY_OBJECT = zlib.compress(b"", 6)
EMPTY_HASH = ContentHash.of(EMPTY_OBJECT, Algorithm.SHA1)


class ObjectCorrupt(Exception):
    """An object's bytes do not hash to its name or do not inflate."""


def inflater() -> Inflater:
    """A streaming inflater for one object (``decompressobj``); errors are in ``ZlibError``."""
    if ISAL:
        return cast("Inflater", isal_zlib.decompressobj())
    return zlib_ng.decompressobj() if ZLIB_NG else zlib.decompressobj()


def compress(
    data: bytes | memoryview, algorithm: Algorithm = Algorithm.SHA1, level: int | None = None
) -> tuple[bytes, ContentHash]:
    """Compress ``data`` and name it. zlib(-ng) and hashlib release the GIL on large buffers."""
    stored = _compress(data, ZLIB_LEVEL if level is None else level) if len(data) else EMPTY_OBJECT
    return stored, ContentHash.of(stored, algorithm)


def decompress(stored: bytes) -> bytes:
    try:
        return _decompress(stored)
    except ZlibError as exc:
        raise ObjectCorrupt(f"not a zlib stream: {exc}") from exc


def verify(stored: bytes, expected: ContentHash) -> None:
    actual = ContentHash.of(stored, expected.algorithm)
    if actual != expected:
        raise ObjectCorrupt(f"object {expected.hex} has content hash {actual.hex}")
