"""ObjectPack V2: how a CVMFS publisher ships objects to a gateway (``cvmfs/pack.{h,cc}`` of CVMFS).

A pack is a text header followed by the objects' stored (compressed) bytes, concatenated in header order::

    V2
    S<sum of the object sizes>
    N<number of objects>
    --
    C <hex digest><algorithm id><suffix letter> <size>          one line per content-addressed object
    N <hex digest><algorithm id> <size> <base64url(name)>       one line per named file

The sender names the pack by ``payload_digest``, the SHA-1 hex of the header. The receiver here never trusts
a name: every object is re-hashed (a CVMFS object's name is the hash of its compressed bytes) and a pack
whose digest, sizes or hashes do not match is refused as a whole before any object is handed on.
Parsing is streaming: the header is bounded (``MAX_OBJECTS`` lines), and one object at a time is held.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .hashes import Algorithm, ContentHash, Suffix

MAX_PACK_BYTES = 200 * 1024 * 1024  # the stock publisher's pack limit
MAX_OBJECTS = 100_000
MAX_HEADER_LINE = 200  # longest header line: "N " + 40 hex + algorithm + size + a base64url name
READ_CHUNK = 1 << 20


class PackError(ValueError):
    """A pack that cannot be accepted; ``str()`` is the reason given to the sender."""


@dataclass(frozen=True)
class PackEntry:
    """One object of a pack: content-addressed (``name`` None) or a named file."""

    hash: ContentHash
    size: int
    suffix: Suffix = Suffix.NONE
    name: str | None = None

    @property
    def object_name(self) -> str:
        """The store key of a content-addressed object (``data/ab/cd...C``)."""
        return self.hash.object_name(self.suffix)

    def header_line(self) -> str:
        if self.name is None:
            return f"C {self.hash.hex}{self.suffix.value} {self.size}\n"
        encoded = base64.urlsafe_b64encode(self.name.encode()).decode()
        return f"N {self.hash.hex} {self.size} {encoded}\n"


def parse_suffixed_hash(text: str) -> tuple[ContentHash, Suffix]:
    """``<40 hex>[-rmd160|-shake128][suffix letter]`` as CVMFS writes object names."""
    suffix = Suffix.NONE
    if text and not text[-1].isdigit() and text[-1] not in "abcdef":
        try:
            suffix = Suffix(text[-1])
        except ValueError as exc:
            raise PackError(f"unknown object suffix in {text!r}") from exc
        text = text[:-1]
    try:
        return ContentHash.from_hex(text), suffix
    except ValueError as exc:
        raise PackError(f"not an object hash: {text!r}") from exc


def header(entries: Iterable[PackEntry]) -> bytes:
    items = list(entries)
    total = sum(e.size for e in items)
    lines = [f"V2\nS{total}\nN{len(items)}\n--\n", *(e.header_line() for e in items)]
    return "".join(lines).encode()


def payload_digest(raw_header: bytes) -> str:
    """What the sender puts in ``payload_digest``: the SHA-1 hex of the header."""
    return hashlib.sha1(raw_header).hexdigest()


def build(objects: Iterable[tuple[PackEntry, bytes]]) -> tuple[bytes, Iterator[bytes]]:
    """The header and the stream of object bytes of a pack of ``(entry, stored bytes)`` pairs."""
    items = list(objects)
    for entry, data in items:
        if entry.size != len(data):
            raise ValueError(f"{entry.hash.hex}: size {entry.size} but {len(data)} bytes")
    if len(items) > MAX_OBJECTS or sum(e.size for e, _ in items) > MAX_PACK_BYTES:
        raise ValueError("pack over the ObjectPack limits: split it")
    return header(e for e, _ in items), (data for _, data in items)


def content_entry(stored: bytes, suffix: Suffix = Suffix.NONE) -> PackEntry:
    """The entry of a content-addressed object, named by the SHA-1 of its stored bytes."""
    return PackEntry(ContentHash.of(stored, Algorithm.SHA1), len(stored), suffix)


def parse_header(raw: bytes) -> list[PackEntry]:
    """The entries of a V2 header; the declared totals and limits are checked."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise PackError("pack header is not ASCII") from exc
    head, sep, body = text.partition("--\n")
    if not sep:
        raise PackError("pack header has no '--' separator")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        if line:
            fields[line[0]] = line[1:]
    if fields.get("V") != "2":
        raise PackError("not an ObjectPack V2 header")
    try:
        total, count = int(fields["S"]), int(fields["N"])
    except (KeyError, ValueError) as exc:
        raise PackError("pack header lacks its S (size) or N (count) line") from exc
    if count > MAX_OBJECTS or total > MAX_PACK_BYTES or min(count, total) < 0:
        raise PackError(f"pack over the limits ({MAX_OBJECTS} objects, {MAX_PACK_BYTES} bytes)")
    if body and not body.endswith("\n"):
        raise PackError("pack header ends in the middle of a line")
    entries = [_parse_line(line) for line in body.splitlines()]
    if len(entries) != count or sum(e.size for e in entries) != total:
        raise PackError("pack header's object lines do not add up to its S and N lines")
    return entries


def _parse_line(line: str) -> PackEntry:
    parts = line.split(" ")
    try:
        if parts[0] == "C" and len(parts) == 3:
            h, suffix = parse_suffixed_hash(parts[1])
            return PackEntry(h, _size(parts[2]), suffix)
        if parts[0] == "N" and len(parts) == 4:
            h, suffix = parse_suffixed_hash(parts[1])
            name = base64.urlsafe_b64decode(parts[3].encode()).decode()
            return PackEntry(h, _size(parts[2]), suffix, name)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, PackError):
            raise
        raise PackError(f"bad pack header line {line[:MAX_HEADER_LINE]!r}") from exc
    raise PackError(f"bad pack header line {line[:MAX_HEADER_LINE]!r}")


def _size(text: str) -> int:
    if not text.isdigit():
        raise PackError(f"bad object size {text[:20]!r}")
    return int(text)


def read(
    stream: BinaryIO,
    header_size: int,
    expected_digest: str | None,
    accept: Callable[[PackEntry, bytes], None],
) -> list[PackEntry]:
    """Read one pack from ``stream``: check the header's digest, re-hash each object, hand it to ``accept``.

    Objects are handed on one at a time as they are verified; a pack refused half-way has handed on only
    good objects (content-addressed objects are harmless until a catalog names them). Bytes after the last
    object are refused.
    """
    if not 0 < header_size <= MAX_OBJECTS * MAX_HEADER_LINE:
        raise PackError(f"bad header_size {header_size}")
    raw = _read_exactly(stream, header_size)
    if expected_digest is not None and payload_digest(raw) != expected_digest.lower():
        raise PackError("payload_digest does not match the pack header")
    entries = parse_header(raw)
    for entry in entries:
        hasher = entry.hash.algorithm.new()
        data = bytearray()
        remaining = entry.size
        while remaining:
            piece = stream.read(min(remaining, READ_CHUNK))
            if not piece:
                raise PackError("pack ends before its last object")
            hasher.update(piece)
            data += piece
            remaining -= len(piece)
        if hasher.digest() != entry.hash.digest:
            raise PackError(f"object {entry.hash.hex}{entry.suffix.value} does not hash to its name")
        accept(entry, bytes(data))
    if stream.read(1):
        raise PackError("bytes after the pack's last object")
    return entries


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise PackError("pack ends inside its header")
    return data
