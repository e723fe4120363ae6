#!/usr/bin/env python3
"""S3 storage benchmark: a stratum 0 whose public files are in a bucket, against the same on local disk.

In one run, against one local ``juicefs gateway`` (tests/s3server.py, started here on 127.0.0.1):

1. publish of the generated code tree (bench/ingest.py's generator and cache, ``--size-gib``, default
   1 GiB) into a fresh repository, on local disk and on S3; the figure is the throughput ratio
   S3 / local (target >= 0.5);
2. small-publish latency: ``--small`` commits of 10 new small files each, p50 and p95, local and S3
   (target: S3 p50 < 1 s);
3. a stratum 1 of the local repository (the tree and the small publishes) made by ``snapshot`` (source:
   the repository's directory, so the source costs no HTTP) into a directory and into the bucket
   (``store=``): objects stored per second, and the ratio bucket / directory;
4. GC on S3: the big tree removed, then ``collect_garbage`` with a zero horizon: objects deleted per second.

Both repositories use the writer in this process (no ``rcds serve``: the HTTP upload path is the same for
either storage). The S3 server runs on the same machine and competes for its cores with the writer's
compression: a remote S3 service would not. So its metadata engine is juicefs's ``badger`` (an embedded
key-value store; tests/s3server.py's default): per small PUT it spends about 2.5x less CPU than
``sqlite3``, which would otherwise be the server's ceiling here (``--meta sqlite3`` to compare).

    python bench/s3.py                    # 1 GiB tree (generated once into /tmp/rcds-bench)
    python bench/s3.py --size-gib 0.2     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ingest  # the tree generator and its cache
from rcds.cvmfs.gc import collect_garbage
from rcds.cvmfs.replica import snapshot
from rcds.cvmfs.repository import Repository
from s3server import run_s3_server

FQRN = "s3.bench.local"
BUCKET = "rcds-bench"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def publish_tree(repo: Repository, path: str, tree: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with repo.transaction() as txn:
        txn.add_directory(path, tree)
        txn.commit()
        written = txn.content.stats.objects_written
    return time.perf_counter() - t0, written


def small_publishes(repo: Repository, work: Path, n: int) -> list[float]:
    times = []
    for i in range(n):
        src = work / f"small-{i}"
        src.mkdir(parents=True)
        for j in range(10):
            (src / f"f{j}.py").write_text(
                f"# small publish {i} file {j} of {repo.store.description}\nX = {i * 10 + j}\n"
            )
        t0 = time.perf_counter()
        with repo.transaction() as txn:
            txn.add_directory(f"/small/{i}", src)
            txn.commit()
        times.append(time.perf_counter() - t0)
    return times


def replicate_figures(
    result: dict[str, Any], source: Repository, work: Path, endpoint: str, jobs: int
) -> None:
    """A stratum 1 of ``source`` into a directory, then into the bucket: objects stored per second."""
    bucket = {"url": f"s3://{BUCKET}/s1/{FQRN}", "endpoint": endpoint}
    result["replicate_jobs"] = jobs
    for name, storage, store in (("dir", work / "s1-dir", None), ("s3", work / "s1-state", bucket)):
        t0 = time.perf_counter()
        report = snapshot(
            str(source.storage), storage, public_keys=[source.public_key_path], jobs=jobs, store=store
        )
        seconds = time.perf_counter() - t0
        result[f"replicate_{name}_s"] = round(seconds, 2)
        result[f"replicate_{name}_objects_per_s"] = round(report.objects_fetched / seconds, 1)
        result["replicate_objects"] = report.objects_fetched
        say(f"stratum 1 into {name}: {report.objects_fetched} objects in {seconds:.1f} s")
    result["replicate_ratio_s3_to_dir"] = round(result["replicate_dir_s"] / result["replicate_s3_s"], 3)
    result["replicate_s3_share_of_server"] = round(
        result["replicate_s3_objects_per_s"] / result["server_put_per_s"], 2
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 1.0002: the 1 GiB tree bench/get.py caches in /tmp/rcds-bench (reused when present)
    parser.add_argument("--size-gib", type=float, default=1.0002)
    parser.add_argument("--small", type=int, default=20, help="small publishes per storage (default 20)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    parser.add_argument(
        "--peek", action="store_true", help="S3: a HEAD before each PUT (peek_before_put; off by default)"
    )
    parser.add_argument("--jobs", type=int, default=8, help="stratum 1: snapshot(jobs=...) (default 8)")
    parser.add_argument(
        "--meta", choices=("badger", "sqlite3"), default="badger", help="the S3 server's metadata engine"
    )
    parser.add_argument("--parallelism", type=int, help="S3: puts in flight (default: S3Settings')")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    info, reused = ingest.ensure_tree(ingest.TreeSpec(args.size_gib), args.workdir)
    tree = args.workdir / f"tree-{ingest.TreeSpec(args.size_gib).key}"
    say(f"tree {tree} ({'cached' if reused else 'generated'}): {info.total_bytes / 2**30:.2f} GiB")
    ingest.warm_cache(ingest.content_files(tree))
    result: dict[str, Any] = {
        "size_gib": round(info.total_bytes / 2**30, 3),
        "cores": os.cpu_count(),
        "server_meta": args.meta,
    }
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="s3bench-") as tmp:
        work = Path(tmp)
        with run_s3_server(work / "s3server", meta=args.meta) as server:
            server.create_bucket(BUCKET)
            os.environ.update(server.env())
            store = {"url": f"s3://{BUCKET}/{FQRN}", "endpoint": server.endpoint}
            if args.parallelism:
                store["parallelism"] = args.parallelism
                result["parallelism"] = args.parallelism
            store["peek_before_put"] = result["peek_before_put"] = args.peek
            local = Repository.create(FQRN, work / "local")
            remote = Repository.create(FQRN, work / "s3state", store=store)

            # The server's own ceiling on this machine now: bare PUTs of small objects, 16 in flight.
            probe = remote.store
            keys = [f"ceiling/{i:05d}" for i in range(2000)]
            with ThreadPoolExecutor(16) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda k: probe.put(k, b"x" * 4096), keys))
                result["server_put_per_s"] = round(len(keys) / (time.perf_counter() - t0), 1)
            probe.delete_many(keys)
            say(f"s3 server: {result['server_put_per_s']} bare 4 KiB PUT/s")

            for name, repo in (("local", local), ("s3", remote)):
                cpu_before = time.process_time(), ingest.process_cpu(server.process.pid)
                seconds, objects = publish_tree(repo, "/tree", tree)
                # CPU seconds of this process (writer and client) and of the S3 server: on 2 cores their
                # sum, not the network, is what bounds the publish
                result[f"tree_{name}_cpu_s"] = round(time.process_time() - cpu_before[0], 1)
                result[f"tree_{name}_server_cpu_s"] = round(
                    ingest.process_cpu(server.process.pid) - cpu_before[1], 1
                )
                result[f"tree_{name}_s"] = round(seconds, 2)
                result[f"tree_{name}_mib_per_s"] = round(info.total_bytes / 2**20 / seconds, 1)
                result["tree_objects"] = objects
                say(f"{name}: tree in {seconds:.1f} s ({objects} objects)")
            result["tree_ratio_s3_to_local"] = round(result["tree_local_s"] / result["tree_s3_s"], 3)
            # objects written per second on S3 against the bare PUT rate: how much of the server rcds uses
            result["tree_s3_objects_per_s"] = round(result["tree_objects"] / result["tree_s3_s"], 1)
            result["tree_s3_share_of_server"] = round(
                result["tree_s3_objects_per_s"] / result["server_put_per_s"], 2
            )

            for name, repo in (("local", local), ("s3", remote)):
                times = small_publishes(repo, work / f"small-{name}", args.small)
                result[f"small_{name}_p50_s"] = round(statistics.median(times), 3)
                result[f"small_{name}_p95_s"] = round(pct(times, 0.95), 3)
                say(f"{name}: small publish p50 {statistics.median(times):.3f} s")

            replicate_figures(result, local, work, server.endpoint, args.jobs)

            with remote.transaction() as txn:
                txn.remove("/tree")
                txn.commit()
            with remote.transaction() as txn:  # moves trunk-previous (a kept tag) past the removal
                txn.add_directory("/after-removal", work / "small-s3" / "small-0")
                txn.commit()
            t0 = time.perf_counter()
            # commit timestamps never repeat, so a burst of commits runs ahead of the clock: collect "later"
            report = collect_garbage(remote, horizon=0, now=time.time() + 3600)
            seconds = time.perf_counter() - t0
            deleted = report.objects_swept + report.catalogs_swept + report.aux_swept
            result["gc_s3_deleted"] = deleted
            result["gc_s3_s"] = round(seconds, 2)
            result["gc_s3_objects_per_s"] = round(deleted / seconds, 1)
            say(f"s3: GC deleted {deleted} objects in {seconds:.1f} s")
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, shared with other work"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
