"""Tests for the CernVM-FS Xor32 content-defined chunker (rcds.cvmfs.chunking)."""

from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcds.cvmfs import chunking
from rcds.cvmfs.chunking import (
    DEFAULT_AVG,
    DEFAULT_MAX,
    DEFAULT_MIN,
    ChunkParams,
    file_cuts,
    find_cut,
    iter_chunks,
    xor32_states,
)

MASK32 = 0xFFFFFFFF
MAGIC = 0x7FFFFFFF

# (input byte, expected xor32 state) from cvmfs test/unittests/t_chunk_detectors.cc (T_ChunkDetectors.Xor32)
XOR32_VECTOR: list[tuple[int, int]] = [
    (5, 5), (255, 245), (0, 490), (32, 1012), (27, 2035), (11, 4077), (87, 8077), (128, 16282),
    (127, 32587), (224, 65142), (63, 130259), (11, 260525), (1, 521051), (103, 1042129),
    (73, 2084331), (22, 4168640), (235, 8337259), (17, 16674503), (3, 33349005), (90, 66698048),
    (210, 133396050), (163, 266791943), (12, 533583874), (79, 1067167819), (53, 2134335651),
    (2, 4268671300), (100, 4242375404), (193, 4189783321), (64, 4084599410), (242, 3874231318),
    (14, 3453495330), (111, 2612023339), (83, 929079301), (253, 1858158839), (207, 3716317473),
    (172, 3137667822), (62, 1980368354), (190, 3960736634), (114, 3626505862), (39, 2958044459),
    (6, 1621121616), (175, 3242243087), (93, 2189518915), (238, 84070504), (184, 168140904),
    (84, 336281732), (29, 672563477), (200, 1345127138),
]  # fmt: skip

# Expected cut marks for 100 MiB of Prng(seed 42) data with min/avg/max 512000/1024000/2048000
# (T_ChunkDetectors.Xor32ChunkDetectorSlow).
PRNG_DATA_SIZE = 104857600
PRNG_MARKS: list[int] = [
    742752, 2790752, 3521796, 4188893, 4940543, 5884591, 7131564,
    8520617, 9159233, 9999783, 11202120, 11778185, 13781177, 15331152,
    16497018, 17410317, 19391774, 20086877, 20763223, 21346744, 22075173,
    22705444, 23557037, 24461261, 25118505, 25663669, 26333579, 27763062,
    28369273, 29586929, 30171732, 30794768, 31811364, 32408599, 33689064,
    34678262, 36410687, 37096663, 37682005, 38269900, 39931592, 41347607,
    42701845, 44350286, 44925654, 45893350, 47770173, 48332690, 49303250,
    49861260, 50727512, 51578678, 52176356, 52949949, 54228704, 54843051,
    55796214, 56694940, 58092222, 59294196, 60381155, 61509784, 62850141,
    63505051, 64168046, 64925423, 66252082, 67232078, 68005369, 68615410,
    69454686, 70276575, 71308716, 73356716, 73946267, 74775664, 75509293,
    77487075, 78606807, 79732133, 80467148, 81185709, 82588680, 83547234,
    84220971, 85992169, 86979928, 87845294, 88392648, 89241756, 89980293,
    91129752, 91891024, 92493793, 93792263, 94393106, 95782791, 96813116,
    97723756, 98618891, 99707336, 101755336, 103405168, 104269441,
]  # fmt: skip
PRNG_PARAMS = ChunkParams(512000, 1024000, 2048000)

# ---------------------------------------------------------------------------------------------
# Helpers: CVMFS Prng (util/prng.h), scalar reference chunker, short-read stream
# ---------------------------------------------------------------------------------------------

LCG_A = 6364136223846793005
LCG_C = 1442695040888963407
MASK64 = (1 << 64) - 1


def prng_scalar(seed: int, n: int) -> bytes:
    """Prng::Next(256) n times: advance the state first, then scale double(state) to [0, 256)."""
    state = seed
    out = bytearray()
    for _ in range(n):
        state = (LCG_A * state + LCG_C) & MASK64
        out.append(int(float(state) * 256.0 / 18446744073709551616.0) % 256)
    return bytes(out)


def _lcg_jump(steps: int) -> tuple[int, int]:
    """(a, c) such that state_{k+steps} = a * state_k + c (mod 2**64)."""
    ra, rc = 1, 0
    ba, bc = LCG_A, LCG_C
    while steps:
        if steps & 1:
            ra, rc = (ba * ra) & MASK64, (ba * rc + bc) & MASK64
        ba, bc = (ba * ba) & MASK64, (ba * bc + bc) & MASK64
        steps >>= 1
    return ra, rc


def prng_bytes(seed: int, n: int, block: int = 1 << 20) -> bytes:
    """Vectorised equivalent of prng_scalar (uint64 arithmetic wraps mod 2**64 in numpy)."""
    states = np.empty(block, dtype=np.uint64)
    states[0] = (LCG_A * seed + LCG_C) & MASK64
    filled = 1
    while filled < block:
        k = min(filled, block - filled)
        a, c = _lcg_jump(filled)
        states[filled : filled + k] = states[:k] * np.uint64(a) + np.uint64(c)
        filled += k
    jump_a, jump_c = _lcg_jump(block)
    out = np.empty(n, dtype=np.uint8)
    for off in range(0, n, block):
        k = min(block, n - off)
        scaled = states[:k].astype(np.float64) * 256.0 / 18446744073709551616.0
        out[off : off + k] = (scaled.astype(np.uint64) % np.uint64(256)).astype(np.uint8)
        states = states * np.uint64(jump_a) + np.uint64(jump_c)
    return out.tobytes()


def ref_is_cut(x: int, threshold: int) -> bool:
    """CheckThreshold with C++ wrap-around: |int32(x - magic)| < threshold, abs(INT32_MIN) < 0."""
    d = (x - MAGIC) & MASK32
    if d >= 1 << 31:
        d -= 1 << 32
    return abs(d) < threshold or d == -(1 << 31)


def ref_chunks(data: bytes, params: ChunkParams) -> list[bytes]:
    """Scalar restatement of the spec (cvmfs-format.md section 2), one byte at a time."""
    threshold = MASK32 // params.avg_size
    chunks: list[bytes] = []
    start = 0
    n = len(data)
    while start < n:
        x = 0
        for j in range(start + params.min_size - 32, min(start + params.min_size, n)):
            x = ((x << 1) ^ data[j]) & MASK32
        cut = min(start + params.max_size, n)
        for i in range(start + params.min_size, min(start + params.max_size, n)):
            x = ((x << 1) ^ data[i]) & MASK32
            if ref_is_cut(x, threshold):
                cut = i
                break
        chunks.append(data[start:cut])
        start = cut
    return chunks


class ShortReadStream(io.RawIOBase):
    """A stream whose read() returns at most a varying, small number of bytes."""

    def __init__(self, data: bytes, max_read: int, seed: int = 0) -> None:
        self._data = data
        self._pos = 0
        self._max_read = max_read
        self._rng = random.Random(seed)
        self.requested: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        self.requested.append(-1 if size is None else size)
        if size is None or size < 0:
            size = len(self._data) - self._pos
        size = min(size, self._rng.randint(1, self._max_read))
        block = self._data[self._pos : self._pos + size]
        self._pos += len(block)
        return block

    @property
    def position(self) -> int:
        return self._pos


@contextmanager
def scan_block(size: int) -> Iterator[None]:
    """Temporarily shrink the scanner's block size so small inputs cross block boundaries."""
    saved = chunking._SCAN_BLOCK
    chunking._SCAN_BLOCK = size
    try:
        yield
    finally:
        chunking._SCAN_BLOCK = saved


def chunk_all(data: bytes, params: ChunkParams, max_read: int | None = None, seed: int = 0) -> list[bytes]:
    stream = io.BytesIO(data) if max_read is None else ShortReadStream(data, max_read, seed)
    return list(iter_chunks(stream, params))  # type: ignore[arg-type]


def expected_find_cut(data: bytes, params: ChunkParams) -> int | None:
    chunks = ref_chunks(data, params)
    if not chunks:
        return None
    first = len(chunks[0])
    return first if first < len(data) or len(data) >= params.max_size else None


# ---------------------------------------------------------------------------------------------
# Xor32 state and parameters
# ---------------------------------------------------------------------------------------------


def test_xor32_state_vector() -> None:
    inputs = bytes(b for b, _ in XOR32_VECTOR)
    assert xor32_states(inputs) == [x for _, x in XOR32_VECTOR]
    assert xor32_states(b"") == []


def test_xor32_state_is_32_byte_window() -> None:
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(200))
    states = xor32_states(data)
    for i in range(31, len(data)):
        window = 0
        for k in range(32):
            window ^= (data[i - k] << k) & MASK32
        assert states[i] == window
        assert xor32_states(data[i - 31 : i + 1])[-1] == states[i]


def test_default_params() -> None:
    p = ChunkParams()
    assert (p.min_size, p.avg_size, p.max_size) == (DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX)
    assert (DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX) == (4194304, 8388608, 16777216)
    assert p.threshold == 511
    assert not p.might_find_chunks(DEFAULT_MIN)
    assert p.might_find_chunks(DEFAULT_MIN + 1)


@pytest.mark.parametrize(
    ("mn", "avg", "mx"),
    [(31, 64, 128), (0, 64, 128), (64, 64, 128), (64, 128, 128), (64, 200, 128), (100, 50, 200)],
)
def test_params_validation(mn: int, avg: int, mx: int) -> None:
    with pytest.raises(ValueError):
        ChunkParams(mn, avg, mx)


def test_params_type_validation() -> None:
    with pytest.raises(TypeError):
        ChunkParams(64.0, 128, 256)  # type: ignore[arg-type]
    ChunkParams(32, 33, 34)  # smallest legal configuration


# ---------------------------------------------------------------------------------------------
# The CVMFS 100 MiB Prng cut-mark test vector
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prng_data() -> bytes:
    return prng_bytes(42, PRNG_DATA_SIZE)


def test_prng_generator_matches_scalar() -> None:
    assert prng_bytes(42, 5000, block=1024) == prng_scalar(42, 5000)
    assert prng_bytes(42, 3000) == prng_scalar(42, 3000)


def _marks(chunks: list[bytes]) -> list[int]:
    marks: list[int] = []
    pos = 0
    for c in chunks:
        pos += len(c)
        marks.append(pos)
    return marks


@pytest.mark.parametrize("read_size", [None, 102400, 512000, 1024000, 10485760])
def test_prng_cut_marks(prng_data: bytes, read_size: int | None) -> None:
    if read_size is None:
        chunks = list(iter_chunks(io.BytesIO(prng_data), PRNG_PARAMS))
    else:
        stream = ShortReadStream(prng_data, read_size, seed=read_size)
        chunks = list(iter_chunks(stream, PRNG_PARAMS))  # type: ignore[arg-type]
    marks = _marks(chunks)
    # every mark but the end of the data is a cut mark of the C++ detector
    assert marks[:-1] == PRNG_MARKS
    assert marks[-1] == PRNG_DATA_SIZE
    assert all(len(c) <= PRNG_PARAMS.max_size for c in chunks)
    assert all(len(c) >= PRNG_PARAMS.min_size for c in chunks[:-1])


def test_prng_cut_marks_find_cut(prng_data: bytes) -> None:
    view = memoryview(prng_data)
    marks: list[int] = []
    pos = 0
    while True:
        cut = find_cut(view[pos : pos + PRNG_PARAMS.max_size], PRNG_PARAMS)
        if cut is None:
            break
        pos += cut
        marks.append(pos)
    assert marks == PRNG_MARKS


def test_prng_cut_marks_with_first(prng_data: bytes) -> None:
    head = prng_data[:700000]
    chunks = list(iter_chunks(io.BytesIO(prng_data[700000:]), PRNG_PARAMS, first=head))
    assert _marks(chunks)[:-1] == PRNG_MARKS


def _cuts_of(data: bytes, params: ChunkParams, size: int | None = None) -> list[tuple[int, int]]:
    """``file_cuts`` of ``data`` written to a real file."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return list(file_cuts(f.fileno(), len(data) if size is None else size, params))


def test_prng_cut_marks_of_a_file(prng_data: bytes) -> None:
    # what the directory ingest cuts a big file into: the C++ detector's marks, read only where a cut can be
    cuts = _cuts_of(prng_data, PRNG_PARAMS)
    assert [offset + length for offset, length in cuts][:-1] == PRNG_MARKS
    assert [offset for offset, _ in cuts] == [0, *PRNG_MARKS]
    assert sum(length for _, length in cuts) == PRNG_DATA_SIZE


def test_file_cuts_of_a_file_shorter_than_its_size_is_an_eof_error() -> None:
    params = ChunkParams(64, 128, 256)
    data = os.urandom(1000)
    with pytest.raises(EOFError, match="shorter than 1500 bytes"):
        _cuts_of(data, params, size=1500)
    # a file that grew: only the first ``size`` bytes are cut
    assert sum(n for _, n in _cuts_of(data, params, size=700)) == 700


# ---------------------------------------------------------------------------------------------
# Fast implementation against the scalar reference
# ---------------------------------------------------------------------------------------------

small_params = st.builds(
    lambda mn, da, dm: ChunkParams(mn, mn + da, mn + da + dm),
    st.sampled_from([32, 33, 40, 64]),
    st.integers(1, 120),
    st.integers(1, 250),
)
chunk_data = st.one_of(
    st.binary(max_size=1500),
    st.lists(st.sampled_from([0, 1, 0x80, 0xFF]), max_size=1500).map(bytes),
    st.tuples(st.binary(min_size=1, max_size=40), st.integers(1, 60)).map(lambda t: t[0] * t[1]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=chunk_data,
    params=small_params,
    max_read=st.integers(1, 700),
    seed=st.integers(0, 1000),
    block=st.sampled_from([1, 7, 64, 1 << 16]),
)
def test_iter_chunks_matches_reference(
    data: bytes, params: ChunkParams, max_read: int, seed: int, block: int
) -> None:
    expected = ref_chunks(data, params)
    with scan_block(block):
        assert chunk_all(data, params) == expected
        assert chunk_all(data, params, max_read=max_read, seed=seed) == expected
        assert find_cut(data, params) == expected_find_cut(data, params)
        assert find_cut(memoryview(data), params) == expected_find_cut(data, params)
        offset = 0
        for (at, length), chunk in zip(_cuts_of(data, params), expected, strict=True):
            assert (at, length) == (offset, len(chunk))
            offset += length


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=600, max_size=1500), params=small_params, split=st.integers(0, 1500))
def test_first_bytes_are_part_of_the_stream(data: bytes, params: ChunkParams, split: int) -> None:
    split = min(split, len(data))
    chunks = list(iter_chunks(io.BytesIO(data[split:]), params, first=data[:split]))
    assert chunks == ref_chunks(data, params)


def test_reference_on_larger_random_data() -> None:
    # several real scan blocks per chunk, and min/avg/max chosen so that both content and
    # forced cuts occur
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 600_000, dtype=np.uint8).tobytes()
    params = ChunkParams(20_000, 60_000, 150_000)
    expected = ref_chunks(data, params)
    assert len(expected) > 4
    assert chunk_all(data, params) == expected
    assert chunk_all(data, params, max_read=70_000, seed=1) == expected


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------

P_SMALL = ChunkParams(64, 128, 256)


def test_empty_input() -> None:
    assert list(iter_chunks(io.BytesIO(b""), P_SMALL)) == []
    assert find_cut(b"", P_SMALL) is None
    assert find_cut(memoryview(b""), P_SMALL) is None


@pytest.mark.parametrize("size", [1, 31, 32, 63, 64])
def test_input_not_longer_than_min(size: int) -> None:
    data = bytes(range(size))
    assert list(iter_chunks(io.BytesIO(data), P_SMALL)) == [data]
    assert find_cut(data, P_SMALL) is None


def test_forced_cut_at_max_and_exact_eof() -> None:
    # all-zero data keeps the state at 0, far from the magic window: only forced cuts
    data = bytes(3 * P_SMALL.max_size)
    assert chunk_all(data, P_SMALL) == [bytes(256)] * 3  # no empty chunk at EOF
    assert chunk_all(data + bytes(10), P_SMALL) == [bytes(256)] * 3 + [bytes(10)]
    assert chunk_all(data[:-1], P_SMALL) == [bytes(256)] * 2 + [bytes(255)]
    assert find_cut(data, P_SMALL) == 256
    assert find_cut(data[:256], P_SMALL) == 256
    assert find_cut(data[:255], P_SMALL) is None


def test_zero_data_default_params() -> None:
    data = bytes(DEFAULT_MAX * 2 + 5)
    sizes = [len(c) for c in iter_chunks(io.BytesIO(data), ChunkParams())]
    assert sizes == [DEFAULT_MAX, DEFAULT_MAX, 5]


def test_all_ones_state_cuts_like_cxx_overflow() -> None:
    # 32 bytes of 0x01 drive the state to 0xFFFFFFFF and keep it there.  In C++,
    # abs(int32(0xFFFFFFFF) - kMagicNumber) = abs(INT32_MIN) stays negative, i.e. "below the
    # threshold", so every chunk is cut as early as possible (at min).
    assert xor32_states(b"\x01" * 40)[31:] == [MASK32] * 9
    params = ChunkParams(32, 64, 128)
    data = b"\x01" * 200
    assert [len(c) for c in chunk_all(data, params)] == [32] * 6 + [8]
    assert chunk_all(data, params) == ref_chunks(data, params)
    assert find_cut(data, params) == 32


@pytest.mark.parametrize(
    "x", [MAGIC - 3, MAGIC - 2, MAGIC, MAGIC + 2, MAGIC + 3, 0, 1 << 31, MASK32 - 1, MASK32]
)
def test_threshold_window_edges(x: int) -> None:
    # build 32 bytes whose window value is x: b_i = bit (31 - i) of x gives x after 32 bytes
    window = bytes((x >> (31 - i)) & 1 for i in range(32))
    assert xor32_states(window)[-1] == x
    params = ChunkParams(32, MASK32 // 3, MASK32)  # threshold 3: |x - magic| < 3 cuts
    assert params.threshold == 3
    data = bytes(1) + window  # the window ends at position 32 == min
    expected = 32 if abs(x - MAGIC) < 3 or x == MASK32 else None
    assert find_cut(data, params) == expected
    assert (expected is not None) == ref_is_cut(x, 3)
    assert [len(c) for c in chunk_all(data + bytes(5), params)] == ([32, 6] if expected else [38])


def test_chunks_reassemble_and_respect_bounds() -> None:
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    # mix in long runs of zeros so forced cuts happen too
    data = data[:1_000_000] + bytes(700_000) + data[1_000_000:]
    params = ChunkParams(64 * 1024, 128 * 1024, 256 * 1024)
    chunks = chunk_all(data, params)
    assert b"".join(chunks) == data
    assert all(len(c) <= params.max_size for c in chunks)
    assert all(len(c) >= params.min_size for c in chunks[:-1])
    assert any(len(c) == params.max_size for c in chunks)
    assert any(params.min_size <= len(c) < params.max_size for c in chunks)
    # deterministic and independent of how the stream delivers the data
    assert chunk_all(data, params) == chunks
    assert chunk_all(data, params, max_read=1000, seed=5) == chunks
    assert chunk_all(data, params, max_read=300_000, seed=6) == chunks


def test_memory_is_bounded() -> None:
    rng = np.random.default_rng(12)
    data = rng.integers(0, 256, 6_000_000, dtype=np.uint8).tobytes()
    params = ChunkParams(128 * 1024, 256 * 1024, 512 * 1024)
    stream = ShortReadStream(data, 1 << 30)
    yielded = 0
    for chunk in iter_chunks(stream, params):  # type: ignore[arg-type]
        yielded += len(chunk)
        assert stream.position - yielded <= params.max_size + chunking._READ_BLOCK
    assert yielded == len(data)
    assert max(stream.requested) <= max(params.min_size, chunking._READ_BLOCK)
