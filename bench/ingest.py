#!/usr/bin/env python3
"""Ingest benchmark for the rcds CernVM-FS writer.

One run:

1. generates (or reuses from ``--workdir``) a deterministic, code-like tree of about ``--size-gib`` GiB:
   ~20,000 small source-like text files per GiB in a few hundred nested directories (with symlinks,
   hard links and executables) plus 3-5 large, partly compressible binaries;
2. measures the *raw limit*: the writer's compressor (``rcds.cvmfs.objects.compress``: zlib-ng level 5 if
   installed, else zlib level 6) + SHA-1 of the compressed bytes, on all cores, over the same
   bytes cut into the same pieces the writer uses (whole small files, ~8 MiB pieces of big files), with
   the data already in memory and nothing written;
3. measures a first ingest into a fresh repository (create + mkdir + add_directory + commit);
4. measures a re-publish of the unchanged tree at another path (content-index hits, no compression);
5. runs each ingest phase in its own child process so that its peak RSS is the ingest's alone;
6. prints a table and a final JSON line, also written to ``<workdir>/ingest-result.json``.

The page cache is not dropped (that needs root); the tree is read once before every timed phase instead,
so every figure is a warm-cache figure.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

GIB = 1 << 30
MIB = 1 << 20
MB = 1_000_000  # throughput figures are decimal MB/s of uncompressed input

GEN_VERSION = 4  # bump whenever the generator changes: the cache key includes it
DEFAULT_SEED = 20240611
FQRN = "bench.rcds.local"
TREE1 = "/sw/bench/tree1"
TREE2 = "/sw/bench/tree2"
FIXED_MTIME = 1_700_000_000

# Writer parameters the raw limit mirrors (rcds.cvmfs.chunking defaults: files above 4 MiB are chunked,
# ~8 MiB average chunks).
WHOLE_FILE_LIMIT = 4 * MIB
RAW_PIECE = 8 * MIB
RAW_BATCH = 256 * MIB

TARGET_RATIO = 0.7
TARGET_RATIO_SMALL_FILES = 0.8  # issue 19: 20,000 small files at >= 0.8 of the raw limit
TARGET_SPEEDUP = 5.0
TARGET_RSS_MIB = 300.0

# --------------------------------------------------------------------------------------------------
# Tree generation
# --------------------------------------------------------------------------------------------------

_SYLLABLES = (
    "get",
    "set",
    "buf",
    "len",
    "data",
    "node",
    "ptr",
    "val",
    "item",
    "list",
    "map",
    "key",
    "idx",
    "count",
    "size",
    "name",
    "path",
    "file",
    "read",
    "write",
    "init",
    "free",
    "alloc",
    "parse",
    "next",
    "prev",
    "head",
    "tail",
    "cfg",
    "ctx",
    "err",
    "msg",
    "src",
    "dst",
    "tmp",
    "res",
    "out",
    "in",
    "num",
    "str",
    "obj",
    "mgr",
    "handle",
    "event",
    "queue",
    "lock",
    "state",
    "table",
    "entry",
    "block",
    "chunk",
    "hash",
    "cache",
    "page",
    "flag",
    "mode",
    "type",
    "id",
    "ref",
)
_TYPES = (
    "int",
    "void",
    "char*",
    "size_t",
    "uint32_t",
    "int64_t",
    "bool",
    "double",
    "auto",
    "const",
    "std::string&",
    "std::vector<int>",
)
_TEMPLATES = (
    "{a} = {b}({c}, {d});",
    "if ({a} == {b}) {{",
    "}}",
    "}}",
    "return {a};",
    "for (int i = 0; i < {a}; ++i) {{",
    "{t} {a} = {b}->{c};",
    "{a}.{b}({c});",
    "// {a} {b} {c}: {d}",
    '#include "{a}.h"',
    "}} else {{",
    "while ({a} != nullptr) {{",
    "{a} += {b}[{c}];",
    "static {t} {a}({t} {b}, {t} {c});",
    "break;",
    "if (!{a}) return {b};",
    "{a}->{b} = {c};",
    "self.{a} = {b}",
    "def {a}(self, {b}, {c}={d}):",
    'raise ValueError(f"{a}: {{{b}}}")',
    "{a} = [{b} for {c} in {d}]",
    "",
    "",
    "assert {a} is not None",
    "case {A}: return {b}({c});",
    "#define {A} {n}",
    "{a}[{n}] = {b};",
    'printf("{a}=%d\\n", {b});',
)
_EXTENSIONS = (".c", ".h", ".cpp", ".hpp", ".py", ".py", ".txt", ".cmake", ".inc", ".cc")
_SCRIPT_EXTENSIONS = (".sh", ".py")
_TOP_DIRS = ("src", "include", "python", "tests", "docs", "tools", "cmake", "examples")

# Text model: modules of pre-generated lines; a file samples lines of one module.  The knobs give
# zlib-6 ratios around 4x, typical of real source code.
_MODULES = 200
_MODULE_LINES = 1000
_MODULE_VOCAB = 120
_TEXT_MEDIAN = 7 * 1024
_TEXT_SIGMA = 1.1
_TEXT_MIN = 48
_TEXT_MAX = 1 * MIB
_AVG_LINE = 28

# Binary model: segments of "machine code" (opcode snippets followed by skewed operand bytes: many short
# LZ matches, which is what makes zlib slow on real code), "data" (runs of recurring byte snippets),
# pointer tables, random bytes (compressed sections, keys), strings and zero padding.  Tuned so that
# zlib-6 gets ~2.4x at ~45 MB/s per core with Xor32 chunks of ~4.2 MiB on average; real shared
# libraries (libLLVM-15, libclang-cpp-14, librustc_driver) measured 2.3-3.4x at 31-43 MB/s per core
# with 4.9-6.2 MiB chunks.
_BIN_FRACTIONS = (
    ("code", 0.62),
    ("data", 0.10),
    ("table", 0.12),
    ("random", 0.04),
    ("strings", 0.06),
    ("zeros", 0.06),
)
_BIN_SNIPPETS = 1024
_BIN_BLOCK = 8 * MIB


@dataclass(frozen=True)
class TreeSpec:
    size_gib: float
    seed: int = DEFAULT_SEED

    @property
    def key(self) -> str:
        return f"v{GEN_VERSION}-{self.size_gib:g}gib-seed{self.seed}"

    @property
    def total_bytes(self) -> int:
        return int(self.size_gib * GIB)

    @property
    def n_text(self) -> int:
        return max(100, round(20_000 * self.size_gib))

    @property
    def n_dirs(self) -> int:
        return max(12, round(400 * self.size_gib))

    @property
    def n_binaries(self) -> int:
        return 3 if self.size_gib < 0.5 else 4 if self.size_gib < 0.9 else 5


@dataclass
class TreeInfo:
    """What was generated (also the cache's completion marker)."""

    key: str
    root: str
    total_bytes: int = 0  # bytes of regular-file content (each inode once)
    text_files: int = 0
    text_bytes: int = 0
    binaries: int = 0
    binary_bytes: int = 0
    binary_sizes: list[int] = field(default_factory=list)
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0  # extra names of files already counted
    executables: int = 0
    generate_seconds: float = 0.0


def _ident(rng: np.random.Generator) -> str:
    parts = [_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), int(rng.integers(1, 4)))]
    style = int(rng.integers(0, 3))
    if style == 0:
        return "_".join(parts)
    if style == 1:
        return parts[0] + "".join(p.title() for p in parts[1:])
    return "".join(p.title() for p in parts)


def _build_modules(rng: np.random.Generator) -> list[list[bytes]]:
    idents = sorted({_ident(rng) for _ in range(6000)})
    modules: list[list[bytes]] = []
    for _ in range(_MODULES):
        vocab = [idents[i] for i in rng.choice(len(idents), _MODULE_VOCAB, replace=False)]
        lines: list[bytes] = []
        tmpl = rng.integers(0, len(_TEMPLATES), _MODULE_LINES)
        words = rng.integers(0, len(vocab), (_MODULE_LINES, 4))
        types = rng.integers(0, len(_TYPES), _MODULE_LINES)
        nums = rng.integers(0, 4096, _MODULE_LINES)
        indents = rng.integers(0, 4, _MODULE_LINES)
        for k in range(_MODULE_LINES):
            a, b, c, d = (vocab[w] for w in words[k])
            text = _TEMPLATES[tmpl[k]].format(a=a, b=b, c=c, d=d, A=a.upper(), t=_TYPES[types[k]], n=nums[k])
            lines.append(("    " * int(indents[k]) + text + "\n").encode())
        modules.append(lines)
    return modules


def _text_content(rng: np.random.Generator, module: list[bytes], size: int, shebang: bytes = b"") -> bytes:
    nlines = size // _AVG_LINE + 4
    idx = rng.integers(0, len(module), nlines)
    data = shebang + b"".join([module[i] for i in idx])
    while len(data) < size:  # short lines drew: top up
        data += b"".join([module[i] for i in rng.integers(0, len(module), nlines)])
    return data[: size - 1] + b"\n"


class _BinaryMaker:
    """Partly compressible binary content, generated block by block with numpy."""

    def __init__(self, rng: np.random.Generator, strings: bytes) -> None:
        self.rng = rng
        # Skewed byte distribution (opcodes and small immediates dominate), permuted over the alphabet.
        p = 0.5 ** (np.arange(256) / 10.0)
        p /= p.sum()
        table = np.minimum(np.searchsorted(np.cumsum(p), (np.arange(65536) + 0.5) / 65536), 255)
        self.byte_table = rng.permutation(256).astype(np.uint8)[table]
        self.snip_len = rng.integers(3, 20, _BIN_SNIPPETS)
        self.snip_start = np.concatenate([[0], np.cumsum(self.snip_len)[:-1]])
        # 8 spare bytes at the end: an opcode (up to 8 bytes) may run past a short snippet into the next.
        self.snippets = self._skewed(int(self.snip_len.sum()) + 8)
        self.strings = np.frombuffer(strings, dtype=np.uint8)
        names = [n for n, _ in _BIN_FRACTIONS]
        self.kinds = names
        self.cum = np.cumsum([f for _, f in _BIN_FRACTIONS])

    def _pick_snippets(self, k: int) -> npt.NDArray[np.int64]:
        """``k`` snippet ids, low ids much more popular (like common opcodes)."""
        rng = self.rng
        return (rng.integers(0, _BIN_SNIPPETS, k) * rng.random(k)).astype(np.int64)

    def _skewed(self, n: int) -> npt.NDArray[np.uint8]:
        return self.byte_table[self.rng.integers(0, 65536, n, dtype=np.uint16)]

    def _code(self, n: int) -> npt.NDArray[np.uint8]:
        """Instructions: an opcode snippet (3-8 bytes) then 0-2 operand bytes."""
        rng = self.rng
        k = n // 4 + 16
        ids = self._pick_snippets(k)
        op_len = 3 + self.snip_len[ids] % 6  # 3..8 bytes from the snippet's start
        lens = op_len + rng.integers(0, 3, k)
        out = self._skewed(int(lens.sum()))
        dst = np.repeat(np.cumsum(lens) - lens, op_len)
        within = np.arange(int(op_len.sum())) - np.repeat(np.cumsum(op_len) - op_len, op_len)
        out[dst + within] = self.snippets[np.repeat(self.snip_start[ids], op_len) + within]
        return out[:n] if out.shape[0] >= n else np.resize(out, n)

    def _data(self, n: int) -> npt.NDArray[np.uint8]:
        """Back-to-back recurring snippets (3-19 bytes)."""
        ids = self._pick_snippets(n // 8 + 16)
        lens = self.snip_len[ids]
        total = int(lens.sum())
        offsets = np.repeat(self.snip_start[ids] - (np.cumsum(lens) - lens), lens) + np.arange(total)
        out = self.snippets[offsets]
        return out[:n] if total >= n else np.resize(out, n)

    def block(self, n: int) -> bytes:
        rng = self.rng
        out = np.empty(n, dtype=np.uint8)
        pos = 0
        while pos < n:
            seg = min(n - pos, int(rng.integers(1024, 32768)))
            kind = self.kinds[int(np.searchsorted(self.cum, rng.random() * self.cum[-1], side="right"))]
            o = out[pos : pos + seg]
            if kind == "random":
                o[:] = np.frombuffer(rng.bytes(seg), dtype=np.uint8)
            elif kind == "code":
                o[:] = self._code(seg)
            elif kind == "data":
                o[:] = self._data(seg)
            elif kind == "table":
                base = int(rng.integers(0, 1 << 40))
                vals = (base + np.cumsum(rng.integers(0, 256, seg // 8 + 1))).astype("<u8")
                o[:] = vals.view(np.uint8)[:seg]
            elif kind == "strings":
                start = int(rng.integers(0, max(1, len(self.strings) - seg)))
                o[:] = np.resize(self.strings[start : start + seg], seg)
            else:
                o[:] = 0
            pos += seg
        return out.tobytes()


def _unique_name(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        i += 1
        stem, dot, ext = base.partition(".")
        name = f"{stem}_{i}{dot}{ext}"
    taken.add(name)
    return name


def generate_tree(spec: TreeSpec, root: Path) -> TreeInfo:
    """Write the tree for ``spec`` under ``root`` (which must not exist). Deterministic for a spec."""
    started = time.monotonic()
    seqs = np.random.SeedSequence([spec.seed, GEN_VERSION]).spawn(4)
    rng_layout, rng_text, rng_model, rng_bin_seed = (np.random.default_rng(s) for s in seqs)
    info = TreeInfo(key=spec.key, root=str(root))
    root.mkdir(parents=True)

    # Directories: a random tree, at most 7 levels deep, under a few conventional top-level names.
    dirs: list[str] = [""]
    depth = {"": 0}
    children: dict[str, set[str]] = {"": set()}
    for name in _TOP_DIRS:
        dirs.append(name)
        depth[name] = 1
        children[""].add(name)
        children[name] = set()
    while len(dirs) < spec.n_dirs:
        parent = dirs[int(rng_layout.integers(1, len(dirs)))]
        if depth[parent] >= 7:
            continue
        name = _unique_name(children[parent], _ident(rng_layout).lower())
        rel = f"{parent}/{name}"
        dirs.append(rel)
        depth[rel] = depth[parent] + 1
        children[rel] = set()
    for rel in dirs[1:]:
        (root / rel).mkdir()
    info.directories = len(dirs) - 1

    # Small text files, log-normal sizes, each directory drawing on one "module" of code lines.
    modules = _build_modules(rng_model)
    sizes = np.exp(rng_text.normal(np.log(_TEXT_MEDIAN), _TEXT_SIGMA, spec.n_text))
    sizes = np.clip(sizes, _TEXT_MIN, _TEXT_MAX).astype(np.int64)
    dir_of = rng_text.integers(1, len(dirs), spec.n_text)
    is_script = rng_text.random(spec.n_text) < 0.03
    files: list[str] = []
    for i in range(spec.n_text):
        parent = dirs[int(dir_of[i])]
        module = modules[(int(dir_of[i]) * 7 + int(rng_text.integers(0, 3))) % _MODULES]
        if is_script[i]:
            ext = _SCRIPT_EXTENSIONS[int(rng_text.integers(0, len(_SCRIPT_EXTENSIONS)))]
            shebang = b"#!/bin/sh\n" if ext == ".sh" else b"#!/usr/bin/env python3\n"
        else:
            ext = _EXTENSIONS[int(rng_text.integers(0, len(_EXTENSIONS)))]
            shebang = b""
        name = _unique_name(children[parent], _ident(rng_text) + ext)
        rel = f"{parent}/{name}"
        data = _text_content(rng_text, module, int(sizes[i]), shebang)
        path = root / rel
        path.write_bytes(data)
        if is_script[i]:
            path.chmod(0o755)
            info.executables += 1
        files.append(rel)
        info.text_files += 1
        info.text_bytes += len(data)

    # Big binaries: the rest of the size budget, in lib/ (shared libraries) and bin/ (executables).
    for top in ("lib", "bin"):
        (root / top).mkdir()
        children[""].add(top)
        children[top] = set()
        info.directories += 1
    budget = max(spec.total_bytes - info.text_bytes, spec.n_binaries * MIB)
    weights = rng_layout.uniform(0.8, 1.2, spec.n_binaries)
    bin_sizes = [int(w) for w in np.floor(weights / weights.sum() * budget)]
    strings = b"".join(modules[0][:2000])
    for j, (size, bin_seed) in enumerate(zip(bin_sizes, rng_bin_seed.spawn(spec.n_binaries), strict=True)):
        maker = _BinaryMaker(bin_seed, strings)
        base = _ident(rng_layout).lower().replace("_", "")
        if j % 2 == 0:
            base = _unique_name(children["lib"], f"lib{base}.so").removesuffix(".so")
            children["lib"].add(f"{base}.so.{j + 1}.0.0")
            rel, mode = f"lib/{base}.so.{j + 1}.0.0", 0o755
        else:
            rel, mode = f"bin/{_unique_name(children['bin'], base)}", 0o755
        with open(root / rel, "wb") as f:
            left = size
            while left:
                n = min(left, _BIN_BLOCK)
                f.write(maker.block(n))
                left -= n
        (root / rel).chmod(mode)
        if rel.startswith("lib/"):
            os.symlink(Path(rel).name, root / f"lib/{base}.so")
            info.symlinks += 1
        info.binaries += 1
        info.binary_bytes += size
        info.binary_sizes.append(size)
        info.executables += 1

    # Symlinks (relative, to files elsewhere in the tree) and a few hard links.
    n_links = max(5, spec.n_text // 100)
    for _ in range(n_links):
        target = files[int(rng_layout.integers(0, len(files)))]
        parent = dirs[int(rng_layout.integers(1, len(dirs)))]
        name = _unique_name(children[parent], "link_" + target.rsplit("/", 1)[1])
        os.symlink(os.path.relpath(target, parent or "."), root / parent / name)
        info.symlinks += 1
    n_hard = max(3, round(10 * spec.size_gib))
    for _ in range(n_hard):
        target = files[int(rng_layout.integers(0, len(files)))]
        parent = dirs[int(rng_layout.integers(1, len(dirs)))]
        name = _unique_name(children[parent], "hl_" + target.rsplit("/", 1)[1])
        os.link(root / target, root / parent / name)
        info.hardlinks += 1

    # Fixed timestamps: the same spec gives byte-identical catalogs apart from publish times.
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
    info.total_bytes = info.text_bytes + info.binary_bytes
    info.generate_seconds = time.monotonic() - started
    return info


def ensure_tree(spec: TreeSpec, workdir: Path) -> tuple[TreeInfo, bool]:
    """The generated tree for ``spec``, from the cache if complete. Returns (info, reused)."""
    root = workdir / f"tree-{spec.key}"
    marker = workdir / f"tree-{spec.key}.json"
    if marker.is_file() and root.is_dir():
        return TreeInfo(**json.loads(marker.read_text())), True
    marker.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    info = generate_tree(spec, root)
    marker.write_text(json.dumps(asdict(info), indent=2))  # written last: marks the cache complete
    return info, False


BINARY_DIRS = ("lib", "bin")  # where generate_tree puts the big binaries
KINDS = ("small-files", "binaries")


def kind_subtree(info: TreeInfo, kind: str, workdir: Path) -> Path:
    """A hard-linked copy of one part of the tree: the small files (everything outside lib/ and bin/)
    or the binaries (lib/ and bin/). Cached next to the tree; costs no data blocks."""
    root = Path(info.root)
    dest = workdir / f"tree-{info.key}-{kind}"
    marker = workdir / f"tree-{info.key}-{kind}.done"
    if marker.is_file() and dest.is_dir():
        return dest
    marker.unlink(missing_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for top in sorted(os.listdir(root)):
        if (top in BINARY_DIRS) != (kind == "binaries"):
            continue
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel = Path(dirpath).relative_to(root)
            (dest / rel).mkdir(exist_ok=True)
            for name in dirnames + filenames:
                src = Path(dirpath) / name
                if src.is_symlink():
                    os.symlink(os.readlink(src), dest / rel / name)
                elif src.is_file():
                    os.link(src, dest / rel / name)
        for dirpath, _dirnames, _filenames in os.walk(dest / top):
            os.utime(dirpath, (FIXED_MTIME, FIXED_MTIME))
    os.utime(dest, (FIXED_MTIME, FIXED_MTIME))
    marker.touch()
    return dest


# --------------------------------------------------------------------------------------------------
# Reading the tree, warm cache, raw limit
# --------------------------------------------------------------------------------------------------


def content_files(root: Path) -> list[tuple[Path, int]]:
    """Regular files in walk order, each inode once (hard links are ingested once too)."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            out.append((p, st.st_size))
    return out


def warm_cache(files: list[tuple[Path, int]]) -> tuple[float, int]:
    """Read every file once so timed phases run against the page cache. Returns (seconds, bytes)."""
    started = time.monotonic()
    total = 0
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    for path, _size in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.monotonic() - started, total


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Accumulates CPU time used by *other* processes (or stolen by the hypervisor) during timed sections.

    The benchmark's figures are only meaningful on an otherwise idle machine; this makes a busy one
    visible: ``cpus`` is the average number of CPUs something else kept busy while we measured.
    """

    def __init__(self) -> None:
        self.wall = 0.0
        self.other = 0.0
        self._start: tuple[float, float | None, float] | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _machine_busy_seconds(), _own_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        t0, busy0, own0 = self._start
        busy1 = _machine_busy_seconds()
        self.wall += time.perf_counter() - t0
        if busy0 is not None and busy1 is not None:
            self.other += max(0.0, (busy1 - busy0) - (_own_cpu() - own0))

    @property
    def cpus(self) -> float:
        return self.other / self.wall if self.wall else 0.0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; OSError if it is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _pieces(files: list[tuple[Path, int]]) -> Iterator[tuple[Path, int, int]]:
    """(path, offset, length): whole small files, ~8 MiB pieces of files the writer would chunk."""
    for path, size in files:
        if size <= WHOLE_FILE_LIMIT:
            yield path, 0, size
        else:
            for off in range(0, size, RAW_PIECE):
                yield path, off, min(RAW_PIECE, size - off)


def _batches(files: list[tuple[Path, int]]) -> Iterator[list[tuple[Path, int, int]]]:
    batch: list[tuple[Path, int, int]] = []
    held = 0
    for piece in _pieces(files):
        batch.append(piece)
        held += piece[2]
        if held >= RAW_BATCH:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _codec() -> str:
    """The writer's compressor, as the raw limit uses it."""
    from rcds.cvmfs import objects

    ng = getattr(objects, "ZLIB_NG", False)  # an rcds from before zlib-ng has only zlib
    return f"{'zlib-ng' if ng else 'zlib'}-{objects.ZLIB_LEVEL}"


def _compress_and_name(data: bytes) -> tuple[int, float]:
    """What the writer does to every new piece: its compressor, then SHA-1 of the compressed bytes."""
    from rcds.cvmfs.objects import compress  # the writer's own: zlib-ng 5 when installed, else zlib 6

    t0 = time.thread_time()
    stored, _name = compress(data)  # the SHA-1 of the compressed bytes is the object's name
    return len(stored), time.thread_time() - t0


def raw_limit(files: list[tuple[Path, int]], workers: int) -> dict[str, Any]:
    """zlib-6 + SHA-1 of all content on ``workers`` threads; only the compute is timed (data in memory)."""
    wall = 0.0
    cpu = 0.0
    bytes_in = 0
    bytes_out = 0
    pieces = 0
    load = OtherLoad()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in _batches(files):
            datas: list[bytes] = []
            for path, off, length in batch:
                with open(path, "rb") as f:
                    f.seek(off)
                    datas.append(f.read(length))
            datas.sort(key=len, reverse=True)  # longest first: less idle time at the end of a batch
            t0 = time.perf_counter()
            with load:
                results = list(pool.map(_compress_and_name, datas))
            wall += time.perf_counter() - t0
            bytes_in += sum(len(d) for d in datas)
            bytes_out += sum(r[0] for r in results)
            cpu += sum(r[1] for r in results)
            pieces += len(datas)
            del datas
    return {
        "workers": workers,
        "pieces": pieces,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "compression_ratio": bytes_in / bytes_out if bytes_out else 0.0,
        "seconds": wall,
        "mb_per_s": bytes_in / MB / wall if wall else 0.0,
        "cpu_seconds": cpu,
        "single_core_mb_per_s": bytes_in / MB / cpu if cpu else 0.0,
        "parallel_efficiency": cpu / (wall * workers) if wall else 0.0,
        "other_load_cpus": load.cpus,
    }


# --------------------------------------------------------------------------------------------------
# Ingest phases (each in a child process)
# --------------------------------------------------------------------------------------------------


def _maxrss_mib(kib: int) -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return kib / (MIB if sys.platform == "darwin" else 1024)


def _vm_hwm_mib(pid: int | str = "self") -> float | None:
    """Peak RSS of a process's own address space (``VmHWM``; Linux; this one by default), or None if
    unavailable.

    Preferred over ``ru_maxrss``: on Linux exec() carries the pre-exec high-water mark into
    ``ru_maxrss``, and subprocess starts children with vfork, so a child's ``ru_maxrss`` (and the
    parent's ``wait4`` figure) is at least the *parent's* peak RSS.  ``VmHWM`` starts afresh at exec.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed_sync(store: Any) -> Callable[[], float]:
    """Wrap ``store.sync`` (syncfs at commit) to measure its time; returns a getter of the total."""
    original = store.sync
    total = [0.0]

    def sync() -> None:
        t0 = time.perf_counter()
        try:
            original()
        finally:
            total[0] += time.perf_counter() - t0

    store.sync = sync
    return lambda: total[0]


def phase_main(phase: str, storage: Path, tree: Path, result_file: Path) -> None:
    """Child process body: one timed ingest phase; writes its figures as JSON to ``result_file``."""
    from rcds.cvmfs.repository import Repository

    try:
        from rcds.cvmfs import smallfiles
    except ImportError:  # an rcds from before the worker processes
        smallfiles = None
    rss_after_import = _vm_hwm_mib()
    target = TREE1 if phase == "first" else TREE2
    # Creating the repository (its keys: ~0.3 s) is not ingesting: timed, reported, not counted.
    created = time.perf_counter()
    repo = Repository.create(FQRN, storage) if phase == "first" else Repository(storage)
    t0 = time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sync_seconds = _timed_sync(repo.store)
    t1 = time.perf_counter()
    with repo.transaction() as txn:
        t2 = time.perf_counter()
        txn.mkdir("/sw", nested=True)
        t3 = time.perf_counter()
        entries = txn.add_directory(target, tree)
        t4 = time.perf_counter()
        result = txn.commit()
        t5 = time.perf_counter()
    t6 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # The small-file worker processes (rcds.cvmfs.smallfiles): their memory, then their CPU once ended.
    workers_rss = 0.0
    if smallfiles is not None:
        workers_rss = sum(_vm_hwm_mib(pid) or 0.0 for pid in smallfiles.POOL.pids())
        smallfiles.POOL.stop()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (children.ru_utime + children.ru_stime) - (children0.ru_utime + children0.ru_stime)
    out = {
        "phase": phase,
        "path": target,
        "entries": entries,
        "revision": result.revision,
        "catalogs_written": result.catalogs_written,
        "stats": asdict(result.stats),
        "seconds": t6 - t0,
        "breakdown_seconds": {
            "create_or_open": t0 - created,
            "begin_transaction": t2 - t1,
            "mkdir": t3 - t2,
            "add_directory": t4 - t3,
            "commit": t5 - t4,
            "commit_sync": sync_seconds(),
            "close": t6 - t5,
        },
        # CPU of the timed section only (all threads; interpreter start-up and imports excluded).
        "cpu_user_seconds": usage.ru_utime - usage0.ru_utime,
        "cpu_system_seconds": usage.ru_stime - usage0.ru_stime,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime + workers_cpu,
        "workers_cpu_seconds": workers_cpu,
        "peak_rss_mib": (_vm_hwm_mib() or _maxrss_mib(usage.ru_maxrss)) + workers_rss,
        "workers_peak_rss_mib": workers_rss,
        "rss_after_import_mib": rss_after_import,
        "ru_maxrss_mib": _maxrss_mib(usage.ru_maxrss),
    }
    result_file.write_text(json.dumps(out))


def run_phase(phase: str, storage: Path, tree: Path, workdir: Path) -> dict[str, Any]:
    """Run one ingest phase in a fresh interpreter; add the kernel's view of its peak RSS and CPU."""
    result_file = workdir / f"phase-{phase}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--phase",
        phase,
        "--storage",
        str(storage),
        "--tree",
        str(tree),
        "--result-file",
        str(result_file),
    ]
    started = time.perf_counter()
    with OtherLoad() as load:
        proc = subprocess.Popen(cmd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase!r} failed with exit code {proc.returncode}")
    out: dict[str, Any] = json.loads(result_file.read_text())
    result_file.unlink()
    out["process_seconds"] = wall
    out["wait4_maxrss_mib"] = _maxrss_mib(usage.ru_maxrss)  # inflated by the parent's peak: see _vm_hwm_mib
    out["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime  # including start-up and imports
    out["other_load_cpus"] = load.cpus
    return out


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_filesystem(where: Path, size_bytes: int) -> Iterator[Path]:
    """A new ext4 file system on a sparse loop image under ``where``, mounted; removed afterwards."""
    image, mount = where / "fs.img", where / "fs"
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        image.unlink()


def can_make_filesystems() -> bool:
    """Root with mkfs.ext4: each run can write to a fresh file system (``fresh_filesystem``)."""
    return os.geteuid() == 0 and shutil.which("mkfs.ext4") is not None


@contextlib.contextmanager
def _storage_area(workdir: Path, fresh: bool, size_bytes: int) -> Iterator[Path]:
    """Where a run's repository goes: a fresh ext4 (creating files right after many deletions costs
    several times the CPU on a long-used one, which swings a first ingest by a second), or the workdir."""
    if fresh:
        images = workdir / "ingest-fs"
        images.mkdir(parents=True, exist_ok=True)
        with fresh_filesystem(images, size_bytes) as fs:
            yield fs
    else:
        yield workdir


def measure(
    tree: Path,
    workdir: Path,
    workers: int,
    repeat: int,
    keep: bool,
    say: Callable[[str], None],
    fresh_fs: bool = False,
) -> dict[str, Any]:
    """Raw limit, first ingest and re-publish of ``tree``, ``repeat`` times; the fastest run of each."""
    files = content_files(tree)
    image_bytes = 2 * sum(size for _path, size in files) + (1 << 30)
    raws: list[dict[str, Any]] = []
    firsts: list[dict[str, Any]] = []
    agains: list[dict[str, Any]] = []
    for run in range(1, repeat + 1):
        tag = f"run {run}/{repeat}: " if repeat > 1 else ""
        warm_cache(files)
        say(f"{tag}raw limit on {workers} threads")
        raws.append(raw_limit(files, workers))
        say(f"{tag}raw limit {raws[-1]['mb_per_s']:.1f} MB/s ({raws[-1]['seconds']:.2f} s); first ingest")
        with _storage_area(workdir, fresh_fs, image_bytes) as area:
            storage = area / "repo"
            if storage.exists():
                shutil.rmtree(storage)
            warm_cache(files)
            firsts.append(run_phase("first", storage, tree, workdir))
            say(f"{tag}first ingest {firsts[-1]['seconds']:.2f} s; re-publish")
            warm_cache(files)
            agains.append(run_phase("republish", storage, tree, workdir))
            say(f"{tag}re-publish {agains[-1]['seconds']:.2f} s")
            if not keep and not fresh_fs:
                shutil.rmtree(storage)
    raw = min(raws, key=lambda r: r["seconds"])
    first = min(firsts, key=lambda r: r["seconds"])
    again = min(agains, key=lambda r: r["seconds"])
    bytes_in = first["stats"]["bytes_in"]
    bytes_written = first["stats"]["bytes_written"]
    first["mb_per_s"] = bytes_in / MB / first["seconds"]
    first["ratio_to_raw"] = first["mb_per_s"] / raw["mb_per_s"] if raw["mb_per_s"] else 0.0
    first["cpu_ratio_to_raw"] = raw["cpu_seconds"] / first["cpu_seconds"] if first["cpu_seconds"] else 0.0
    first["compression_ratio"] = bytes_in / bytes_written if bytes_written else 0.0
    again["mb_per_s"] = again["stats"]["bytes_in"] / MB / again["seconds"]
    again["speedup"] = first["seconds"] / again["seconds"]
    return {
        "raw_limit": raw,
        "first_ingest": first,
        "republish": again,
        "runs": {
            "raw_limit_seconds": [r["seconds"] for r in raws],
            "first_ingest_seconds": [r["seconds"] for r in firsts],
            "republish_seconds": [r["seconds"] for r in agains],
            "other_load_cpus": [[r["other_load_cpus"] for r in runs] for runs in (raws, firsts, agains)],
        },
    }


def _rcds_version() -> dict[str, Any]:
    """Which rcds was measured: package version and location, and the git commit if it is a checkout."""
    import rcds

    package = Path(rcds.__file__).resolve().parent
    out: dict[str, Any] = {"version": getattr(rcds, "__version__", "unknown"), "path": str(package)}
    checkout = package.parent.parent  # <checkout>/src/rcds
    try:
        git = ["git", "-C", str(checkout)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout
        out["src_modified"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=1.0, help="approximate tree size (default 1.0)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/rcds-bench"),
        help="generated tree cache, repository and result (default /tmp/rcds-bench)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark repository afterwards")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every phase N times and report the fastest run of each (default 1); "
        "useful on a machine that is not idle",
    )
    parser.add_argument(
        "--by-kind",
        action="store_true",
        help="also measure the small files and the binaries on their own (hard-linked sub-trees)",
    )
    parser.add_argument(
        "--small-files",
        action="store_true",
        help="measure only the small files (the tree outside lib/ and bin/, a hard-linked sub-tree); "
        f"target ingest/raw >= {TARGET_RATIO_SMALL_FILES}",
    )
    parser.add_argument(
        "--no-fresh-fs",
        action="store_true",
        help="write the repositories into --workdir even as root (by default, where root can make file "
        "systems, each run writes to a fresh loop-mounted ext4)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("first", "republish"), help=argparse.SUPPRESS)
    parser.add_argument("--storage", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        phase_main(args.phase, args.storage, args.tree, args.result_file)
        return 0
    if args.size_gib <= 0:
        parser.error("--size-gib must be positive")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 2
    spec = TreeSpec(args.size_gib, args.seed)

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    say(f"tree {spec.key} in {workdir}")
    info, reused = ensure_tree(spec, workdir)
    tree = Path(info.root)
    say(
        f"tree {'reused' if reused else f'generated in {info.generate_seconds:.1f} s'}: "
        f"{info.text_files} text files, {info.binaries} binaries, {_fmt_bytes(info.total_bytes)}"
    )
    target_ratio, target_speedup = TARGET_RATIO, TARGET_SPEEDUP
    if args.small_files:
        tree = kind_subtree(info, "small-files", workdir)
        # A re-publish of small files still reads and hashes every file; the 5x is the whole tree's,
        # where the index spares the deflate of the binaries.
        target_ratio, target_speedup = TARGET_RATIO_SMALL_FILES, None
        say(f"small files only ({tree.name})")

    files = content_files(tree)
    warm_s, warm_bytes = warm_cache(files)
    say(f"warm read {_fmt_bytes(warm_bytes)} in {warm_s:.2f} s")
    fresh_fs = can_make_filesystems() and not args.keep and not args.no_fresh_fs
    say("each run's repository on a fresh ext4" if fresh_fs else f"repositories in {workdir}")
    measured = measure(tree, workdir, workers, args.repeat, args.keep, say, fresh_fs)
    raw, first, again = measured["raw_limit"], measured["first_ingest"], measured["republish"]
    by_kind: dict[str, dict[str, Any]] = {}
    if args.by_kind and not args.small_files:
        for kind in KINDS:
            sub = kind_subtree(info, kind, workdir)
            say(f"{kind} only ({sub.name})")
            by_kind[kind] = measure(sub, workdir, workers, args.repeat, False, say, fresh_fs)

    bytes_written = first["stats"]["bytes_written"]
    first_mbps, again_mbps = first["mb_per_s"], again["mb_per_s"]
    ratio, cpu_ratio, speedup = first["ratio_to_raw"], first["cpu_ratio_to_raw"], again["speedup"]
    parts = [measured, *by_kind.values()]
    other_load = max(
        m[p]["other_load_cpus"] for m in parts for p in ("raw_limit", "first_ingest", "republish")
    )
    peak_rss = max(first["peak_rss_mib"], again["peak_rss_mib"])
    result: dict[str, Any] = {
        "benchmark": "rcds-ingest",
        "tree": {**asdict(info), "reused_from_cache": reused, "bytes_read_warm": warm_bytes},
        "rcds": _rcds_version(),
        "repeat": args.repeat,
        "small_files_only": args.small_files,
        "fresh_filesystems": fresh_fs,
        "machine": {
            "cpus": workers,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "codec": _codec(),
        },
        "warm_read_seconds": warm_s,
        **measured,
        "by_kind": by_kind,
        "summary": {
            "size_bytes": info.total_bytes,
            "files": first["stats"]["files"],
            "raw_limit_mb_per_s": raw["mb_per_s"],
            "ingest_seconds": first["seconds"],
            "ingest_mb_per_s": first_mbps,
            "ingest_to_raw_ratio": ratio,
            "ingest_to_raw_cpu_ratio": cpu_ratio,
            "republish_seconds": again["seconds"],
            "republish_speedup": speedup,
            "peak_rss_mib_first": first["peak_rss_mib"],
            "peak_rss_mib_republish": again["peak_rss_mib"],
            "objects_written": first["stats"]["objects_written"],
            "bytes_written": bytes_written,
            "compression_ratio": first["compression_ratio"],
            "max_other_load_cpus": other_load,
            "targets_met": {
                f"ratio>={target_ratio:g}": ratio >= target_ratio,
                **(
                    {}
                    if target_speedup is None
                    else {f"speedup>={target_speedup:g}": speedup >= target_speedup}
                ),
                "rss<300MiB": peak_rss < TARGET_RSS_MIB,
            },
        },
    }

    def row(name: str, seconds: float, mbps: float, rel: str, cpu: float, rss: str, other: float) -> str:
        return f"{name:<14}{seconds:>9.2f}{mbps:>9.1f}{rel:>10}{cpu:>8.1f}{rss:>10}{other:>8.2f}"

    fb, fr = first["breakdown_seconds"], again["breakdown_seconds"]
    ok = {True: "ok", False: "MISSED"}
    fs, rs = first["stats"], again["stats"]
    what = (
        f"{_fmt_bytes(fs['bytes_in'])} in {fs['files']} files (small files only: the tree outside lib/ and bin/)"
        if args.small_files
        else f"{_fmt_bytes(info.total_bytes)} in {fs['files']} files "
        f"({info.text_files} text, {info.binaries} binaries), {info.directories} dirs, "
        f"{info.symlinks} symlinks, {info.hardlinks} hard links"
    )
    lines = [
        f"rcds ingest benchmark: {what}; {workers} CPUs; warm page cache"
        + (f"; fastest of {args.repeat} runs" if args.repeat > 1 else ""),
        f"{'phase':<14}{'seconds':>9}{'MB/s':>9}{'vs raw':>10}{'CPU s':>8}{'RSS MiB':>10}{'other':>8}",
        row(
            "raw limit",
            raw["seconds"],
            raw["mb_per_s"],
            "1.00",
            raw["cpu_seconds"],
            "-",
            raw["other_load_cpus"],
        ),
        row(
            "first ingest",
            first["seconds"],
            first_mbps,
            f"{ratio:.2f}",
            first["cpu_seconds"],
            f"{first['peak_rss_mib']:.0f}",
            first["other_load_cpus"],
        ),
        row(
            "re-publish",
            again["seconds"],
            again_mbps,
            f"{again_mbps / raw['mb_per_s']:.2f}",
            again["cpu_seconds"],
            f"{again['peak_rss_mib']:.0f}",
            again["other_load_cpus"],
        ),
        f"raw limit:    {_codec()} + SHA-1 on {workers} threads, {raw['pieces']} pieces, "
        f"{raw['single_core_mb_per_s']:.1f} MB/s per core, "
        f"{raw['parallel_efficiency']:.0%} parallel efficiency",
        f"first ingest: add_directory {fb['add_directory']:.2f} s, commit {fb['commit']:.2f} s "
        f"(syncfs {fb['commit_sync']:.2f} s), create {fb['create_or_open']:.2f} s; "
        f"{fs['objects_written']} objects, {_fmt_bytes(bytes_written)} written, "
        f"compression {first['compression_ratio']:.2f}x",
        f"re-publish:   add_directory {fr['add_directory']:.2f} s, commit {fr['commit']:.2f} s; "
        f"{rs['pieces_from_index']} index hits, {rs['objects_written']} objects written",
        f"CPU cost:     first ingest uses {1 / cpu_ratio if cpu_ratio else 0:.2f}x the raw limit's "
        f"CPU seconds (CPU-time ratio {cpu_ratio:.2f}); "
        "'other' = CPUs kept busy by other processes while measuring",
    ]
    for kind, m in by_kind.items():
        kr, kf, ka = m["raw_limit"], m["first_ingest"], m["republish"]
        lines.append(
            f"{kind + ':':<14}{_fmt_bytes(kr['bytes_in'])} in {kf['stats']['files']} files: raw "
            f"{kr['mb_per_s']:.1f} MB/s, first ingest {kf['mb_per_s']:.1f} MB/s = {kf['ratio_to_raw']:.2f} "
            f"of raw (CPU-time ratio {kf['cpu_ratio_to_raw']:.2f}), re-publish {ka['seconds']:.2f} s = "
            f"{ka['speedup']:.1f}x faster; peak RSS {kf['peak_rss_mib']:.0f} MiB"
        )
    lines.append(
        f"targets: ingest/raw {ratio:.2f} >= {target_ratio:g} {ok[ratio >= target_ratio]}; "
        + (
            f"re-publish speed-up {speedup:.1f}x (no target for small files alone); "
            if target_speedup is None
            else f"re-publish speed-up {speedup:.1f}x >= {target_speedup:g}x {ok[speedup >= target_speedup]}; "
        )
        + f"peak RSS {peak_rss:.0f} MiB < {TARGET_RSS_MIB:g} MiB {ok[peak_rss < TARGET_RSS_MIB]}"
    )
    if other_load > 0.2:
        lines.append(
            f"WARNING: other processes kept up to {other_load:.1f} of {workers} CPUs busy during "
            "the measurements; wall-clock figures and ratios are unreliable: "
            "re-run on an idle machine"
        )
    print("\n".join(lines))
    line = json.dumps(result, sort_keys=True)
    (workdir / "ingest-result.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
