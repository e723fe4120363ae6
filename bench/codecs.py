#!/usr/bin/env python3
"""Deflate and inflate: stock zlib against the zlib-ng and ISA-L bindings, on the ingest benchmark's tree.

For each codec and level: the stored size (ratio = bytes in / bytes stored) and the CPU seconds of one
thread to deflate, then the CPU seconds to inflate those same objects with each inflater. Text files and
binaries are reported apart (they compress very differently). CPU time of one thread (``thread_time``),
not wall time, so that other load on the machine moves the figures less; every measurement is repeated
``--repeat`` times and the fastest kept, and the stock zlib row is measured in the same run, so the
``x zlib`` columns are side-by-side ratios.

    python bench/codecs.py                     # 48 MiB of each kind from the 1 GiB tree of ingest.py
    python bench/codecs.py --sample-mib 16     # quicker

Codecs that are not installed are skipped with a message. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # the tree generator and its piece layout

MIB = 1 << 20
MB = 1_000_000

Compress = Callable[[bytes, int], bytes]
Decompress = Callable[[bytes], bytes]


def _codecs() -> dict[str, tuple[Compress, Decompress, list[int]]]:
    found: dict[str, tuple[Compress, Decompress, list[int]]] = {
        "zlib": (zlib.compress, zlib.decompress, [1, 6, 9]),
    }
    try:
        from zlib_ng import zlib_ng

        found["zlib-ng"] = (zlib_ng.compress, zlib_ng.decompress, [1, 2, 4, 5, 6, 9])
    except ImportError:
        print("zlib-ng is not installed (pip install zlib-ng): skipped", file=sys.stderr)
    try:
        from isal import isal_zlib

        found["isal"] = (isal_zlib.compress, isal_zlib.decompress, [0, 1, 2, 3])
    except ImportError:
        print("isal is not installed (pip install isal): skipped", file=sys.stderr)
    return found


def sample(files: list[tuple[Path, int]], budget: int) -> list[bytes]:
    """Every k-th piece (the writer's layout: whole files <= 4 MiB, 8 MiB pieces) up to ``budget`` bytes."""
    pieces = list(ingest._pieces(files))
    step = max(1, round(sum(p[2] for p in pieces) / budget))
    out: list[bytes] = []
    taken = 0
    for path, off, length in pieces[::step]:
        with open(path, "rb") as f:
            f.seek(off)
            out.append(f.read(length))
        taken += length
        if taken >= budget:
            break
    return out


def cpu(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best = float("inf")
    result: Any = None
    for _ in range(repeat):
        t0 = time.thread_time()
        result = fn()
        best = min(best, time.thread_time() - t0)
    return best, result


def measure(datas: list[bytes], repeat: int) -> list[dict[str, Any]]:
    codecs = _codecs()
    size = sum(len(d) for d in datas)
    rows: list[dict[str, Any]] = []
    for name, (comp, _decomp, levels) in codecs.items():
        for level in levels:
            seconds, stored = cpu(lambda c=comp, lv=level: [c(d, lv) for d in datas], repeat)
            row: dict[str, Any] = {
                "codec": name,
                "level": level,
                "bytes_in": size,
                "bytes_stored": sum(len(s) for s in stored),
                "deflate_cpu_s": seconds,
            }
            for iname, (_c, decomp, _l) in codecs.items():
                isec, out = cpu(lambda dc=decomp, st=stored: [dc(s) for s in st], repeat)
                assert out == datas, f"{iname} did not inflate {name} {level} back"
                row[f"inflate_{iname}_cpu_s"] = isec
            # any client inflates these with stock zlib: checked here for every codec and level
            assert [zlib.decompress(s) for s in stored] == datas
            rows.append(row)
    return rows


def report(kind: str, rows: list[dict[str, Any]]) -> None:
    base = next(r for r in rows if r["codec"] == "zlib" and r["level"] == 6)
    inflaters = [k[len("inflate_") : -len("_cpu_s")] for k in base if k.startswith("inflate_")]
    mb = base["bytes_in"] / MB
    print(f"\n{kind}: {mb:.1f} MB in, one thread, CPU seconds (best of the repeats)")
    head = f"{'codec':<8} {'lvl':>3} {'ratio':>6} {'size':>7} {'deflate MB/s':>12} {'x zlib6':>7}"
    head += "".join(f" {'inflate ' + i:>15} {'x':>5}" for i in inflaters)
    print(head)
    for r in rows:
        line = f"{r['codec']:<8} {r['level']:>3} {r['bytes_in'] / r['bytes_stored']:>6.2f}"
        line += f" {r['bytes_stored'] / base['bytes_stored']:>7.3f}"
        line += f" {mb / r['deflate_cpu_s']:>12.1f} {base['deflate_cpu_s'] / r['deflate_cpu_s']:>7.2f}"
        for i in inflaters:
            s = r[f"inflate_{i}_cpu_s"]
            line += f" {mb / s:>15.0f} {base['inflate_zlib_cpu_s'] / s:>5.2f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--size-gib", type=float, default=1.0, help="tree of ingest.py to sample (default 1.0)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    parser.add_argument("--sample-mib", type=float, default=48, help="bytes of each kind to measure")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    spec = ingest.TreeSpec(args.size_gib)
    info, _ = ingest.ensure_tree(spec, args.workdir)
    files = ingest.content_files(info.root)
    text = [(p, s) for p, s in files if s <= ingest.WHOLE_FILE_LIMIT]
    binaries = [(p, s) for p, s in files if s > ingest.WHOLE_FILE_LIMIT]
    budget = int(args.sample_mib * MIB)
    result: dict[str, Any] = {"benchmark": "rcds-codecs", "zlib_version": zlib.ZLIB_RUNTIME_VERSION}
    print(f"zlib {zlib.ZLIB_RUNTIME_VERSION}; {os.cpu_count()} CPUs; sample {args.sample_mib} MiB per kind")
    # Catalogs: the uncompressed copies that the benchmarks' repositories keep (``.rcds/catalogs/``),
    # the larger ones (small catalogs are one or two SQLite pages), each distinct one once.
    catalogs: dict[bytes, None] = {}
    for path in sorted(args.workdir.glob("**/.rcds/catalogs/*")):
        if path.stat().st_size > 100_000 and sum(map(len, catalogs)) < budget:
            catalogs.setdefault(path.read_bytes())
    kinds = [("text", sample(text, budget)), ("binaries", sample(binaries, budget))]
    if catalogs:
        kinds.append(("catalogs", list(catalogs)))
    else:
        print("no catalogs over 100 kB under the workdir (run bench/get.py or publish.py first): skipped")
    for kind, datas in kinds:
        rows = measure(datas, args.repeat)
        report(kind, rows)
        result[kind] = rows
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
