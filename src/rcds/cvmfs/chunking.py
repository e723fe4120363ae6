"""CernVM-FS compatible Xor32 content-defined chunking.

The Xor32 rolling value is a 32-bit unsigned state updated per byte ``b`` as
``x = ((x << 1) ^ b) mod 2**32``.  Because every byte is shifted out after 32 steps, the state
after byte ``i`` depends only on bytes ``i-31 .. i``::

    x_i = XOR_{k=0..31} (b_{i-k} << k)  mod 2**32

A chunk starting at ``s`` is cut before the first position ``i`` in ``[s+min, s+max)`` whose state
lies in the window around ``magic = 2**31 - 1`` (``|int32(x_i - magic)| < threshold`` with
``threshold = (2**32 - 1) // avg``; like the C++ code, ``x_i == 0xFFFFFFFF`` also counts, because
there ``abs(INT32_MIN)`` overflows to a negative value).  The byte at ``i`` starts the next chunk.
Without such a position the chunk is cut at ``s+max``.  CernVM-FS seeds the state with the 32 bytes
``s+min-32 .. s+min-1`` before the first test, so (with ``min >= 32``) every tested state is the
pure 32-byte window value above, which is what the vectorised scanner computes.

The scanner computes ``x_i`` for a block of positions with numpy using a doubling scheme
(``y_{2j}[i] = y_j[i] ^ (y_j[i-j] << j)`` for ``j = 1, 2, 4, 8, 16``).  Only the region from
``s+min`` up to the cut is examined, in cache-sized blocks, stopping at the first hit.  numpy
releases the GIL in its loops, so chunking can run alongside compression threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # numpy is imported on the first scan: a push of unchanged files never loads it (~60 ms)
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DEFAULT_AVG",
    "DEFAULT_MAX",
    "DEFAULT_MIN",
    "ChunkParams",
    "file_cuts",
    "find_cut",
    "iter_chunks",
    "xor32_states",
]

DEFAULT_MIN = 4 * 1024 * 1024
DEFAULT_AVG = 8 * 1024 * 1024
DEFAULT_MAX = 16 * 1024 * 1024

XOR32_WINDOW = 32
_MASK32 = 0xFFFFFFFF
_MAGIC = _MASK32 // 2  # 2**31 - 1, centre of the cut window (kMagicNumber)

# Positions tested per numpy pass.  The working set (two uint32 arrays plus a bool mask, ~1.1 MiB)
# stays inside L2; each ufunc call still runs long enough that the GIL is mostly released.
_SCAN_BLOCK = 1 << 17
# Preferred size of a single stream.read() in iter_chunks.
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ChunkParams:
    """Xor32 chunk size parameters (bytes): ``32 <= min_size < avg_size < max_size``."""

    min_size: int = DEFAULT_MIN
    avg_size: int = DEFAULT_AVG
    max_size: int = DEFAULT_MAX

    def __post_init__(self) -> None:
        for name in ("min_size", "avg_size", "max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.min_size < XOR32_WINDOW:
            raise ValueError(f"min_size must be >= {XOR32_WINDOW}, got {self.min_size}")
        if not self.min_size < self.avg_size < self.max_size:
            raise ValueError(
                "chunk sizes must satisfy min_size < avg_size < max_size, got "
                f"{self.min_size}/{self.avg_size}/{self.max_size}"
            )

    @property
    def threshold(self) -> int:
        """Half-width of the cut window around the magic number."""
        return _MASK32 // self.avg_size

    def might_find_chunks(self, size: int) -> bool:
        """Whether a file of ``size`` bytes is worth chunking at all (``size > min_size``)."""
        return size > self.min_size


def xor32_states(data: bytes) -> list[int]:
    """Reference scalar state sequence starting from x=0 (for the test vector)."""
    states: list[int] = []
    x = 0
    for b in data:
        x = ((x << 1) ^ b) & _MASK32
        states.append(x)
    return states


class _Scratch(threading.local):
    """Per-thread work arrays for the scanner (reused to avoid allocation and page faults)."""

    def __init__(self) -> None:
        import numpy as np

        self.acc: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self.tmp: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self.mask: npt.NDArray[np.bool_] = np.empty(0, dtype=np.bool_)
        self.window = bytearray()  # file_cuts' read buffer

    def reserve(self, size: int) -> None:
        import numpy as np

        if self.acc.shape[0] < size:
            self.acc = np.empty(size, dtype=np.uint32)
            self.tmp = np.empty(size, dtype=np.uint32)
            self.mask = np.empty(size, dtype=np.bool_)


_scratch: _Scratch | None = None  # made on the first scan (it imports numpy)
_scratch_lock = threading.Lock()


def _thread_scratch() -> _Scratch:
    global _scratch
    if _scratch is None:
        with _scratch_lock:
            if _scratch is None:
                _scratch = _Scratch()
    return _scratch


def _scan(data: npt.NDArray[np.uint8], begin: int, end: int, threshold: int) -> int | None:
    """Return the first position ``i`` in ``[begin, end)`` whose 32-byte window value is a cut
    mark, or None.  Requires ``begin >= 31`` (the window bytes ``i-31 .. i`` are in ``data``)."""
    import numpy as np

    assert begin >= XOR32_WINDOW - 1
    block = _SCAN_BLOCK
    scratch = _thread_scratch()
    scratch.reserve(min(block, end - begin) + XOR32_WINDOW)
    # x is a hit iff x in [lo, lo + span] (|int32(x - magic)| < threshold) or x == 0xFFFFFFFF.
    has_range = threshold > 0
    lo = np.uint32(_MAGIC - threshold + 1) if has_range else np.uint32(0)
    span = np.uint32(2 * threshold - 2) if has_range else np.uint32(0)
    ones = np.uint32(_MASK32)
    pos = begin
    while pos < end:
        n = min(block, end - pos)
        length = n + XOR32_WINDOW - 1
        acc = scratch.acc[:length]
        tmp = scratch.tmp
        np.copyto(acc, data[pos - (XOR32_WINDOW - 1) : pos + n])
        valid = 0  # acc[valid:] holds the window value over the last `width` bytes
        width = 1
        while width < XOR32_WINDOW:
            count = length - valid - width
            np.left_shift(acc[valid : valid + count], width, out=tmp[:count])
            np.bitwise_xor(acc[valid + width :], tmp[:count], out=acc[valid + width :])
            valid += width
            width *= 2
        x = acc[valid:]  # x[k] is the state after byte pos + k
        first: int | None = None
        if x.max() == ones:  # the C++ abs(INT32_MIN) overflow case; astronomically rare
            first = int(np.argmax(x == ones))
        if has_range:
            np.subtract(x, lo, out=x)
            if x.min() <= span:
                mask = scratch.mask[:n]
                np.less_equal(x, span, out=mask)
                k = int(np.argmax(mask))
                if first is None or k < first:
                    first = k
        if first is not None:
            return pos + first
        pos += n
    return None


def _as_array(buf: memoryview | bytes | bytearray) -> npt.NDArray[np.uint8]:
    import numpy as np

    return np.frombuffer(buf, dtype=np.uint8)


def find_cut(buf: memoryview | bytes, params: ChunkParams) -> int | None:
    """Given a buffer that starts at a chunk start, return the length of the first chunk
    if a cut is found within the buffer (a content hit at i >= min, or max if len(buf) >= max),
    else None (need more data or EOF)."""
    data = _as_array(buf)
    size = data.shape[0]
    limit = min(size, params.max_size)
    if limit > params.min_size:
        hit = _scan(data, params.min_size, limit, params.threshold)
        if hit is not None:
            return hit
    if size >= params.max_size:
        return params.max_size
    return None


def iter_chunks(stream: BinaryIO, params: ChunkParams, first: bytes = b"") -> Iterator[bytes]:
    """Read `stream` (optionally preceded by already-read bytes `first`) to EOF and yield
    successive chunks (each <= max_size bytes, all but the last >= min_size unless forced).
    Memory bounded: holds at most about max_size + one read block. Yields nothing for empty input."""
    min_size = params.min_size
    max_size = params.max_size
    threshold = params.threshold
    buf = bytearray(first)
    scanned = min_size  # next position (relative to the chunk start) still to be tested
    eof = False
    while True:
        cut: int | None = None
        limit = min(len(buf), max_size)
        if scanned < limit:
            data = _as_array(buf)
            cut = _scan(data, scanned, limit, threshold)
            del data  # release the buffer export so that `buf` can be resized again
            scanned = limit
        if cut is None and len(buf) >= max_size:
            cut = max_size
        if cut is not None:
            chunk = bytes(memoryview(buf)[:cut])
            del buf[:cut]
            scanned = min_size
            yield chunk
            continue
        if eof:
            if buf:
                yield bytes(buf)
            return
        want = max(_READ_BLOCK, min_size - len(buf))
        block = stream.read(want)
        if block:
            buf += block
        else:
            eof = True


def file_cuts(fd: int, size: int, params: ChunkParams) -> Iterator[tuple[int, int]]:
    """The pieces ``iter_chunks`` cuts the first ``size`` bytes of the open file ``fd`` into, as
    ``(offset, length)``, without keeping their bytes.

    A cut can only fall between ``min_size`` and ``max_size`` bytes into a piece, so only that stretch
    (plus the 31 bytes the rolling window needs before it) is read, with ``os.preadv`` into one per-thread
    buffer: nothing is copied out, and whoever stores a piece reads it again (from the page cache) on
    its own thread. EOFError if the file is shorter than ``size``.
    """
    import numpy as np

    lead = XOR32_WINDOW - 1
    scratch = _thread_scratch()
    need = min(params.max_size, size) - params.min_size + lead
    if need > lead and len(scratch.window) < need:
        scratch.window = bytearray(params.max_size - params.min_size + lead)
    view = memoryview(scratch.window)
    data = np.frombuffer(scratch.window, dtype=np.uint8)
    start = 0
    try:
        while start < size:
            limit = min(size - start, params.max_size)
            cut = limit  # no cut mark: max_size, or the rest of the file
            if limit > params.min_size:  # (never for a file of min_size bytes or less: no buffer then)
                n = limit - params.min_size + lead
                first = start + params.min_size - lead
                got = 0
                while got < n:
                    k = os.preadv(fd, [view[got:n]], first + got)
                    if k == 0:
                        raise EOFError(f"the file is shorter than {size} bytes")
                    got += k
                hit = _scan(data[:n], lead, n, params.threshold)
                if hit is not None:
                    cut = hit + params.min_size - lead
            yield start, cut
            start += cut
    finally:
        view.release()
