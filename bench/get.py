#!/usr/bin/env python3
"""Benchmark of ``rcds get`` (``rcds.client.materialize``) against ``cp -r``, all figures from one run.

1. generates (or reuses) the code-like tree of ``bench/ingest.py`` at about ``--size-mb`` MB: thousands of
   small, compressible source files of log-normal sizes (up to 1 MiB), symlinks, hard links and a few big,
   partly compressible binaries (instruction-like bytes, random bytes, zero padding);
2. publishes it once with the repository core (default CVMFS chunking: 4/8/16 MiB) at
   ``/sw/bench/<cid>``, cached in ``--workdir`` for the next run;
3. serves the repository with ``rcds.web.repo_http`` in a subprocess on 127.0.0.1 (real HTTP, sendfile);
4. measures side by side: ``cp -r tree copy`` on the same disk (before and after the gets), a *cold* get (empty node cache: every
   object downloaded, verified, inflated) and a *warm* get (same node cache, new DEST: hard links only),
   plus a warm get with ``link=False`` (copies from the cache). Each get includes opening the repository
   (manifest, certificate, whitelist, catalogs into a fresh reader cache), as a new job on a node would.

ratio = cp seconds / get seconds (> 1: faster than cp), from the fastest run of each step.
Targets: warm >= 1.0, cold >= 0.3. ``--via-httpx`` adds a cold get with every request through httpx instead of http.client.
The page cache is not dropped (that needs root): the tree and the repository objects are read once before
the timed steps, and ``sync`` runs (untimed) before each step so that one step's dirty pages are not
written back during the next. ``--profile`` runs one more cold get under cProfile, every thread included.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench
from rcds.client.materialize import MaterializeStats, materialize
from rcds.cvmfs import sources as sources_module
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository

MB = 1_000_000
FQRN = "get.bench.local"
CID = "/sw/bench/" + "0123456789abcdef" * 4
REPO_VERSION = 1  # bump when the way the repository is built changes: part of its cache key
TARGET_WARM = 1.0
TARGET_COLD = 0.3


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_repo(tree: Path, key: str, workdir: Path) -> Path:
    """The tree published at CID in a repository of its own, built once and cached."""
    storage = workdir / f"get-repo-v{REPO_VERSION}-{key}"
    marker = storage.with_name(storage.name + ".done")
    if marker.is_file() and storage.is_dir():
        return storage
    marker.unlink(missing_ok=True)
    if storage.exists():
        shutil.rmtree(storage)
    t0 = time.monotonic()
    repo = Repository.create(FQRN, storage)
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir("/sw/bench", nested=True)
        txn.add_directory(CID, tree)
        txn.commit()
    marker.touch()
    say(f"published the tree in {time.monotonic() - t0:.1f} s")
    return storage


class RepoServer:
    """repo_http in its own process (its own GIL), as a stratum 0/1 would be."""

    def __init__(self, storage: Path) -> None:
        code = (
            "import sys; from pathlib import Path; from rcds.web.repo_http import run; "
            "run({sys.argv[1]: Path(sys.argv[2])}, port=0, print_fn=lambda s: print(s, flush=True))"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, FQRN, str(storage)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError(f"repository server did not start: {self.url!r}")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (Linux /proc)."""
        try:
            return ingest_bench.process_cpu(self.proc.pid)
        except OSError:
            return 0.0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def read_all(root: Path) -> int:
    """Read every file once (page cache warm for cp and for the server's sendfile)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb", buffering=0) as f:
                    while chunk := f.read(8 << 20):
                        total += len(chunk)
    return total


def timed(fn: Callable[[], Any], server: RepoServer) -> dict[str, Any]:
    """Wall seconds, CPU seconds of this process and children, of the server, and of everything else
    running on the machine meanwhile (``other_load_cpus``); ``sync`` runs before the clock starts."""
    os.sync()
    load = ingest_bench.OtherLoad()
    srv0, cpu0 = server.cpu_seconds(), ingest_bench._own_cpu()
    with load:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    srv = server.cpu_seconds() - srv0
    return {
        "seconds": seconds,
        "result": result,
        "cpu_seconds": ingest_bench._own_cpu() - cpu0,
        "server_cpu_seconds": srv,
        "other_load_cpus": max(0.0, load.cpus - srv / seconds),
    }


def profiled(fn: Callable[[], Any]) -> str:
    """Run ``fn`` with cProfile (CPU time) in this thread and in every thread it starts; the merged top
    functions. CPU rather than wall time: the worker threads mostly wait, the cores are what is scarce."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start(*_args: object) -> None:
        p = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(p)
        p.enable()

    main = cProfile.Profile(time.thread_time)
    threading.setprofile(start)
    main.enable()
    try:
        fn()
    finally:
        main.disable()
        threading.setprofile(None)
        for p in profiles:
            p.disable()
    out = io.StringIO()
    stats = pstats.Stats(main, stream=out)
    for p in profiles:
        stats.add(p)
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=500.0, help="approximate tree size (default 500)")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/rcds-bench"), help="tree and repository caches, scratch"
    )
    parser.add_argument("--jobs", type=int, default=8, help="parallel downloads of materialize (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="run each step N times, report the fastest")
    parser.add_argument("--profile", action="store_true", help="also profile one cold get (cProfile)")
    parser.add_argument(
        "--via-httpx",
        action="store_true",
        help="also measure a cold get with every request through httpx instead of http.client, for comparison",
    )
    parser.add_argument("--seed", type=int, default=ingest_bench.DEFAULT_SEED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.repeat < 1 or args.jobs < 1:
        parser.error("--size-mb, --repeat and --jobs must be positive")

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = ingest_bench.TreeSpec(round(args.size_mb * MB / ingest_bench.GIB, 4), args.seed)
    info, reused = ingest_bench.ensure_tree(spec, workdir)
    tree = Path(info.root)
    say(f"tree {tree.name} {'reused' if reused else 'generated'}: {info.total_bytes / MB:.0f} MB")
    storage = ensure_repo(tree, spec.key, workdir)
    key = Repository(storage).public_key_path
    scratch = workdir / "get-scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    read_all(tree)
    read_all(storage / "data")

    server = RepoServer(storage)
    say(f"serving {server.url}")
    runs: dict[str, list[dict[str, Any]]] = {"cp": [], "cold": [], "warm": [], "warm_copy": []}
    if args.via_httpx:
        runs["cold_httpx"] = []
    counter = iter(range(1_000_000))

    def get(cache: Path, link: bool = True) -> MaterializeStats:
        n = next(counter)
        with RepositoryReader.open(server.url, key, fqrn=FQRN, cache_dir=scratch / f"reader{n}") as reader:
            return materialize(
                reader, CID, scratch / f"dest{n}", cache_dir=cache, jobs=args.jobs, link=link, progress=False
            )

    def record(step: str, m: dict[str, Any]) -> None:
        stats = m.pop("result")
        if isinstance(stats, MaterializeStats):
            m["stats"] = stats.__dict__.copy()
        runs[step].append(m)
        say(f"{step}: {m['seconds']:.2f} s, other load {m['other_load_cpus']:.2f} CPUs")

    def cp(copy: Path) -> None:
        subprocess.run(["cp", "-r", str(tree), str(copy)], check=True)

    def never(url: str) -> bool:
        return False

    try:
        for i in range(args.repeat):
            record("cp", timed(partial(cp, scratch / f"cp{i}"), server))
            shutil.rmtree(scratch / f"cp{i}")
            cache = scratch / f"cache{i}"
            record("cold", timed(partial(get, cache), server))
            record("warm", timed(partial(get, cache), server))
            assert runs["warm"][-1]["stats"]["downloaded_bytes"] == 0
            record("warm_copy", timed(partial(get, cache, link=False), server))
            if args.via_httpx:
                usable = sources_module._PlainHttp.usable
                sources_module._PlainHttp.usable = staticmethod(never)  # type: ignore[method-assign]
                try:  # every object through httpx
                    record("cold_httpx", timed(partial(get, scratch / f"cache-httpx{i}"), server))
                finally:
                    sources_module._PlainHttp.usable = usable  # type: ignore[method-assign]
            # cp once more, after the gets: its time varies with the state of the disk
            record("cp", timed(partial(cp, scratch / f"cp{i}-again"), server))
            shutil.rmtree(scratch / f"cp{i}-again")
            for p in scratch.iterdir():  # keep the disk usage of --repeat flat
                if p.name.startswith(("dest", "reader", "cache")):
                    shutil.rmtree(p)
        profile = profiled(lambda: get(scratch / "cache-profile")) if args.profile else None
    finally:
        server.close()
        shutil.rmtree(scratch, ignore_errors=True)

    best = {step: min(rows, key=lambda r: r["seconds"]) for step, rows in runs.items()}
    stats0 = MaterializeStats(**best["cold"]["stats"])
    size = stats0.bytes
    cp_s = best["cp"]["seconds"]
    ratios = {step: cp_s / best[step]["seconds"] for step in best}
    print(
        f"rcds get benchmark: {size / MB:.0f} MB in {stats0.files} files, {stats0.directories} dirs, "
        f"{stats0.symlinks} symlinks; {stats0.downloaded_bytes / MB:.0f} MB served compressed; "
        f"jobs {args.jobs}; {os.cpu_count()} CPUs; warm page cache"
    )
    print(f"{'step':<22}{'seconds':>9}{'MB/s':>9}{'vs cp':>8}{'CPU s':>8}{'server':>8}{'other':>7}")
    labels = {
        "cp": "cp -r",
        "cold": "get, cold cache",
        "warm": "get, warm cache",
        "warm_copy": "get, warm, link=False",
        "cold_httpx": "get, cold, via httpx",
    }
    for step, label in labels.items():
        if step not in best:
            continue
        b = best[step]
        print(
            f"{label:<22}{b['seconds']:>9.2f}{size / MB / b['seconds']:>9.0f}{ratios[step]:>8.2f}"
            f"{b['cpu_seconds']:>8.1f}{b['server_cpu_seconds']:>8.1f}{b['other_load_cpus']:>7.2f}"
        )
    ok_warm, ok_cold = ratios["warm"] >= TARGET_WARM, ratios["cold"] >= TARGET_COLD
    print(
        f"targets: warm/cp {ratios['warm']:.2f} >= {TARGET_WARM} {'ok' if ok_warm else 'MISSED'}; "
        f"cold/cp {ratios['cold']:.2f} >= {TARGET_COLD} {'ok' if ok_cold else 'MISSED'}"
    )
    if max(b["other_load_cpus"] for b in best.values()) > 0.2:
        print("warning: other processes kept more than 0.2 CPUs busy during a measurement (see 'other')")
    if profile:
        print(profile)
    result = {
        "benchmark": "rcds-get",
        "tree": {"key": spec.key, "bytes": size, "files": stats0.files, "directories": stats0.directories},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
        },
        "jobs": args.jobs,
        "runs": runs,
        "summary": {
            "cp_seconds": cp_s,
            **{f"{step}_seconds": best[step]["seconds"] for step in best if step != "cp"},
            **{f"{step}_to_cp_ratio": ratios[step] for step in best if step != "cp"},
            "downloaded_bytes": stats0.downloaded_bytes,
            "targets_met": ok_warm and ok_cold,
        },
    }
    (workdir / "get-result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
